"""What this proves about feature-cached accumulation (accumulation.py; run: python -m pytest
tests/test_accumulation.py), in float64 on a small Llip:
- the loss and the gradient of every parameter after accumulating micro-batches equal those of
  one step on the whole batch without accumulation (Llip.forward), for pools cls, avg (W_O in
  the image tower) and llip, every loss form (plain, gram, mixed), on 1 rank and on 2 gloo ranks
  under DDP (whose gradient average then equals the single process's gradient of the global
  batch);
- under DDP the gradients are all-reduced once per optimizer step: an accumulated step makes
  exactly as many all-reduce calls as a step without accumulation;
- the replay of a micro-batch draws the same random numbers as its first forward (a dropout put
  on the image tower gives the same features twice), and the generator ends where one forward
  of every micro-batch would leave it;
- train.py with --grad_accum: a run killed mid-step (checkpoints are written between steps
  only) resumes to the same weights as an uninterrupted run (which asked for its micro-batches
  with --grad_accum, the killed one with --global_batch); what --global_batch derived is printed
  and recorded in config.json;
- (two ranks under torchrun with --global_batch, accumulation under DDP end to end: in
  test_train.py, whose two "nodes" run it);
- --global_batch=N derives --batch_size and --grad_accum from N and the world size, keeps and
  checks the ones given, and refuses with a one-line error an N that does not divide or
  contradicts them.
"""
import importlib
import json
import os
import signal
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from accumulation import Towers, split_batch, train_step
from conftest import (assert_same_weights, batch, free_port, main_in_process, start_ranks, tiny,
                      train, weights)
from model import Llip

MICRO, ACCUM, WORLD = 3, 3, 2            # 3 images per micro-batch, 3 micro-batches per step
CASES = [('cls', 'plain'), ('avg', 'plain'),                     # the form is llip's only
         ('llip', 'plain'), ('llip', 'gram'), ('llip', 'mixed')]


def make_model(pool):
    torch.manual_seed(0)
    return Llip(tiny(pool=pool, num_mixture=3)).double()


def whole_batch(world):
    """The global batch of one step: world x ACCUM x MICRO images, in rank-major order."""
    images, tokens = batch(world * ACCUM * MICRO, make_model('llip').config, seed=1)
    return images.double(), tokens


def reference(pool, world):
    """One step on the whole batch, no accumulation: the model's own loss."""
    model = make_model(pool)
    loss = model(*whole_batch(world), chunk_size=2)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def accumulated(pool, form, rank, world):
    """This rank's ACCUM micro-batches through train_step (under DDP when world > 1)."""
    model = make_model(pool)
    towers = DistributedDataParallel(Towers(model)) if world > 1 else Towers(model)
    images, tokens = whole_batch(world)
    mine = slice(rank * ACCUM * MICRO, (rank + 1) * ACCUM * MICRO)
    micro = list(zip(images[mine].split(MICRO), tokens[mine].split(MICRO)))
    loss = train_step(towers, model, micro, chunk_size=2, form=form)
    return loss, {n: p.grad for n, p in model.named_parameters()}


def assert_same(got, want):
    (loss, grads), (ref_loss, ref_grads) = got, want
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        assert grads[name] is not None, f'{name}: no gradient'
        torch.testing.assert_close(grads[name], grad, msg=name)


@pytest.mark.parametrize('pool, form', CASES)
def test_one_rank_equals_the_whole_batch(pool, form, one_thread):
    assert_same(accumulated(pool, form, 0, 1), reference(pool, 1))


def test_one_micro_batch_is_the_plain_step(one_thread):
    """ACCUM = 1 takes the direct path (no cache): the same gradient as Llip.forward."""
    model = make_model('llip')
    images, tokens = batch(MICRO, model.config, seed=1)
    loss = train_step(Towers(model), model, [(images.double(), tokens)], chunk_size=2)
    want = make_model('llip')
    ref_loss = want(images.double(), tokens, chunk_size=2)
    ref_loss.backward()
    assert_same((loss, {n: p.grad for n, p in model.named_parameters()}),
                (ref_loss.detach(), {n: p.grad for n, p in want.named_parameters()}))


def count_all_reduces(pool, rank, accum):
    """How many times DDP's communication hook runs in one train_step of `accum` micro-batches."""
    model = make_model(pool)
    towers = DistributedDataParallel(Towers(model))
    calls = []

    def hook(state, bucket):
        calls.append(1)
        return allreduce_hook(state, bucket)
    towers.register_comm_hook(dist.group.WORLD, hook)
    images, tokens = batch(accum * MICRO, model.config, seed=2 + rank)
    train_step(towers, model, list(zip(images.double().split(MICRO), tokens.split(MICRO))))
    return len(calls)


def worker(rank, port, out):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=WORLD)
    result = {}
    for pool, form in CASES:
        loss, grads = accumulated(pool, form, rank, WORLD)
        dist.all_reduce(loss)              # the global loss: the mean of the ranks' losses
        result[pool, form] = loss / WORLD, grads
    result['all_reduces'] = [count_all_reduces('llip', rank, accum) for accum in (1, ACCUM)]
    torch.save(result, f'{out}.{rank}')
    dist.destroy_process_group()


def test_two_ranks_equal_the_whole_batch(tmp_path, one_thread):
    start_ranks(worker, (free_port(), str(tmp_path / 'rank')), WORLD)
    ranks = [torch.load(tmp_path / f'rank.{r}', weights_only=False) for r in range(WORLD)]
    for pool, form in CASES:
        want = reference(pool, WORLD)
        for r in range(WORLD):
            assert_same(ranks[r][pool, form], want)
    for r in range(WORLD):
        plain, accumulated_calls = ranks[r]['all_reduces']
        assert plain > 0 and accumulated_calls == plain, ranks[r]['all_reduces']


