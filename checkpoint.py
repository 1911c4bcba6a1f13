"""
train.py's checkpoints: written atomically with a checksum, verified when read, rotated by step.

    out/ckpt_0000250.pt, out/ckpt_0000500.pt, ...   one per --save_every steps (the newest --keep)
    out/ckpt.pt                                      a hard link to the newest, for eval.py --ckpt
    out/ckpt_0000250/, ...                           --shard=fsdp: a directory per step, written
                                                     by every rank (checkpoint_dcp.py)

A checkpoint is a dict of tensors and plain containers (torch.load(weights_only=True) reads it,
so loading one never runs code): model, optimizer, scaler, step, config, loader positions (one
per rank), RNG states, and 'sha256', a digest of everything else in the dict. torch does not
verify the zip's CRCs, so without the digest a flipped bit in a weight would be resumed from and
trained on; with it, such a file is refused like a truncated one and the previous is used.

Also here, what decides when a run resumes or stops: resume and save_run (a run's state in and
out), agree_on_checkpoint (rank 0 picks the checkpoint, every rank reads that one or the run
stops with a message) and cut_log (log.jsonl back to the checkpoint's step); what stops a run
on a signal is preemption.py. README, "Reliability", lists each fault, what happens and its
test.
"""
import dataclasses
import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import socket
import sys
import zipfile

import numpy as np
import torch
import torch.distributed as dist

import run_dir

# ckpt_<step>.pt, or a directory ckpt_<step> (sharded); a user's ckpt_best.pt is never touched
NAME = re.compile(r'ckpt_(\d+)(\.pt)?')


class CheckpointError(Exception):
    """A checkpoint that cannot be written or read; the message is one line for the user."""


class UnsafeCheckpointError(ValueError):
    """A .pt file holds pickled objects other than tensors and plain containers."""


def load_weights(path):
    """torch.load with weights_only=True: a .pt file is a pickle, and unpickling an arbitrary
    object can run arbitrary code, so only tensors and plain containers (dict, list, tuple,
    str, numbers) are accepted. Anything else raises UnsafeCheckpointError, before it runs."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a page of advice; keep the part that names the refused object
        what = re.search(r"GLOBAL [\w.]+|got <class '[^']+'>", str(e))
        raise UnsafeCheckpointError(
            f"refusing to unpickle {path}: it holds objects other than tensors and plain "
            f"containers, which torch.load(weights_only=True) rejects because loading them can "
            f"run code ({what.group(0) if what else 'unsupported content'})") from None


def unwrapped(state_dict):
    """A state dict without the prefixes of the wrappers it was saved from: DDP's 'module.'
    and torch.compile's '_orig_mod.', in either order (the authors' B/16 config compiles the
    DDP model, so their training checkpoints hold '_orig_mod.module.visual...'). The one rule
    for every checkpoint this project reads."""
    def strip(key):
        while key.startswith(('module.', '_orig_mod.')):
            key = key.removeprefix('module.').removeprefix('_orig_mod.')
        return key
    return {strip(k): v for k, v in state_dict.items()}


def paths(out_dir):
    """The numbered checkpoints in out_dir, newest (highest step) first."""
    if not os.path.isdir(out_dir):
        return []
    steps = {int(m.group(1)): os.path.join(out_dir, name) for name in os.listdir(out_dir)
             if (m := NAME.fullmatch(name))
             and (m.group(2) or os.path.isdir(os.path.join(out_dir, name)))}
    return [steps[s] for s in sorted(steps, reverse=True)]


def remove(path):
    """Delete a checkpoint: a file, or a sharded checkpoint's directory."""
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def path_of(out_dir, step):
    return os.path.join(out_dir, f'ckpt_{step:07d}.pt')


def digest(obj, h=None):
    """sha256 over every tensor's dtype, shape and bytes and every other value's repr, in the
    dict's own order (which torch.save keeps)."""
    h = hashlib.sha256() if h is None else h
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f'tensor {t.dtype} {tuple(t.shape)}'.encode())
        h.update(t.flatten().view(torch.uint8).numpy().tobytes())   # uint8: bf16 has no numpy type
    elif isinstance(obj, dict):
        for key, value in obj.items():
            h.update(repr(key).encode())
            digest(value, h)
    elif isinstance(obj, (list, tuple)):
        h.update(f'{type(obj).__name__} {len(obj)}'.encode())
        for value in obj:
            digest(value, h)
    else:
        h.update(repr(obj).encode())
    return h.hexdigest()


