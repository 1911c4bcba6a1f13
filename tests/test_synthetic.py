"""What this proves about synthetic.py (run: python -m pytest tests/test_synthetic.py -q), CPU only:
- the dataset has its layout (train shards, retrieval shard, zero-shot folders with class
  names and templates), is byte-for-byte deterministic from its seed, is reused when complete
  and refuses to mix settings;
- every caption is true of its image, checked against the pixels (colours, places, relations,
  background), and the zero-shot colour images show their colour;
- data.ShardLoader reads the shards, and the command line writes the dataset.
"""
import io
import json
import os
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

import data
import synthetic as synthetic_data
from synthetic import make_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BPE = data.ClipTokenizer()

SMALL = {'train': 60, 'retrieval': 20, 'zeroshot': 3, 'shard_size': 25}


@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
    return make_synthetic(str(tmp_path_factory.mktemp('syn')), seed=0, **SMALL)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def files_of(root):
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), 'rb') as f:
                out[os.path.relpath(os.path.join(folder, name), root)] = f.read()
    return out


def test_synthetic_layout(synthetic):
    assert sorted(os.listdir(os.path.join(synthetic, 'train'))) == ['00000.tar', '00001.tar', '00002.tar']
    assert os.path.exists(os.path.join(synthetic, 'retrieval', '00000.tar'))
    assert os.path.exists(os.path.join(synthetic, 'README.txt'))
    for split, classes in (('shape', synthetic_data.SHAPES), ('color', synthetic_data.COLORS)):
        folder = os.path.join(synthetic, 'zeroshot', split)
        names = read_json(os.path.join(folder, 'classnames.json'))
        assert names == sorted(classes) == sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
        assert all(len(os.listdir(os.path.join(folder, n))) == 3 for n in names)
        templates = read_json(os.path.join(folder, 'templates.json'))
        assert templates and all(t.count('{}') == 1 for t in templates)
    samples = list(data.read_shards(os.path.join(synthetic, 'train')))
    assert len(samples) == 60 and len({k for k, _, _ in samples}) == 60


def test_synthetic_is_deterministic_and_reused(synthetic, tmp_path):
    again = make_synthetic(str(tmp_path / 'again'), seed=0, **SMALL)
    assert files_of(again) == files_of(synthetic)
    other = make_synthetic(str(tmp_path / 'other'), seed=1, **SMALL)
    assert files_of(other)['train/00000.tar'] != files_of(synthetic)['train/00000.tar']
    shard = os.path.join(again, 'train', '00000.tar')
    os.utime(shard, (0, 0))
    make_synthetic(again, seed=0, **SMALL)                     # complete: left as it is
    assert os.path.getmtime(shard) == 0
    with pytest.raises(ValueError, match='seed'):
        make_synthetic(again, seed=1, **SMALL)


PALETTE = {**synthetic_data.COLORS, **{'bg_' + b: v for b, v in synthetic_data.BACKGROUNDS.items()}}


def nearest(rgb, palette):
    return min(palette, key=lambda name: sum((int(a) - b) ** 2 for a, b in zip(rgb, palette[name])))


def test_synthetic_captions_are_diverse_and_true(synthetic):
    with tarfile.open(os.path.join(synthetic, 'retrieval', '00000.tar')) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted({name.split('.')[0] for name in members})
    assert len(keys) == 20
    for key in keys:
        scene = json.loads(members[f'{key}.json'])
        captions = members[f'{key}.txt'].decode().split('\n')
        image = np.array(Image.open(io.BytesIO(members[f'{key}.png'])))
        assert image.shape == (32, 32, 3)
        n = len(scene['objects'])
        assert len(captions) == 3 * n + 2 + n * (n - 1) // 2 and len(set(captions)) >= 5 - (n == 1)
        assert all(len(BPE.encode(c)) <= 14 for c in captions)       # + SOT, EOT: the tiny preset's 16 tokens
        assert f"a {scene['background']} background" in captions and synthetic_data.COUNTS[n - 1] in captions
        assert nearest(image[1, 1], synthetic_data.BACKGROUNDS) == scene['background']   # no object reaches a corner
        # relations, checked against where each colour's pixels are
        labels = np.array([nearest(p, PALETTE) for p in image.reshape(-1, 3)]).reshape(32, 32)
        relations = [re.fullmatch(r'an? (\w+) \w+ (left of|right of|above|below) an? (\w+) \w+', c) for c in captions]
        assert sum(r is not None for r in relations) == n * (n - 1) // 2
        for r in filter(None, relations):
            (ya, xa), (yb, xb) = [np.argwhere(labels == color).mean(axis=0) for color in (r[1], r[3])]
            assert {'left of': xa < xb, 'right of': xa > xb, 'above': ya < yb, 'below': ya > yb}[r[2]], (key, r[0])
        for o in scene['objects']:
            assert f"a {o['size']} {o['shape']}" in captions
            assert f"a {o['shape']} {synthetic_data.WHERE[o['place']]}" in captions
            if o['shape'] != 'ring':                                  # a ring's centre is background
                x, y = synthetic_data.PLACES[o['place']]
                assert nearest(image[y, x], synthetic_data.COLORS) == o['color'], (key, o)


def test_synthetic_zeroshot_colors_are_true(synthetic):
    folder = os.path.join(synthetic, 'zeroshot', 'color')
    for name in synthetic_data.COLORS:
        for file in os.listdir(os.path.join(folder, name)):
            image = np.array(Image.open(os.path.join(folder, name, file))).reshape(-1, 3).astype(int)
            labels = [nearest(p, PALETTE) for p in image]
            objects = [label for label in labels if not label.startswith('bg_')]
            assert max(set(objects), key=objects.count) == name


def test_loader_on_synthetic_shards(synthetic):
    ld = data.ShardLoader(os.path.join(synthetic, 'train', '{00000..00002}.tar'), batch_size=8, image_size=32,
                          context_length=48, workers=0)
    images, tokens = next(iter(ld))
    assert images.shape == (8, 3, 32, 32) and tokens.shape == (8, 48)
    texts = {k: caps for k, _, caps in data.read_shards(os.path.join(synthetic, 'train'))}
    all_captions = {c for caps in texts.values() for c in caps}
    assert all(t in all_captions for t in [data.ByteTokenizer().decode(row) for row in tokens])


def test_cli_writes_the_dataset(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'synthetic.py'), f"--out={tmp_path / 's'}",
                          '--train=30', '--retrieval=5', '--zeroshot=2', '--shard_size=10'],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert sorted(os.listdir(tmp_path / 's' / 'train')) == ['00000.tar', '00001.tar', '00002.tar']
    assert os.path.exists(tmp_path / 's' / '.complete')
