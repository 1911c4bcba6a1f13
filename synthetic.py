"""
The built-in synthetic dataset: small scenes whose captions each describe a different part or
property of the image. One image vector has to sit close to all of an image's captions at
once; Llip's caption-driven mixer can pick, for each caption, the mixture tokens it needs.
That is the situation the paper is about, at a size that a CPU trains on in minutes.

    python synthetic.py --out=data/synthetic     # write it (seconds; train.py does this itself)
    python synthetic.py --out=/tmp/syn --seed=1 --train=50000 --shard_size=2000
    python -m pytest tests/test_synthetic.py -q  # deterministic, complete, true to its captions

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
import sys
import tarfile
import zlib
from functools import lru_cache

import numpy as np
from PIL import Image

SHAPES = ('circle', 'square', 'triangle', 'cross', 'diamond', 'ring')
COLORS = {
    'red': (220, 40, 40),
    'green': (40, 170, 60),
    'blue': (40, 80, 230),
    'yellow': (240, 220, 40),
    'purple': (140, 60, 190),
    'orange': (250, 140, 20),
    'pink': (250, 150, 200),
    'cyan': (50, 210, 220),
}
BACKGROUNDS = {
    'black': (15, 15, 15),
    'gray': (115, 115, 115),
    'white': (240, 240, 240),
    'brown': (105, 70, 40),
}
SIZES = {'small': 3.5, 'large': 6.0}   # radius in pixels of a 32 x 32 image
PLACES = {
    'left': (7, 16),
    'right': (25, 16),
    'top': (16, 7),
    'bottom': (16, 25),
    'center': (16, 16),
}  # (x, y)
WHERE = {
    'left': 'on the left',
    'right': 'on the right',
    'top': 'at the top',
    'bottom': 'at the bottom',
    'center': 'in the center',
}
COUNTS = ('one shape', 'two shapes', 'three shapes', 'four shapes', 'five shapes')
# what is said of each object, one caption per kind (_say); the default data says these four,
# --synthetic_captions takes any of them and 'where' (the place alone)
OBJECT_CAPTIONS = ('shape', 'color', 'place', 'size')
CAPTION_KINDS = OBJECT_CAPTIONS + ('where',)


def _scene(rng, n_objects=None, max_objects=3):
    """{'background': name, 'objects': [{'shape', 'color', 'size', 'place'}]}: 1 to max_objects
    objects in different places, not overlapping, each with its own colour."""
    n = n_objects or rng.randint(1, max_objects)
    while True:
        places = rng.sample(sorted(PLACES), n)
        sizes = [rng.choice(sorted(SIZES)) for _ in range(n)]
        if all(math.dist(PLACES[places[a]], PLACES[places[b]]) >= SIZES[sizes[a]] + SIZES[sizes[b]]
               for a in range(n) for b in range(a)):
            break
    colors = rng.sample(sorted(COLORS), n)
    objects = [
        {'shape': rng.choice(SHAPES), 'color': c, 'size': s, 'place': p}
        for c, s, p in zip(colors, sizes, places)
    ]
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
    """'a red circle', 'an orange ring': an object named by its colour, unique in its image."""
    return f"{'an' if o['color'][0] in 'aeiou' else 'a'} {o['color']} {o['shape']}"


def _say(kind, o):
    """The caption about one attribute of object o: each said with the object's shape, the shape
    also on its own, and ('where') the place on its own. An attribute is learned from the captions
    in which it is the one word that tells images apart: when every caption also carried the
    colour, shape stayed at chance; said beside the shape, place still does, and 'where' teaches
    it. Measured in the README's "What each attribute needs"."""
    return {'shape': f"a {o['shape']}", 'color': _name(o),
            'place': f"a {o['shape']} {WHERE[o['place']]}",
            'size': f"a {o['size']} {o['shape']}", 'where': f"a shape {WHERE[o['place']]}"}[kind]


def _relation(a, b):
    """How object a is placed relative to object b, along the axis where they are further apart."""
    (ax, ay), (bx, by) = PLACES[a['place']], PLACES[b['place']]
    if abs(bx - ax) >= abs(by - ay):
        return 'left of' if ax < bx else 'right of'
    return 'above' if ay < by else 'below'


