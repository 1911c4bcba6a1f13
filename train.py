"""
Train Llip. The same script runs a CPU smoke test and multi-node pretraining: only flags
and torchrun's environment change.

    python train.py                           # tiny preset, built-in synthetic data, CPU
    python train.py --model=vit_b16 --data='shards/{00000..09999}.tar' --batch_size=256
    python train.py --data='shards/{00000..00099}.tar' --zeroshot_data=imagenet/val \\
        --zeroshot_classnames=imagenet --zeroshot_templates=imagenet --retrieval_data=coco/val \\
        --eval_every=1000 --logger=tensorboard  # evaluation on real data during training
    torchrun --standalone --nproc_per_node=8 train.py --model=vit_b16 --data=...   # 1 node, 8 GPUs
    torchrun --standalone --nproc_per_node=8 train.py --model=vit_g14 --shard=fsdp --grad_ckpt \
        --data=...                  # parameters, gradients and AdamW state split over the ranks
    torchrun --standalone --nproc_per_node=8 train.py --model=vit_b16 --data=... \\
        --global_batch=32768 --batch_size=256   # the paper's batch: 8 GPUs x 256 x 16 micro-batches
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        --rdzv_id=llip --max-restarts=3 train.py --model=vit_b16 --data=... --resume=auto \\
        --out_dir=/shared/run1                          # on each node; one shared --out_dir

DDP is decided by torchrun's environment alone (RANK, WORLD_SIZE, LOCAL_RANK): NCCL on
CUDA, gloo on CPU. --batch_size is per rank per micro-batch; the loss of each rank covers its
images against every rank's captions (loss.py), and --grad_accum micro-batches are one
contrastive batch (accumulation.py caches their features), so a step's contrastive batch is
batch_size x world size x grad_accum. --global_batch=N asks for that product and derives the
other two from N and the world size: the same command trains the same batch on 8 or 256 GPUs.
--shard=fsdp shards the model instead of copying it (sharding.py); its checkpoints are
directories every rank writes (checkpoint_dcp.py). A run resumes from either kind of checkpoint
on any number of ranks, each sample of the epoch seen once. Ranks started by hand (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT set) wait --rendezvous_timeout s for each other.
Every flag is --key=value (bools too: --eval=false); `python train.py --help` lists them. Any
LlipConfig field can be overridden (--num_mixture=64 --tau=8 ...). On several nodes, --out_dir
must be one shared filesystem path: rank 0 picks the checkpoint and every rank reads it.
What happens on preemption, a dead rank, NaN, a full disk or a corrupt checkpoint: README,
"Reliability"; checkpoint.py writes and verifies the checkpoints.
"""
import argparse
import dataclasses
import datetime
import gc
import io
import itertools
import json
import math
import os
import socket
import sys
import time
from contextlib import nullcontext, redirect_stdout

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import accumulation
import bench_plan
import checkpoint
import data
import eval as llip_eval
import eval_plan
import run_dir
import sharding
import synthetic
from metrics import print_table
from model import Llip, LlipConfig, init_weights
from preemption import Preemption
from train_flags import check_flags, config_fields, parser

parser.description = __doc__   # --help shows the commands above


def lr_at(step, args):
    """Linear warmup, then cosine from lr down to lr * min_lr_ratio."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)


# ----------------------------------------------------------------------------- the run
@dataclasses.dataclass
class Run:
    """What a run is made of, set up once by main() and read by train() and checkpoint.py.
    `model` is the plain module (saved, evaluated, logged); `wrapped` is what steps run the
    towers through: accumulation.Towers of the same module, compiled and/or in
    DistributedDataParallel."""
    args: argparse.Namespace
    config: LlipConfig
    rank: int
    world: int
    ddp: bool
    device: str
    autocast: object                 # a context manager: torch.autocast or nullcontext
    scaler: torch.amp.GradScaler     # enabled for float16 only
    model: Llip = None
    wrapped: torch.nn.Module = None
    optimizer: torch.optim.Optimizer = None
    loader: data.ShardLoader = None

    @property
    def master(self):
        return self.rank == 0

    @property
    def sharded(self):
        return self.args.shard == 'fsdp'

    def log(self, *parts):
        if self.master:
            tqdm.write(' '.join(str(x) for x in parts))

    def record(self):
        """The resolved run config saved in config.json and every checkpoint: the flags without
        nulls, the world size, and the model's fields as resolved."""
        fields = {f.name for f in config_fields}
        flags = {k: v for k, v in vars(self.args).items() if k not in fields and v is not None}
        return {**flags, 'world_size': self.world,
                'model_config': dataclasses.asdict(self.config)}


