"""What this proves about train.py (run: python -m pytest tests/test_train.py), on a very
small model and the built-in synthetic data, CPU only:
- a run writes its config, a JSONL log and checkpoints, and resuming continues to the same
  final weights as an uninterrupted run — after a clean stop, after SIGTERM (which saves and
  exits 0) and after SIGKILL mid-run;
- checkpoints hold only tensors and plain containers (they load with weights_only=True), the
  numpy RNG state included, and it is restored exactly;
- a truncated newest checkpoint is skipped in favour of the previous one;
- only ckpt_<digits>.pt files are resumed from (newest by step) and rotated: a user's
  ckpt_best.pt is left alone;
- a checkpoint from another model config is refused with a clear error, and the refused launch
  leaves the run's config.json as it was;
- flag values out of range (--keep=0, --steps=0, --tau=0, --qkv_norm=on, ...) stop train.py
  with a one-line error naming the flag, before anything is written;
- every bool flag takes --key=value (--eval=false) as well as --no-key; an empty or non-tar
  shard is a one-line error;
- startup prints a few short lines; config.json holds the resolved config without nulls;
  train.py's lines are within 100 characters and lr_at / checkpoint.save, load are module level;
- after a resume, log.jsonl holds each step once (cut back to the checkpoint's step);
- with real --data, --zeroshot_data and --retrieval_data are evaluated every --eval_every steps
  into log.jsonl, and the startup says what is evaluated (or that nothing is);
- --logger=wandb sends each record to the package when installed (a fake one here), and main()
  leaves the SIGTERM handler as it found it;
- a NaN loss stops the run with a clear message and leaves the last checkpoint intact;
- two "nodes" on localhost (two torchrun agents, --nnodes=2, c10d rendezvous; gloo) train
  with --global_batch: accumulation under DDP end to end, the micro-batches it derives printed
  and recorded.
"""
import importlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import train_flags
from conftest import (ROOT, SMALL, assert_same_weights, copy_of, free_port, log_lines,
                      main_in_process, torchrun, train, weights)

# Most runs here are train.main() in the test's process (main_in_process): what they prove is
# in the files written and the lines printed, and a new python costs seconds. Separate processes
# remain where the process is the point: a signal or kill mid-run, startup output, the exit of
# torchrun's ranks.


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, synthetic):
    out = str(tmp_path_factory.mktemp('full'))
    with pytest.MonkeyPatch.context() as monkeypatch:
        main_in_process(monkeypatch, out, synthetic, '--steps=12', '--save_every=4', '--eval')
    return out


def test_run_writes_log_config_checkpoints(uninterrupted):
    names = sorted(os.listdir(uninterrupted))
    assert {'config.json', 'log.jsonl', 'ckpt.pt', 'ckpt_0000012.pt'} <= set(names)
    assert [n for n in names if n.startswith('ckpt_')] == [
        'ckpt_0000004.pt',
        'ckpt_0000008.pt',
        'ckpt_0000012.pt',
    ]
    lines = log_lines(uninterrupted)
    assert [r['step'] for r in lines if 'loss' in r] == list(range(1, 13))
    assert all(r['loss'] > 0 for r in lines if 'loss' in r)
    final = lines[-1]
    assert any(k.startswith('zeroshot') for k in final) and any(
        k.startswith('retrieval') for k in final
    )
    ckpt = torch.load(os.path.join(uninterrupted, 'ckpt.pt'), weights_only=True)
    assert ckpt['step'] == 12 and ckpt['config']['model_config']['num_mixture'] == 4
    assert not any(k.startswith(('module.', '_orig_mod.')) for k in ckpt['model'])


def test_resume_after_clean_stop_continues_identically(tmp_path, synthetic, uninterrupted,
                                                       monkeypatch, capsys):
    out = copy_of(uninterrupted, tmp_path)                   # a run that stopped cleanly at 12
    os.remove(os.path.join(out, 'ckpt_0000012.pt'))
    os.remove(os.path.join(out, 'ckpt_0000008.pt'))          # back to step 4
    main_in_process(monkeypatch, out, synthetic, '--steps=12', '--save_every=4')
    assert 'resuming from' in capsys.readouterr().err
    assert_same_weights(weights(out), weights(uninterrupted))
    # log.jsonl was cut back to step 4 on resume: steps 5..12 once, not twice (and without
    # --eval this time, no evaluation line after the last step's)
    assert [r['step'] for r in log_lines(out)] == list(range(1, 13))


