"""What this proves about synthetic.py (run: python -m pytest tests/test_synthetic.py -q), CPU only:
- the dataset has its layout (train shards, retrieval shard, zero-shot folders with class
  names and templates), is byte-for-byte deterministic from its seed, is reused when complete
  and refuses to mix settings;
- every caption is true of its image, checked against the pixels (colours, places, relations,
  background), and the zero-shot colour images show their colour;
- what is said of each object is the kinds asked for (captions=...), of the same scenes;
- data.ShardLoader reads the shards, and the command line writes the dataset.
"""
import io
import json
import os
import random
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
    assert sorted(os.listdir(os.path.join(synthetic, 'train'))) == [
        '00000.tar',
        '00001.tar',
        '00002.tar',
    ]
    assert os.path.exists(os.path.join(synthetic, 'README.txt'))
    families = {
        'shape': synthetic_data.SHAPES,
        'color': tuple(synthetic_data.COLORS),
        'size': ('small', 'large'),
        'place': tuple(synthetic_data.WHERE.values()),
        'count': synthetic_data.COUNTS[:3],
    }
    for split in ('', 'val'):   # the test splits at the top, the validation splits under val/
        assert os.path.exists(os.path.join(synthetic, split, 'retrieval', '00000.tar'))
        assert sorted(os.listdir(os.path.join(synthetic, split, 'zeroshot'))) == sorted(families)
        for family, classes in families.items():
            folder = os.path.join(synthetic, split, 'zeroshot', family)
            names = read_json(os.path.join(folder, 'classnames.json'))
            assert (
                sorted(names)
                == sorted(classes)
                == sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
            )
            assert all(len(os.listdir(os.path.join(folder, n))) == 3 for n in names)
            templates = read_json(os.path.join(folder, 'templates.json'))
            assert templates and all(t.count('{}') == 1 for t in templates)
    test, val = (files_of(os.path.join(synthetic, split, 'retrieval')) for split in ('', 'val'))
    assert test['00000.tar'] != val['00000.tar']   # drawn anew, not a copy
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


def object_areas(shape, r, n=400):
    """The area of each shape of radius r, by counting a fine grid's points inside its mask."""
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / n * 4 * r - 2 * r
    return synthetic_data._mask(shape, x, y, r).mean() * (4 * r) ** 2


