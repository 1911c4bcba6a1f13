"""What this proves about sharded training (run: python -m pytest tests/test_sharding.py):
two gloo processes with FSDP2 (fully_shard), each with half of the batch, give
- the same loss and, for every parameter, the same gradient after the reduce as one process on
  the whole batch, in float64: every loss form (plain, gram, mixed; plain and gram also with
  --grad_ckpt), and pool=cls (SigLIP's loss; its single mixture token is a 1-row parameter
  whose shard on rank 1 is empty);
- the same whole-gradient norm and clipped gradients as torch's clip_grad_norm_ on one process
  (a shard's norm is not the gradient's);
- after three AdamW steps with two accumulated micro-steps each and clipping, the same weights
  as DDP on two ranks (float32);
and the traps of sharding, each shown: t and b, 0-d parameters fully_shard refuses, get their
0-d gradients; reading them works on every rank; a sharded state_dict() holds only this rank's
rows while full_state_dict gathers the single-process weights; rank 0's unsharded copy for
evaluation computes what the single-process model does;
and of train.py --shard=fsdp under torchrun: killed with SIGKILL on 2 ranks and resumed on 3
(uneven shards; with --grad_accum=2 there, FSDP's accumulation end to end), then on 1 plain
process, every sample of the epochs begun is taken exactly once; --shard=fsdp on a single
process runs, and a refused combination or value is a one-line error.
"""
import collections
import importlib
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import checkpoint
import data
import loss
import sharding
import train_flags
from model import Llip
from conftest import batch, descendants, log_lines, start_ranks, tiny

N, WORLD = 4, 2
# the three forms of llip_loss, each forced on Llip.forward (see `form`), and pool=cls
CASES = {'gram': tiny(num_mixture=3), 'plain': tiny(num_mixture=3), 'mixed': tiny(num_mixture=3),
         'cls': tiny(pool='cls', num_mixture=3)}


@contextmanager
def form(name):
    """Llip.forward's loss in form `name` ('cls': as picked): llip_loss asks loss.pick_form."""
    original = loss.pick_form
    if name != 'cls':
        loss.pick_form = lambda form, *shapes: name if form == 'auto' else original(form, *shapes)
    try:
        yield
    finally:
        loss.pick_form = original


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def spawn(worker, tmp_path, world=WORLD):
    """Run worker(rank, world, out) on `world` gloo ranks; returns what each rank saved."""
    start_ranks(_init_and_run, (world, free_port(), worker, str(tmp_path / 'rank')), world)
    return [torch.load(tmp_path / f'rank.{r}') for r in range(world)]


def _init_and_run(rank, world, port, worker, out):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        torch.save(worker(rank, world), f'{out}.{rank}')
    finally:
        dist.destroy_process_group()


def model_of(config, grad_ckpt=False, dtype=torch.float64):
    torch.manual_seed(0)
    model = Llip(config).to(dtype)
    model.set_grad_checkpointing(grad_ckpt)
    return model


def full_grads(model):
    return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
            for n, p in model.named_parameters()}


def loss_and_grads(model, config, part, sharded):
    images, tokens = batch(N, config)
    loss = model(images[part].to(torch.float64), tokens[part], chunk_size=1)
    loss.backward()
    if sharded:
        sharding.reduce_head_grads(model)
        dist.all_reduce(loss := loss.detach())
        loss /= dist.get_world_size()
    return loss.detach(), full_grads(model)


