"""
Train Llip. The same script runs a CPU smoke test and multi-node pretraining: only flags
and torchrun's environment change.

    python train.py                                       # tiny preset, built-in synthetic data, CPU
    python train.py --model=vit_b16 --data='shards/{00000..09999}.tar' --batch_size=256
    torchrun --standalone --nproc_per_node=8 train.py --model=vit_b16 --data=...      # 1 node, 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        --rdzv_id=llip --max-restarts=3 train.py --model=vit_b16 --data=... --resume=auto  # on each node

DDP is decided by torchrun's environment alone (RANK, WORLD_SIZE, LOCAL_RANK): NCCL on
CUDA, gloo on CPU. --batch_size is per rank; the loss of each rank covers its images against
every rank's captions (loss.py), so the contrastive batch is batch_size x world size.
Every flag is --key=value; `python train.py --help` lists them. Any LlipConfig field can be
overridden (--num_mixture=64 --tau=8 ...).
"""
import argparse
import dataclasses
import json
import math
import os
import re
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import synthetic
from model import PRESETS, Llip, LlipConfig, UnsafeCheckpointError, load_weights

# ----------------------------------------------------------------------------- flags
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--model', default='tiny', choices=sorted(PRESETS), help='model preset (model.PRESETS)')
p.add_argument('--data', default='synthetic',
               help="training shards: a brace pattern 'dir/{00000..00099}.tar', a directory, or 'synthetic' "
                    "(the built-in dataset, generated into --synthetic_dir on first use)")
p.add_argument('--synthetic_dir', default='data/synthetic', help='where the built-in synthetic dataset lives')
p.add_argument('--synthetic_objects', type=int, default=3,
               help='built-in data: 1 to this many objects per image (at most 5; another value needs '
                    'its own --synthetic_dir)')
p.add_argument('--out_dir', default='out', help='checkpoints, log.jsonl and config.json go here')
p.add_argument('--steps', type=int, default=1000, help='optimizer steps in total')
p.add_argument('--batch_size', type=int, default=64, help='images (and captions) per rank per micro-step')
p.add_argument('--grad_accum', type=int, default=1,
               help='micro-steps per optimizer step. Note: each micro-step is its own contrastive batch, '
                    'so accumulation does not add negatives; it only averages gradients')
p.add_argument('--lr', type=float, default=3e-4,
               help='peak learning rate (3e-4: what runs/study.sh picks for the tiny preset, pool=llip, on '
                    'the validation split; paper: 5e-4 for B, 4e-4 for L/H/G)')
p.add_argument('--min_lr_ratio', type=float, default=0.1, help='the cosine decays to lr * min_lr_ratio')
p.add_argument('--warmup', type=int, default=50, help='linear warmup steps (paper: 2000)')
p.add_argument('--weight_decay', type=float, default=0.2, help='AdamW decay on matrices; none on biases, norms, logit scale/bias')
p.add_argument('--beta1', type=float, default=0.9, help='AdamW beta1')
p.add_argument('--beta2', type=float, default=0.95, help='AdamW beta2 (0.95 as in SigLIP and the paper)')
p.add_argument('--eps', type=float, default=1e-6, help='AdamW epsilon')
p.add_argument('--grad_clip', type=float, default=1.0, help='clip the global gradient norm (0: off)')
p.add_argument('--chunk_size', type=int, default=0,
               help='llip_loss: images per chunk, each against every caption; 0: picked from the shapes')
p.add_argument('--dtype', default='auto', choices=['auto', 'float32', 'bfloat16', 'float16'],
               help='autocast dtype; auto = bf16 on GPUs that support it, fp16 + GradScaler on older GPUs, fp32 on CPU')
p.add_argument('--compile', action=argparse.BooleanOptionalAction, default=False, help='torch.compile the model')
p.add_argument('--grad_ckpt', action=argparse.BooleanOptionalAction, default=False,
               help='activation checkpointing in both towers (less memory, ~30%% more compute)')
p.add_argument('--device', default='auto', help="'auto' (cuda if available, else cpu), 'cpu' or 'cuda'")
p.add_argument('--workers', type=int, default=2, help='data-loading processes per rank')
p.add_argument('--seed', type=int, default=0, help='seed of the model init and the data order')
p.add_argument('--log_every', type=int, default=10, help='steps between lines in log.jsonl')
p.add_argument('--eval', action=argparse.BooleanOptionalAction, default=True,
               help='zero-shot and retrieval on the synthetic evaluation splits (with --data=synthetic)')
