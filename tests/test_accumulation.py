"""What this proves about feature-cached accumulation (accumulation.py; run: python -m pytest
tests/test_accumulation.py), in float64 on a small Llip:
- the loss and the gradient of every parameter after accumulating micro-batches equal those of
  one step on the whole batch without accumulation (Llip.forward), for pools cls and llip and
  both loss forms (plain, gram), on 1 rank and on 2 gloo ranks under DDP (whose gradient average
  then equals the single process's gradient of the global batch);
- under DDP the gradients are all-reduced once per optimizer step: an accumulated step makes
  exactly as many all-reduce calls as a step without accumulation;
- the replay of a micro-batch draws the same random numbers as its first forward (a dropout put
  on the image tower gives the same features twice), and the generator ends where one forward
  of every micro-batch would leave it.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from accumulation import Towers, train_step
from model import Llip
from test_model import batch, tiny

MICRO, ACCUM, WORLD = 3, 3, 2            # 3 images per micro-batch, 3 micro-batches per step
CASES = [('cls', 'plain'), ('llip', 'plain'), ('llip', 'gram')]   # the form is llip's only


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
    torch.set_num_threads(1)
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
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, str(tmp_path / 'rank')), nprocs=WORLD, join=True)
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
