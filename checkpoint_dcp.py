"""
Sharded checkpoints, for train.py --shard=fsdp: a directory per step, written by every rank at
once with torch.distributed.checkpoint (DCP), readable by any number of ranks, sharded or not.

    out/ckpt_0001000/
        .metadata, __<rank>_0.distcp   DCP: model and optimizer, each rank writes its own rows
        train_state.pt                 step, config, every rank's loader position, RNG, scaler
        manifest.json                  size and sha256 of every file above; written last

    python checkpoint_dcp.py out/ckpt_0001000 model.pt   # one file with the whole model, as
                                                         # train.py writes without sharding

The guarantees of checkpoint.py's single files hold for a directory too (README, "Reliability"):
  - atomic: written as out/.tmp_ckpt_0001000 and renamed by rank 0 once every rank has written
    and the manifest is complete; a crash or a full disk leaves no ckpt_* directory behind;
  - verified: every file's sha256 is checked on load (the ranks share the hashing), so a
    truncated or bit-flipped shard is refused and the caller takes the previous checkpoint;
  - never non-finite: every rank checks its own rows before anything is written;
  - nothing unpickled unsafely: DCP's .metadata is a pickle; it is read here by an unpickler
    that builds only DCP's own metadata classes (and torch sizes and dtypes), train_state.pt
    with torch.load(weights_only=True), the shards by DCP with weights_only as well.
Model and optimizer state are saved by name (torch.distributed.checkpoint.state_dict), so a
checkpoint written by 2 ranks loads on 1 or 3, into a sharded model or a plain one.
"""
import argparse
import hashlib
import json
import os
import pickle
import shutil
import sys
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict, set_state_dict)
from torch.distributed.tensor import DTensor

import checkpoint
from checkpoint import CheckpointError, UnsafeCheckpointError, load_weights
from model import LlipConfig, for_loading

MANIFEST, TRAIN_STATE = 'manifest.json', 'train_state.pt'


def is_sharded(path):
    """Whether a checkpoint path is a directory of this kind (else a train.py file)."""
    return os.path.isdir(path)


def path_of(out_dir, step):
    return os.path.join(out_dir, f'ckpt_{step:07d}')


# ----------------------------------------------------------------------------- across ranks
def _rank_and_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(value):
    """Every rank's value, in rank order (just [value] without a process group)."""
    _, world = _rank_and_world()
    if world == 1:
        return [value]
    out = [None] * world
    dist.all_gather_object(out, value)
    return out


def _agree(error):
    """Raise the first rank's error (a one-line string) on every rank, or return if none has one."""
    first = next((e for e in _gather(error) if e), None)
    if first:
        raise CheckpointError(first)


def _barrier():
    if _rank_and_world()[1] > 1:
        dist.barrier()


def _local(value):
    return value.to_local() if isinstance(value, DTensor) else value