p.add_argument('--eval_every', type=int, default=0, help='steps between evaluations (0: only at the end)')
p.add_argument('--eval_split', default='test', choices=['test', 'val'],
               help="which synthetic evaluation splits: 'val' to choose settings (e.g. the learning rate), "
                    "'test' for the numbers that are reported")
p.add_argument('--save_every', type=int, default=250, help='steps between checkpoints (and one at the end)')
p.add_argument('--keep', type=int, default=3,
               help='how many of the newest checkpoints to keep (at least 1)')
p.add_argument('--resume', default='auto',
               help="'auto': continue from the newest valid checkpoint in --out_dir if any; "
                    "a path: from that file; 'never': start afresh")


def boolean(text):
    """A bool flag's value. Anything but these words is an error: 'on' or a typo must not
    quietly turn a feature off."""
    words = {'true': True, '1': True, 'yes': True, 'false': False, '0': False, 'no': False}
    if text.lower() not in words:
        raise argparse.ArgumentTypeError(f'{text!r}: expected one of true/false/1/0/yes/no')
    return words[text.lower()]


config_fields = [f for f in dataclasses.fields(LlipConfig)]
for f in config_fields:   # every model field can override the preset, e.g. --pool=avg --num_mixture=64
    kind = boolean if f.type in (bool, 'bool') else \
        {int: int, 'int': int, float: float, 'float': float}.get(f.type, str)
    p.add_argument(f'--{f.name}', type=kind, default=None, help=f'model: override the preset\'s {f.name}')

# flags whose value must be at least 1; 0 or less would loop zero times, divide by zero or (for
# --keep) delete every checkpoint right after writing it. The model's own fields (num_mixture,
# mixer_heads, tau) are checked by LlipConfig.
AT_LEAST_ONE = ('steps', 'grad_accum', 'log_every', 'save_every', 'keep')


def check_flags(args):
    """A one-line error naming the first flag with a value out of range, before any work."""
    for name in AT_LEAST_ONE:
        if getattr(args, name) < 1:
            sys.exit(f'error: --{name}={getattr(args, name)}: must be an integer >= 1')


CHECKPOINT = re.compile(r'ckpt_(\d+)\.pt')   # what save_checkpoint writes: ckpt_<step>.pt


def checkpoint_paths(out_dir):
    """train.py's checkpoints in out_dir, newest (highest step) first. Only ckpt_<digits>.pt:
    a user's ckpt_best.pt is neither resumed from nor deleted by the rotation."""
    steps = {int(m.group(1)): os.path.join(out_dir, name) for name in os.listdir(out_dir)
             if (m := CHECKPOINT.fullmatch(name))}
    return [steps[s] for s in sorted(steps, reverse=True)]