def main():
    """One training run: flags, set up (ranks, device, precision), build (model, optimizer),
    data, resume, train, finish. Everything runs here, not at import: spawned processes
    (DataLoader workers on macOS and Windows) import this file as __mp_main__ and must not start
    a second training run."""
    args = parser.parse_args()
    config = check_flags(args)
    plan = eval_plan.training_plan(args)
    run = set_up(args, config)
    build(run)
    # torch and the compiler stack that AdamW imports leave ~280,000 objects that live as long
    # as the process: frozen, the garbage collector no longer walks them (a process's exit: 1.75 s
    # -> 0.5 s) and the DataLoader workers forked below share their pages, not copy them
    gc.freeze()
    run.loader = training_data(run)
    start_step = checkpoint.resume(run)
    if start_step >= args.steps:   # change nothing: not config.json, not log.jsonl
        run.log(f'nothing to do: the checkpoint is at step {start_step} and --steps={args.steps}')
        return
    if run.master:   # only now that the run is accepted: a refused resume leaves the old config
        run_dir.write_json(os.path.join(args.out_dir, 'config.json'), run.record())
        checkpoint.cut_log(os.path.join(args.out_dir, 'log.jsonl'), start_step)
    run.wrapped = wrap(run)
    run.log(plan.summary)
    with Preemption(args.stop_grace) as preemption:
        train(run, start_step, plan, preemption)
    if run.ddp:
        dist.destroy_process_group()


def ranks():
    """(ddp, rank, world) from torchrun's environment, or a one-line error where it is
    inconsistent (a rank outside 0..WORLD_SIZE-1 would wait for peers that never come)."""
    if 'RANK' not in os.environ:
        return False, 0, 1
    env = {k: os.environ.get(k, '') for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')}
    rank, world = env['RANK'], env['WORLD_SIZE']
    if not (rank.isdecimal() and world.isdecimal() and int(rank) < int(world)
            and env['MASTER_ADDR'] and env['MASTER_PORT']):
        sys.exit(f"error: {' '.join(f'{k}={v!r}' for k, v in env.items())}: expected 0 <= RANK < "
                 'WORLD_SIZE and MASTER_ADDR, MASTER_PORT set (torchrun sets all four)')
    return True, int(rank), int(world)


def rendezvous(rank, world, timeout):
    """The store every rank meets at (torchrun's, or rank 0's when the ranks were started by
    hand), within timeout seconds: a rank that never comes is a one-line error, not a silent
    wait of torch's default 30 minutes."""
    addr, port = os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT'])
    if 'TORCHELASTIC_RUN_ID' not in os.environ:   # by hand: say what it waits for
        print(f'rank {rank}: waiting up to {timeout:g} s for {world} ranks at {addr}:{port} '
              '(--rendezvous_timeout)', file=sys.stderr, flush=True)
    start = time.time()
    try:
        if rank > 0:   # rank 0's store is up first: torch's client would log a C++ trace a try
            listening(addr, port, start + timeout)
        store, _, _ = next(dist.rendezvous('env://', rank=rank, world_size=world,
                                           timeout=datetime.timedelta(seconds=timeout)))
    except (RuntimeError, ValueError, OSError) as e:   # torch's DistStoreError is a RuntimeError
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.exit(f'error: rank {rank} waited {time.time() - start:.0f} s for {world} ranks at '
                 f'{addr}:{port} and gave up ({reason}); start them all with torchrun '
                 f'(--nproc_per_node={world}), or each with its RANK within '
                 f'--rendezvous_timeout={timeout:g} s')
    # from here on, the store's operations wait as long as torch's default (the first
    # collective can come minutes after the rendezvous: rank 0 writes the built-in data first)
    store.set_timeout(default_pg_timeout)
    return store


def listening(addr, port, deadline):
    """Return once something listens at addr:port; OSError after the deadline."""
    while True:
        try:
            socket.create_connection((addr, port), timeout=1).close()
            return
        except OSError:
            if time.time() > deadline:
                raise OSError(f'nothing listens at {addr}:{port}: is rank 0 running?') from None
            time.sleep(0.2)


def set_up(args, config):
    """Ranks (torchrun's environment alone decides DDP), device and precision."""
    ddp, rank, world = ranks()
    if rank == 0:   # one run per --out_dir, before anything there is read or written
        try:
            run_dir.claim(args.out_dir)
        except run_dir.RunDirError as e:
            sys.exit(f'error: {e}')
    device = args.device
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if ddp:
        if device == 'cuda':
            device = f'cuda:{os.environ.get("LOCAL_RANK", 0)}'
            torch.cuda.set_device(device)
        # torchrun keeps its store across --max-restarts: without a prefix per attempt, a
        # restarted rank can read a dead rank's address from the last attempt and never connect
        store = rendezvous(rank, world, args.rendezvous_timeout)
        attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')
        dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo', rank=rank,
                                world_size=world,
                                store=dist.PrefixStore(f'attempt{attempt}/', store))
    elif args.shard == 'fsdp':   # one process: a process group of one, one shard
        dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo',
                                store=dist.HashStore(), rank=0, world_size=1)
        ddp = True
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    if args.dtype == 'auto':   # by capability, not by GPU name
        args.dtype = 'float32' if device_type == 'cpu' else \
            'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    dtype = getattr(torch, args.dtype)
    if args.shard == 'fsdp' and dtype == torch.float16:
        sys.exit('error: --shard=fsdp with --dtype=float16: the GradScaler is not wired for '
                 'sharded gradients here; use --dtype=bfloat16 or float32')
    autocast = nullcontext() if dtype == torch.float32 else \
        torch.autocast(device_type, dtype=dtype)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)   # fp16 only
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    args.device = device
    os.makedirs(args.out_dir, exist_ok=True)
    return Run(args, config, rank, world, ddp, device, autocast, scaler)


