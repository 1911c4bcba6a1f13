"""What this proves about sharded checkpoints, checkpoint_dcp.py
(run: python -m pytest tests/test_checkpoint_dcp.py):
- a directory written by 2 FSDP ranks loads on 3 FSDP ranks (uneven shards) and in one plain
  process with the same model weights and AdamW state, whole; a DDP-style optimizer state (by
  index) loads into a sharded optimizer the same;
- it appears whole or not at all: no temporary directory is left, and a full disk (ENOSPC while
  DCP writes) says so, leaves no directory and the previous checkpoint intact;
- non-finite weights are refused before anything is written;
- a bit-flipped, truncated or missing shard, and a missing manifest, are refused with a one-line
  reason; a .metadata pickle that would build anything but DCP's records is refused unrun;
- --keep rotation keeps the newest directories and leaves foreign files alone;
- `python checkpoint_dcp.py DIR model.pt` writes one file that eval.py's loader reads.
"""
import argparse
import dataclasses
import errno
import json
import os
import pickle
import runpy
import shutil
import sys

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

import analysis
import checkpoint
import checkpoint_dcp
import eval as llip_eval
import sharding
from checkpoint import CheckpointError
from model import Llip
from conftest import batch
from test_sharding import CASES, model_of, spawn

CONFIG = CASES['gram']
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def optimizer_of(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)


def whole_optimizer(model, optimizer):
    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True))


def train_state(step):
    return {'step': step, 'config': {'model_config': dataclasses.asdict(CONFIG)},
            'loader': [{'batches': step}]}


def save_worker(rank, world, out_dir):
    model = sharding.shard(model_of(CONFIG, dtype=torch.float32))
    optimizer = optimizer_of(model)
    n = 4 // world
    for step in range(1, 3):
        images, tokens = batch(4, CONFIG, seed=step)
        model(images[rank * n:(rank + 1) * n], tokens[rank * n:(rank + 1) * n]).backward()
        sharding.reduce_head_grads(model)
        optimizer.step()
        optimizer.zero_grad()
        checkpoint_dcp.save(model, optimizer, train_state(step), out_dir, keep=5)
    return {'model': sharding.full_state_dict(model),
            'optimizer': whole_optimizer(model, optimizer),
            'listing': sorted(os.listdir(out_dir))}


def load_worker(rank, world, path):
    torch.manual_seed(1)   # other weights than saved: the load must replace them all
    model = sharding.shard(Llip(CONFIG))
    optimizer = optimizer_of(model)
    state = checkpoint_dcp.load(path, model, optimizer)
    return {'model': sharding.full_state_dict(model), 'step': state['step'],
            'optimizer': whole_optimizer(model, optimizer)}


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp('out')
    ranks = spawn(_SaveTo(str(out / 'run')), out, world=2)
    return out / 'run', ranks[0]


class _SaveTo:
    """save_worker with its directory: a picklable callable for the spawned ranks."""

    def __init__(self, out_dir):
        self.out_dir = out_dir

    def __call__(self, rank, world):
        return save_worker(rank, world, self.out_dir)


class _LoadFrom(_SaveTo):
    def __call__(self, rank, world):
        return load_worker(rank, world, self.out_dir)


def assert_same(got, expected):
    torch.testing.assert_close(got['model'], expected['model'], rtol=0, atol=0)
    torch.testing.assert_close(got['optimizer']['state'], expected['optimizer']['state'],
                               rtol=0, atol=0)


def test_saved_on_two_ranks_loads_on_three_and_on_one(saved, tmp_path):
    run, expected = saved
    assert expected['listing'] == ['ckpt_0000001', 'ckpt_0000002']   # no temporary left
    path = run / 'ckpt_0000002'
    assert set(os.listdir(path)) == {'.metadata', '__0_0.distcp', '__1_0.distcp',
                                     'train_state.pt', 'manifest.json'}
    for got in spawn(_LoadFrom(str(path)), tmp_path, world=3):
        assert got['step'] == 2
        assert_same(got, expected)
    model = Llip(CONFIG)   # one process, no process group, a plain model
    optimizer = optimizer_of(model)
    checkpoint_dcp.load(str(path), model, optimizer)
    assert_same({'model': model.state_dict(), 'optimizer': whole_optimizer(model, optimizer)},
                expected)
    # an unsharded checkpoint's optimizer (parameters by index) into the same optimizer
    other = Llip(CONFIG)
    fresh = optimizer_of(other)
    checkpoint_dcp.load_optimizer_by_index(other, fresh, optimizer.state_dict())
    torch.testing.assert_close(fresh.state_dict(), optimizer.state_dict(), rtol=0, atol=0)


def test_consolidated_file_reads_as_an_unsharded_checkpoint(saved, tmp_path, monkeypatch,
                                                           capsys):
    run, expected = saved
    out = tmp_path / 'model.pt'
    # the command `python checkpoint_dcp.py DIR model.pt`, run as __main__ in this process
    monkeypatch.setattr(sys, 'argv', ['checkpoint_dcp.py', str(run / 'ckpt_0000002'), str(out)])
    runpy.run_path(os.path.join(ROOT, 'checkpoint_dcp.py'), run_name='__main__')
    assert capsys.readouterr().out == f'wrote {out}\n'
    model = llip_eval.load_checkpoint(str(out))
    torch.testing.assert_close(model.state_dict(), expected['model'], rtol=0, atol=0)
    # eval.py --ckpt, analysis.py and diagnose.py take the directory itself too
    directory = analysis.checkpoint_path(run / 'ckpt_0000002')
    assert directory == run / 'ckpt_0000002'
    model = llip_eval.load_checkpoint(str(directory))
    torch.testing.assert_close(model.state_dict(), expected['model'], rtol=0, atol=0)