def _captions(scene, kinds=OBJECT_CAPTIONS):
    """Captions that each describe one aspect of the image -- an object's shape, its colour,
    place or size (those of kinds), how many objects, the background, how two objects are
    placed -- so that no one of them says everything and different ones need different image
    parts."""
    objects = scene['objects']
    captions = [_say(kind, o) for kind in kinds for o in objects]
    captions = list(dict.fromkeys(captions))   # two circles: "a circle" once
    captions += [COUNTS[len(objects) - 1], f"a {scene['background']} background"]
    for a in range(len(objects)):
        for b in range(a + 1, len(objects)):
            captions.append(
                f"{_name(objects[a])} {_relation(objects[a], objects[b])} {_name(objects[b])}"
            )
    return captions


def true_captions(scene, kinds=OBJECT_CAPTIONS):
    """Every caption in the generator's grammar that is true of the scene: its own captions and
    each relation said the other way round ("a red circle left of a blue square" is also "a blue
    square right of a red circle"). Evaluation counts any of them as a hit, so a caption such as
    "one shape", which hundreds of images share, is true of all of them."""
    objects = scene['objects']
    reversed_relations = [f"{_name(b)} {_relation(b, a)} {_name(a)}"
                          for i, a in enumerate(objects) for b in objects[i + 1:]]
    return sorted(set(_captions(scene, kinds) + reversed_relations))


def binding_pairs(scene):
    """[true caption, false caption, kind] for each two objects of the scene: the false one has
    the same words as the true one, with an attribute taken from the other object ("a blue
    square" for a red square beside a blue circle; "a square at the top" when the circle is the
    one at the top). Telling them apart needs to know which attribute goes with which object: a
    bag of the image's words cannot."""
    truth, pairs = set(true_captions(scene)), []
    for a in scene['objects']:
        for b in scene['objects']:
            for kind in ('color', 'place', 'size'):
                true, false = _say(kind, a), _say(kind, {**a, kind: b[kind]})
                if a is not b and false not in truth:   # the swap must really be false
                    pairs.append([true, false, kind])
    return pairs


def _png(image):
    """uint8 (H, W, 3) -> PNG bytes. Written directly (header, one zlib stream of rows each
    with filter byte 0, end): PIL's encoder costs 5x more per tiny image, most of the time
    of making the dataset."""
    h, w, _ = image.shape
    rows = np.zeros((h, 1 + 3 * w), np.uint8)
    rows[:, 1:] = image.reshape(h, 3 * w)
    chunk = (
        lambda tag, body: struct.pack('>I', len(body))
        + tag
        + body
        + struct.pack('>I', zlib.crc32(tag + body))
    )
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


def _captioned(rng, index, image_size, max_objects, with_truth=False, kinds=OBJECT_CAPTIONS):
    """One sample: KEY.png, KEY.txt (all captions) and, for evaluation, KEY.json: the scene,
    every caption true of it, and its binding pairs (eval.py reads the last two)."""
    scene = _scene(rng, max_objects=max_objects)
    files = {'png': _png(_draw(scene, rng, image_size)),
             'txt': '\n'.join(_captions(scene, kinds)).encode()}
    if with_truth:   # a tar member costs >= 1 KiB, so the training shards go without
        truth = {'scene': scene, 'true_captions': true_captions(scene, kinds),
                 'binding': binding_pairs(scene)}
        files['json'] = json.dumps(truth).encode()
    return f'{index:08d}', files