def test_synthetic_captions_are_diverse_and_true(synthetic):
    with tarfile.open(os.path.join(synthetic, 'retrieval', '00000.tar')) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted({name.split('.')[0] for name in members})
    assert len(keys) == 20
    for key in keys:
        truth = json.loads(members[f'{key}.json'])
        scene, true = truth['scene'], truth['true_captions']
        captions = members[f'{key}.txt'].decode().split('\n')
        image = np.array(Image.open(io.BytesIO(members[f'{key}.png'])))
        assert image.shape == (32, 32, 3)
        n = len(scene['objects'])
        said = {synthetic_data._say(kind, o)
                for kind in ('shape', 'color', 'place', 'size') for o in scene['objects']}
        assert len(captions) == len(set(captions)) == len(said) + 2 + n * (n - 1) // 2 >= 6
        assert set(captions) <= set(true) and len(true) == len(set(captions)) + n * (n - 1) // 2
        assert all(
            len(BPE.encode(c)) <= 14 for c in true
        )  # + SOT, EOT: the tiny preset's 16 tokens
        assert (
            f"a {scene['background']} background" in captions
            and synthetic_data.COUNTS[n - 1] in captions
        )
        assert (
            nearest(image[1, 1], synthetic_data.BACKGROUNDS) == scene['background']
        )  # no object reaches a corner
        # what the pixels show: one colour per object, where its place says, of its size and shape
        labels = np.array([nearest(p, PALETTE) for p in image.reshape(-1, 3)]).reshape(32, 32)
        names, counts = np.unique(labels, return_counts=True)   # edge pixels blend two colours:
        found = sorted((-k, str(c)) for c, k in zip(names, counts) if not c.startswith('bg_'))
        assert {c for _, c in found[:n]} == {o['color'] for o in scene['objects']}, (
            key,
            found,
        )  # n most common
        for o in scene['objects']:
            # its pixels: within the colour jitter (20 a channel) of its colour, not blended edges
            ys, xs = np.nonzero(
                np.abs(image.astype(int) - synthetic_data.COLORS[o['color']]).sum(axis=-1) <= 60
            )
            assert (
                np.hypot(
                    xs.mean() + 0.5 - synthetic_data.PLACES[o['place']][0],
                    ys.mean() + 0.5 - synthetic_data.PLACES[o['place']][1],
                )
                < 3
            ), (
                key,
                o,
            )  # places: >= 9 apart
            if o['size'] == 'large':   # small ones are a few pixels, their edges blur (next test)
                expected = object_areas(o['shape'], synthetic_data.SIZES[o['size']])
                assert 0.7 < len(xs) / expected < 1.3, (key, o, len(xs), expected)
        # every relation, either way round, checked against where each colour's pixels are
        relations = [
            re.fullmatch(r'an? (\w+) \w+ (left of|right of|above|below) an? (\w+) \w+', c)
            for c in true
        ]
        assert sum(r is not None for r in relations) == n * (n - 1)
        for r in filter(None, relations):
            (ya, xa), (yb, xb) = [
                np.argwhere(labels == color).mean(axis=0) for color in (r[1], r[3])
            ]
            assert {'left of': xa < xb, 'right of': xa > xb, 'above': ya < yb, 'below': ya > yb}[
                r[2]
            ], (key, r[0])
        for o in scene['objects']:
            assert f"a {o['shape']}" in captions and f"{synthetic_data._name(o)}" in captions
            assert f"a {o['size']} {o['shape']}" in captions
            assert f"a {o['shape']} {synthetic_data.WHERE[o['place']]}" in captions
            if o['shape'] != 'ring':  # a ring's centre is background
                x, y = synthetic_data.PLACES[o['place']]
                assert nearest(image[y, x], synthetic_data.COLORS) == o['color'], (key, o)
        # binding: the true caption is true of one object, the swapped one of none; they differ
        # in the attribute the triple names
        for true_caption, false_caption, kind in truth['binding']:
            assert true_caption in true and false_caption not in true
            said = [parse_object_caption(c) for c in (true_caption, false_caption)]
            holds = [
                any(all(o[k] == v for k, v in s.items()) for o in scene['objects']) for s in said
            ]
            assert holds == [True, False], (key, true_caption, false_caption)
            assert [k for k in said[0] if said[0][k] != said[1].get(k)] == [kind]
        # a swap between two objects of different shapes is false; between two circles it is true
        assert bool(truth['binding']) == (len({o['shape'] for o in scene['objects']}) > 1)


def test_object_captions_are_the_kinds_asked_for(synthetic, tmp_path):
    other = make_synthetic(str(tmp_path / 'where'), seed=0, **SMALL, captions=('shape', 'where'))
    default, asked = [files_of(d)['retrieval/00000.tar'] for d in (synthetic, other)]
    with tarfile.open(fileobj=io.BytesIO(default)) as a, tarfile.open(
        fileobj=io.BytesIO(asked)
    ) as b:
        first = {m.name: a.extractfile(m).read() for m in a.getmembers()}
        second = {m.name: b.extractfile(m).read() for m in b.getmembers()}
    for name in (n for n in first if n.endswith('.png')):
        assert first[name] == second[name]               # the same scenes, drawn the same
        scene = json.loads(second[name.replace('.png', '.json')])['scene']
        captions = second[name.replace('.png', '.txt')].decode().split('\n')
        objects = {c for c in captions if not re.search('background|shapes?$| of |above|below', c)}
        assert objects == (
            {f"a {o['shape']}" for o in scene['objects']}
            | {f"a shape {synthetic_data.WHERE[o['place']]}" for o in scene['objects']}
        )
    place = read_json(os.path.join(other, 'zeroshot', 'place', 'templates.json'))
    assert place[0] == 'a shape {}' and 'a shape {}' not in read_json(
        os.path.join(synthetic, 'zeroshot', 'place', 'templates.json'))
    # the default data's marker is what it was before there was a choice, so its directories
    # stay valid
    assert 'captions' not in read_json(os.path.join(synthetic, '.complete'))
    assert read_json(os.path.join(other, '.complete'))['captions'] == ['shape', 'where']
    with pytest.raises(ValueError, match='captions'):
        make_synthetic(other, seed=0, **SMALL)             # the same directory, other captions
    for bad in ((), ('shape', 'shape'), ('colour',)):
        with pytest.raises(ValueError, match='expected some of'):
            make_synthetic(str(tmp_path / 'bad'), seed=0, **SMALL, captions=bad)