def build(run):
    """The model and AdamW (decay on matrices only). The model is built on the meta device
    (shapes only, no memory), sharded with --shard=fsdp, and only then materialised on this
    rank's device: each rank allocates its own part (with fsdp, its rows of every parameter, so
    no rank ever holds the whole model) and model.init_weights draws each parameter's initial
    value from --seed and the parameter's name: the same weights on 1 or 64 ranks, with DDP or
    fsdp, as model.Llip(config, seed=--seed). AdamW is built after sharding: it must hold this
    rank's rows."""
    args, config = run.args, run.config
    planned = log_plan(run)   # before any memory is spent
    torch.manual_seed(args.seed)   # torch's global generator, for whatever else draws from it
    with torch.device('meta'):
        model = Llip(config)
    model.set_grad_checkpointing(args.grad_ckpt)
    if run.sharded:   # every block, then each tower, then the rest: sharding.shard
        device_type = 'cuda' if run.device.startswith('cuda') else 'cpu'
        model = sharding.shard(model, device_type, param_dtype=getattr(torch, args.dtype),
                               compile=args.compile)
    try:
        model.to_empty(device=run.device)
        init_weights(model, args.seed)
    except RuntimeError as e:   # torch.OutOfMemoryError on CUDA, the CPU allocator's otherwise
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate" not in str(e):
            raise
        sys.exit(f'error: --model={args.model}: out of memory on {run.device} allocating its '
                 f'weights ({planned:.2f} GiB planned per rank); try --shard=fsdp on more ranks')
    run.model = model
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]   # biases, norms, logit scale/bias
    run.optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': args.weight_decay},
                                       {'params': no_decay, 'weight_decay': 0.0}],
                                      lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)
    micro = f' x {args.grad_accum} micro-batches' if args.grad_accum > 1 else ''
    images = args.batch_size * run.world * args.grad_accum
    captions = (f', against {images * args.captions_per_image} captions '
                f'({args.captions_per_image} an image)' if args.captions_per_image > 1 else '')
    run.log(f'images per step: {args.batch_size} per rank x {run.world} rank(s)'
            f'{micro} = {images}{captions}')
    run.log(f'device {run.device}, {args.dtype}; data {args.data}')
    run.log(f'out_dir {args.out_dir}')


def log_plan(run):
    """The model's size and the memory a training step will need per rank (bench_plan's
    arithmetic), printed by rank 0 before the model is built; returns that memory in GiB."""
    args, config = run.args, run.config
    params = bench_plan.count_parameters(config)['total']
    device_type = 'cuda' if run.device.startswith('cuda') else 'cpu'
    plan = bench_plan.memory_plan(config, args.batch_size, args.batch_size * run.world *
                                  args.grad_accum, run.world, args.shard, args.grad_ckpt,
                                  args.dtype, device_type)
    gib = {k: v / 2 ** 30 for k, v in plan.items()}
    run.log(f'model {args.model}: pool={config.pool}, K={config.num_mixture} mixture tokens, '
            f'D={config.embed_dim}, tau={config.tau:g}, {params / 1e6:.2f}M parameters')
    # state: float32 weights and gradients, AdamW's two moments (with fsdp, this rank's share)
    run.log(f"memory per rank (bench_plan): {gib['total']:.2f} GiB = state {gib['state']:.2f}"
            + (f' (1/{run.world})' if run.sharded else '')
            + f" + activations {gib['activations']:.2f} + loss {gib['transient']:.2f}")
    return gib['total']