def test_killed_run_resumes_to_the_same_weights(tmp_path, synthetic, uninterrupted, monkeypatch):
    """SIGTERM (saves, exits 0) and SIGKILL, each to a run of its own: the two side by side,
    each signalled as soon as its step 2 is saved."""
    runs = {}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        out = str(tmp_path / sig.name)
        runs[sig] = out, train(out, synthetic, '--steps=12', '--save_every=1', popen=True)
    waiting = set(runs)
    while waiting:
        for sig in list(waiting):
            out, proc = runs[sig]
            if os.path.exists(os.path.join(out, 'ckpt_0000002.pt')) or proc.poll() is not None:
                proc.send_signal(sig)
                waiting.remove(sig)
        time.sleep(0.01)
    for sig, (out, proc) in runs.items():
        output = proc.communicate(timeout=120)[0]
        if sig == signal.SIGTERM:
            assert proc.returncode == 0 and 'SIGTERM' in output, output[-2000:]
        else:
            assert proc.returncode == -signal.SIGKILL
        assert not os.path.exists(
            os.path.join(out, 'ckpt_0000012.pt')
        ), f'the run ended before the signal ({sig.name})'
        main_in_process(monkeypatch, out, synthetic, '--steps=12', '--save_every=4')
        assert_same_weights(weights(out), weights(uninterrupted))
        steps = [r['step'] for r in log_lines(out) if 'loss' in r]
        resumed_at = torch.load(os.path.join(out, 'ckpt_0000012.pt'), weights_only=True)['step']
        assert resumed_at == 12 and max(steps) == 12


# trained: a run's --out_dir with ckpt_0000001.pt and ckpt_0000002.pt (conftest)
def test_truncated_checkpoint_is_skipped(trained, tmp_path, synthetic, monkeypatch, capsys):
    out = copy_of(trained, tmp_path)
    newest = os.path.join(out, 'ckpt_0000002.pt')
    with open(newest, 'r+b') as f:
        f.truncate(1000)
    main_in_process(monkeypatch, out, synthetic, '--steps=3', '--save_every=1', '--workers=0')
    text = capsys.readouterr().err
    assert 'skipping checkpoint' in text and 'ckpt_0000001.pt at step 1' in text


def test_numpy_rng_state_survives_a_weights_only_checkpoint(tmp_path):
    train_py = importlib.import_module('train')
    np.random.seed(3)
    np.random.randn()   # leaves a cached Gaussian: has_gauss=1 and its value are part of the state
    torch.save({'numpy': train_py.checkpoint.numpy_rng_state()}, tmp_path / 'rng.pt')
    expected = np.random.randn(5)
    np.random.seed(99)
    train_py.checkpoint.set_numpy_rng_state(
        torch.load(tmp_path / 'rng.pt', weights_only=True)['numpy']
    )
    np.testing.assert_array_equal(np.random.randn(5), expected)


def test_only_numbered_checkpoints_are_resumed_and_rotated(trained, tmp_path, synthetic,
                                                           monkeypatch, capsys):
    out = copy_of(trained, tmp_path)
    best = os.path.join(out, 'ckpt_best.pt')   # a user's copy of step 1: by name it sorts last
    with open(os.path.join(out, 'ckpt_0000001.pt'), 'rb') as src, open(best, 'wb') as dst:
        dst.write(src.read())
    main_in_process(monkeypatch, out, synthetic, '--steps=4', '--save_every=2', '--keep=2',
                    '--workers=0')
    assert 'ckpt_0000002.pt at step 2' in capsys.readouterr().err
    assert sorted(n for n in os.listdir(out) if n.startswith('ckpt_')) == \
        ['ckpt_0000002.pt', 'ckpt_0000004.pt', 'ckpt_best.pt']


def test_other_model_config_is_refused(trained, tmp_path, synthetic, monkeypatch):
    out = copy_of(trained, tmp_path)
    with open(os.path.join(out, 'config.json')) as f:
        config = f.read()
    with pytest.raises(SystemExit) as stop:
        main_in_process(monkeypatch, out, synthetic, '--steps=4', '--num_mixture=8',
                        '--workers=0')
    message = str(stop.value.code)   # sys.exit(message): what stderr shows, exit status 1
    assert 'different model config' in message and 'num_mixture' in message
    with open(os.path.join(out, 'config.json')) as f:
        assert f.read() == config, 'the refused launch overwrote config.json'


@pytest.mark.parametrize('flag', ['--keep=0', '--keep=-1', '--steps=0', '--grad_accum=0',
                                  '--log_every=0', '--save_every=-5', '--tau=0', '--tau=-1',
                                  '--num_mixture=0', '--mixer_heads=0', '--qkv_norm=on',
                                  '--quick_gelu=ture', '--vocab_size=10', '--device=cuda',
                                  '--device=gpu', '--workers=-1', '--eval=maybe',
                                  '--grad_ckpt=on', '--logger=wandb', '--logger=tensorboard',
                                  '--logger=mlflow', '--data=/nonexistent/{000..009}.tar',
                                  '--zeroshot_data=/nonexistent'])