README = """The built-in synthetic dataset of llip, written by `python synthetic.py` \
(settings: .complete).

train/NNNNN.tar      WebDataset shards: KEY.png ({size}x{size} RGB), KEY.txt \
(captions, one per line)
retrieval/00000.tar  held-out test images with all their captions, for image-text retrieval;
                     KEY.json: the scene, every caption true of it, its binding pairs
zeroshot/<family>/   one folder per class, classnames.json, templates.json; families:
                     shape, color, size, place (one object per image), count (1 to {max_objects})
val/                 the same evaluation splits drawn anew: for choosing settings such as the
                     learning rate, so that the test splits above are only ever reported

objects      1-{max_objects} per image, not overlapping, each of its own colour
shapes       {shapes}
colours      {colors}
sizes        small, large
places       left, right, top, bottom, center
backgrounds  {backgrounds}
captions     each about one aspect: an object's shape, its colour, its place or its size (each said
             with the shape), the number of objects, the background, or where two objects are
             relative to each other. Said of each object here: {kinds}.
             Training draws one caption per image each time the image is read.
"""


def _zeroshot_families(max_objects, kinds=OBJECT_CAPTIONS):
    """family -> (class names, prompt templates, how a scene of that class is made). Templates
    use the words of the training captions; the classes of one family differ in that one
    attribute, every other attribute is drawn at random."""
    def one_object(attribute):
        def make(rng, name):
            scene = _scene(rng, n_objects=1)
            scene['objects'][0][attribute] = name
            return scene
        return make
    counts = COUNTS[:max_objects]
    return {
        'shape': (
            SHAPES,
            ['a {}'] + [_name({'color': c, 'shape': '{}'}) for c in COLORS],
            one_object('shape'),
        ),
        'color': (tuple(COLORS), ['a {} ' + shape for shape in SHAPES], one_object('color')),
        'size': (tuple(SIZES), [f'a {{}} {shape}' for shape in SHAPES], one_object('size')),
        'place': (
            tuple(WHERE[p] for p in PLACES),
            (['a shape {}'] if 'where' in kinds else []) + [f'a {shape} {{}}' for shape in SHAPES],
            lambda rng, name: one_object('place')(rng, next(p for p in PLACES if WHERE[p] == name)),
        ),
        'count': (counts, ['{}'], lambda rng, name: _scene(rng, n_objects=counts.index(name) + 1)),
    }


def _write_zeroshot(out_dir, split, seed, per_class, image_size, max_objects, kinds):
    """out_dir/<split>/zeroshot/<family>/<class>/NNNNN.png with classnames.json, templates.json."""
    for family, (classes, templates, make) in _zeroshot_families(max_objects, kinds).items():
        rng = random.Random(f'{seed}/{split}/zeroshot/{family}')
        folder = os.path.join(out_dir, split, 'zeroshot', family)
        for name in classes:   # folders carry the class names, so eval.py matches them by name
            os.makedirs(os.path.join(folder, name), exist_ok=True)
            for i in range(per_class):
                with open(os.path.join(folder, name, f'{i:05d}.png'), 'wb') as f:
                    f.write(_png(_draw(make(rng, name), rng, image_size)))
        for file, content in (('classnames.json', list(classes)), ('templates.json', templates)):
            with open(os.path.join(folder, file), 'w') as f:
                json.dump(content, f, indent=1)


