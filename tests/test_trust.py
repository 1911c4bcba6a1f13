"""What this proves (issue 23: a run a user can trust with a week of GPUs), on a very small
model and the built-in synthetic data, CPU only (run: python -m pytest tests/test_trust.py):
- nothing saved is lost: a second run on a used --out_dir is refused with a message naming the
  first (its pid), and a lock left by a killed run is taken over; --resume=never in a used
  --out_dir is refused and changes nothing; a junk ckpt_0009999.pt neither counts toward --keep
  nor gets the new checkpoint deleted, and the warning names the file and what is wrong;
  Ctrl-C (SIGINT) and SIGHUP to the process group save and exit 0, a second Ctrl-C exits at once;
- the run's writes never follow a planted symbolic link (ckpt_N.pt.tmp, config.json.tmp) and a
  link where log.jsonl or config.json belongs is refused; a 1 x 250,000 image is never resized
  to 224 x 56 million pixels in evaluation;
- optimizer flags that would train on something else (--grad_clip=-1, --min_lr_ratio=-3,
  --lr=nan, --stop_grace=0, ...) are one-line errors before any work;
- eval.py refuses non-finite weights and --tau 0, negative, nan or inf; templates '{{}}' and
  '{}{}', a single class, Unicode-normalised folder names and a .cls of -1 are handled.
"""
import importlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch
from PIL import Image

import checkpoint
import eval as llip_eval
import eval_data
import images
import run_dir
from test_faults import FAST
from test_train import ROOT, SMALL, synthetic, train  # noqa: F401

ZERO_WORKERS = ['--workers=0']


@pytest.fixture(scope='module')
def trained(tmp_path_factory, synthetic):
    """An --out_dir after a 2-step run that saved at steps 1 and 2 (copied by each test)."""
    out = str(tmp_path_factory.mktemp('trained'))
    train(out, synthetic, '--steps=2', '--save_every=1', *ZERO_WORKERS)
    return out


def copy_of(trained, tmp_path):
    out = str(tmp_path / 'run')
    shutil.copytree(trained, out)
    return out


def wait_for_log(out, proc, timeout=120):
    path, end = os.path.join(out, 'log.jsonl'), time.time() + timeout
    while not (os.path.exists(path) and os.path.getsize(path) > 0):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < end, 'no log line'
        time.sleep(0.05)


# ---------------------------------------------------------------- 1. one run per out_dir
def test_a_second_run_on_an_out_dir_in_use_is_refused_and_a_killed_runs_lock_is_stale(tmp_path,
                                                                                    synthetic):
    out = str(tmp_path / 'run')
    first = train(out, synthetic, '--steps=100000', '--save_every=100000', *ZERO_WORKERS,
                  popen=True)
    try:
        wait_for_log(out, first)
        second = train(out, synthetic, '--steps=2', '--seed=1', *ZERO_WORKERS, check=False)
        last = second.stderr.strip().splitlines()[-1]
        assert second.returncode == 1 and 'in use by another run' in last, second.stderr[-2000:]
        assert f'pid {first.pid} ' in last and 'Traceback' not in second.stderr
        assert first.poll() is None, 'the first run must go on'
    finally:
        first.kill()   # as kill -9: the lock file is left behind, its lock is not
        first.communicate(timeout=30)
    third = train(out, synthetic, '--steps=2', *ZERO_WORKERS)
    assert 'left by a run that has ended' in third.stderr and f'pid {first.pid} ' in third.stderr
    assert checkpoint.load(os.path.join(out, 'ckpt.pt'))['step'] == 2
    with open(os.path.join(out, run_dir.LOCK)) as f:
        assert f.read() == '', 'a clean exit leaves the lock file empty'


def test_out_dir_that_is_a_file_is_a_one_line_error(tmp_path, synthetic, monkeypatch):
    path = tmp_path / 'file'
    path.write_text('not a folder')
    with pytest.raises(run_dir.RunDirError, match='is a file, not a folder'):
        run_dir.claim(str(path))


