"""What this proves about training from a folder of KEY.jpg + KEY.txt (shards.py, issue 23 item
18), CPU only (run: python -m pytest tests/test_shards_folder.py -q):
- --data=DIR on such a folder is read as shards are: every sample once per epoch across ranks
  and workers, the same batches after a resume as without one, bad files skipped and counted;
- train.py --data=DIR trains on it (it used to stop: 'the directory holds no *.tar file').
"""
import collections
import importlib
import json
import os
import sys

import pytest

import data
import shards
from conftest import SMALL, png
from test_data import assert_same_batches, keys_of, loader, take


def write_folder(folder, n):
    """n samples KEY.png + KEY.txt, each caption being its key (the tokens say which sample)."""
    folder.mkdir()
    for i in range(n):
        (folder / f'k{i:03d}.png').write_bytes(png(i))
        (folder / f'k{i:03d}.txt').write_text(f'k{i:03d}')
    return str(folder)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, 'FOLDER_PIECE', 7)   # 30 samples: 5 pieces, as if 5 shards
    return write_folder(tmp_path / 'pairs', 30)


def test_a_folder_is_cut_into_pieces_read_as_shards(folder):
    pieces = data.expand_urls(folder)
    assert len(pieces) == 5 and data.count_samples(pieces) == 30
    keys = [k for _, t in loader(folder, workers=0, resample=False, train=False)
            for k in keys_of(t)]
    assert keys == [f'k{i:03d}' for i in range(30)]   # train=False: in order


@pytest.mark.parametrize('world_size, workers', [(1, 2), (2, 1)])
def test_every_sample_once_per_epoch(folder, world_size, workers):
    keys = [k for rank in range(world_size)
            for _, t in loader(folder, rank=rank, world_size=world_size, workers=workers,
                               resample=False) for k in keys_of(t)]
    assert collections.Counter(keys) == {f'k{i:03d}': 1 for i in range(30)}


def test_resume_gives_the_uninterrupted_batches(folder):
    full = take(iter(loader(folder)), 9)   # 30 samples, 4 a batch: into the second epoch
    first = loader(folder)
    assert_same_batches(take(iter(first), 5), full[:5])
    resumed = loader(folder)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert_same_batches(take(iter(resumed), 4), full[5:])


def test_bad_files_are_skipped_and_counted(folder):
    os.remove(os.path.join(folder, 'k003.txt'))                        # no caption
    open(os.path.join(folder, 'k004.png'), 'wb').write(b'not a png')  # corrupt image
    open(os.path.join(folder, 'k005.txt'), 'wb').write(b'\xff\xfe')   # not UTF-8
    open(os.path.join(folder, 'k099.txt'), 'w').write('no image')     # no image
    with pytest.warns(data.DataWarning):
        got = loader(folder, workers=0, resample=False, train=False)
        keys = [k for _, t in got for k in keys_of(t)]
    assert len(keys) == 27 and not {'k003', 'k004', 'k005'} & set(keys)
    assert got.skipped == {'no caption': 1, 'corrupt image': 1, 'caption not UTF-8': 1,
                           'no image': 1}


def test_train_py_trains_from_a_folder(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / 'pairs', 16)
    monkeypatch.setattr(sys, 'argv', ['train.py', f'--data={folder}',
                                      f'--out_dir={tmp_path / "run"}', '--steps=2', *SMALL,
                                      '--workers=0'])
    importlib.import_module('train').main()   # in this process: a new python adds only seconds
    assert os.path.isfile(tmp_path / 'run' / 'ckpt.pt')