def numpy_rng_state():
    """np.random's state as a tensor and plain values: torch.load(weights_only=True) refuses the
    numpy array inside np.random.get_state()."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {'kind': str(kind), 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
            'has_gauss': int(has_gauss), 'cached_gaussian': float(cached_gaussian)}


def set_numpy_rng_state(state):
    if isinstance(state, tuple):   # a checkpoint from before numpy_rng_state: get_state() as is
        return np.random.set_state(state)
    np.random.set_state((state['kind'], state['keys'].numpy().astype(np.uint32), state['pos'],
                         state['has_gauss'], state['cached_gaussian']))


def main():
    # everything runs here, not at import: spawned processes (DataLoader workers on macOS and
    # Windows) import this file as __mp_main__ and must not start a second training run
    args = p.parse_args()
    check_flags(args)

    # ----------------------------------------------------------------------------- distributed, device, precision
    ddp = 'RANK' in os.environ
    rank, world, local_rank = 0, 1, 0
    device = args.device if args.device != 'auto' else ('cuda' if torch.cuda.is_available() else 'cpu')
    if ddp:
        rank, world, local_rank = int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), int(os.environ['LOCAL_RANK'])
        if device == 'cuda':
            device = f'cuda:{local_rank}'
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    master = rank == 0
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    if args.dtype == 'auto':
        args.dtype = 'float32' if device_type == 'cpu' else \
            'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'   # by capability, not by GPU name
    ptdtype = getattr(torch, args.dtype)
    autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
    scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)   # fp16 only
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


    def log(*a):
        if master:
            tqdm.write(' '.join(str(x) for x in a))


    overrides = {f.name: getattr(args, f.name) for f in config_fields if getattr(args, f.name) is not None}
    try:
        config = dataclasses.replace(PRESETS[args.model], **overrides)
    except ValueError as e:   # LlipConfig's messages start with the field's name: the flag's
        sys.exit(f'error: --{e}')
    os.makedirs(args.out_dir, exist_ok=True)
    run_config = {**vars(args), 'world_size': world, 'model_config': dataclasses.asdict(config)}
    log('config:', json.dumps(run_config, indent=1))

    # ----------------------------------------------------------------------------- model and optimizer
    torch.manual_seed(args.seed)   # same init on every rank (DDP also broadcasts rank 0's weights)
    model = Llip(config).to(device)
    model.set_grad_checkpointing(args.grad_ckpt)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [(n, p) for n, p in model.named_parameters() if p.ndim < 2]   # biases, norms, logit scale/bias
    kinds = lambda names: ', '.join(dict.fromkeys(re.sub(r'\.\d+\.', '.*.', n) for n in names))   # blocks.3. -> blocks.*.
    log(f'parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M. With weight decay: '
        f'{kinds(n for n, p in model.named_parameters() if p.ndim >= 2)}. Without: {kinds(n for n, _ in no_decay)}')
    optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': args.weight_decay},
                                   {'params': [p for _, p in no_decay], 'weight_decay': 0.0}],
                                  lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)


    def lr_at(step):
        """Linear warmup, then cosine from lr down to lr * min_lr_ratio."""
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


    # ----------------------------------------------------------------------------- data
    if args.data == 'synthetic':
        if master:
            try:   # settings that differ from the data already there: a message, not a traceback
                synthetic.make_synthetic(args.synthetic_dir, seed=0, image_size=config.image_size,
                                         max_objects=args.synthetic_objects)
            except ValueError as e:
                sys.exit(f'error: --synthetic_dir: {e}')
        if ddp:
            dist.barrier()
        train_urls = os.path.join(args.synthetic_dir, 'train')
    else:
        train_urls = args.data
    loader = data.ShardLoader(train_urls, batch_size=args.batch_size, image_size=config.image_size,
                              context_length=config.context_length, tokenizer=config.tokenizer, rank=rank,
                              world_size=world, workers=args.workers, seed=args.seed, resample=True)


    # ----------------------------------------------------------------------------- checkpoints
    def save_checkpoint(step):
        """Every rank contributes its loader position; rank 0 writes atomically (temp file, rename)."""
        positions = [None] * world
        if ddp:
            dist.all_gather_object(positions, loader.state_dict())
        else:
            positions = [loader.state_dict()]
        if not master:
            return
        state = {'model': raw_model.state_dict(),   # the plain module: no DDP 'module.' or compile '_orig_mod.'
                 'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(), 'step': step,
                 'config': run_config, 'loader': positions,
                 'rng': {'torch': torch.get_rng_state(), 'numpy': numpy_rng_state()}}
        path = os.path.join(args.out_dir, f'ckpt_{step:07d}.pt')
        with open(path + '.tmp', 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + '.tmp', path)   # a crash mid-write leaves the previous checkpoints intact
        latest = os.path.join(args.out_dir, 'ckpt.pt')   # the newest, for eval.py --ckpt=out/ckpt.pt
        if os.path.exists(latest + '.tmp'):
            os.remove(latest + '.tmp')
        os.link(path, latest + '.tmp')
        os.replace(latest + '.tmp', latest)
        for old in checkpoint_paths(args.out_dir)[args.keep:]:
            os.remove(old)


    def load_checkpoint():
        """The newest checkpoint that loads, or None. A truncated or corrupt file is skipped."""
        if args.resume == 'never':
            return None
        candidates = checkpoint_paths(args.out_dir) if args.resume == 'auto' else [args.resume]
        for path in candidates:
            try:   # weights_only: a checkpoint holds tensors and plain containers, never code
                state = load_weights(path)
                state['model'], state['step']
            except Exception as e:
                why = str(e) if isinstance(e, UnsafeCheckpointError) else f'{type(e).__name__}: {e}'
                if args.resume != 'auto':   # the file asked for: an error, not a fallback
                    sys.exit(f'error: --resume={path}: {why}')
                log(f'warning: skipping checkpoint {path}: {why}')
                continue
            theirs = state['config']['model_config']
            mine = dataclasses.asdict(config)
            differ = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
            if differ:
                sys.exit(f'error: checkpoint {path} was trained with a different model config '
                         f'(field: checkpoint vs now): {differ}. Use another --out_dir or the same flags.')
            log(f'resuming from {path} at step {state["step"]}')
            return state
        if args.resume != 'auto':
            sys.exit(f'error: --resume={args.resume}: no loadable checkpoint there')
        return None


    start_step = 0
    state = load_checkpoint()
    if state is not None:
        model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        scaler.load_state_dict(state['scaler'])
        torch.set_rng_state(state['rng']['torch'])
        set_numpy_rng_state(state['rng']['numpy'])
        if len(state['loader']) != world:
            log(f'warning: the checkpoint was written by {len(state["loader"])} ranks, this run has {world}: '
                'the data order starts afresh from its epoch')
        loader.load_state_dict(state['loader'][rank % len(state['loader'])])
        start_step = state['step']
        del state
    if master:   # only now that the run is accepted: a refused resume leaves the old config.json
        with open(os.path.join(args.out_dir, 'config.json'), 'w') as f:
            json.dump(run_config, f, indent=1)

    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if ddp:
        model = DistributedDataParallel(model, device_ids=[local_rank] if device_type == 'cuda' else None)

    # SIGTERM (preemption): finish the step, save, exit cleanly
    stop_requested = False


    def on_sigterm(signum, frame):
        nonlocal stop_requested
        stop_requested = True


    signal.signal(signal.SIGTERM, on_sigterm)


    def evaluate(step):
        """Zero-shot and retrieval on the synthetic evaluation splits (rank 0)."""
        if not master or not args.eval or args.data != 'synthetic':
            return {}
        import eval as llip_eval
        raw_model.eval()
        with torch.no_grad(), autocast:
            root = os.path.join(args.synthetic_dir, 'val' if args.eval_split == 'val' else '')
            metrics = llip_eval.evaluate_synthetic(raw_model, root, device=device)
        raw_model.train()
        log(f'step {step} eval: ' + ', '.join(f'{k} {v:.3f}' for k, v in metrics.items()))
        return metrics


    # ----------------------------------------------------------------------------- training
    logfile = open(os.path.join(args.out_dir, 'log.jsonl'), 'a') if master else None
    batches = iter(loader)
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, disable=not master,
               dynamic_ncols=True)
    t0 = time.time()
    model.train()
    for step in bar:
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group['lr'] = lr
        total = torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            images, tokens = next(batches)
            images, tokens = images.to(device, non_blocking=True), tokens.to(device, non_blocking=True)
            # DDP all-reduces gradients only on the last micro-step
            sync = nullcontext() if not ddp or micro == args.grad_accum - 1 else model.no_sync()
            with sync:
                with autocast:
                    loss = model(images, tokens, chunk_size=args.chunk_size or None) / args.grad_accum
                scaler.scale(loss).backward()
            total += loss.detach()
        if ddp:   # the global loss is the mean over ranks; every rank sees the same value
            dist.all_reduce(total)
            total /= world
        total = total.item()
        if not math.isfinite(total):
            log(f'error: loss is {total} at step {step}; stopping. The last good checkpoint in {args.out_dir} '
                f'is untouched: try a lower --lr, --grad_clip or --dtype=bfloat16/float32.')
            sys.exit(1)
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float('inf'))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():   # the authors' clamp: a = exp(t) <= 100
            raw_model.logit_scale.clamp_(0, math.log(100))

        done = step + 1
        dt, t0 = time.time() - t0, time.time()
        images_per_s = args.batch_size * args.grad_accum * world / dt
        bar.set_postfix(loss=f'{total:.4f}', lr=f'{lr:.2e}', img_s=f'{images_per_s:.0f}')
        record = None
        if done % args.log_every == 0 or done == args.steps:
            record = {'step': done, 'loss': total, 'lr': lr, 'grad_norm': grad_norm.item(),
                      'images_per_s': images_per_s, 'logit_scale': raw_model.logit_scale.exp().item(),
                      'logit_bias': raw_model.logit_bias.item(), 'time': time.time()}
        if (args.eval_every and done % args.eval_every == 0) or done == args.steps:
            record = {**(record or {'step': done}), **evaluate(done)}
        if record and master:
            logfile.write(json.dumps(record) + '\n')
            logfile.flush()
        stop = torch.tensor(float(stop_requested), device=device)
        if ddp:
            dist.all_reduce(stop)   # every rank stops at the same step
        if done % args.save_every == 0 or done == args.steps or stop.item():
            save_checkpoint(done)
        if stop.item():
            log(f'SIGTERM: saved a checkpoint at step {done}; exiting. Resume with --resume=auto.')
            break

    if master:
        logfile.close()
    if ddp:
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