# ---------------------------------------------------------------- 2. --resume=never
def test_resume_never_in_a_used_out_dir_is_refused_and_changes_nothing(trained, tmp_path,
                                                                       synthetic):
    out = copy_of(trained, tmp_path)
    before = {name: open(os.path.join(out, name), 'rb').read() for name in os.listdir(out)}
    result = train(out, synthetic, '--steps=2', '--seed=1', '--resume=never', *ZERO_WORKERS,
                   check=False)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and 'step 2' in last, result.stderr[-2000:]
    assert '--resume=auto' in last and 'another --out_dir' in last
    after = {name: open(os.path.join(out, name), 'rb').read() for name in os.listdir(out)}
    assert after == before


# ---------------------------------------------------------------- 3. --keep
def tiny_state(step):
    return {'model': {'w': torch.full((3,), float(step))}, 'step': step}


def test_junk_checkpoint_files_do_not_count_toward_keep_and_are_named(tmp_path, capsys):
    out = str(tmp_path)
    junk = os.path.join(out, 'ckpt_0009999.pt')
    with open(junk, 'w') as f:
        f.write('junk\n')
    truncated = os.path.join(out, 'ckpt_0000001.pt')
    for step in (2, 4, 6):
        checkpoint.save(tiny_state(step), out, keep=2)
        if step == 2:   # a cut-off copy of a real checkpoint, older than the new ones
            data = open(checkpoint.path_of(out, 2), 'rb').read()
            with open(truncated, 'wb') as f:
                f.write(data[:len(data) // 2])
    names = sorted(n for n in os.listdir(out) if n.startswith('ckpt_'))
    assert names == ['ckpt_0000001.pt', 'ckpt_0000004.pt', 'ckpt_0000006.pt', 'ckpt_0009999.pt']
    err = capsys.readouterr().err
    assert f'{junk} is not counted toward --keep' in err and 'not the zip file' in err, err
    assert f'{truncated} is not counted' in err and err.count(junk) == 1, 'warned once per file'
    assert torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['step'] == 6
    with pytest.raises(checkpoint.CheckpointError, match='not a checkpoint: 5 bytes'):
        checkpoint.load(junk)


def test_keep_1_with_a_junk_high_numbered_file_keeps_the_new_checkpoint(tmp_path, synthetic):
    out = str(tmp_path / 'run')
    os.makedirs(out)
    with open(os.path.join(out, 'ckpt_0009999.pt'), 'w') as f:
        f.write('junk\n')
    result = train(out, synthetic, '--steps=2', '--save_every=1', '--keep=1', *ZERO_WORKERS)
    assert 'KeyError' not in result.stderr and 'not a checkpoint' in result.stderr
    assert sorted(n for n in os.listdir(out) if n.startswith('ckpt_')) == [
        'ckpt_0000002.pt', 'ckpt_0009999.pt']


# ---------------------------------------------------------------- 4, 5. signals
@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGHUP])
def test_ctrl_c_and_sighup_to_the_group_save_and_exit_0(tmp_path, synthetic, sig):
    out = str(tmp_path / 'run')
    cmd = [sys.executable, os.path.join(ROOT, 'train.py'), f'--out_dir={out}',
           f'--synthetic_dir={synthetic}', *FAST, '--steps=100000', '--save_every=100000']
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, process_group=0, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    wait_for_log(out, proc)
    os.killpg(proc.pid, sig)   # a terminal sends Ctrl-C to the trainer and its workers
    output = proc.communicate(timeout=60)[0]
    name = 'Ctrl-C' if sig == signal.SIGINT else 'SIGHUP'
    assert proc.returncode == 0 and f'{name}: saved a checkpoint' in output, output[-3000:]
    assert checkpoint.load(os.path.join(out, 'ckpt.pt'))['step'] >= 1