def training_data(run):
    """This rank's ShardLoader; the built-in data is written first (by rank 0) if need be."""
    args, config = run.args, run.config
    urls = args.data
    if args.data == 'synthetic':
        if run.master:
            try:   # settings that differ from the data already there: a message, not a traceback
                synthetic.make_synthetic(args.synthetic_dir, seed=0, image_size=config.image_size,
                                         max_objects=args.synthetic_objects,
                                         captions=args.synthetic_captions.split(','))
            except ValueError as e:
                sys.exit(f'error: the built-in data: {e}')
        if run.ddp:
            dist.barrier()
        urls = os.path.join(args.synthetic_dir, 'train')
    try:
        return data.ShardLoader(urls, batch_size=args.batch_size, image_size=config.image_size,
                                context_length=config.context_length,
                                tokenizer=config.tokenizer, rank=run.rank, world_size=run.world,
                                workers=args.workers, seed=args.seed, resample=True,
                                # the built-in data has one caption per line
                                caption_lines=args.caption_lines or args.data == 'synthetic',
                                captions_per_image=args.captions_per_image)
    except ValueError as e:
        sys.exit(f'error: --data={args.data}: {e}')


def wrap(run):
    """What the steps run the towers through (accumulation.Towers: one forward for both, so
    that a wrapper sees it): compiled (--compile), then DistributedDataParallel; with
    --shard=fsdp the towers of the sharded model as they are (its blocks were compiled before
    sharding; encode_image / encode_text are its registered forward methods)."""
    towers = accumulation.Towers(run.model)
    if run.sharded:
        return towers
    wrapped = torch.compile(towers) if run.args.compile else towers
    if run.ddp:
        ids = [torch.device(run.device)] if run.device.startswith('cuda') else None
        wrapped = DistributedDataParallel(wrapped, device_ids=ids)
    return wrapped


# ----------------------------------------------------------------------------- training
def train(run, start_step, plan, preemption):
    """The loop: a step, a log line, an evaluation and a checkpoint when due, until --steps or
    a SIGTERM (then save and exit 0)."""
    args = run.args
    log_path = os.path.join(args.out_dir, 'log.jsonl')
    tracker = run_dir.Tracker(args.logger, args.out_dir, run.record()) if run.master else None
    logfile = run_dir.open_append(log_path) if run.master else None
    stream = iter(run.loader)

    def write(record):   # a line of log.jsonl, and the tracker's
        if run.master:
            logfile.write(json.dumps(record) + '\n')
            logfile.flush()
            tracker.log(record)
    try:
        try:
            first = Preemption.deaf_workers(stream)
        except (RuntimeError, ValueError) as e:   # e.g. no valid sample in any shard
            sys.exit(f'error: --data={args.data}: {str(e).strip().splitlines()[-1]}')
        batches = itertools.chain([first], stream)
        bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps,
                   disable=not run.master, dynamic_ncols=True)
        t0 = time.time()
        run.wrapped.train()
        for step in bar:
            lr = lr_at(step, args)
            for group in run.optimizer.param_groups:
                group['lr'] = lr
            loss, grad_norm = train_step(run, batches, step)
            done = step + 1
            dt, t0 = time.time() - t0, time.time()
            images_per_s = args.batch_size * args.grad_accum * run.world / dt
            bar.set_postfix(loss=f'{loss:.4f}', lr=f'{lr:.2e}', img_s=f'{images_per_s:.0f}')
            if done % args.log_every == 0 or done == args.steps:
                write({'step': done, 'loss': loss, 'lr': lr, 'grad_norm': grad_norm,
                       'images_per_s': images_per_s,
                       'logit_scale': run.model.logit_scale.exp().item(),
                       'logit_bias': run.model.logit_bias.item(), 'time': time.time()})
            stop = torch.tensor(float(preemption.requested), device=run.device)
            if run.ddp:
                dist.all_reduce(stop)   # every rank stops at the same step
            # Saved before the evaluation, which can take minutes and touches other data: a
            # crash, a kill or a SIGTERM during it loses no step of a save step or of the last
            # step. An evaluation step that is not a save step is not saved: --save_every says
            # how often a checkpoint is worth its cost (the model and AdamW state written whole)
            # and --keep counts checkpoints; a failing evaluation is a warning (eval_plan.py).
            if done % args.save_every == 0 or done == args.steps or stop.item():
                checkpoint.save_run(run, done, preemption)
            due = plan.any and ((args.eval_every and done % args.eval_every == 0)
                                or done == args.steps)
            if stop.item():   # no evaluation now: the signal asks for an exit within seconds
                then = ('Resume with --resume=auto.' if done < args.steps else
                        f'Its final evaluation was skipped: eval.py --ckpt={args.out_dir}'
                        if due else '')
                run.log(f'{preemption.name}: saved a checkpoint at step {done}; exiting. {then}')
                break
            if due:
                metrics = evaluate(run, plan, done, final=done == args.steps)
                if metrics:
                    write({'step': done, **metrics})
    finally:
        stream.close()   # the DataLoader workers end now, however the loop ended
        if run.master:
            logfile.close()
            tracker.close()