def test_resume_skips_a_damaged_directory_and_refuses_another_config(saved, tmp_path):
    run, _ = saved
    out = shutil.copytree(run, tmp_path / 'run')
    shard = out / 'ckpt_0000002' / '__0_0.distcp'
    shard.write_bytes(shard.read_bytes()[:-1] + b'?')
    args = argparse.Namespace(resume='auto', out_dir=str(out))
    state, messages, error = checkpoint.choose_checkpoint(args, CONFIG)
    assert error is None and state['step'] == 1
    assert 'warning: skipping checkpoint' in messages[0] and 'checksum mismatch' in messages[0]
    args.resume = str(out / 'ckpt_0000002')   # asked for by name: an error, no fallback
    assert 'checksum mismatch' in checkpoint.choose_checkpoint(args, CONFIG)[2]
    args.resume = 'auto'
    error = checkpoint.choose_checkpoint(args, dataclasses.replace(CONFIG, embed_dim=64))[2]
    assert 'different model config' in error and 'embed_dim' in error


def copy_of(saved, tmp_path):
    run, _ = saved
    return shutil.copytree(run / 'ckpt_0000002', tmp_path / 'ckpt_0000002')


@pytest.mark.parametrize('damage, reason', [
    ('flip', 'checksum mismatch in __1_0.distcp'), ('truncate', '__1_0.distcp has'),
    ('remove', "__1_0.distcp is missing (a rank's shard)"), ('manifest', 'no readable')])
def test_damaged_directory_is_refused(saved, tmp_path, damage, reason):
    path = copy_of(saved, tmp_path)
    shard = path / '__1_0.distcp'
    if damage == 'flip':
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 1
        shard.write_bytes(bytes(data))
    elif damage == 'truncate':
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == 'remove':
        shard.unlink()
    else:
        (path / 'manifest.json').unlink()
    with pytest.raises(CheckpointError, match=reason.replace('(', r'\(').replace(')', r'\)')):
        checkpoint_dcp.load(str(path), Llip(CONFIG))


class Boom:
    def __reduce__(self):
        return (os.system, ('echo unsafe',))


def test_metadata_pickle_building_other_objects_is_refused(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    (path / '.metadata').write_bytes(pickle.dumps(Boom()))
    manifest = json.loads((path / 'manifest.json').read_text())   # as if written so
    manifest['.metadata'] = checkpoint_dcp._hash_files(str(path), ['.metadata'])['.metadata']
    (path / 'manifest.json').write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match='refusing to unpickle posix.system'):
        checkpoint_dcp.load(str(path), Llip(CONFIG))


def test_non_finite_weights_are_never_written(tmp_path):
    model = model_of(CONFIG, dtype=torch.float32)
    with torch.no_grad():
        model.out_proj[0, 0] = float('nan')
    with pytest.raises(CheckpointError, match='non-finite weights at step 3 .out_proj'):
        checkpoint_dcp.save(model, optimizer_of(model), train_state(3), str(tmp_path), keep=2)
    assert os.listdir(tmp_path) == []


def test_full_disk_leaves_nothing_and_the_previous_intact(tmp_path, monkeypatch):
    model = model_of(CONFIG, dtype=torch.float32)
    optimizer = optimizer_of(model)
    checkpoint_dcp.save(model, optimizer, train_state(1), str(tmp_path), keep=2)
    before = sorted(os.listdir(tmp_path / 'ckpt_0000001'))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(checkpoint_dcp.dcp.FileSystemWriter, 'write_data', full)
    with pytest.raises(CheckpointError, match='no space left on .*ckpt_0000002 not written'):
        checkpoint_dcp.save(model, optimizer, train_state(2), str(tmp_path), keep=2)
    assert os.listdir(tmp_path) == ['ckpt_0000001']
    assert sorted(os.listdir(tmp_path / 'ckpt_0000001')) == before
    checkpoint_dcp.verify(str(tmp_path / 'ckpt_0000001'))


def test_keep_rotation_leaves_foreign_files(tmp_path):
    model = model_of(CONFIG, dtype=torch.float32)
    optimizer = optimizer_of(model)
    (tmp_path / 'ckpt_best').mkdir()
    (tmp_path / 'notes.txt').write_text('mine')
    for step in (1, 2, 3):
        checkpoint_dcp.save(model, optimizer, train_state(step), str(tmp_path), keep=2)
    assert sorted(os.listdir(tmp_path)) == ['ckpt_0000002', 'ckpt_0000003', 'ckpt_best',
                                            'notes.txt']
    assert checkpoint.paths(str(tmp_path)) == [str(tmp_path / 'ckpt_0000003'),
                                                   str(tmp_path / 'ckpt_0000002')]
