"""What this proves about a training run (issue 23: a run a user can trust with a week of
GPUs), on a very small model and the built-in synthetic data, CPU only
(run: python -m pytest tests/test_trust.py; what the run reads: tests/test_trust_inputs.py):
- nothing saved is lost: a second run on an --out_dir in use is refused with a message naming
  the first (its pid), and a lock left by a killed run is taken over; --resume=never in a used
  --out_dir is refused and changes nothing; a junk ckpt_0009999.pt neither counts toward --keep
  nor gets the new checkpoint deleted, and the warning names the file and what is wrong;
  Ctrl-C (SIGINT) and SIGHUP to the process group save and exit 0, a second Ctrl-C exits at
  once; --steps already reached changes nothing;
- the run's writes never follow a planted symbolic link (ckpt_N.pt.tmp, ckpt.pt.tmp), and a link
  where log.jsonl or config.json belongs is refused;
- flags and an environment that would train on something else or wait forever (--grad_clip=-1,
  --min_lr_ratio=-3, --lr=nan, --stop_grace=0, RANK=1 WORLD_SIZE=1, ...) are one-line errors
  before any work; so are a full disk or a file size limit while saving or logging, an
  --out_dir that is a file, malformed log.jsonl lines at resume.
"""
import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import run_dir
from conftest import FAST, ROOT, copy_of, main_in_process, train

ZERO_WORKERS = ['--workers=0']

def wait_for_log(out, proc, timeout=120):
    path, end = os.path.join(out, 'log.jsonl'), time.time() + timeout
    while not (os.path.exists(path) and os.path.getsize(path) > 0):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < end, 'no log line'
        time.sleep(0.05)


# ---------------------------------------------------------------- 1. one run per out_dir
def test_a_second_run_on_an_out_dir_in_use_is_refused_and_a_killed_runs_lock_is_stale(
        tmp_path, synthetic, monkeypatch):
    out = str(tmp_path / 'run')
    first = train(out, synthetic, '--steps=100000', '--save_every=100000', *ZERO_WORKERS,
                  popen=True)
    try:
        # the lock is taken first thing, before the model is built: in use from then on
        lock, end = os.path.join(out, run_dir.LOCK), time.time() + 120
        while not (os.path.exists(lock) and os.path.getsize(lock) > 0):
            assert first.poll() is None and time.time() < end, first.communicate()[0][-3000:]
            time.sleep(0.05)
        with pytest.raises(SystemExit) as stop:   # this process is the second run
            main_in_process(monkeypatch, out, synthetic, '--steps=2', '--seed=1', *ZERO_WORKERS)
        last = stop.value.code   # a one-line string: printed on exit, status 1
        assert isinstance(last, str) and len(last.splitlines()) == 1, last
        assert 'in use by another run' in last and f'pid {first.pid} ' in last, last
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
                                                                       synthetic, monkeypatch):
    out = copy_of(trained, tmp_path)
    before = {name: open(os.path.join(out, name), 'rb').read() for name in os.listdir(out)}
    with pytest.raises(SystemExit) as stop:   # in this process: the exit's line is its code
        main_in_process(monkeypatch, out, synthetic, '--steps=2', '--seed=1', '--resume=never',
                        *ZERO_WORKERS)
    run_dir._release(out)   # what the refused process's exit does: its lock file emptied
    last = stop.value.code
    assert isinstance(last, str) and len(last.splitlines()) == 1 and 'step 2' in last, last
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


def test_keep_1_with_a_junk_high_numbered_file_keeps_the_new_checkpoint(tmp_path, synthetic,
                                                                        monkeypatch, capsys):
    out = str(tmp_path / 'run')
    os.makedirs(out)
    with open(os.path.join(out, 'ckpt_0009999.pt'), 'w') as f:
        f.write('junk\n')
    main_in_process(monkeypatch, out, synthetic, '--steps=2', '--save_every=1', '--keep=1',
                    *ZERO_WORKERS)   # a KeyError raised would end it here
    err = capsys.readouterr().err
    assert 'KeyError' not in err and 'not a checkpoint' in err
    assert sorted(n for n in os.listdir(out) if n.startswith('ckpt_')) == [
        'ckpt_0000002.pt', 'ckpt_0009999.pt']


