"""
The built-in synthetic dataset: small scenes whose captions each describe a different part or
property of the image. One image vector has to sit close to all of an image's captions at
once; Llip's caption-driven mixer can pick, for each caption, the mixture tokens it needs.
That is the situation the paper is about, at a size that a CPU trains on in minutes.

    python synthetic.py --out=data/synthetic                 # write it (seconds; train.py does this itself)
    python synthetic.py --out=/tmp/syn --seed=1 --train=50000 --shard_size=2000
    python -m pytest tests/test_synthetic.py -q              # deterministic, complete, true to its captions

What it writes is ordinary data for data.py: WebDataset tar shards for training and
retrieval, image folders with classnames.json / templates.json for zero-shot (layout: README
below, also written into the directory).
"""
import argparse
import io
import json
import math
import multiprocessing
import os
import random
import struct
import tarfile
import zlib
from functools import lru_cache

import numpy as np
from PIL import Image

SHAPES = ('circle', 'square', 'triangle', 'cross', 'diamond', 'ring')
COLORS = {'red': (220, 40, 40), 'green': (40, 170, 60), 'blue': (40, 80, 230), 'yellow': (240, 220, 40),
          'purple': (140, 60, 190), 'orange': (250, 140, 20), 'pink': (250, 150, 200), 'cyan': (50, 210, 220)}
BACKGROUNDS = {'black': (15, 15, 15), 'gray': (115, 115, 115), 'white': (240, 240, 240), 'brown': (105, 70, 40)}
SIZES = {'small': 3.5, 'large': 6.0}   # radius in pixels of a 32 x 32 image
PLACES = {'left': (7, 16), 'right': (25, 16), 'top': (16, 7), 'bottom': (16, 25), 'center': (16, 16)}   # (x, y)
WHERE = {'left': 'on the left', 'right': 'on the right', 'top': 'at the top', 'bottom': 'at the bottom',
         'center': 'in the center'}
COUNTS = ('one shape', 'two shapes', 'three shapes')


def _scene(rng, n_objects=None):
    """{'background': name, 'objects': [{'shape', 'color', 'size', 'place'}]}: 1-3 objects in
    different places, not overlapping, each with its own colour."""
    n = n_objects or rng.randint(1, 3)
    while True:
        places = rng.sample(sorted(PLACES), n)
        sizes = [rng.choice(sorted(SIZES)) for _ in range(n)]
        if all(math.dist(PLACES[places[a]], PLACES[places[b]]) >= SIZES[sizes[a]] + SIZES[sizes[b]]
               for a in range(n) for b in range(a)):
            break
    colors = rng.sample(sorted(COLORS), n)
    objects = [{'shape': rng.choice(SHAPES), 'color': c, 'size': s, 'place': p} for c, s, p in zip(colors, sizes, places)]
    return {'background': rng.choice(sorted(BACKGROUNDS)), 'objects': objects}


@lru_cache(maxsize=4)
def _grid(size):
    y, x = np.mgrid[0:size, 0:size] + 0.5   # pixel centres, (size, size) each
    return x.astype(np.float32), y.astype(np.float32)


def _mask(shape, dx, dy, r):
    """Boolean mask of a shape of radius r, given each pixel's offset (dx, dy) from its centre."""
    if shape in ('circle', 'ring'):
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.5 * r) ** 2) if shape == 'ring' else d2 <= r * r
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == 'square':
        return np.maximum(ax, ay) <= 0.82 * r
    if shape == 'diamond':
        return ax + ay <= 1.15 * r
    if shape == 'cross':
        return ((ax <= r / 3) & (ay <= r)) | ((ay <= r / 3) & (ax <= r))
    return (dy >= -r) & (dy <= 0.8 * r) & (ax <= (dy + r) / 1.6)   # triangle, apex up


