"""What this proves about sharded training (run: python -m pytest tests/test_sharding.py):
two gloo processes with FSDP2 (fully_shard), each with half of the batch, give
- the same loss and, for every parameter, the same gradient after the reduce as one process on
  the whole batch, in float64: both loss forms (plain and gram), with and without --grad_ckpt,
  and pool=cls (SigLIP's loss; its single mixture token is a 1-row parameter whose shard on
  rank 1 is empty);
- the same whole-gradient norm and clipped gradients as torch's clip_grad_norm_ on one process
  (a shard's norm is not the gradient's);
- after three AdamW steps with two accumulated micro-steps each and clipping, the same weights
  as DDP on two ranks (float32);
and the traps of sharding, each shown: t and b, 0-d parameters fully_shard refuses, get their
0-d gradients; reading them works on every rank; a sharded state_dict() holds only this rank's
rows while full_state_dict gathers the single-process weights; rank 0's unsharded copy for
evaluation computes what the single-process model does.
"""
import os
from contextlib import nullcontext
import socket
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import sharding
from model import Llip
from test_model import batch, tiny

N, WORLD = 4, 2
# M = 8 heads of d = 4: K = 3 <= d takes the Gram form (loss.pick_form), K = 5 the plain one
CASES = {'gram': tiny(num_mixture=3), 'plain': tiny(num_mixture=5),
         'cls': tiny(pool='cls', num_mixture=3)}


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def spawn(worker, tmp_path, world=WORLD):
    """Run worker(rank, world, out) on `world` gloo ranks; returns what each rank saved."""
    mp.spawn(_init_and_run, args=(world, free_port(), worker, str(tmp_path / 'rank')),
             nprocs=world, join=True)
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
        sharding.reduce_scalar_grads(model)
        dist.all_reduce(loss := loss.detach())
        loss /= dist.get_world_size()
    return loss.detach(), full_grads(model)


# ----------------------------------------------------------------------------- exactness
def exactness_worker(rank, world):
    part = slice(rank * N // world, (rank + 1) * N // world)
    result = {}
    for case, config in CASES.items():
        for ckpt in (False, True) if case != 'cls' else (False,):
            model = sharding.shard(model_of(config, ckpt))
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
        single_loss, single_grads = loss_and_grads(model_of(config, ckpt), config, slice(None),
                                                   sharded=False)
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
            sharding.reduce_scalar_grads(raw)
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