def _sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _hash_files(folder, names):
    """{name: [bytes, sha256]} of every file, the ranks sharing the work (rank r hashes every
    r-th name); a missing file has None."""
    rank, world = _rank_and_world()
    mine = {}
    for name in names[rank::world]:
        path = os.path.join(folder, name)
        mine[name] = [os.path.getsize(path), _sha256(path)] if os.path.isfile(path) else None
    return {k: v for part in _gather(mine) for k, v in part.items()}


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- save
def save(model, optimizer, train_state, out_dir, keep):
    """Write a sharded checkpoint of step train_state['step']; every rank calls this, together.
    train_state: plain values and tensors (step, config, loader positions, RNG, scaler), written
    by rank 0. Keeps the newest `keep` directories. CheckpointError (on every rank) if refused."""
    rank, _ = _rank_and_world()
    step = train_state['step']
    bad = [name for name, value in model.state_dict().items()
           if value.is_floating_point() and not torch.isfinite(_local(value)).all()]
    bad = sorted({name for part in _gather(bad) for name in part})
    if bad:   # resuming from it would only fail again
        raise CheckpointError(f'refusing to save non-finite weights at step {step} '
                              f'({", ".join(bad[:3])}{", ..." if len(bad) > 3 else ""})')
    final = path_of(out_dir, step)
    tmp = os.path.join(out_dir, '.tmp_' + os.path.basename(final))
    error = None
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)   # what a crash mid-write left
            os.makedirs(tmp)
        _barrier()
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({'model': model_state, 'optimizer': optimizer_state},
                 storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
        if rank == 0:
            with open(os.path.join(tmp, TRAIN_STATE), 'wb') as f:
                torch.save(train_state, f)
                f.flush()
                os.fsync(f.fileno())
    except (Exception, CheckpointException) as e:   # DCP's gathers every rank's errors
        error = _describe(e, out_dir, final)
    _barrier()
    if error is None:
        names = sorted(os.listdir(tmp))
        manifest = _hash_files(tmp, names)
        if rank == 0:
            try:
                with open(os.path.join(tmp, MANIFEST), 'w') as f:
                    json.dump(manifest, f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                _fsync(tmp)
                shutil.rmtree(final, ignore_errors=True)   # a step saved again after a resume
                os.replace(tmp, final)
                _fsync(out_dir)
                checkpoint.rotate(out_dir, keep, final)   # files and directories alike
            except Exception as e:
                error = _describe(e, out_dir, final)
    if rank == 0 and error is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    _agree(error)
    return final


def _describe(e, out_dir, final):
    """One line for what went wrong while writing."""
    if checkpoint._no_space(e) or 'No space left' in str(e):   # DCP's error may be text
        return (f'no space left on {out_dir}: checkpoint {os.path.basename(final)} not written '
                '(the previous ones are intact)')
    return f'checkpoint {os.path.basename(final)} not written: {_one_line(e)}'


def _one_line(e):
    """An exception in one line; for DCP's, which quote every failed rank's traceback, the
    last line of the first (the error itself)."""
    if isinstance(e, CheckpointException):
        first, _ = next(iter(e.failures.values()))   # (exception, its traceback)
        return f'{type(first).__name__}: {first}'.splitlines()[0]
    return f'{type(e).__name__}: {e}'.splitlines()[0]


# ----------------------------------------------------------------------------- load
# what DCP's .metadata pickle may build: its own metadata records, torch sizes, dtypes, layouts
SAFE_MODULES = {'torch.distributed.checkpoint.metadata'}
SAFE_NAMES = {('torch.distributed.checkpoint.filesystem', '_StorageInfo'), ('torch', 'Size'),
              ('torch.serialization', '_get_layout'), ('pathlib', 'PosixPath'),
              ('pathlib', 'WindowsPath'), ('pathlib', 'PurePosixPath'),
              ('collections', 'OrderedDict')}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module in SAFE_MODULES or (module, name) in SAFE_NAMES or (
                module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f'refusing to unpickle {module}.{name} from a DCP .metadata '
                                    'file: only DCP metadata, sizes and dtypes are allowed')


class SafeReader(dcp.FileSystemReader):
    """DCP's reader, with its .metadata pickle read by _MetadataUnpickler."""

    def read_metadata(self, *args, **kwargs):
        with open(os.path.join(self.path, '.metadata'), 'rb') as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, 'storage_meta', None) is None:
            metadata.storage_meta = dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def verify(path, every_file=True):
    """The training state (step, config, loader, RNG, scaler) of a sharded checkpoint, its files
    checked against the manifest (every_file=False: train_state.pt alone, for ranks that read
    a checkpoint rank 0 has checked); CheckpointError naming the first problem."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f'no readable {MANIFEST} ({type(e).__name__}): not completely '
                              'written') from None
    for name in sorted(manifest) if every_file else [TRAIN_STATE]:
        file, expected = os.path.join(path, name), manifest.get(name)
        if not os.path.isfile(file):
            shard = " (a rank's shard)" if name.endswith('.distcp') else ''
            raise CheckpointError(f'{name} is missing{shard}')
        if os.path.getsize(file) != expected[0]:
            raise CheckpointError(f'{name} has {os.path.getsize(file)} bytes, {expected[0]} were '
                                  'written (truncated?)')
        if _sha256(file) != expected[1]:
            raise CheckpointError(f'checksum mismatch in {name}: the file changed after it was '
                                  'written (a flipped bit on disk or in transfer)')
    try:   # DCP reads it again in load; here a refusal is one line, not wrapped per rank
        with open(os.path.join(path, '.metadata'), 'rb') as f:
            _MetadataUnpickler(f).load()
        state = load_weights(os.path.join(path, TRAIN_STATE))
        state['step'], state['config']
    except UnsafeCheckpointError as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:
        raise CheckpointError(f'{type(e).__name__}: {e}'.splitlines()[0]) from None
    return state


def load(path, model, optimizer=None, check=True):
    """Read a sharded checkpoint into `model` (sharded or plain) and `optimizer` (None: the
    model alone); every rank calls this together. Returns the training state. check=False:
    the files were verified already (by rank 0, when it chose this checkpoint)."""
    state = verify(path, every_file=check)
    if optimizer is None:
        model_state = get_model_state_dict(model)
        wanted = {'model': model_state}
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        wanted = {'model': model_state, 'optimizer': optimizer_state}
    try:
        dcp.load(wanted, storage_reader=SafeReader(path))
    except UnsafeCheckpointError as e:
        raise CheckpointError(str(e)) from None
    except (Exception, CheckpointException) as e:   # one rank's error, as DCP gathered them
        raise CheckpointError(_one_line(e)) from None
    if optimizer is None:
        set_model_state_dict(model, model_state)
    else:
        set_state_dict(model, optimizer, model_state_dict=model_state,
                       optim_state_dict=optimizer_state)
    return state


def load_optimizer_by_index(model, optimizer, saved):
    """An optimizer state dict as torch.optim saves it (parameters by index: what an unsharded
    checkpoint holds) into `optimizer` over a sharded or plain `model`. The indices are the
    order of this optimizer's parameter groups, which train.py builds the same way each run."""
    names = {p: n for n, p in model.named_parameters()}
    order = [names[p] for group in optimizer.param_groups for p in group['params']]
    by_name = {'state': {order[i]: value for i, value in saved['state'].items()},
               'param_groups': [{**g, 'params': [order[i] for i in g['params']]}
                                for g in saved['param_groups']]}
    set_optimizer_state_dict(model, optimizer, by_name,
                             options=StateDictOptions(full_state_dict=True))


def load_model(path):
    """The model of a sharded checkpoint, whole, in this process (no process group needed), and
    its training state: what eval.py, analysis.py and diagnose.py read."""
    state = verify(path)
    config = state['config'].get('model_config', state['config'])
    fields = LlipConfig.__dataclass_fields__
    model = for_loading(LlipConfig(**{k: v for k, v in config.items() if k in fields}))
    with warnings.catch_warnings():   # DCP says it assumes one process: so it is meant
        warnings.filterwarnings('ignore', message='torch.distributed is disabled')
        load(path, model, check=False)
    return model.eval(), state


def consolidate(path, out):
    """Write the sharded checkpoint at `path` as one file in the format of train.py's unsharded
    checkpoints (model and config; eval.py --ckpt reads it)."""
    model, state = load_model(path)
    torch.save({'model': model.state_dict(), 'config': state['config'], 'step': state['step']},
               out)


def main():
    parser = argparse.ArgumentParser(description='Write a sharded checkpoint (a directory that '
                                     'train.py --shard=fsdp saved) as one file with the whole '
                                     'model, which eval.py --ckpt reads.')
    parser.add_argument('checkpoint', help='the directory, e.g. out/ckpt_0001000')
    parser.add_argument('out', help='the file to write, e.g. model.pt')
    args = parser.parse_args()
    try:
        consolidate(args.checkpoint, args.out)
    except CheckpointError as e:
        sys.exit(f'error: {args.checkpoint}: {e}')
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