def _draw(scene, rng, size=32):
    """The scene as uint8 (size, size, 3): drawn at twice the size as a map of which object
    covers each pixel, coloured, then reduced 2 x 2 (smooth edges). Colours are jittered so
    that a colour name covers a range of values."""
    scale = 2 * size / 32
    x, y = _grid(2 * size)
    jitter = lambda rgb, a: [min(255, max(0, v + rng.randint(-a, a))) for v in rgb]
    owner = np.zeros((2 * size, 2 * size), np.uint8)                    # 0: background, k: object k
    palette = [jitter(BACKGROUNDS[scene['background']], 8)]
    for k, o in enumerate(scene['objects'], 1):
        cx, cy = [(c + rng.uniform(-0.7, 0.7)) * scale for c in PLACES[o['place']]]
        owner[_mask(o['shape'], x - cx, y - cy, SIZES[o['size']] * scale)] = k
        palette.append(jitter(COLORS[o['color']], 20))
    image = np.take(np.array(palette, np.uint8), owner, axis=0)         # (2S, 2S, 3)
    return np.asarray(Image.fromarray(image).reduce(2))                 # (S, S, 3)


def _name(o):
    return f"{'an' if o['color'][0] in 'aeiou' else 'a'} {o['color']} {o['shape']}"


def _captions(scene):
    """Captions that each describe one aspect of the image -- an object's colour and shape,
    its place, its size, how many objects, the background, how two objects are placed --
    so that no one of them says everything and different ones need different image parts."""
    objects = scene['objects']
    captions = [_name(o) for o in objects]
    captions += [f"a {o['shape']} {WHERE[o['place']]}" for o in objects]
    captions += [f"a {o['size']} {o['shape']}" for o in objects]
    captions += [COUNTS[len(objects) - 1], f"a {scene['background']} background"]
    for a in range(len(objects)):
        for b in range(a + 1, len(objects)):
            (ax, ay), (bx, by) = PLACES[objects[a]['place']], PLACES[objects[b]['place']]
            if abs(bx - ax) >= abs(by - ay):
                relation = 'left of' if ax < bx else 'right of'
            else:
                relation = 'above' if ay < by else 'below'
            captions.append(f"{_name(objects[a])} {relation} {_name(objects[b])}")
    return captions


def _png(image):
    """uint8 (H, W, 3) -> PNG bytes. Written directly (header, one zlib stream of rows each
    with filter byte 0, end): PIL's encoder costs 5x more per tiny image, most of the time
    of making the dataset."""
    h, w, _ = image.shape
    rows = np.zeros((h, 1 + 3 * w), np.uint8)
    rows[:, 1:] = image.reshape(h, 3 * w)
    chunk = lambda tag, body: struct.pack('>I', len(body)) + tag + body + struct.pack('>I', zlib.crc32(tag + body))
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(rows.tobytes())) + chunk(b'IEND', b''))