def test_bad_flag_values_are_refused_before_any_work(tmp_path, synthetic, monkeypatch, capsys,
                                                     flag):
    # in-process, for speed: main() must exit before building anything (--steps=1 keeps short a
    # run that wrongly starts)
    out = tmp_path / 'out'
    train_py = importlib.import_module('train')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)   # as on a machine without GPU
    for package in train_flags.TRACKERS.values():   # as where the package is not installed
        monkeypatch.setitem(sys.modules, package, None)
    monkeypatch.setattr(sys, 'argv', ['train.py', f'--out_dir={out}',
                                      f'--synthetic_dir={synthetic}', *SMALL, '--steps=1', flag])
    with pytest.raises(SystemExit) as stop:
        train_py.main()
    code = stop.value.code   # sys.exit('error: ...') carries the message; argparse prints it
    message = code if isinstance(code, str) else capsys.readouterr().err
    last = message.strip().splitlines()[-1]
    assert 'error' in last and flag.split('=')[0] in last, message   # the flag, e.g. '--tau'
    assert not out.exists(), 'out_dir was written before the flags were checked'


def test_every_bool_flag_takes_key_value(monkeypatch):
    train_py = importlib.import_module('train')
    args = train_py.parser.parse_args(['--eval=false', '--compile=false', '--grad_ckpt=true',
                                  '--qkv_norm=yes'])
    assert (args.eval, args.compile, args.grad_ckpt, args.qkv_norm) == (False, False, True, True)
    args = train_py.parser.parse_args(['--no-eval', '--compile', '--no-qkv_norm'])
    assert (args.eval, args.compile, args.qkv_norm) == (False, True, False)


@pytest.mark.parametrize('content', [b'', b'not a tar file, just text\n'])
def test_an_empty_or_non_tar_shard_is_a_one_line_error(tmp_path, synthetic, content,
                                                       monkeypatch, capfd):
    shard = tmp_path / 'bad.tar'
    shard.write_bytes(content)
    with pytest.raises(SystemExit) as stop:   # with SMALL's DataLoader worker, as a run has
        main_in_process(monkeypatch, tmp_path / 'out', synthetic, f'--data={shard}', '--steps=2')
    message = stop.value.code   # a string: what python prints on exit, with status 1
    assert isinstance(message, str) and len(message.splitlines()) == 1, message
    assert message.startswith(f'error: --data={shard}: ')
    assert 'Traceback' not in capfd.readouterr().err   # nor from the worker


def test_startup_is_a_few_lines_and_config_json_has_no_nulls(trained_run):
    out, text = trained_run   # a 2-step run's --out_dir and what train.py printed (conftest)
    lines = text.strip().splitlines()   # the progress bar is on stderr
    assert len(lines) <= 10 and all(len(line.replace(out, 'OUT')) <= 100 for line in lines), lines
    assert 'K=4' in text and 'D=16' in text and 'tau=' in text and 'parameters' in text
    assert 'images per step: 8 per rank x 1 rank(s) = 8' in text
    assert 'device cpu, float32' in text and f'out_dir {out}' in text
    with open(os.path.join(out, 'config.json')) as f:
        config = json.load(f)
    nulls = [k for k, v in {**config, **config['model_config']}.items() if v is None]
    assert not nulls and config['model_config']['num_mixture'] == 4 and config['device'] == 'cpu'


def test_learning_rate_schedule_and_module_level_helpers():
    train_py = importlib.import_module('train')

    class Args:
        lr, warmup, steps, min_lr_ratio = 1.0, 10, 110, 0.1
    assert train_py.lr_at(0, Args) == pytest.approx(0.1)           # warmup: (step + 1) / warmup
    assert train_py.lr_at(10, Args) == pytest.approx(1.0)          # the peak
    assert train_py.lr_at(110, Args) == pytest.approx(0.1)         # the floor
    assert callable(train_py.checkpoint.save) and callable(train_py.checkpoint.load)