def test_replay_draws_the_same_random_numbers(one_thread):
    model = make_model('llip')
    seen = []

    def dropout(module, inputs, output):   # randomness inside the towers, as dropout would be
        output = F.dropout(output, p=0.5, training=True)
        seen.append(output.detach().clone())
        return output
    model.visual.register_forward_hook(dropout)
    images, tokens = batch(ACCUM * MICRO, model.config, seed=1)
    micro = list(zip(images.double().split(MICRO), tokens.split(MICRO)))

    torch.manual_seed(5)
    for images, tokens in micro:           # one forward of each micro-batch: where the RNG ends
        model.visual(images)
    after_one_pass = torch.get_rng_state()
    seen.clear()
    torch.manual_seed(5)
    train_step(Towers(model), model, micro, chunk_size=2)
    assert len(seen) == 2 * ACCUM                      # cache, then replay
    for first, replay in zip(seen[:ACCUM], seen[ACCUM:]):
        torch.testing.assert_close(replay, first, rtol=0, atol=0)
    assert not torch.equal(seen[0], seen[1])           # the draws do differ between micro-batches
    assert torch.equal(torch.get_rng_state(), after_one_pass)


# the killed run asks for its 3 micro-batches of 4 through --global_batch, the uninterrupted one
# directly: the same weights also show that the two say the same thing
ACCUM_RUN = ['--batch_size=4', '--steps=6']
GLOBAL_BATCH = ['--global_batch=12']


def test_killed_mid_step_resumes_to_the_same_weights(tmp_path, synthetic, monkeypatch, capsys):
    full, out = str(tmp_path / 'full'), str(tmp_path / 'killed')
    proc = train(out, synthetic, *ACCUM_RUN, *GLOBAL_BATCH, '--save_every=2', popen=True)
    while not os.path.exists(os.path.join(out, 'ckpt_0000002.pt')) and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.3)                        # into step 3's micro-batches
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=120)
    assert not os.path.exists(os.path.join(out, 'ckpt_0000006.pt')), 'the run ended first'
    # the uninterrupted run and the resumed one in this process: they are not what is tested
    main_in_process(monkeypatch, full, synthetic, *ACCUM_RUN, '--grad_accum=3', '--save_every=3')
    capsys.readouterr()
    main_in_process(monkeypatch, out, synthetic, *ACCUM_RUN, *GLOBAL_BATCH, '--save_every=3')
    printed = capsys.readouterr()
    assert 'resuming from' in printed.err
    assert_same_weights(weights(out), weights(full))
    # --global_batch is trained and recorded as what it derives
    assert 'images per step: 4 per rank x 1 rank(s) x 3 micro-batches = 12' in printed.out
    with open(os.path.join(out, 'config.json')) as f:
        config = json.load(f)
    assert (config['global_batch'], config['batch_size'], config['grad_accum']) == (12, 4, 3)


@pytest.mark.parametrize('given, world, want', [
    ((None, None, None), 1, (64, 1)),                # no --global_batch: the defaults
    ((None, 8, 2), 1, (8, 2)),
    ((32768, None, None), 8, (64, 64)),              # 4096 a rank: micro-batch 64, 64 of them
    ((32768, None, None), 256, (64, 2)),
    ((32768, 128, None), 256, (128, 1)),
    ((32768, None, 16), 8, (256, 16)),
    ((300, None, None), 2, (50, 3)),                 # 150 a rank: the largest divisor <= 64
    ((24, 4, 3), 2, (4, 3)),
])
def test_global_batch_derives_the_micro_batch_and_accumulation(given, world, want):
    global_batch, batch_size, grad_accum = given
    got = split_batch(global_batch, world, batch_size, grad_accum)
    assert got == want and (global_batch is None or got[0] * world * got[1] == global_batch)


@pytest.mark.parametrize('flags, world, words', [
    (['--global_batch=10'], 3, 'not divisible by the 3 ranks'),
    (['--global_batch=24', '--batch_size=5'], 1, 'not a multiple of --batch_size=5'),
    (['--global_batch=24', '--grad_accum=5'], 2, 'not divisible by --grad_accum=5'),
    (['--global_batch=24', '--batch_size=4', '--grad_accum=2'], 1, 'contradicts'),
    (['--global_batch=0'], 1, 'must be an integer >= 1'),
])
def test_bad_global_batch_is_a_one_line_error(tmp_path, monkeypatch, flags, world, words):
    train_py = importlib.import_module('train')
    if world > 1:   # as torchrun would set it; check_flags runs before any process group
        monkeypatch.setenv('RANK', '0')
        monkeypatch.setenv('WORLD_SIZE', str(world))
    monkeypatch.setattr(sys, 'argv', ['train.py', f'--out_dir={tmp_path / "out"}', *flags])
    with pytest.raises(SystemExit) as stop:
        train_py.check_flags(train_py.parser.parse_args())
    message = str(stop.value.code)
    assert message.startswith('error: --global_batch=') and words in message, message
    assert len(message.splitlines()) == 1


# --global_batch trained and recorded by one process: in
# test_killed_mid_step_resumes_to_the_same_weights


# --global_batch on two ranks under torchrun (accumulation under DDP, end to end): in
# test_train.py's test_two_nodes_on_localhost_with_global_batch