# ---------------------------------------------------------------- 4, 5. signals
def test_ctrl_c_and_sighup_to_the_group_save_and_exit_0(tmp_path, synthetic):
    """Ctrl-C and SIGHUP, each to a run of its own, the two runs side by side."""
    runs = {}
    try:
        for sig, name in [(signal.SIGINT, 'Ctrl-C'), (signal.SIGHUP, 'SIGHUP')]:
            out = str(tmp_path / name)
            cmd = [sys.executable, os.path.join(ROOT, 'train.py'), f'--out_dir={out}',
                   f'--synthetic_dir={synthetic}', *FAST, '--steps=100000', '--save_every=100000']
            runs[sig] = name, out, subprocess.Popen(
                cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                process_group=0, env={**os.environ, 'OMP_NUM_THREADS': '1'})
        for sig, (name, out, proc) in runs.items():
            wait_for_log(out, proc)
            os.killpg(proc.pid, sig)   # a terminal sends Ctrl-C to the trainer and its workers
        for sig, (name, out, proc) in runs.items():
            output = proc.communicate(timeout=60)[0]
            assert proc.returncode == 0 and f'{name}: saved a checkpoint' in output, \
                output[-3000:]
            assert checkpoint.load(os.path.join(out, 'ckpt.pt'))['step'] >= 1
    finally:
        for _, _, proc in runs.values():   # a run left going by a failed check
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()


SECOND_CTRL_C = '''
import os, signal, time
from preemption import Preemption
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
def test_a_link_where_a_run_file_belongs_is_refused(tmp_path, synthetic, name, monkeypatch):
    out, victim = tmp_path / 'run', tmp_path / 'victim'
    out.mkdir()
    victim.write_text('precious')
    os.symlink(victim, out / name)
    with pytest.raises(SystemExit) as stop:
        main_in_process(monkeypatch, out, synthetic, '--steps=1', *ZERO_WORKERS)
    last = stop.value.code   # a one-line string: printed on exit, status 1, no traceback
    assert isinstance(last, str) and len(last.splitlines()) == 1, last
    assert last.startswith('error: ') and 'symbolic link' in last and name in last
    assert victim.read_text() == 'precious'


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


def test_steps_at_or_below_the_checkpoint_change_nothing(trained, tmp_path, synthetic,
                                                         monkeypatch, capsys):
    out = copy_of(trained, tmp_path)
    before = {name: open(os.path.join(out, name), 'rb').read() for name in os.listdir(out)}
    main_in_process(monkeypatch, out, synthetic, '--steps=1', '--lr=5e-4', *ZERO_WORKERS)
    assert 'nothing to do: the checkpoint is at step 2 and --steps=1' in capsys.readouterr().out
    after = {name: open(os.path.join(out, name), 'rb').read() for name in os.listdir(out)}
    # but run.lock: this process holds it (it is emptied at exit, as test_a_second_run_on_...
    # and test_resume_never_... show for a process of its own)
    assert after.pop(run_dir.LOCK) and before.pop(run_dir.LOCK) == b'' and after == before


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


# ---------------------------------------------------------------- 19. what a person watches
def test_generating_the_built_in_data_says_so_once(tmp_path, capfd):
    from synthetic import make_synthetic
    make_synthetic(str(tmp_path), train=4, retrieval=2, zeroshot=1, shard_size=4, image_size=16)
    assert f'writing the built-in synthetic data into {tmp_path}' in capfd.readouterr().err
    make_synthetic(str(tmp_path), train=4, retrieval=2, zeroshot=1, shard_size=4, image_size=16)
    assert 'writing' not in capfd.readouterr().err   # already there: nothing said
