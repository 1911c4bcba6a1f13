"""What this proves about feature-cached accumulation under FSDP (accumulation.py with
sharding.py; run: python -m pytest tests/test_fsdp_accum.py):
- two gloo ranks, the model sharded with fully_shard, each accumulating 3 micro-batches through
  accumulation.train_step, give the loss (averaged over ranks) and, for every parameter, the
  gradient (after sharding.reduce_head_grads, gathered whole) of one single process on the whole
  global batch with Llip.forward, in float64, for pool=llip (W_O in the loss head, kept whole on
  every rank) and pool=cls (no W_O); the whole-gradient norm of sharding.clip_grad_norm is the
  single process's (the replicated loss head counted once);
- gradients are reduce-scattered once per optimizer step: an accumulated step makes as many
  reduce-scatter calls as a step of one micro-batch (every replay but the last runs unsynced);
- (train.py --shard=fsdp --grad_accum=2 under torchrun, end to end: in test_sharding.py, whose
  run resumed on three ranks accumulates.)
"""
import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import sharding
from accumulation import Towers, train_step
from conftest import batch, free_port, start_ranks, tiny
from model import Llip

MICRO, ACCUM, WORLD = 3, 3, 2            # 3 images per micro-batch, 3 micro-batches per step
POOLS = ('llip', 'cls')


def make_model(pool):
    torch.manual_seed(0)
    return Llip(tiny(pool=pool, num_mixture=3)).double()


def whole_batch():
    """The global batch of one step: WORLD x ACCUM x MICRO images, in rank-major order."""
    images, tokens = batch(WORLD * ACCUM * MICRO, make_model('llip').config, seed=1)
    return images.double(), tokens


def reference(pool):
    """One process, one step on the whole batch, no accumulation: the model's own loss."""
    model = make_model(pool)
    loss = model(*whole_batch(), chunk_size=2)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    norm = torch.stack([g.norm() for g in grads.values()]).norm()
    return loss.detach(), grads, norm


def sharded_step(pool, rank):
    """This rank's ACCUM micro-batches through train_step on the sharded model."""
    model = sharding.shard(make_model(pool))
    images, tokens = whole_batch()
    mine = slice(rank * ACCUM * MICRO, (rank + 1) * ACCUM * MICRO)
    micro = list(zip(images[mine].split(MICRO), tokens[mine].split(MICRO)))
    loss = train_step(Towers(model), model, micro, chunk_size=2)
    dist.all_reduce(loss)                  # the global loss: the mean of the ranks' losses
    sharding.reduce_head_grads(model)
    grads = {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
             for n, p in model.named_parameters()}
    norm = sharding.clip_grad_norm(list(model.parameters()), float('inf'))
    return loss / WORLD, grads, norm


def count_reduce_scatters(rank, accum):
    """How many reduce-scatters FSDP makes in one train_step of `accum` micro-batches: the
    collective it calls is patched to count (reduce_scatter_single in torch 2.13's FSDP2)."""
    name = 'reduce_scatter_single' if hasattr(dist, 'reduce_scatter_single') else \
        'reduce_scatter_tensor'
    original, calls = getattr(dist, name), []

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    model = sharding.shard(make_model('llip'))
    images, tokens = batch(accum * MICRO, model.config, seed=2 + rank)
    setattr(dist, name, counted)
    try:
        train_step(Towers(model), model, list(zip(images.double().split(MICRO),
                                                  tokens.split(MICRO))))
    finally:
        setattr(dist, name, original)
    return len(calls)


def worker(rank, port, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=WORLD)
    try:
        result = {pool: sharded_step(pool, rank) for pool in POOLS}
        result['reduce_scatters'] = [count_reduce_scatters(rank, accum) for accum in (1, ACCUM)]
        torch.save(result, f'{out}.{rank}')
    finally:
        dist.destroy_process_group()


def test_fsdp_accumulation_equals_the_whole_batch(tmp_path, one_thread):
    start_ranks(worker, (free_port(), str(tmp_path / 'rank')), WORLD)
    ranks = [torch.load(tmp_path / f'rank.{r}', weights_only=False) for r in range(WORLD)]
    for pool in POOLS:
        ref_loss, ref_grads, ref_norm = reference(pool)
        for r in range(WORLD):
            loss, grads, norm = ranks[r][pool]
            torch.testing.assert_close(loss, ref_loss)
            assert grads.keys() == ref_grads.keys()
            for name, grad in ref_grads.items():
                assert grads[name] is not None, f'{pool} {name}: no gradient on rank {r}'
                torch.testing.assert_close(grads[name], grad, msg=f'{pool} {name} rank {r}')
            torch.testing.assert_close(norm.double(), ref_norm, rtol=1e-6, atol=0)
    for r in range(WORLD):
        plain, accumulated = ranks[r]['reduce_scatters']
        assert plain > 0 and accumulated == plain, ranks[r]['reduce_scatters']


# train.py --shard=fsdp --grad_accum=2 under torchrun: the resumed run of test_sharding.py's
# test_fsdp_killed_and_resumed_on_three_ranks_sees_each_sample_once