def _write_tar(path, samples):
    """samples: (key, {extension: bytes}). Fixed metadata, so equal content gives equal bytes;
    written under a temporary name and renamed, so a crash leaves no half shard behind."""
    with tarfile.open(path + '.tmp', 'w', format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            for ext, payload in files.items():
                member = tarfile.TarInfo(f'{key}.{ext}')
                member.size, member.mtime, member.mode = len(payload), 0, 0o644
                tar.addfile(member, io.BytesIO(payload))
    os.replace(path + '.tmp', path)


def _write_shard(path, seed, indices, image_size, with_scene):
    rng = random.Random(f'{seed}/{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}')
    _write_tar(path, (_captioned(rng, i, image_size, with_scene) for i in indices))


def _captioned(rng, index, image_size, with_scene=False):
    """One sample: KEY.png, KEY.txt (all captions) and, for analysis, KEY.json (the scene)."""
    scene = _scene(rng)
    files = {'png': _png(_draw(scene, rng, image_size)), 'txt': '\n'.join(_captions(scene)).encode()}
    if with_scene:   # a tar member costs >= 1 KiB, so the training shards go without
        files['json'] = json.dumps(scene).encode()
    return f'{index:08d}', files


README = """The built-in synthetic dataset of llip, written by `python synthetic.py` (settings: .complete).

train/NNNNN.tar      WebDataset shards: KEY.png ({size}x{size} RGB), KEY.txt (captions, one per line)
retrieval/00000.tar  held-out images with all their captions, for image-text retrieval; KEY.json: the scene
zeroshot/shape/      one object per image, a folder per shape;  classnames.json, templates.json
zeroshot/color/      one object per image, a folder per colour; classnames.json, templates.json

objects      1-3 per image, not overlapping, each of its own colour
shapes       {shapes}
colours      {colors}
sizes        small, large
places       left, right, top, bottom, center
backgrounds  {backgrounds}
captions     each about one aspect: an object's colour and shape, its place, its size, the number
             of objects, the background, or where two objects are relative to each other.
             Training draws one caption per image each time the image is read.
"""


def make_synthetic(out_dir, seed=0, train=20000, retrieval=1000, zeroshot=50, shard_size=1000, image_size=32):
    """Write the synthetic dataset into out_dir (layout: README above) deterministically from
    seed; return out_dir. A complete directory with the same settings is left as it is (the
    marker file .complete is written last); one with other settings is an error."""
    settings = {'seed': seed, 'train': train, 'retrieval': retrieval, 'zeroshot': zeroshot,
                'shard_size': shard_size, 'image_size': image_size, 'version': 1}
    marker = os.path.join(out_dir, '.complete')
    if os.path.exists(marker):
        with open(marker) as f:
            found = json.load(f)
        if found != settings:
            raise ValueError(f"{out_dir} holds synthetic data made with {found}, not {settings}; "
                             f"use another --out / --synthetic_dir or delete it")
        return out_dir
    for name in ('train', 'retrieval', 'zeroshot/shape', 'zeroshot/color'):
        os.makedirs(os.path.join(out_dir, name), exist_ok=True)
    # one job per tar, each seeded by its own name: the same bytes however many processes run them
    jobs = [(os.path.join(out_dir, 'train', f'{k:05d}.tar'), seed, range(k * shard_size, min(train, (k + 1) * shard_size)),
             image_size, False) for k in range(math.ceil(train / shard_size))]
    jobs.append((os.path.join(out_dir, 'retrieval', '00000.tar'), seed, range(retrieval), image_size, True))
    try:   # fork where there is one: a spawned child would re-import the caller's main script
        with multiprocessing.get_context('fork').Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
            pool.starmap(_write_shard, jobs)
    except (ValueError, OSError):   # no fork on this platform, or no processes allowed
        for job in jobs:
            _write_shard(*job)
    # zero-shot: one object, a folder per class; templates in the words of the training captions
    rng = random.Random(f'{seed}/zeroshot')
    splits = {'shape': (SHAPES, ['a {}', 'a small {}', 'a large {}']),
              'color': (tuple(COLORS), ['a {} ' + shape for shape in SHAPES])}
    for split, (classes, templates) in splits.items():
        folder = os.path.join(out_dir, 'zeroshot', split)
        for name in sorted(classes):
            os.makedirs(os.path.join(folder, name), exist_ok=True)
            for i in range(zeroshot):
                scene = _scene(rng, n_objects=1)
                scene['objects'][0][split] = name
                with open(os.path.join(folder, name, f'{i:05d}.png'), 'wb') as f:
                    f.write(_png(_draw(scene, rng, image_size)))
        for file, content in (('classnames.json', sorted(classes)), ('templates.json', templates)):
            with open(os.path.join(folder, file), 'w') as f:
                json.dump(content, f, indent=1)
    with open(os.path.join(out_dir, 'README.txt'), 'w') as f:
        f.write(README.format(size=image_size, shapes=', '.join(SHAPES), colors=', '.join(COLORS),
                              backgrounds=', '.join(BACKGROUNDS)))
    with open(marker, 'w') as f:
        json.dump(settings, f)
    return out_dir


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', required=True, help='output directory')
    p.add_argument('--seed', type=int, default=0, help='everything written follows from this seed')
    p.add_argument('--train', type=int, default=20000, help='training images')
    p.add_argument('--retrieval', type=int, default=1000, help='held-out images of the retrieval split')
    p.add_argument('--zeroshot', type=int, default=50, help='images per class of each zero-shot split')
    p.add_argument('--shard_size', type=int, default=1000, help='samples per training shard')
    p.add_argument('--image_size', type=int, default=32, help='image side in pixels (objects scale with it)')
    args = vars(p.parse_args())
    out = make_synthetic(args.pop('out'), **args)
    print(f"synthetic dataset in {out}: {args['train']} training images, {args['retrieval']} for retrieval, "
          f"zero-shot splits shape and color; see {os.path.join(out, 'README.txt')}")