# ----------------------------------------------------------------------------- exactness
def exactness_worker(rank, world):
    part = slice(rank * N // world, (rank + 1) * N // world)
    result = {}
    for case, config in CASES.items():
        for ckpt in (False, True) if case in ('plain', 'gram') else (False,):
            model = sharding.shard(model_of(config, ckpt))
            with form(case):
                result[case, ckpt] = loss_and_grads(model, config, part, sharded=True)
            if (case, ckpt) == ('gram', False):   # the traps, on this model
                norm = sharding.clip_grad_norm(model.parameters(), max_norm=0.05)
                result['clipped'] = norm, full_grads(model)
                result['scalars'] = (model.logit_scale.item(), model.logit_bias.item())
                pos = model.state_dict()['visual.pos_embed']
                result['local_rows'] = (type(pos).__name__, pos.to_local().shape[0])
                result['full_state'] = sharding.full_state_dict(model)
                copy = sharding.unsharded_copy(model, 'cpu', keep=rank == 0)
                if copy is not None:
                    images, tokens = batch(N, config)
                    with torch.no_grad():
                        result['eval'] = copy.similarity(copy.encode_image(images.double()),
                                                         copy.encode_text(tokens))
    return result


def every_worker(rank, world):
    return {**exactness_worker(rank, world), 'steps': steps_worker(rank, world)}


@pytest.fixture(scope='module')
def ranks(tmp_path_factory):
    """What each rank computed, for every test here: one spawn, as starting ranks is slow."""
    return spawn(every_worker, tmp_path_factory.mktemp('ranks'))


def test_fsdp_two_ranks_equal_one_process(ranks):
    for key in [k for k in ranks[0] if isinstance(k, tuple)]:   # (case, grad_ckpt)
        case, ckpt = key
        config = CASES[case]
        with form(case):
            single_loss, single_grads = loss_and_grads(model_of(config, ckpt), config,
                                                       slice(None), sharded=False)
        for r in range(WORLD):
            loss, grads = ranks[r][key]
            torch.testing.assert_close(loss, single_loss, msg=f'{key} loss')
            assert grads.keys() == single_grads.keys()
            for name, grad in single_grads.items():
                # same shape too: t and b stay 0-d, and their gradients with them
                torch.testing.assert_close(grads[name], grad, msg=f'{key} {name}')


def test_fsdp_traps(ranks):
    config = CASES['gram']
    single = model_of(config)
    _, _ = loss_and_grads(single, config, slice(None), sharded=False)
    norm = torch.nn.utils.clip_grad_norm_(single.parameters(), max_norm=0.05)
    for r in range(WORLD):
        got_norm, got_grads = ranks[r]['clipped']
        torch.testing.assert_close(got_norm, norm.float())
        for name, p in single.named_parameters():
            torch.testing.assert_close(got_grads[name], p.grad, msg=name)
        assert ranks[r]['scalars'] == (single.logit_scale.item(), single.logit_bias.item())
        kind, rows = ranks[r]['local_rows']   # between steps a parameter is this rank's rows
        whole = single.visual.pos_embed.shape[0]                  # 7 rows: 4 on rank 0, 3 on 1
        assert kind == 'DTensor' and rows == len(torch.arange(whole).chunk(WORLD)[r])
        state = ranks[r]['full_state']
        assert state.keys() == single.state_dict().keys()
        for name, value in model_of(config).state_dict().items():
            torch.testing.assert_close(state[name], value, msg=name)
    assert 'eval' not in ranks[1]
    images, tokens = batch(N, config)
    with torch.no_grad():
        expected = single.similarity(single.encode_image(images.double()),
                                     single.encode_text(tokens))
    torch.testing.assert_close(ranks[0]['eval'], expected)


# ----------------------------------------------------------------------------- steps: fsdp == DDP
STEPS, ACCUM = 3, 2


def train_steps(model, raw, config, rank, world, sharded):
    """train.py's loop in small: ACCUM micro-steps per AdamW step, gradients reduced on the last
    one only, the whole gradient clipped, the clamp of t. Returns the weights, whole."""
    decay = [p for p in raw.parameters() if p.ndim >= 2]
    no_decay = [p for p in raw.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': 0.2},
                                   {'params': no_decay, 'weight_decay': 0.0}], lr=1e-3)
    n = N // world
    for step in range(STEPS):
        for micro in range(ACCUM):
            images, tokens = batch(N, config, seed=step * ACCUM + micro)
            part = slice(rank * n, (rank + 1) * n)
            last = micro == ACCUM - 1
            if sharded:
                sharding.set_gradient_sync(model, last)
                sync = nullcontext()
            else:
                sync = nullcontext() if last else model.no_sync()
            with sync:
                (model(images[part], tokens[part], chunk_size=1) / ACCUM).backward()
        if sharded:
            sharding.reduce_head_grads(raw)
        sharding.clip_grad_norm(raw.parameters(), max_norm=0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            raw.logit_scale.clamp_(0, 2.0)
    return sharding.full_state_dict(raw)


def steps_worker(rank, world):
    config = CASES['gram']
    raw = model_of(config, dtype=torch.float32)
    ddp = train_steps(DistributedDataParallel(raw), raw, config, rank, world, sharded=False)
    sharded = sharding.shard(model_of(config, dtype=torch.float32))
    return {'ddp': ddp, 'fsdp': train_steps(sharded, sharded, config, rank, world, sharded=True)}


def test_fsdp_steps_equal_ddp(ranks):
    start = model_of(CASES['gram'], dtype=torch.float32).state_dict()
    for r in range(WORLD):
        ddp, fsdp = ranks[r]['steps']['ddp'], ranks[r]['steps']['fsdp']
        for name, value in ddp.items():
            assert not torch.equal(value, start[name]), f'{name} did not train'
            torch.testing.assert_close(fsdp[name], value, msg=name)


# ----------------------------------------------------------------------- train.py --shard=fsdp
# a patch of the loader that writes, per rank, the keys of every batch the loop takes; with
# train.main() after it, a wrapper around train.py
COUNTING = '''
import os, sys
sys.path.insert(0, {root!r})
import data, train
original, byte = data.ShardLoader.__iter__, data.ByteTokenizer()
def counted(self):
    with open(os.environ['KEYS'] + '.' + os.environ.get('RANK', '0'), 'a') as f:
        for images, tokens in original(self):
            f.write(' '.join(byte.decode(row) for row in tokens) + chr(10))
            f.flush()
            yield images, tokens
data.ShardLoader.__iter__ = counted
'''
SMALL = ['--vision_layers=1', '--text_layers=1', '--vision_width=32', '--text_width=32',
         '--embed_dim=16', '--num_mixture=4', '--vision_head_width=16', '--text_heads=2',
         '--tokenizer=byte', '--vocab_size=259', '--context_length=16', '--batch_size=4',
         '--workers=1', '--warmup=2', '--no-eval', '--save_every=2']


def batches_taken(keys_file, ranks, first=None):
    """The keys of the batches each rank's loop took (the first `first` of each rank)."""
    keys = []
    for rank in range(ranks):
        with open(f'{keys_file}.{rank}') as f:
            lines = f.read().splitlines()
        keys += [k for line in lines[:first] for k in line.split()]
    return keys


def test_fsdp_killed_and_resumed_on_three_ranks_sees_each_sample_once(tmp_path, capsys):
    from test_data import make_shards
    shards = tmp_path / 'shards'
    shards.mkdir()
    make_shards(shards, 6, 20)   # 120 samples, each caption its key
    everything = [f's{s}_{i:03d}' for s in range(6) for i in range(20)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    wrapper = tmp_path / 'counting.py'
    wrapper.write_text(COUNTING.format(root=root) + 'train.main()\n')
    out = tmp_path / 'out'

    def command(ranks, *flags):
        run = ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={ranks}'] \
            if ranks else []
        return [sys.executable, *run, str(wrapper), f'--out_dir={out}', f'--data={shards}',
                *SMALL, *flags]

    # 2 ranks, killed with SIGKILL (no checkpoint on the way out) once step 2's is written
    env = {**os.environ, 'KEYS': str(tmp_path / 'first')}
    first = subprocess.Popen(command(2, '--shard=fsdp', '--steps=1000'), env=env, cwd=root,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.time() + 240
    while not (out / 'ckpt_0000002').exists() and first.poll() is None:
        assert time.time() < deadline, 'no checkpoint at step 2 in 240 s'
        time.sleep(0.05)
    for pid in [first.pid, *descendants(first.pid)]:   # torchrun's ranks: their own sessions
        os.kill(pid, signal.SIGKILL)
    first.wait()
    # the newest whole checkpoint (a directory is renamed into place complete)
    step = max(int(m.group(1)) for name in os.listdir(out)
               if (m := re.fullmatch(r'ckpt_(\d+)', name)))
    # 3 ranks (uneven shards) continue for 4 steps of 2 micro-batches, then one plain process
    # (--shard=none) for 1
    env['KEYS'] = str(tmp_path / 'second')
    second = subprocess.run(command(3, '--shard=fsdp', '--grad_accum=2', f'--steps={step + 4}',
                                    '--log_every=1'),
                            env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert f'ckpt_{step:07d} at step {step}' in second.stderr
    assert '4 per rank x 3 rank(s) x 2 micro-batches = 24' in second.stdout
    losses = [r['loss'] for r in log_lines(out) if 'loss' in r and r['step'] > step]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses), losses
    # the plain process is this one: train.main() with the same patch of the loader (undone after)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data.ShardLoader, '__iter__', data.ShardLoader.__iter__)
        exec(COUNTING.format(root=root), {})
        patch.setenv('KEYS', str(tmp_path / 'third'))
        patch.delenv('RANK', raising=False)
        patch.setattr(sys, 'argv', command(0, f'--steps={step + 5}')[1:])
        capsys.readouterr()
        importlib.import_module('train').main()
    assert f'ckpt_{step + 4:07d} at step {step + 4}' in capsys.readouterr().err

    # what the last checkpoint says is left of the epochs begun, read by a fresh loader
    state = checkpoint.load(checkpoint.path_of(str(out), step + 5))
    rest = data.ShardLoader(str(shards), batch_size=5, image_size=8, context_length=16,
                            tokenizer='byte', workers=0, resample=False)
    rest.load_state_dict(state['loader'])
    left = [data.ByteTokenizer().decode(row) for _, tokens in rest for row in tokens]
    epochs = 1 + max(p[0] for s in state['loader'] for p in s['positions'])
    seen = (batches_taken(tmp_path / 'first', 2, first=step) + batches_taken(tmp_path / 'second', 3)
            + batches_taken(tmp_path / 'third', 1) + left)
    assert collections.Counter(seen) == {key: epochs for key in everything}


def test_fsdp_on_one_process_runs_and_bad_values_are_one_line_errors(tmp_path, capsys):
    from test_data import make_shards
    shards = tmp_path / 'shards'
    shards.mkdir()
    make_shards(shards, 2, 8)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def train(out, *flags):   # processes of their own: each makes a process group of one
        return subprocess.Popen([sys.executable, 'train.py', f'--out_dir={tmp_path / out}',
                                 f'--data={shards}', *SMALL, *flags], cwd=root, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # side by side: the run and the refused launch (which is refused after the process group
    # is made) in two --out_dirs
    one = train('out', '--shard=fsdp', '--steps=2')   # a process group of one: one shard
    bad = train('bad', '--shard=fsdp', '--dtype=float16', '--steps=3')
    (_, one_err), (_, bad_err) = one.communicate(timeout=300), bad.communicate(timeout=300)
    assert one.returncode == 0, one_err[-2000:]
    assert sorted(os.listdir(tmp_path / 'out'))[:2] == ['ckpt_0000002', 'config.json']
    assert bad.returncode != 0 and 'error: --shard=fsdp with --dtype=float16' in bad_err, \
        bad_err[-2000:]
    assert 'Traceback' not in bad_err
    # an unknown value: argparse's one line, here in this process (it is all the process does)
    with pytest.raises(SystemExit) as stop:
        train_flags.parser.parse_args(['--shard=zero3'])
    assert stop.value.code == 2
    assert "--shard: invalid choice: 'zero3'" in capsys.readouterr().err