SECOND_CTRL_C = '''
import os, signal, time
from checkpoint import Preemption
with Preemption(grace=60) as p:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.5)
    assert p.requested and p.name == 'Ctrl-C', (p.requested, p.name)
    print('first heard', flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)   # as a step that does not end: the second Ctrl-C must not wait for it
'''


def test_a_second_ctrl_c_exits_at_once(tmp_path):
    start = time.time()
    result = subprocess.run([sys.executable, '-c', SECOND_CTRL_C], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 130, result.stdout + result.stderr
    assert 'first heard' in result.stdout and 'Ctrl-C again' in result.stderr
    assert time.time() - start < 25


BAD_NUMBERS = ['--stop_grace=0', '--stop_grace=-1', '--stop_grace=nan', '--grad_clip=-1',
               '--min_lr_ratio=-3', '--min_lr_ratio=2', '--lr=nan', '--lr=0', '--lr=-1e-3',
               '--lr=inf', '--eps=0', '--beta1=1', '--beta1=-0.1', '--beta2=1.5',
               '--weight_decay=-0.1']


@pytest.mark.parametrize('flag', BAD_NUMBERS)
def test_optimizer_and_signal_flags_out_of_range_are_one_line_errors(flag):
    train_py = importlib.import_module('train')
    args = train_py.parser.parse_args([flag])
    with pytest.raises(SystemExit) as stop:
        train_py.check_flags(args)
    message = str(stop.value.code)
    assert message.startswith(f'error: {flag.split("=")[0]}=') and 'must be' in message, message


# ---------------------------------------------------------------- 6. symlinks
def test_a_planted_tmp_link_is_never_followed(tmp_path):
    out, victim = tmp_path / 'run', tmp_path / 'victim'
    out.mkdir()
    victim.write_text('precious')
    os.symlink(victim, out / 'ckpt_0000004.pt.tmp')
    os.symlink(victim, out / 'ckpt.pt.tmp')
    checkpoint.save(tiny_state(4), str(out), keep=3)
    assert victim.read_text() == 'precious'
    for name in ('ckpt_0000004.pt', 'ckpt.pt'):
        assert not os.path.islink(out / name) and not os.path.samefile(out / name, victim)
    assert checkpoint.load(str(out / 'ckpt.pt'))['step'] == 4
    os.symlink(victim, out / 'log.jsonl.tmp')
    run_dir.write_atomic(str(out / 'log.jsonl'), lambda f: f.write('{}\n'), binary=False)
    assert victim.read_text() == 'precious' and not os.path.islink(out / 'log.jsonl')


@pytest.mark.parametrize('name', ['log.jsonl', 'config.json'])
def test_a_link_where_a_run_file_belongs_is_refused(tmp_path, synthetic, name):
    out, victim = tmp_path / 'run', tmp_path / 'victim'
    out.mkdir()
    victim.write_text('precious')
    os.symlink(victim, out / name)
    result = train(str(out), synthetic, '--steps=1', *ZERO_WORKERS, check=False)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and 'symbolic link' in last and name in last, result.stderr
    assert victim.read_text() == 'precious'


# ---------------------------------------------------------------- 7. thin images
def test_a_thin_image_is_never_resized_whole(monkeypatch):
    resize = Image.Image.resize

    def bounded(self, size, *a, **k):
        assert size[0] * size[1] <= images.MAX_PIXELS, f'resize to {size}'
        return resize(self, size, *a, **k)
    monkeypatch.setattr(Image.Image, 'resize', bounded)
    for size in [(1, 250_000), (1_000_000, 1)]:
        x = images.eval_transform(224)(Image.new('RGB', size, (200, 10, 10)))
        assert x.shape == (3, 224, 224)
        expected = images.to_tensor(Image.new('RGB', (1, 1), (200, 10, 10)))
        torch.testing.assert_close(x[:, 100, 100], expected[:, 0, 0], atol=1e-5, rtol=0)
    normal = Image.new('RGB', (300, 200), (1, 2, 3))   # an ordinary image: the usual path
    assert images.eval_transform(32)(normal).shape == (3, 32, 32)


# ---------------------------------------------------------------- 9-11. evaluation
@pytest.mark.parametrize('tau', ['0', '-1', 'nan', 'inf'])
def test_eval_refuses_a_bad_tau(tau, capsys):
    with pytest.raises(SystemExit):
        llip_eval.main(['--ckpt=x.pt', '--task=synthetic', '--data=x', '--tau', '1', tau])
    assert 'must be a finite number > 0' in capsys.readouterr().err


def test_eval_refuses_non_finite_weights(trained, tmp_path):
    state = checkpoint.load(os.path.join(trained, 'ckpt.pt'))
    name = next(iter(state['model']))
    state['model'][name] = torch.full_like(state['model'][name], float('nan'))
    path = str(tmp_path / 'nan.pt')
    torch.save(state, path)   # no sha256: as a hand-made file
    with pytest.raises(SystemExit, match=f'non-finite weights in 1 tensors \\({name}'):
        llip_eval.main([f'--ckpt={path}', '--task=synthetic', '--data=x', '--device=cpu'])


def test_templates_must_insert_the_class_name_once(tmp_path):
    for folder in ('cat', 'dog'):
        (tmp_path / folder).mkdir()
    for templates in (['a photo of a {{}}.'], ['{}{}'], ['a {c}'], ['a {'], ['ok {}', '{0}']):
        (tmp_path / 'templates.json').write_text(json.dumps(templates))
        with pytest.raises(ValueError, match="'{}' once"):
            llip_eval.class_names_and_templates(str(tmp_path))
    (tmp_path / 'templates.json').write_text(json.dumps(['a photo of a {}.', '{{literal}} {}']))
    assert llip_eval.class_names_and_templates(str(tmp_path))[0] == ['cat', 'dog']


def clip_benchmark_root(root, names, labels):
    """ROOT/classnames.txt and ROOT/test/0.tar with one 8 x 8 PNG per label."""
    os.makedirs(root / 'test')
    (root / 'classnames.txt').write_text('\n'.join(names) + '\n')
    with tarfile.open(root / 'test' / '0.tar', 'w') as tar:
        for i, label in enumerate(labels):
            png = io.BytesIO()
            Image.new('RGB', (8, 8), (i * 40 % 256, 0, 0)).save(png, 'PNG')
            for ext, payload in (('png', png.getvalue()), ('cls', str(label).encode())):
                info = tarfile.TarInfo(f'{i:04d}.{ext}')
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_one_class_is_an_error_in_train_and_eval(tmp_path):
    clip_benchmark_root(tmp_path / 'one', ['cat'], [0, 0])
    with pytest.raises(ValueError, match='at least 2'):
        llip_eval.class_names_and_templates(str(tmp_path / 'one'))
    train_py = importlib.import_module('train')
    args = train_py.parser.parse_args([f'--zeroshot_data={tmp_path / "one"}', '--data=x.tar'])
    with pytest.raises(SystemExit, match='^error: --zeroshot_data=.*at least 2'):
        llip_eval.training_plan(args)
    two = tmp_path / 'two'
    clip_benchmark_root(two, ['cat', 'dog', 'bird', 'fish'], [0, 1, 2, 3])
    args = train_py.parser.parse_args([f'--zeroshot_data={two}', '--data=x.tar'])
    assert '4 classes' in llip_eval.training_plan(args).summary


def test_a_cls_of_minus_one_is_skipped_and_counted(tmp_path):
    root = tmp_path / 'bench'
    clip_benchmark_root(root, ['cat', 'dog'], [0, -1, 1])
    shards = eval_data.clip_benchmark_layout(root)[0]
    items = list(eval_data.LabelledShards(shards, images.eval_transform(8), 2))
    skipped = [x for x in items if isinstance(x, str)]
    assert len(items) == 3 and len(skipped) == 1 and 'class -1' in skipped[0]


def test_class_folders_match_names_across_unicode_normalisation(tmp_path):
    nfd, nfc = 'cafe\u0301', 'caf\u00e9'
    labels = eval_data.folder_labels(tmp_path, [nfd, 'tea'], [nfc, 'tea'])
    assert labels == {nfd: 0, 'tea': 1}


def test_wnid_folders_with_too_many_class_names_fail_before_step_1(tmp_path):
    for wnid in ('n01440764', 'n01443537'):
        (tmp_path / wnid).mkdir()
        Image.new('RGB', (8, 8)).save(tmp_path / wnid / 'a.png')
    train_py = importlib.import_module('train')
    args = train_py.parser.parse_args([f'--zeroshot_data={tmp_path}', '--data=x.tar',
                                       '--zeroshot_classnames=imagenet'])
    with pytest.raises(SystemExit, match='^error: --zeroshot_data: .*2 class folders but 1000'):
        llip_eval.training_plan(args)


# ---------------------------------------------------------------- 12, 15, 16
def test_an_evaluation_that_fails_mid_run_is_a_warning_and_training_goes_on(tmp_path, capsys):
    from model import PRESETS, Llip
    model = Llip(PRESETS['tiny']).train()
    plan = llip_eval.EvalPlan((str(tmp_path / 'gone'), ['cat', 'dog'], ['a {}']), None, None, '')
    assert llip_eval.evaluate_plan(model, plan, 'cpu', torch.autocast('cpu', enabled=False)) == {}
    assert 'warning: the evaluation failed, training goes on' in capsys.readouterr().err
    assert model.training


def eval_error(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        llip_eval.main(argv)
    message = stop.value.code if isinstance(stop.value.code, str) else capsys.readouterr().err
    assert 'Traceback' not in message and len(message.strip().splitlines()) == 1, message
    return message


def test_eval_checks_out_and_device_before_the_work(trained, tmp_path, monkeypatch, capsys):
    ckpt = os.path.join(trained, 'ckpt.pt')
    out = tmp_path / 'missing' / 'r.json'
    message = eval_error([f'--ckpt={ckpt}', '--task=synthetic', '--data=x', f'--out={out}'],
                         capsys)
    assert 'does not exist or is not writable' in message
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    message = eval_error([f'--ckpt={ckpt}', '--task=synthetic', '--data=x', '--device=cuda',
                          f'--out={tmp_path / "r.json"}'], capsys)
    assert '--device=cuda: no CUDA GPU' in message


@pytest.mark.parametrize('content', ['empty', 'list', 'tensor', 'truncated'])
def test_eval_official_on_a_file_that_is_not_weights_is_one_line(tmp_path, capsys, content):
    path = tmp_path / 'w.pt'
    if content == 'empty':
        path.write_bytes(b'')
    else:
        torch.save({'list': [1, 2], 'tensor': torch.ones(3),
                    'truncated': {'a': torch.ones(1000)}}[content], path)
        if content == 'truncated':
            path.write_bytes(path.read_bytes()[:500])
    message = eval_error([f'--official={path}', '--task=synthetic', '--data=x',
                          f'--out={tmp_path / "r.json"}'], capsys)
    assert "not the authors' weights" in message


def test_eval_ckpt_with_a_hand_edited_shape_is_one_line(trained, tmp_path, capsys):
    state = checkpoint.load(os.path.join(trained, 'ckpt.pt'))
    name = next(k for k, v in state['model'].items() if v.ndim == 2)
    state['model'][name] = state['model'][name][:, :1]
    path = str(tmp_path / 'edited.pt')
    torch.save(state, path)
    message = eval_error([f'--ckpt={path}', '--task=synthetic', '--data=x',
                          f'--out={tmp_path / "r.json"}'], capsys)
    assert 'do not fit its config' in message and name in message


def test_malformed_log_lines_at_resume_are_dropped_not_a_traceback(tmp_path):
    path = tmp_path / 'log.jsonl'
    path.write_bytes(b'{"step": 1}\n[1, 2]\nnull\n\xff\xfe\n{"step": "3"}\n{"step": 2}\n'
                     b'{"step": 5}\n')
    checkpoint.cut_log(str(path), 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{'step': 1},
                                                                           {'step': 2}]


def test_a_full_disk_when_writing_config_json_is_one_line(tmp_path, monkeypatch):
    def full(obj, f, **k):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(json, 'dump', full)
    with pytest.raises(SystemExit, match='cannot write .*config.json: No space left'):
        run_dir.write_json(str(tmp_path / 'config.json'), {'a': 1})
    assert os.listdir(tmp_path) == []


def test_steps_at_or_below_the_checkpoint_change_nothing(trained, tmp_path, synthetic):
    out = copy_of(trained, tmp_path)
    before = {name: open(os.path.join(out, name), 'rb').read() for name in os.listdir(out)}
    result = train(out, synthetic, '--steps=1', '--lr=5e-4', *ZERO_WORKERS)
    assert 'nothing to do: the checkpoint is at step 2 and --steps=1' in result.stdout
    after = {name: open(os.path.join(out, name), 'rb').read() for name in os.listdir(out)}
    assert after == before


# ---------------------------------------------------------------- 13, 14. data
def test_a_caption_bomb_is_skipped_and_counted_never_read(tmp_path):
    import shards
    from test_data import png, write_tar
    bomb = 'x' * (shards.MAX_TEXT_BYTES + 1)
    path = write_tar(tmp_path / 'a.tar', [('k0', {'png': png(0), 'txt': 'a cat'}),
                                          ('k1', {'png': png(1), 'txt': bomb}),
                                          ('k2', {'png': png(2), 'json': json.dumps(
                                              {'caption': bomb})})])
    with pytest.warns(shards.DataWarning, match="'caption too long': 2"):
        samples = list(shards.read_shards(path))
    assert [key for key, _, _ in samples] == ['k0']


def test_tokenizers_make_only_what_the_context_keeps(monkeypatch):
    import tokenizer
    text = "a photo of it's 12 cafés, ² and a dog   \n" * 50
    for tok in (tokenizer.ByteTokenizer(), tokenizer.ClipTokenizer()):
        full = tok.encode(text)
        for limit in (1, 7, 75):
            assert tok.encode(text, limit)[:limit] == full[:limit]
        assert torch.equal(tok([text], 77)[0, 1:76], torch.tensor(full[:75]))
    clip, words = tokenizer.ClipTokenizer(), []
    bpe = clip.bpe
    monkeypatch.setattr(clip, 'bpe', lambda word: words.append(len(word)) or bpe(word))
    clip(['x' * 100_000 + ' and more'], 77)   # one word without spaces: BPE's time grows faster
    assert words == [75 * clip.longest]         # than its length; only the part that fits


def test_a_fifo_among_the_shards_is_skipped_not_waited_on(tmp_path):
    import threading
    import shards
    from test_data import png, write_tar
    write_tar(tmp_path / 'a.tar', [('k0', {'png': png(0), 'txt': 'a cat'})])
    fifo = str(tmp_path / 'b.tar')
    os.mkfifo(fifo)
    assert shards.expand_urls(str(tmp_path)) == [str(tmp_path / 'a.tar')]
    result = []
    reader = threading.Thread(target=lambda: result.append(list(shards._shard_items(fifo))),
                              daemon=True)
    reader.start()
    reader.join(20)
    if reader.is_alive():   # before the fix: blocked in open(); a writer end lets it go
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert not reader.is_alive() and result[0][0][0] == ('unreadable shard', result[0][0][0][1])
    assert 'not a regular file' in result[0][0][0][1]


def test_a_brace_pattern_naming_too_many_files_is_refused_before_expansion():
    import shards
    with pytest.raises(ValueError, match='names 100,000,000 files'):
        shards.expand_urls('shards/{0..9999}{0..9999}.tar')


@pytest.mark.parametrize('env', [{'RANK': '1', 'WORLD_SIZE': '1'},
                                 {'RANK': '-1', 'WORLD_SIZE': '2'}, {'RANK': '0'},
                                 {'RANK': 'x', 'WORLD_SIZE': '2'},
                                 {'RANK': '0', 'WORLD_SIZE': '2', 'MASTER_ADDR': ''}])
def test_an_inconsistent_rank_environment_is_one_line(monkeypatch, env):
    train_py = importlib.import_module('train')
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')
    monkeypatch.setenv('MASTER_PORT', '29500')
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit, match=f"^error: RANK='{env['RANK']}' .*0 <= RANK < WORLD_SIZE"):
        train_py.ranks()


def test_a_directory_named_like_a_checkpoint_is_left_alone(tmp_path):
    os.mkdir(tmp_path / 'ckpt_0000001.pt')
    with pytest.raises(checkpoint.CheckpointError, match='not a regular file'):
        checkpoint.load(str(tmp_path / 'ckpt_0000001.pt'))
    checkpoint.save(tiny_state(2), str(tmp_path), keep=1)
    checkpoint.save(tiny_state(3), str(tmp_path), keep=1)
    assert sorted(os.listdir(tmp_path)) == ['ckpt.pt', 'ckpt_0000001.pt', 'ckpt_0000003.pt']


def test_a_full_disk_while_appending_to_the_log_is_one_line():
    log = run_dir.open_append('/dev/full')   # every write: ENOSPC
    log.write('{"step": 1}\n')
    with pytest.raises(SystemExit, match='^error: cannot write /dev/full: No space left'):
        log.flush()


def test_a_file_size_limit_while_saving_is_one_line(tmp_path):
    script = ('import resource, torch, checkpoint\n'
              'resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n'
              f'checkpoint.save({{"model": {{"w": torch.ones(100_000)}}, "step": 1}}, '
              f'{str(tmp_path)!r}, 1)\n')
    result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert 'file too large (a file size limit, ulimit -f)' in result.stderr, result.stderr
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- 18. as an open_clip user has it
def test_eval_takes_tau_both_ways_and_a_run_directory(trained, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(llip_eval, 'run', lambda args: seen.update(vars(args)))
    llip_eval.main([f'--ckpt={trained}', '--task=synthetic', '--data=x', '--tau=1,5', '--tau', '8'])
    assert seen['tau'] == [8.0] and seen['ckpt'] == os.path.join(trained, 'ckpt.pt')
    llip_eval.main([f'--ckpt={trained}', '--task=synthetic', '--data=x', '--tau', '1', '5,8'])
    assert seen['tau'] == [1.0, 5.0, 8.0]


def test_benchmark_names_as_clip_benchmark_spells_them_and_wordnet_ids_warn(tmp_path, capsys):
    for name, key in (('cifar10', 'CIFAR10'), ('imagenet1k', 'imagenet'),
                      ('vtab/eurosat', 'EuroSAT')):
        assert eval_data.load_names(name, 'classnames', tmp_path) == \
            eval_data.load_names(key, 'classnames', tmp_path)
    for wnid in ('n01440764', 'n01443537'):
        (tmp_path / wnid).mkdir()
    llip_eval.class_names_and_templates(str(tmp_path))
    assert 'look like WordNet ids' in capsys.readouterr().err


# ---------------------------------------------------------------- 19. what a person watches
def test_generating_the_built_in_data_says_so_once(tmp_path, capfd):
    from synthetic import make_synthetic
    make_synthetic(str(tmp_path), train=4, retrieval=2, zeroshot=1, shard_size=4, image_size=16)
    assert f'writing the built-in synthetic data into {tmp_path}' in capfd.readouterr().err
    make_synthetic(str(tmp_path), train=4, retrieval=2, zeroshot=1, shard_size=4, image_size=16)
    assert 'writing' not in capfd.readouterr().err   # already there: nothing said