def _no_space(e):
    """What stopped a write, in words, or None: ENOSPC (a full disk), EDQUOT, EFBIG (ulimit -f),
    EROFS, EIO in an exception or the one it was raised from. They show up as OSError on close
    or as torch's 'unexpected pos' RuntimeError, the OSError chained."""
    kinds = {errno.ENOSPC: 'no space left', errno.EDQUOT: 'disk quota exceeded',
             errno.EFBIG: 'file too large (a file size limit, ulimit -f)',
             errno.EROFS: 'read-only file system', errno.EIO: 'input/output error'}
    while e is not None:
        if isinstance(e, OSError) and e.errno in kinds:
            return kinds[e.errno]
        e = e.__cause__ or e.__context__
    return None


def save(state, out_dir, keep):
    """Write state (with state['step']) as ckpt_<step>.pt, point ckpt.pt at it, keep the newest
    `keep`. Atomic: a temp file, fsync'd, then renamed, so a crash or a full disk mid-write
    leaves the previous checkpoints as they were (and no partial file behind)."""
    bad = [name for name, value in state['model'].items()
           if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:   # resuming from it would only fail again
        raise CheckpointError(f'refusing to save non-finite weights at step {state["step"]} '
                              f'({", ".join(bad[:3])}{", ..." if len(bad) > 3 else ""})')
    state = {**state, 'sha256': digest(state)}
    path = path_of(out_dir, state['step'])
    try:   # the .tmp is new and no link is followed (run_dir.open_new)
        run_dir.write_atomic(path, lambda f: torch.save(state, f))
    except run_dir.RunDirError as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:
        if _no_space(e):
            raise CheckpointError(f'{_no_space(e)} on {out_dir}: checkpoint '
                                  f'{os.path.basename(path)} not written (the previous ones are '
                                  'intact)') from None
        raise
    latest = os.path.join(out_dir, 'ckpt.pt')   # the newest, for eval.py --ckpt=out/ckpt.pt
    if os.path.lexists(latest + '.tmp'):
        os.remove(latest + '.tmp')   # a link is removed, never followed
    os.link(path, latest + '.tmp')
    os.replace(latest + '.tmp', latest)
    rotate(out_dir, keep, path)
    return path


_reported = set()   # files rotate() has warned about once already


def rotate(out_dir, keep, newest):
    """Delete all but the `keep` newest checkpoints, counting only those that open as a
    checkpoint (a zip holding data.pkl, as torch.save writes) and never `newest`, the one just
    written: a junk ckpt_0009999.pt must neither count as one of the kept nor make the new one
    look old. Files that are not checkpoints are left alone, with a warning once."""
    step = int(NAME.fullmatch(os.path.basename(newest)).group(1))
    kept = [newest]
    for path in paths(out_dir):
        problem = not_a_checkpoint(path)
        later = int(NAME.fullmatch(os.path.basename(path)).group(1)) > step
        if path != newest and (problem or later) and path not in _reported:
            _reported.add(path)
            print(f'warning: {path} is not counted toward --keep and is left alone: '
                  + (problem or f'its step is beyond this run\'s step {step}'), file=sys.stderr)
        if path == newest or problem or later:
            continue
        if len(kept) < keep:
            kept.append(path)
        else:
            remove(path)


def not_a_checkpoint(path):
    """Why path cannot be a checkpoint (one line), or None: a cheap look at its zip directory
    (or, for a sharded checkpoint's directory, its manifest), not a full load (that is for
    resuming)."""
    import checkpoint_dcp   # here, not above: it imports this module
    if not os.path.lexists(path):
        return 'no such file'
    if not os.path.islink(path) and checkpoint_dcp.is_sharded(path) and not path.endswith('.pt'):
        manifest = os.path.join(path, checkpoint_dcp.MANIFEST)
        return None if os.path.isfile(manifest) else 'a directory without a checkpoint manifest'
    if os.path.islink(path) or not os.path.isfile(path):
        return 'not a regular file'
    size = os.path.getsize(path)
    if not zipfile.is_zipfile(path):
        return f'not a checkpoint: {size} bytes that are not the zip file torch.save writes'
    with zipfile.ZipFile(path) as z:
        if not any(name.endswith('/data.pkl') for name in z.namelist()):
            return f'not a checkpoint: a zip file ({size} bytes) without data.pkl'
    return None


def load(path, every_file=True):
    """The checkpoint at path, verified; CheckpointError (one line) if it cannot be used. A
    sharded checkpoint gives its training state alone (resume reads the weights with every rank);
    every_file=False checks only that state's file, not every shard again."""
    import checkpoint_dcp   # here, not above: it imports this module
    if checkpoint_dcp.is_sharded(path) and not path.endswith('.pt'):
        return checkpoint_dcp.verify(path, every_file)
    problem = not_a_checkpoint(path)
    if problem:   # a clear reason, not torch's 'KeyError: 174812789' for a junk file
        raise CheckpointError(problem)
    try:   # weights_only: tensors and plain containers, never code
        state = load_weights(path)
        state['model'], state['step']
    except UnsafeCheckpointError as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:   # truncated, not a zip, not a checkpoint: many kinds
        raise CheckpointError(f'{type(e).__name__}: {e}'.splitlines()[0]) from None
    return verified(state)


def verified(state):
    """state without its 'sha256', which must match the rest: CheckpointError if it does not."""
    expected = state.pop('sha256', None)   # None: written by hand, not by train.py
    if expected is not None and digest(state) != expected:
        raise CheckpointError('checksum mismatch: the file changed after it was written '
                              '(a flipped bit on disk or in transfer)')
    return state


def numpy_rng_state():
    """np.random's state as a tensor and plain values: torch.load(weights_only=True) refuses the
    numpy array inside np.random.get_state()."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {'kind': str(kind), 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
            'has_gauss': int(has_gauss), 'cached_gaussian': float(cached_gaussian)}


def set_numpy_rng_state(state):
    np.random.set_state((state['kind'], state['keys'].numpy().astype(np.uint32), state['pos'],
                         state['has_gauss'], state['cached_gaussian']))


# ----------------------------------------------------------------------------- resuming
def choose_checkpoint(args, config):
    """Rank 0: (state or None, messages, error or None): the newest checkpoint that loads and
    verifies; a truncated or corrupt one is skipped with a warning."""
    if args.resume == 'never':
        return None, [], refuse_fresh_start(args.out_dir)
    auto = args.resume == 'auto'
    messages = []
    for path in paths(args.out_dir) if auto else [args.resume]:
        try:
            state = load(path)
        except CheckpointError as e:
            if not auto:   # the file asked for: an error, not a fallback
                return None, messages, f'error: --resume={path}: {e}'
            messages.append(f'warning: skipping checkpoint {path}: {e}')
            continue
        theirs, mine = state['config']['model_config'], dataclasses.asdict(config)
        differ = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if differ:
            return None, messages, (
                f'error: checkpoint {path} was trained with a different model config (field: '
                f'checkpoint vs now): {differ}. Use another --out_dir or the same flags.')
        state['path'] = path
        return state, messages + [f'resuming from {path} at step {state["step"]}'], None
    return None, messages, None


def refuse_fresh_start(out_dir):
    """--resume=never where checkpoints are: the error (a fresh run there would mix its log
    with checkpoints of higher steps, which the next --resume=auto would take), or None."""
    found = paths(out_dir)
    if not found:
        return None
    step = int(NAME.fullmatch(os.path.basename(found[0])).group(1))
    return (f'error: --resume=never, but --out_dir={out_dir} holds checkpoints up to step '
            f'{step} ({found[0]}): continue them with --resume=auto, or start afresh in another '
            '--out_dir (nothing was changed)')


def agree_on_checkpoint(args, config, rank, ddp):
    """The state every rank resumes from, or None. Rank 0 decides and tells the step; each
    other rank reads that same file. A rank that cannot (e.g. --out_dir is not shared between
    nodes) says so and every rank stops with that message, rather than training apart."""
    decision = [None]
    if rank == 0:
        state, messages, error = choose_checkpoint(args, config)
        for m in messages:
            print(m, file=sys.stderr)
        decision = [{'error': error, 'step': state and state['step'],
                     'path': state and state['path']}]
    else:
        state = None
    if ddp:
        dist.broadcast_object_list(decision, src=0)
    decision = decision[0]
    error = None
    if rank != 0 and decision['error'] is None and decision['step'] is not None:
        # its own --out_dir: on nodes that do not share one, the file is missing and we say so
        path = decision['path'] if args.resume != 'auto' else \
            os.path.join(args.out_dir, os.path.basename(decision['path']))
        try:
            state = load(path, every_file=False)   # rank 0 checked every shard
            state['path'] = path
        except CheckpointError as e:
            error = (f'error: rank {rank} on {socket.gethostname()} cannot read {path}, which '
                     f'rank 0 resumes from ({e}). On several nodes --out_dir must be one shared '
                     'path.')
    errors = [error]
    if ddp:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    problems = [e for e in [decision['error'], *errors] if e]
    if problems and ddp:
        # leave without tearing the process group down: the other ranks are leaving too, and
        # gloo aborts (SIGABRT, no message) when a peer closes under a teardown in progress
        if rank == 0:
            print(' '.join(problems), file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    if problems:
        sys.exit(' '.join(problems))
    return state


def resume(run):
    """Load the agreed checkpoint (if any) into the run's model, optimizer, scaler, RNGs and
    loader; the step to start from (0 for a fresh run). Either kind of checkpoint resumes either
    kind of run (--shard=none or fsdp), on any number of ranks."""
    import checkpoint_dcp, sharding   # here, not above: both import model.py, which imports this
    state = agree_on_checkpoint(run.args, run.config, run.rank, run.ddp)
    if state is None:
        return 0
    if checkpoint_dcp.is_sharded(state['path']):   # every rank reads its part
        checkpoint_dcp.load(state['path'], run.model, run.optimizer, check=False)
    elif run.sharded:   # a whole model: each rank keeps its rows
        sharding.load_full_state_dict(run.model, state['model'])
        checkpoint_dcp.load_optimizer_by_index(run.model, run.optimizer, state['optimizer'])
    else:
        run.model.load_state_dict(state['model'])
        run.optimizer.load_state_dict(state['optimizer'])
    run.scaler.load_state_dict(state['scaler'])
    torch.set_rng_state(state['rng']['torch'])
    set_numpy_rng_state(state['rng']['numpy'])
    # every rank's position: on another number of ranks the loader deals out what is left of
    # the epoch, each sample once (data.ShardLoader.load_state_dict)
    run.loader.load_state_dict(state['loader'])
    return state['step']


def save_run(run, step, preemption):
    """Every rank contributes its loader position; rank 0 writes the checkpoint (save), or,
    with --shard=fsdp, every rank writes its shards (checkpoint_dcp.save)."""
    import checkpoint_dcp
    positions = [run.loader.state_dict()]
    if run.ddp:
        positions = [None] * run.world
        dist.all_gather_object(positions, run.loader.state_dict())
    state = {'scaler': run.scaler.state_dict(), 'step': step, 'config': run.record(),
             'loader': positions,
             'rng': {'torch': torch.get_rng_state(), 'numpy': numpy_rng_state()}}
    preemption.saving = True   # the SIGTERM watchdog lets a checkpoint being written finish
    try:
        if run.sharded:
            checkpoint_dcp.save(run.model, run.optimizer, state, run.args.out_dir, run.args.keep)
        elif run.master:   # the plain module: no 'module.' or '_orig_mod.'
            save({'model': run.model.state_dict(), 'optimizer': run.optimizer.state_dict(),
                  **state}, run.args.out_dir, run.args.keep)
    except CheckpointError as e:
        sys.exit(f'error: {e}')
    finally:
        preemption.saving = False


def cut_log(path, step):
    """log.jsonl without the records after `step`: a resumed run logs those steps again."""
    if not os.path.exists(path):
        return
    with open(path, encoding='utf-8', errors='replace') as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:   # a line cut by the kill
            continue
        if not isinstance(record, dict) or not isinstance(record.get('step', 0), int):
            continue   # [1, 2], null, "step": "3": not a record this code wrote
        if record.get('step', 0) <= step:
            kept.append(json.dumps(record) + '\n')
    if len(kept) != len(lines):
        run_dir.write_atomic(path, lambda f: f.writelines(kept), binary=False)
