"""What this proves about the initial weights (run: python -m pytest tests/test_init.py):
train.py builds the model on the meta device and materialises each rank's part (sharding.py,
model.init_weights), and the weights it starts from are the same, bit for bit, for one seed
whatever the ranks or the sharding:
- model.Llip(config, seed) built plainly on CPU, as users and tests build it;
- train.build on one process;
- train.build on 2 gloo ranks with DDP (each rank's own weights, before DDP's broadcast could
  hide a difference) and with --shard=fsdp (gathered whole, and the sharded towers compute
  what the plain model's do), on the tiny preset with K = 5, so that some parameters split
  unevenly over the two ranks;
and a different seed gives different weights; Llip(config) without a seed is decided by
torch.manual_seed, as before; the largest preset builds on the meta device without memory; the
planner counts as whole on every rank exactly the parameters sharding leaves unsharded.
"""
import os
import time

import torch
from torch.distributed.tensor import DTensor

import bench_plan
import sharding
import train
from model import PRESETS, Llip
from conftest import batch, free_port, start_ranks

FLAGS = ['--model=tiny', '--num_mixture=5', '--seed=7', '--device=cpu', '--dtype=float32',
         '--workers=0']


def set_up(out_dir, shard):
    """train.py's own set-up (ranks from torchrun's environment, if set) for these flags."""
    args = train.parser.parse_args([*FLAGS, f'--shard={shard}', f'--out_dir={out_dir}'])
    return train.set_up(args, train.check_flags(args))


def built_weights(run):
    """train.build's model, every tensor whole (gathered from every rank under fsdp)."""
    train.build(run)
    return sharding.full_state_dict(run.model)


def config():
    return train.check_flags(train.parser.parse_args(FLAGS))


def plain(seed=7):
    return {name: value.detach() for name, value in Llip(config(), seed=seed).state_dict().items()}


def assert_equal(a, b, what):
    assert a.keys() == b.keys(), what
    for name in a:
        assert torch.equal(a[name], b[name]), f'{what}: {name}'


def test_a_different_seed_gives_different_weights():
    a, b = plain(seed=7), plain(seed=8)
    drawn = [n for n in a if a[n].numel() > 1 and a[n].std() > 0]   # not the constant ones
    assert drawn and all(not torch.equal(a[n], b[n]) for n in drawn)
    assert_equal(a, plain(seed=7), 'the same seed twice')


def test_without_a_seed_torch_manual_seed_decides():
    torch.manual_seed(0)
    a = Llip(PRESETS['tiny']).text_proj
    torch.manual_seed(0)
    b = Llip(PRESETS['tiny']).text_proj
    torch.manual_seed(1)
    assert torch.equal(a, b) and not torch.equal(a, Llip(PRESETS['tiny']).text_proj)


def test_the_largest_preset_builds_on_meta_in_no_time():
    start = time.perf_counter()
    with torch.device('meta'):
        model = Llip(PRESETS['vit_g14'])
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) > 2e9
    assert time.perf_counter() - start < 30   # seconds; drawing 2.8 B numbers takes minutes


def test_one_process_builds_the_plain_models_weights(tmp_path):
    assert_equal(built_weights(set_up(str(tmp_path), 'none')), plain(), 'train.build, 1 process')


def test_two_ranks_with_ddp_and_with_fsdp_build_the_same_weights(tmp_path):
    port = free_port()
    start_ranks(_two_ranks, (port, str(tmp_path)), 2)
    expected = plain()
    model = Llip(config(), seed=7)
    for rank in range(2):
        ddp, fsdp, features, unsharded, head = torch.load(tmp_path / f'rank{rank}.pt')
        assert_equal(ddp, expected, f'rank {rank} with DDP')
        assert_equal(fsdp, expected, f'rank {rank} with fsdp')
        # and the sharded forward computes with them (the rows FSDP gathers are the ones set)
        torch.testing.assert_close(features, towers(model), rtol=1e-6, atol=1e-6)
        # what fsdp leaves whole on every rank is what the planner counts whole (bench_plan)
        assert unsharded == head > 0


def towers(model):
    """Both towers' outputs for a fixed batch: the keys of the images and z'_j of the captions."""
    images, tokens = batch(4, model.config)
    with torch.no_grad():
        return model.encode_image(images).keys, model.encode_text(tokens).emb


def _two_ranks(rank, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    run = set_up(os.path.join(out, 'run'), 'none')   # DDP, through train.py's set-up
    train.build(run)
    ddp = {name: value.detach() for name, value in run.model.state_dict().items()}
    run.args.shard = 'fsdp'   # the same ranks again, sharded
    fsdp = built_weights(run)
    unsharded = sum(p.numel() for p in run.model.parameters() if not isinstance(p, DTensor))
    features = towers(run.model)   # the same batch on both ranks, through the sharded towers
    head = bench_plan.count_parameters(run.config)['head']
    torch.save((ddp, fsdp, features, unsharded, head), os.path.join(out, f'rank{rank}.pt'))
    torch.distributed.destroy_process_group()
