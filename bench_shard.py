"""
Memory per rank and step time of sharded training (--shard=fsdp) against DDP (--shard=none), on
2 gloo ranks on this machine's CPUs, for a model whose parameters dominate its memory.

    python bench_shard.py                                   # vit_b16, batch 2 per rank, 3 steps
    python bench_shard.py --model=vit_b32 --image_size=112 --steps=2   # quicker
    python bench_shard.py --build=whole     # each rank builds the whole model first (reference)

Each setting runs in fresh processes (torch.multiprocessing, gloo), so each rank's peak
resident memory (VmHWM) is that run's. Per rank it reports
  state_mib   the bytes this rank holds in parameters, gradients and AdamW's two moments, counted
              tensor by tensor after the last step (FSDP: this rank's rows; DDP: everything,
              plus DDP's gradient buckets);
  built_mib   peak resident memory once the model is built, before the first step, minus the
              memory held before (--build=meta: as train.py, only this rank's part is ever
              allocated; --build=whole: every rank first builds the whole model);
  peak_mib    peak resident memory minus the memory held before the model was built: state,
              activations, and what the communication buffers add;
  step_s      the median time of a training step (forward, backward, reduce, AdamW).
"""
import argparse
import json
import os
import socket
import statistics
import time
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import sharding
from model import PRESETS, Llip, init_weights

WORLD = 2


def rss_mib(field):
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ':')) / 1024


def local_bytes(tensor):
    tensor = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return tensor.numel() * tensor.element_size()


def one_rank(rank, port, shard, args, out):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=WORLD)
    torch.set_num_threads(args.threads)
    before = rss_mib('VmRSS')
    config = replace(PRESETS[args.model], image_size=args.image_size)
    if args.build == 'whole':   # the reference: every rank builds the whole model, then shards
        model = Llip(config, seed=0)
        model = sharding.shard(model) if shard == 'fsdp' else model
    else:   # as train.build: shapes on meta, sharded, then only this rank's part allocated
        with torch.device('meta'):
            model = Llip(config)
        model = sharding.shard(model) if shard == 'fsdp' else model
        model.to_empty(device='cpu')
        init_weights(model, seed=0)
    built = rss_mib('VmHWM') - before
    wrapped = model if shard == 'fsdp' else DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(rank)
    images = torch.randn(args.batch, 3, config.image_size, config.image_size, generator=g)
    tokens = torch.randint(1, 1000, (args.batch, config.context_length), generator=g)
    tokens[:, -1] = 49407   # EOT
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        wrapped(images, tokens).backward()
        if shard == 'fsdp':
            sharding.reduce_head_grads(model)
        optimizer.step()
        times.append(time.perf_counter() - start)
        optimizer.zero_grad(set_to_none=False)   # gradients kept, to be counted below
    state = sum(local_bytes(p) + local_bytes(p.grad) for p in model.parameters())
    state += sum(local_bytes(v) for s in optimizer.state.values() for v in s.values()
                 if torch.is_tensor(v))
    if shard == 'none':   # DDP's buckets: a flat copy of every gradient
        state += sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.device('meta'):   # sizes only
        params = sum(p.numel() for p in Llip(config).parameters())
    result = {'rank': rank, 'shard': shard, 'state_mib': state / 2 ** 20, 'built_mib': built,
              'peak_mib': rss_mib('VmHWM') - before, 'step_s': statistics.median(times[1:]),
              'parameters': params}
    with open(f'{out}.{shard}.{rank}', 'w') as f:
        json.dump(result, f)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='vit_b16', choices=sorted(PRESETS), help='preset')
    parser.add_argument('--image_size', type=int, default=224, help='image side in pixels')
    parser.add_argument('--batch', type=int, default=2, help='images per rank')
    parser.add_argument('--steps', type=int, default=3,
                        help='training steps (the first, warm-up, is not timed)')
    parser.add_argument('--threads', type=int, default=1, help='torch threads per rank')
    parser.add_argument('--out', default='/tmp/bench_shard', help='where ranks write results')
    parser.add_argument('--build', default='meta', choices=['meta', 'whole'],
                        help="meta: as train.py, each rank allocates its part only; whole: the "
                             "reference, every rank builds the whole model before sharding it")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error(f'--steps={args.steps}: at least 2 (the first is not timed)')
    rows = {}
    for shard in ('none', 'fsdp'):
        mp.spawn(one_rank, args=(free_port(), shard, args, args.out), nprocs=WORLD, join=True)
        rows[shard] = [json.load(open(f'{args.out}.{shard}.{r}')) for r in range(WORLD)]
    params = rows['none'][0]['parameters']
    print(f'{args.model} at {args.image_size}px, {params / 1e6:.1f}M parameters, batch '
          f'{args.batch} per rank, {WORLD} gloo ranks, {args.threads} thread(s) each, '
          f'--build={args.build}')
    print(f'{"shard":<6} {"rank":>4} {"state MiB":>10} {"built MiB":>10} {"peak MiB":>9} '
          f'{"step s":>7}')
    for shard, ranks in rows.items():
        for r in ranks:
            print(f'{shard:<6} {r["rank"]:>4} {r["state_mib"]:>10.0f} {r["built_mib"]:>10.0f} '
                  f'{r["peak_mib"]:>9.0f} {r["step_s"]:>7.2f}')
    mean = {s: {k: statistics.mean(r[k] for r in ranks)
                for k in ('state_mib', 'built_mib', 'peak_mib', 'step_s')}
            for s, ranks in rows.items()}
    print(f'fsdp / none: state {mean["fsdp"]["state_mib"] / mean["none"]["state_mib"]:.2f}, '
          f'built {mean["fsdp"]["built_mib"] / mean["none"]["built_mib"]:.2f}, '
          f'peak {mean["fsdp"]["peak_mib"] / mean["none"]["peak_mib"]:.2f}, '
          f'step time {mean["fsdp"]["step_s"] / mean["none"]["step_s"]:.2f}')


if __name__ == '__main__':
    main()