def evaluate(run, plan, step, final):
    """The EvalPlan on rank 0 (eval_plan.py), as log.jsonl's flat keys ({} on other ranks, or
    if it failed); a line, or for the final evaluation the table eval.py prints."""
    # rank 0 evaluates alone: a sharded model would wait for the other ranks in its first
    # forward, so every rank gathers the weights and rank 0 gets a plain copy
    model = sharding.unsharded_copy(run.model, run.device, run.master)
    if not run.master:
        return {}
    results = eval_plan.evaluate_plan(model, plan, run.device, run.autocast)
    metrics = llip_eval.flatten(results)
    if final and results:
        table = io.StringIO()
        with redirect_stdout(table):
            print_table(results)
        run.log(f'step {step}, final evaluation (%; tau: the mixing temperature):\n'
                + table.getvalue().rstrip())
    elif metrics:
        run.log(f'step {step} eval: ' + ', '.join(f'{k} {v:.3f}' for k, v in metrics.items()))
    return metrics


def train_step(run, batches, step):
    """One optimizer step on the contrastive batch of --grad_accum micro-batches (every image
    against every caption of all of them, accumulation.train_step): (the global loss, the
    gradient norm), both the same on every rank. Stops the run before the update on a
    non-finite loss or gradient. The step's micro-batches are drawn here, all before the
    update: a checkpoint (only between steps) always holds the loader after a whole step."""
    args, model, optimizer, scaler = run.args, run.model, run.optimizer, run.scaler
    micro_batches = [(images.to(run.device, non_blocking=True),     # (B, 3, S, S)
                      tokens.to(run.device, non_blocking=True))     # (B, L)
                     for images, tokens in itertools.islice(batches, args.grad_accum)]
    # DDP all-reduces the gradients once, in the step's last backward; FSDP reduce-scatters them
    total = accumulation.train_step(run.wrapped, model, micro_batches, args.chunk_size or None,
                                    autocast=run.autocast, scale=scaler.scale)
    if run.ddp:   # the global loss is the mean over ranks; every rank sees the same value
        dist.all_reduce(total)
        total /= run.world
    total = total.item()
    sharding.reduce_head_grads(run.model)   # fsdp: t, b, W_O, whole on every rank, averaged
    scaler.unscale_(optimizer)
    # the norm of the whole gradient, the same on every rank (sharded: summed over the shards)
    clip = sharding.clip_grad_norm if run.sharded else torch.nn.utils.clip_grad_norm_
    grad_norm = clip(model.parameters(), args.grad_clip or float('inf'))
    # fp16: an inf gradient is the GradScaler's to handle (it skips the step, lowers the scale)
    bad_grad = not scaler.is_enabled() and not torch.isfinite(grad_norm)
    if not math.isfinite(total) or bad_grad:
        newest = checkpoint.paths(args.out_dir)
        what = f'loss is {total}' if not math.isfinite(total) else \
            f'gradient norm is {grad_norm.item()} (loss {total:.4f})'
        run.log(f'error: {what} at step {step + 1}; stopping before the update. '
                + (f'The newest checkpoint, {newest[0]}, was checked finite when it was written'
                   if newest else 'No checkpoint was written yet')
                + ': try a lower --lr, --grad_clip or --dtype=bfloat16/float32.')
        sys.exit(1)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():   # the authors' clamp: a = exp(t) <= 100
        run.model.logit_scale.clamp_(0, math.log(100))
    return total, grad_norm.item()


if __name__ == '__main__':
    main()