def parse_object_caption(caption):
    """'a small circle' -> {'size': 'small', 'shape': 'circle'}; 'a red circle', 'a circle on
    the left' likewise."""
    where = {v: k for k, v in synthetic_data.WHERE.items()}
    m = re.fullmatch(rf"an? (?:(small|large) )?(?:({'|'.join(synthetic_data.COLORS)}) )?"
                     rf"({'|'.join(synthetic_data.SHAPES)})(?: ({'|'.join(where)}))?", caption)
    said = {'size': m[1], 'color': m[2], 'shape': m[3], 'place': where.get(m[4])}
    return {k: v for k, v in said.items() if v is not None}


def test_every_shape_is_drawn_as_its_mask_where_its_place_says():
    """At 128 pixels, where edges are a small part of an object: each shape and size covers
    the area of its mask, centred on its place (up to the drawing's 0.7 pixel jitter)."""
    rng, size, scale = random.Random(0), 128, 128 / 32
    for shape in synthetic_data.SHAPES:
        for radius_name, radius in synthetic_data.SIZES.items():
            for place in synthetic_data.PLACES:
                scene = {'background': 'black', 'objects': [{'shape': shape, 'color': 'red',
                                                              'size': radius_name, 'place': place}]}
                image = synthetic_data._draw(scene, rng, size).astype(int)
                red = np.abs(image - synthetic_data.COLORS['red']).sum(axis=-1) < 80   # (S, S)
                ys, xs = np.nonzero(red)
                assert 0.85 < len(xs) / object_areas(shape, radius * scale) < 1.15, (
                    shape,
                    radius_name,
                )
                x, y = synthetic_data.PLACES[place]
                if shape != 'triangle':   # a triangle's centroid is below its centre
                    assert (
                        np.hypot(xs.mean() + 0.5 - x * scale, ys.mean() + 0.5 - y * scale)
                        < 1.5 * scale
                    )


def test_synthetic_zeroshot_colors_are_true(synthetic):
    folder = os.path.join(synthetic, 'zeroshot', 'color')
    for name in synthetic_data.COLORS:
        for file in os.listdir(os.path.join(folder, name)):
            image = (
                np.array(Image.open(os.path.join(folder, name, file))).reshape(-1, 3).astype(int)
            )
            labels = [nearest(p, PALETTE) for p in image]
            objects = [label for label in labels if not label.startswith('bg_')]
            assert max(set(objects), key=objects.count) == name


def test_loader_on_synthetic_shards(synthetic):
    ld = data.ShardLoader(
        os.path.join(synthetic, 'train', '{00000..00002}.tar'),
        batch_size=8,
        image_size=32,
        context_length=48,
        workers=0,
        caption_lines=True,
    )
    images, tokens = next(iter(ld))
    assert images.shape == (8, 3, 32, 32) and tokens.shape == (8, 48)
    texts = {k: caps for k, _, caps in data.read_shards(os.path.join(synthetic, 'train'))}
    all_captions = {c for caps in texts.values() for c in caps}
    assert all(t in all_captions for t in [data.ByteTokenizer().decode(row) for row in tokens])


def test_cli_writes_the_dataset(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, 'synthetic.py'),
            f"--out={tmp_path / 's'}",
            '--train=30',
            '--retrieval=5',
            '--zeroshot=2',
            '--shard_size=10',
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert sorted(os.listdir(tmp_path / 's' / 'train')) == ['00000.tar', '00001.tar', '00002.tar']
    assert os.path.exists(tmp_path / 's' / '.complete')