def make_synthetic(out_dir, seed=0, train=20000, retrieval=1000, zeroshot=50, shard_size=1000,
                   image_size=32, max_objects=3, captions=OBJECT_CAPTIONS):
    """Write the synthetic dataset into out_dir (layout: README above) deterministically from
    seed; return out_dir. captions: what is said of each object (kinds of CAPTION_KINDS). A
    complete directory with the same settings is left as it is (the marker file .complete is
    written last); one with other settings is an error."""
    if not 1 <= max_objects <= len(COUNTS):
        raise ValueError(f"max_objects={max_objects}: expected 1 to {len(COUNTS)}")
    kinds = tuple(captions)
    if not kinds or len(set(kinds)) < len(kinds) or not set(kinds) <= set(CAPTION_KINDS):
        raise ValueError(f"captions={','.join(kinds)}: expected some of "
                         f"{','.join(CAPTION_KINDS)}, each once")
    settings = {'seed': seed, 'train': train, 'retrieval': retrieval, 'zeroshot': zeroshot,
                'shard_size': shard_size, 'image_size': image_size, 'max_objects': max_objects,
                'version': 3}
    if kinds != OBJECT_CAPTIONS:   # only then: a directory of the default data stays valid
        settings['captions'] = list(kinds)
    marker = os.path.join(out_dir, '.complete')
    if os.path.exists(marker):
        with open(marker) as f:
            found = json.load(f)
        if found != settings:
            raise ValueError(f"{out_dir} holds synthetic data made with {found}, not {settings}; "
                             f"use another --out / --synthetic_dir or delete it")
        return out_dir
    # a first run with --model=vit_b16 is otherwise more than a minute without a word
    print(f'writing the built-in synthetic data into {out_dir} (once: {train} training images, '
          f'{image_size} x {image_size})', file=sys.stderr, flush=True)
    # one job per tar, each seeded by its own name: the same bytes however many processes run them
    shards = [(f'train/{k:05d}.tar', range(k * shard_size, min(train, (k + 1) * shard_size)), False)
              for k in range(math.ceil(train / shard_size))]
    shards += [(f'{split}retrieval/00000.tar', range(retrieval), True) for split in ('', 'val/')]
    jobs = [(out_dir, name, seed, indices, image_size, max_objects, truth, kinds)
            for name, indices, truth in shards]
    for name, _, _ in shards:
        os.makedirs(os.path.dirname(os.path.join(out_dir, name)), exist_ok=True)
    jobs += [(out_dir, split, seed, zeroshot, image_size, max_objects, kinds)
             for split in ('', 'val')]
    try:   # fork where there is one: a spawned child would re-import the caller's main script
        with multiprocessing.get_context('fork').Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
            results = [pool.apply_async(_job, job) for job in jobs]
            [r.get() for r in results]
    except (ValueError, OSError):   # no fork on this platform, or no processes allowed
        for job in jobs:
            _job(*job)
    with open(os.path.join(out_dir, 'README.txt'), 'w') as f:
        f.write(README.format(size=image_size, shapes=', '.join(SHAPES), colors=', '.join(COLORS),
                              backgrounds=', '.join(BACKGROUNDS), max_objects=max_objects,
                              kinds=', '.join(kinds)))
    with open(marker, 'w') as f:
        json.dump(settings, f)
    return out_dir


def _job(out_dir, name, seed, *rest):
    """A shard (name ends in .tar) or a split's zero-shot folders."""
    if name.endswith('.tar'):
        indices, image_size, max_objects, truth, kinds = rest
        rng = random.Random(f'{seed}/{name}')
        _write_tar(os.path.join(out_dir, name),
                   (_captioned(rng, i, image_size, max_objects, truth, kinds) for i in indices))
    else:
        _write_zeroshot(out_dir, name, seed, *rest)


if __name__ == '__main__':
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument('--out', required=True, help='output directory')
    p.add_argument('--seed', type=int, default=0, help='everything written follows from this seed')
    p.add_argument('--train', type=int, default=20000, help='training images')
    p.add_argument(
        '--retrieval', type=int, default=1000, help='held-out images of the retrieval split'
    )
    p.add_argument(
        '--zeroshot', type=int, default=50, help='images per class of each zero-shot split'
    )
    p.add_argument('--shard_size', type=int, default=1000, help='samples per training shard')
    p.add_argument(
        '--image_size', type=int, default=32, help='image side in pixels (objects scale with it)'
    )
    p.add_argument(
        '--max_objects', type=int, default=3, help='objects per image: 1 to this many (at most 5)'
    )
    p.add_argument(
        '--captions',
        default=','.join(OBJECT_CAPTIONS),
        type=lambda s: tuple(s.split(',')),
        help=f"what is said of each object, comma-separated, of "
        f"{','.join(CAPTION_KINDS)} ('where': the place alone: 'a shape on the left')",
    )
    args = vars(p.parse_args())
    try:   # bad settings: the message, not a traceback
        out = make_synthetic(args.pop('out'), **args)
    except ValueError as e:
        p.error(str(e))
    families = ', '.join(_zeroshot_families(args['max_objects']))
    print(f"synthetic dataset in {out}: {args['train']} training images, {args['retrieval']} for "
          f"retrieval, zero-shot splits {families}; see {os.path.join(out, 'README.txt')}")