def make_real_eval_data(root):
    """A zero-shot folder (2 classes x 2 images) and a caption folder (4 images)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    image = lambda: Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    for name in ('red', 'blue'):
        os.makedirs(root / 'zs' / name)
        for i in range(2):
            image().save(root / 'zs' / name / f'{i}.png')
    os.makedirs(root / 'captions')
    for i in range(4):
        image().save(root / 'captions' / f'{i}.png')
        (root / 'captions' / f'{i}.txt').write_text(f'a picture number {i}\n')


def test_eval_on_real_data_during_training(tmp_path, synthetic, monkeypatch, capsys):
    make_real_eval_data(tmp_path)
    out = str(tmp_path / 'out')
    main_in_process(monkeypatch, out, synthetic, f'--data={synthetic}/train',
                    f'--zeroshot_data={tmp_path}/zs', f'--retrieval_data={tmp_path}/captions',
                    '--steps=2', '--eval_every=1', '--eval=true', '--workers=0')
    printed = capsys.readouterr().out
    assert 'eval: zero-shot on' in printed and 'retrieval on' in printed
    evaluated = [r for r in log_lines(out) if 'zeroshot/zs/top1' in r]
    assert [r['step'] for r in evaluated] == [1, 2]
    assert all(0 <= r['retrieval/i2t_r1'] <= 1 for r in evaluated)
    main_in_process(monkeypatch, tmp_path / 'quiet', synthetic, f'--data={synthetic}/train',
                    '--steps=1', '--eval=true', '--workers=0')
    quiet = capsys.readouterr().out
    assert 'eval: nothing' in quiet and '--zeroshot_data' in quiet


def fake_tracker(kind, calls):
    """A stand-in for wandb or torch.utils.tensorboard: records what train.py calls."""
    module = type(sys)(kind)
    if kind == 'wandb':
        class Run:
            def log(self, values, step):
                calls.append(('log', step, sorted(values)))

            def finish(self):
                calls.append(('close',))
        module.init = lambda **kw: calls.append(('init', kw['config']['steps'])) or Run()
    else:
        class SummaryWriter:
            def __init__(self, log_dir):
                calls.append(('init', os.path.basename(log_dir)))

            def add_scalar(self, key, value, step):
                calls.append(('log', step, [key]))

            def close(self):
                calls.append(('close',))
        module.SummaryWriter = SummaryWriter
    return module


@pytest.mark.parametrize('kind', ['wandb', 'tensorboard'])
def test_logger_sends_records_to_an_installed_package_and_main_restores_sigterm(
        tmp_path, synthetic, monkeypatch, kind):
    calls = []
    train_py = importlib.import_module('train')
    monkeypatch.setitem(sys.modules, train_flags.TRACKERS[kind], fake_tracker(kind, calls))
    monkeypatch.setattr(sys, 'argv', ['train.py', f'--out_dir={tmp_path}',
                                      f'--synthetic_dir={synthetic}', *SMALL, '--workers=0',
                                      '--steps=2', f'--logger={kind}'])
    before = signal.getsignal(signal.SIGTERM)
    train_py.main()
    assert signal.getsignal(signal.SIGTERM) is before   # no handler leaks out of main()
    assert calls[0] == ('init', 2 if kind == 'wandb' else 'tensorboard')
    assert calls[-1] == ('close',)
    logged = [c for c in calls if c[0] == 'log']
    assert sorted({c[1] for c in logged}) == [1, 2]
    assert {'loss', 'lr'} <= {key for c in logged for key in c[2]}


def test_nan_loss_stops_and_keeps_the_last_checkpoint(trained, tmp_path, synthetic, monkeypatch,
                                                     capsys):
    out = copy_of(trained, tmp_path)
    before = open(os.path.join(out, 'ckpt_0000002.pt'), 'rb').read()
    with pytest.raises(SystemExit) as stop:
        main_in_process(monkeypatch, out, synthetic, '--steps=40', '--save_every=100',
                        '--lr=1e30', '--grad_clip=0', '--warmup=1', '--workers=0')
    printed = capsys.readouterr()
    assert stop.value.code == 1 and 'loss is nan' in (printed.out + printed.err).lower()
    assert open(os.path.join(out, 'ckpt_0000002.pt'), 'rb').read() == before
    assert sorted(n for n in os.listdir(out) if n.startswith('ckpt_')) == \
        ['ckpt_0000001.pt', 'ckpt_0000002.pt']


# torchrun --standalone (one node): test_sharding.py's killed and resumed --shard=fsdp run


def test_two_nodes_on_localhost_with_global_batch(tmp_path, synthetic):
    """Two torchrun agents, one rank each, meet by c10d rendezvous as two machines would; the
    global batch of 16 is 4 images a rank times 2 micro-batches."""
    out, port = str(tmp_path), free_port()
    node = torchrun('--nnodes=2', '--nproc_per_node=1', '--rdzv_backend=c10d',
                    f'--rdzv_endpoint=127.0.0.1:{port}', '--rdzv_id=llip-test',
                    os.path.join(ROOT, 'train.py'), f'--out_dir={out}',
                    f'--synthetic_dir={synthetic}', *SMALL, '--global_batch=16',
                    '--batch_size=4', '--steps=2', '--save_every=2')
    nodes = [subprocess.Popen(node, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [n.communicate(timeout=300)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), '\n'.join(o[-2000:] for o in outputs)
    # rank 0, which prints, is on whichever node the rendezvous made first
    assert any('4 per rank x 2 rank(s) x 2 micro-batches = 16' in o for o in outputs), outputs
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert ckpt['config']['world_size'] == 2 and ckpt['step'] == 2
    assert ckpt['config']['grad_accum'] == 2 and len(ckpt['loader']) == 2
    assert [r['step'] for r in log_lines(out) if 'loss' in r] == [1, 2]
