"""
Data for Llip: image transforms and a loader for WebDataset tar shards (the tokenizers are
tokenizer.py, also reachable as data.tokenize, data.ClipTokenizer, ...). (The
built-in synthetic dataset, whose images each have several captions about different things,
is synthetic.py; it writes shards in the format read here.)

    python -m pytest tests/test_data.py -q                    # what this file promises
    python bench_data.py                                      # loader speed vs the webdataset library

Shards are what img2dataset writes: tar files whose members KEY.jpg|jpeg|png|webp and KEY.txt
(and optionally KEY.json) belong together. The caption is KEY.txt, or without one the "caption"
field of KEY.json (caption_key). For training, the whole text is one caption (a web caption may
hold a newline), except in the built-in synthetic data, whose .txt holds several captions, one
per line, one of them drawn each time a sample is read (caption_lines; evaluation reads one
caption per line, as COCO-style retrieval sets hold several per image). Shards are named by a brace pattern
'dir/{00000..09999}.tar', a list, a directory (every *.tar in it) or 'pipe:COMMAND' (the tar
comes from the command's stdout, e.g. 'pipe:aws s3 cp s3://bucket/00001.tar -').

How ShardLoader orders samples, and why a resumed run continues exactly:
- the rank's DataLoader workers are "roles" 0..workers-1; role w of rank r is global worker
  g = r * workers + w of W = world_size * workers. Per epoch the shard list is shuffled with
  (seed, epoch) -- identically on every rank -- and global worker g reads shards g, g+W, ...
  (with fewer shards than W, every worker reads every shard and keeps every W-th sample), so
  in an epoch each sample is read by exactly one worker of one rank;
- a worker shuffles each shard's samples through a buffer (raw bytes, decoded on the way out)
  and makes its own batches; the random choices (the buffer's, the caption drawn, the crop)
  come from RNGs seeded by (seed, epoch, shard, worker / sample key), never from global state;
- torch's DataLoader hands out the workers' batches round robin: batch n comes from role
  n % workers. Each batch carries its role's position (epoch, shard index in its list, sample
  index in the shard's shuffled order). state_dict() holds the position of every role after
  the batches the trainer took, and which role is next; a new loader puts its worker 0 in that
  role's seat and each worker skips, without decoding, what its role had delivered. So batch
  n + 1 of a resumed run is batch n + 1 of the uninterrupted one (for resample=True; with
  resample=False the rest of the epoch still arrives exactly once, interleaved maybe otherwise).
  Resuming costs at most one shard read per worker: the buffer is emptied at each shard's end.

Bad input never stops a run: a corrupt or truncated image, an image beyond the pixel budget
(MAX_PIXELS; a larger JPEG is decoded at reduced size instead), a sample without image, caption
or with an empty one, a caption that is not UTF-8, an image of an unknown extension (.gif, ...),
a truncated tar (also one cut inside a header; its samples before the damage are kept) and a
shard that cannot be opened (empty, not a tar) are skipped and counted in ShardLoader.skipped,
with one DataWarning per kind and a summary at the end of each epoch. A worker whose share of an
epoch is all bad goes on to the next epoch. A pattern that names no file, and a dataset with no
valid sample in a whole epoch, raise an error that quotes the pattern and the first problem of
each kind. (A tar cut exactly between two members looks complete.)
"""
import functools
import glob
import io
import json
import math
import os
import random
import re
import subprocess
import tarfile
import warnings

import numpy as np
import torch
from PIL import Image

# the tokenizers live in tokenizer.py; data.tokenize, data.ClipTokenizer, ... name them as before
from tokenizer import CLIP_BPE, ByteTokenizer, ClipTokenizer, get_tokenizer, tokenize  # noqa: F401

MEAN = (0.48145466, 0.4578275, 0.40821073)   # CLIP's per-channel statistics, RGB
STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp', 'bmp', 'gif', 'tif', 'tiff')   # image folders
SHARD_IMAGE_KEYS = IMAGE_EXTENSIONS[:4]   # shard members: img2dataset's and open_clip's


# ----------------------------------------------------------------------------- image transforms
def to_rgb(image):
    """Any PIL mode -> RGB. Transparent images are laid on white (convert('RGB') would show
    whatever colour the invisible pixels hold, often black); 16/32-bit and float images are
    scaled to 8 bits instead of being clipped to white."""
    if image.mode == 'RGB':
        return image
    if image.mode in ('I', 'F') or image.mode.startswith('I;16'):
        x = np.asarray(image, dtype=np.float32)
        if image.mode.startswith('I;16') or x.max() > 255:
            x = x * (255 / 65535)
        image = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8), 'L')
    if image.mode == 'P':
        image = image.convert('RGBA' if 'transparency' in image.info else 'RGB')
    if image.mode in ('RGBA', 'LA', 'PA', 'La', 'RGBa'):
        rgba = image.convert('RGBA')
        white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert('RGB')
    return image.convert('RGB')   # L, 1, CMYK, YCbCr, RGBX, ...


# The decoded-size budget: an image of more pixels is refused (skipped and counted as 'image too
# large') before it is decoded, except a JPEG, which is decoded at 1/2, 1/4 or 1/8 size until it
# fits. Memory then stays below about 12 bytes x MAX_PIXELS per image being decoded (200 MB for
# a 16-bit greyscale PNG, which passes through int32 and float32 on its way to 8 bits), where
# PIL alone allows 179 million pixels (2 GiB). 4096 x 4096 holds any ImageNet or COCO image.
MAX_PIXELS = 4096 * 4096


class ImageTooLarge(ValueError):
    """An image beyond MAX_PIXELS (or beyond PIL's own decompression-bomb limit)."""


def open_image(file, max_pixels=None):
    """Image.open (a path or a binary file object) within the pixel budget: the image, lazily
    decoded as PIL's always is, or ImageTooLarge. Only the header has been read when it raises.
    max_pixels: default MAX_PIXELS, read at call time."""
    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():   # PIL warns from 89 million pixels; we refuse well before
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)
            image = Image.open(file)
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(str(e)) from None
    width, height = image.size
    if width * height > max_pixels and image.format == 'JPEG':
        scale = 2 ** math.ceil(math.log2(math.sqrt(width * height / max_pixels)))   # 2, 4, 8, ...
        if scale <= 8:
            image.draft(image.mode, (math.ceil(width / scale), math.ceil(height / scale)))
    if image.size[0] * image.size[1] > max_pixels:
        image.close()
        raise ImageTooLarge(f'{width} x {height} pixels, more than the budget of {max_pixels} '
                            f'(data.MAX_PIXELS)')
    return image


_SCALE = 1 / (255 * torch.tensor(STD).view(3, 1, 1))   # (x / 255 - mean) / std == x * _SCALE + _SHIFT
_SHIFT = -torch.tensor(MEAN).view(3, 1, 1) / torch.tensor(STD).view(3, 1, 1)


def to_tensor(image):
    """PIL RGB image (W x H) -> normalised FloatTensor (3, H, W). Channels first while still
    uint8, then float: arithmetic on a contiguous tensor is 5x faster than on a permuted one."""
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()   # (3, H, W) uint8
    return x.float().mul_(_SCALE).add_(_SHIFT)


def random_resized_crop(width, height, rng, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)):
    """The box (left, top, right, bottom) of a random crop covering `scale` of the area with
    an aspect ratio in `ratio` (the Inception / CLIP recipe); after 10 misses, the largest
    centred box whose aspect ratio is in range."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    w, h = width, height
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def train_transform(image_size, scale=(0.9, 1.0)):
    """PIL image -> FloatTensor (3, S, S): random resized crop (scale as open_clip's CLIP
    recipe), bicubic, CLIP normalisation. transform(image, rng) draws only from rng (a
    random.Random), so a sample's crop can be replayed; without rng it uses `random`."""
    def transform(image, rng=None):
        width, height = image.size
        left, top, right, bottom = random_resized_crop(width, height, rng or random, scale)
        if image.format == 'JPEG':
            # A JPEG decodes at 1/2, 1/4 or 1/8 size for a fraction of the cost: ask for the
            # smallest that leaves the crop >= image_size pixels, and scale the box with it.
            image.draft('RGB', (math.ceil(width * image_size / (right - left)),
                                math.ceil(height * image_size / (bottom - top))))
        fx, fy = image.size[0] / width, image.size[1] / height   # 1 unless drafted
        image = to_rgb(image)
        # resize with box= crops and scales in one pass, without an intermediate image
        box = (left * fx, top * fy, right * fx, bottom * fy)
        return to_tensor(image.resize((image_size, image_size), Image.BICUBIC, box=box))
    return transform


def eval_transform(image_size):
    """PIL image -> FloatTensor (3, S, S) as CLIP evaluates: bicubic resize of the short side
    to S, centre crop, CLIP normalisation. (The colour conversion comes first, so a palette
    image is resampled in colour, where CLIP's order would resample it nearest-neighbour.)"""
    def transform(image, rng=None):
        image = to_rgb(image)
        w, h = image.size
        size = (image_size, int(image_size * h / w)) if w <= h else (int(image_size * w / h), image_size)
        image = image.resize(size, Image.BICUBIC)
        left, top = int(round((size[0] - image_size) / 2)), int(round((size[1] - image_size) / 2))
        return to_tensor(image.crop((left, top, left + image_size, top + image_size)))
    return transform


# ----------------------------------------------------------------------------- shards
def _braces(pattern):
    """'a/{000..002}.tar' -> ['a/000.tar', 'a/001.tar', 'a/002.tar']; '{x,y}' alternatives too."""
    m = re.search(r'\{([^{}]*)\}', pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    numbers = re.fullmatch(r'(\d+)\.\.(\d+)', body)
    if numbers:
        a, b = numbers.groups()
        if int(b) < int(a):
            raise ValueError(f"shard pattern {pattern!r}: range {{{body}}} runs backwards")
        width = len(a) if a.startswith('0') else 0   # {00000..00099} keeps its zero padding
        options = [f'{i:0{width}d}' for i in range(int(a), int(b) + 1)]
    else:
        options = body.split(',')
    return [path for option in options for path in _braces(head + option + tail)]


def expand_urls(urls):
    """Shard list from a brace pattern ('::' joins several), a glob, a directory (its *.tar,
    sorted) or a list. A pattern that names no existing file is an error that quotes it;
    some missing files are only warned about when the loader reaches them."""
    if isinstance(urls, (str, os.PathLike)):
        pattern = os.fspath(urls)
        if os.path.isdir(pattern):
            paths = sorted(glob.glob(os.path.join(pattern, '*.tar')))
            if not paths:
                raise ValueError(f"shards {pattern!r}: the directory holds no *.tar file")
            return paths
        paths = []
        for part in pattern.split('::'):
            for path in _braces(part):
                paths += sorted(glob.glob(path)) if any(c in path for c in '*?[') else [path]
    else:
        pattern, paths = str(list(urls)), [os.fspath(u) for u in urls]
    local = [p for p in paths if not p.startswith('pipe:')]
    if not paths or (local and not any(os.path.isfile(p) for p in local)):
        raise ValueError(f"shards {pattern!r} match no file (no such file or directory: "
                         f"{paths[0] if paths else pattern})")
    return paths


def _open(url):
    """A readable binary stream of one shard: a local file, or 'pipe:COMMAND''s stdout."""
    if url.startswith('pipe:'):
        return subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout
    return open(url, 'rb')


def _key(member_name):
    """A sample's KEY: the member's path up to the first dot of its file name."""
    folder, name = os.path.split(member_name)
    return os.path.join(folder, name.partition('.')[0])


def _tar_groups(tar):
    """Consecutive members with the same KEY (path up to the first dot of the file name) ->
    (key, {extension: bytes}), as img2dataset writes them and webdataset reads them."""
    key, group = None, {}
    for member in tar:
        if not member.isfile():
            continue
        ext = os.path.basename(member.name).partition('.')[2]
        if _key(member.name) != key:
            if group:
                yield key, group
            key, group = _key(member.name), {}
        group[ext.lower()] = tar.extractfile(member).read()   # raises on a truncated tar
    # tarfile ends the archive in silence where the next 512-byte header is cut short; the
    # stream then stands between 1 and 511 bytes past that header's start (0: cut between two
    # members, which looks complete; 512: the end-of-archive block). The group in progress
    # may have lost members, so it is not yielded.
    if 0 < tar.fileobj.tell() - tar.offset < tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f'cut inside the header at byte {tar.offset}')
    if group:
        yield key, group


def _shard_items(url, with_json=False, check=None):
    """Everything a shard holds, undecoded and in tar order, as items (problem, key, image
    bytes, captions): problem is None for a usable sample, else (kind, detail) for a sample
    or a shard that will be skipped and counted. Shard problems are items too, so they are
    counted where they happen in the stream, once, also after a resume. with_json: a fifth
    element, the bytes of KEY.json or None (evaluation reads ground truth from it).
    check(url, key, group) makes an item of a sample (default: _check, one caption per line)."""
    check = check or _check
    stream = tar = None
    try:
        stream = _open(url)
        tar = tarfile.open(fileobj=stream, mode='r|*')
        for key, group in _tar_groups(tar):
            item = check(url, key, group)
            yield (*item, group.get('json')) if with_json else item
    except (OSError, EOFError, tarfile.TarError) as e:   # a truncated tar loses the group in progress
        if tar is not None:
            problem = ('truncated tar', f'{url}: {e}')
        elif not url.startswith('pipe:') and os.path.isfile(url) and os.path.getsize(url) == 0:
            problem = ('unreadable shard', f'{url}: an empty file (0 bytes)')
        elif isinstance(e, tarfile.ReadError):
            problem = ('unreadable shard', f'{url}: not a tar file ({e})')
        else:
            problem = ('unreadable shard', f'{url}: {e}')
        yield (problem, None, None, None) + ((None,) if with_json else ())
    finally:
        if stream is not None:
            stream.close()


def _captions(url, key, group, caption_lines=True, caption_key='caption'):
    """(problem or None, [captions]) of one sample. The text is KEY.txt, or where there is none
    the field caption_key of KEY.json (img2dataset writes both; some tools only the .json): a
    string, or a list of strings that are several captions. caption_lines=True: each line of
    the text is a caption of its own (the synthetic data, COCO-style caption files), one of
    which is drawn each time; False: the whole text is one caption (web captions may hold a
    newline). Text that is not UTF-8 is a problem, not a caption full of U+FFFD."""
    if 'txt' in group:
        try:
            texts = [group['txt'].decode('utf-8')]
        except UnicodeDecodeError as e:
            return ('caption not UTF-8', f'{url}: {key}.txt: {e}'), None
    elif 'json' in group and caption_key:
        try:
            meta = json.loads(group['json'])
        except UnicodeDecodeError as e:
            return ('caption not UTF-8', f'{url}: {key}.json: {e}'), None
        except ValueError as e:
            return ('no caption', f'{url}: {key}: no {key}.txt, and {key}.json does not parse ({e})'), None
        texts = meta.get(caption_key) if isinstance(meta, dict) else None
        texts = [texts] if isinstance(texts, str) else texts
        if not (isinstance(texts, list) and all(isinstance(t, str) for t in texts)):
            return ('no caption', f'{url}: {key}: no {key}.txt, and {key}.json has no string '
                                  f'{caption_key!r}'), None
    else:
        return ('no caption', f'{url}: {key}: no {key}.txt' + (' or .json' if caption_key else '')), None
    if caption_lines:
        texts = [line for text in texts for line in text.splitlines()]
    captions = [t.strip() for t in texts if t.strip()]
    if not captions:
        return ('empty caption', f'{url}: {key}: the caption has no text'), None
    return None, captions


def _check(url, key, group, caption_lines=True, caption_key='caption'):
    """The cheap checks, made before any image is decoded."""
    ext = next((e for e in SHARD_IMAGE_KEYS if e in group), None)
    if ext is None:
        unknown = sorted(e for e in group if e not in ('txt', 'json', 'cls'))
        kind = 'unknown extension' if unknown else 'no image'
        return (kind, f'{url}: {key}: members {sorted(group)}'), key, None, None
    problem, captions = _captions(url, key, group, caption_lines, caption_key)
    if problem is not None:
        return problem, key, None, None
    return None, key, group[ext], captions


def read_shards(urls, with_json=False, caption_lines=True, caption_key='caption'):
    """Every sample with an image and a caption, in shard order, for evaluation: (key, PIL RGB
    image or None if it does not decode or is too large, [captions]). What was skipped is warned
    about at the end. One caption per line by default (retrieval sets such as COCO give an image
    several); caption_lines, caption_key as in ShardLoader.
    with_json=True: a fourth element, KEY.json parsed, or None when the sample has none or it
    does not parse (those are counted and warned about, the sample is still yielded)."""
    skipped, bad_json = {}, []
    for url in expand_urls(urls):
        check = functools.partial(_check, caption_lines=caption_lines, caption_key=caption_key)
        for problem, key, image_bytes, captions, *raw_json in _shard_items(url, with_json, check):
            if problem is not None:
                skipped[problem[0]] = skipped.get(problem[0], 0) + 1
                continue
            image = _decode(image_bytes)
            if not with_json:
                yield key, image, captions
                continue
            meta = None
            if raw_json[0] is not None:
                try:
                    meta = json.loads(raw_json[0])
                except ValueError:   # not UTF-8 or not JSON; UnicodeDecodeError is a ValueError
                    bad_json.append(key)
            yield key, image, captions, meta
    if skipped:
        warnings.warn(f"shards {urls!r}: skipped {skipped}", DataWarning)
    if bad_json:
        warnings.warn(f"shards {urls!r}: ignored {len(bad_json)} KEY.json that do not parse, "
                      f"e.g. {bad_json[:3]}", DataWarning)


def _decode(image_bytes):
    """PIL RGB image, or None when it does not decode or is beyond the pixel budget."""
    try:
        with open_image(io.BytesIO(image_bytes)) as im:
            image = to_rgb(im)
            image.load()
        return image
    except Exception:   # PIL raises many kinds of errors on a broken file
        return None


def count_samples(urls):
    """How many samples with an image the shards hold, from their tar headers alone (a local
    uncompressed tar is read by seeking from header to header), or None where that is unknown
    (a pipe:, a shard that does not open). For the totals of evaluation progress bars."""
    n = 0
    for url in urls:
        if url.startswith('pipe:'):
            return None
        try:
            with tarfile.open(url) as tar:
                n += len({_key(m.name) for m in tar if m.isfile() and
                          m.name.rpartition('.')[2].lower() in IMAGE_EXTENSIONS})
        except (OSError, EOFError, tarfile.TarError):
            return None
    return n


def _check_cls(url, key, group):
    """_check for clip_benchmark's zero-shot shards: (problem, key, image bytes, class index)."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in group), None)
    if ext is None:
        return ('no image', f'{url}: {key}: members {sorted(group)}'), key, None, None
    try:
        return None, key, group[ext], int(group['cls'].decode('ascii').strip())
    except (KeyError, UnicodeDecodeError, ValueError):
        return ('no class index', f'{url}: {key}: no {key}.cls holding an integer'), key, None, None


def read_labelled_shards(urls):
    """clip_benchmark's WebDataset zero-shot format: (key, PIL RGB image or None when it does
    not decode, class index) for each sample KEY.jpg|png|webp + KEY.cls (the index as text), in
    shard order. Samples without an image or a class index, and unreadable shards, are
    skipped and warned about at the end."""
    skipped = {}
    for url in expand_urls(urls):
        for problem, key, image_bytes, label in _shard_items(url, check=_check_cls):
            if problem is not None:
                skipped[problem[0]] = skipped.get(problem[0], 0) + 1
                continue
            yield key, _decode(image_bytes), label
    if skipped:
        warnings.warn(f"shards {urls!r}: skipped {skipped}", DataWarning)


class DataWarning(UserWarning):
    """Skipped samples and unreadable shards."""


# ----------------------------------------------------------------------------- the loader
def _shuffled(items, size, rng):
    """Shuffle a stream through a buffer of `size` items; the buffer's random choices depend
    on rng alone, never on the items, so a replay with the same rng gives the same order."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


class _ShardStream(torch.utils.data.IterableDataset):
    """One rank's sample stream, run inside each DataLoader worker; it yields whole batches
    (images (B, 3, S, S), tokens (B, L), info) where info = {'role', 'position', 'problems',
    'empty_epoch'}. ShardLoader sets .start (per role: epoch, shard index, sample index) and
    .first_role. A worker whose share of an epoch holds no valid sample (a zero-byte shard where
    there are about as many shards as workers) yields an empty batch (images None) with
    empty_epoch = that epoch, and goes on: the DataLoader takes the workers' batches in turn and
    would wait for it forever. Whether the whole dataset is empty, ShardLoader decides."""

    def __init__(self, urls, pattern, batch_size, image_size, context_length, tokenizer, rank,
                 world_size, roles, seed, shuffle_buffer, resample, train, caption_lines=True,
                 caption_key='caption'):
        super().__init__()
        self.caption_lines, self.caption_key = caption_lines, caption_key
        self.urls, self.pattern, self.batch_size, self.context_length = urls, pattern, batch_size, context_length
        self.tokenizer, self.rank, self.world_size, self.roles, self.seed = tokenizer, rank, world_size, roles, seed
        self.shuffle_buffer, self.resample, self.train, self.image_size = shuffle_buffer, resample, train, image_size
        self.start, self.first_role = [(0, 0, 0)] * roles, 0

    def shards_of(self, epoch, g):
        """[(shard index, keep)] read by global worker g in `epoch`: keep is None (every
        sample) or r (samples j with j % W == r, when there are fewer shards than workers)."""
        order = list(range(len(self.urls)))
        if self.train:
            random.Random(f'{self.seed}/shards/{epoch}').shuffle(order)   # the same on every rank
        n = self.world_size * self.roles
        if len(order) >= n:
            return [(s, None) for s in order[g::n]]
        return [(s, (g - p) % n) for p, s in enumerate(order)]   # the shard's place p staggers who starts

    def items(self, epoch, g, s, keep):
        n = self.world_size * self.roles
        check = functools.partial(_check, caption_lines=self.caption_lines, caption_key=self.caption_key)
        items = (item for j, item in enumerate(_shard_items(self.urls[s], check=check))
                 if keep is None or j % n == keep)
        if self.train and self.shuffle_buffer > 1:
            items = _shuffled(items, self.shuffle_buffer, random.Random(f'{self.seed}/buffer/{epoch}/{s}/{g}'))
        return items

    def decode(self, item, epoch, s, problems):
        """(image (3, S, S), caption), or None after counting the problem."""
        problem, key, image_bytes, captions = item
        if problem is None:
            rng = random.Random(f'{self.seed}/{epoch}/{s}/{key}')   # this sample's caption and crop
            try:
                caption = rng.choice(captions) if self.train else captions[0]
                with open_image(io.BytesIO(image_bytes)) as im:
                    return self.transform(im, rng), caption
            except ImageTooLarge as e:
                problem = ('image too large', f'{self.urls[s]}: {key}: {e}')
            except Exception as e:   # PIL raises many kinds; one bad JPEG must not end a multi-day run
                problem = ('corrupt image', f'{self.urls[s]}: {key}: {type(e).__name__}: {e}')
        kind, detail = problem
        count, first = problems.get(kind, (0, detail))
        problems[kind] = (count + 1, first)
        return None

    def batch(self, samples, role, position, problems, empty_epoch=None):
        # default_collate stacks into shared memory when in a worker: no copy on the way to the trainer
        images = torch.utils.data.default_collate([x for x, _ in samples]) if samples else None       # (B, 3, S, S)
        tokens = tokenize([c for _, c in samples], self.context_length, self.tokenizer) if samples else None  # (B, L)
        return images, tokens, {'role': role, 'position': position, 'problems': problems,
                                'empty_epoch': empty_epoch}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        # made here, not in __init__: a closure does not pickle, and spawned workers get a pickle
        self.transform = (train_transform if self.train else eval_transform)(self.image_size)
        role = ((info.id if info else 0) + self.first_role) % self.roles
        g = self.rank * self.roles + role
        epoch, k0, n0 = self.start[role]
        samples, problems = [], {}
        while True:
            shards, valid = self.shards_of(epoch, g), 0
            for k in range(k0, len(shards)):
                s, keep = shards[k]
                for n, item in enumerate(self.items(epoch, g, s, keep), 1):
                    if k == k0 and n <= n0:
                        continue   # delivered before the resume: skipped, not decoded
                    sample = self.decode(item, epoch, s, problems)
                    if sample is None:
                        continue
                    valid += 1
                    samples.append(sample)
                    if len(samples) == self.batch_size:
                        yield self.batch(samples, role, (epoch, k, n), problems)
                        samples, problems = [], {}
            if not self.resample:
                break
            # a whole epoch with nothing to deliver: say so, and take the next one (the rest of
            # an epoch after a resume gave batches before the interruption, so it says nothing)
            if valid == 0 and not samples and (k0, n0) == (0, 0):
                yield self.batch([], role, (epoch + 1, 0, 0), problems, epoch)
                problems = {}
            epoch, k0, n0 = epoch + 1, 0, 0
        if samples or problems:   # resample=False: the rest, and the count of what was skipped
            yield self.batch(samples, role, (epoch, len(shards), 0), problems)


# Epochs in a row in which a rank's workers find no valid sample before a rank of several that
# has never had a batch gives up (with one rank, one such epoch means an empty dataset).
EMPTY_EPOCHS = 10


def _is_synthetic(urls):
    """Whether the shards are the built-in synthetic data's training shards (one caption per line)."""
    parents = {os.path.dirname(os.path.dirname(os.path.abspath(u))) for u in urls if not u.startswith('pipe:')}
    return len(parents) == 1 and os.path.isfile(os.path.join(parents.pop(), '.complete'))


class ShardLoader:
    """Batches (images (B, 3, S, S) float32, tokens (B, L) int64) from WebDataset shards, for
    one rank: `for images, tokens in loader`. See the module docstring for the order of
    samples; state_dict() / load_state_dict() resume exactly after the batches taken.

    urls: brace pattern, list or directory. workers: DataLoader processes (0: in this
    process, the same batches as 1). resample=True repeats epochs forever (training);
    False gives one epoch per `for` loop, the last batch of each worker possibly short.
    train=False: eval transform, first caption, shards in the given order, no shuffling.
    Skipped samples are counted by kind in .skipped; each kind warns once (DataWarning).
    caption_lines: True, each line of KEY.txt is a caption (one is drawn each time); False, the
    whole text is one caption; None (default): True for the built-in synthetic data (shards in
    DIR/train/ beside synthetic.py's DIR/.complete marker), False otherwise, since web captions
    (img2dataset) may hold newlines. caption_key: the field of KEY.json read as the caption
    when a sample has no KEY.txt (None: never)."""

    def __init__(self, urls, batch_size, image_size, context_length, tokenizer='byte', rank=0, world_size=1,
                 workers=2, seed=0, shuffle_buffer=1000, resample=True, train=True, caption_lines=None,
                 caption_key='caption'):
        for name, value, low in (('batch_size', batch_size, 1), ('image_size', image_size, 1),
                                 ('world_size', world_size, 1), ('workers', workers, 0), ('rank', rank, 0),
                                 ('shuffle_buffer', shuffle_buffer, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"ShardLoader: {name}={value!r}, expected an integer >= {low}")
        if rank >= world_size:
            raise ValueError(f"ShardLoader: rank={rank} is not below world_size={world_size}")
        tokenize([''], context_length, tokenizer)   # a bad name or vocabulary fails here, not in a worker
        self.urls = expand_urls(urls)
        self.pattern = urls if isinstance(urls, str) else str(urls)
        self.workers, self.roles = workers, max(workers, 1)
        self.caption_lines = _is_synthetic(self.urls) if caption_lines is None else caption_lines
        self.stream = _ShardStream(self.urls, self.pattern, batch_size, image_size, context_length, tokenizer,
                                   rank, world_size, self.roles, seed, shuffle_buffer, resample, train,
                                   self.caption_lines, caption_key)
        self.positions = [(0, 0, 0)] * self.roles   # per role: (epoch, shard index, sample index) delivered
        self.next_role, self.batches, self.skipped, self._warned = 0, 0, {}, set()
        self._empty = {}   # epoch -> the roles that found no valid sample in all of it
        self._examples = {}   # kind -> the first skipped item's detail, for the error messages

    def _identity(self):
        s = self.stream
        return {'seed': s.seed, 'rank': s.rank, 'world_size': s.world_size, 'workers': self.roles,
                'batch_size': s.batch_size, 'shuffle_buffer': s.shuffle_buffer, 'shards': len(self.urls),
                'resample': s.resample, 'train': s.train}

    def state_dict(self):
        """Plain Python values (fits torch.save and all_gather_object)."""
        return {'batches': self.batches, 'positions': [list(p) for p in self.positions],
                'next_role': self.next_role, 'skipped': dict(self.skipped), **self._identity()}

    def load_state_dict(self, state):
        self.batches, self.skipped = state['batches'], dict(state['skipped'])
        changed = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
        if not changed:
            self.positions, self.next_role = [tuple(p) for p in state['positions']], state['next_role']
            return
        epoch = min(p[0] for p in state['positions'])
        warnings.warn(f"ShardLoader: the saved position is from other settings (saved vs now: {changed}); "
                      f"exact resume is impossible, restarting epoch {epoch} from its beginning", DataWarning)
        self.positions, self.next_role = [(epoch, 0, 0)] * self.roles, 0

    def _check_empty(self, role, epoch):
        """A worker found no valid sample in an epoch. One rank alone: every worker in the same
        epoch means the whole dataset, an error. Several ranks: the rank's share was empty, as
        may be by chance with about as many shards as workers; only a rank that has never had a
        batch, after EMPTY_EPOCHS such epochs, stops (the dataset has too few valid samples)."""
        self._empty.setdefault(epoch, set()).add(role)
        empty_epochs = sum(len(roles) == self.roles for roles in self._empty.values())
        world = self.stream.world_size
        if empty_epochs and (world == 1 or (self.batches == 0 and empty_epochs >= EMPTY_EPOCHS)):
            where = '' if world == 1 else (f" in the share of rank {self.stream.rank} of {world} "
                                           f"({EMPTY_EPOCHS} epochs)")
            raise ValueError(f"shards {self.pattern!r}: no valid sample in epoch {epoch}{where} "
                             f"({self._what_was_skipped()})")

    def _what_was_skipped(self):
        examples = '; '.join(f'{kind}: {detail}' for kind, detail in self._examples.items())
        return f"skipped: {self.skipped}; first of each kind: {examples}" if self.skipped else 'nothing readable'


    def _count(self, problems):
        for kind, (count, first) in problems.items():
            if kind not in self._warned:
                self._warned.add(kind)
                self._examples[kind] = first
                warnings.warn(f"shards {self.pattern!r}: skipping a sample: {kind}: {first} "
                              f"(further ones are counted in ShardLoader.skipped)", DataWarning)
            self.skipped[kind] = self.skipped.get(kind, 0) + count

    def __iter__(self):
        self.stream.start, self.stream.first_role = list(self.positions), self.next_role
        fresh = all(p[1:] == (0, 0) for p in self.positions)
        loader = torch.utils.data.DataLoader(self.stream, batch_size=None, num_workers=self.workers,
                                             pin_memory=torch.cuda.is_available())
        epoch, delivered = min(p[0] for p in self.positions), 0
        for images, tokens, info in loader:
            self._count(info['problems'])
            if images is None and info['empty_epoch'] is None:
                continue   # the count of what was skipped at the end of a one-epoch pass
            self.positions[info['role']] = tuple(info['position'])
            self.next_role = (info['role'] + 1) % self.roles
            if images is None:
                self._check_empty(info['role'], info['empty_epoch'])
                continue
            self._empty.clear()
            self.batches += 1
            delivered += len(images)
            if min(p[0] for p in self.positions) > epoch and self.skipped:   # every role is past `epoch`
                warnings.warn(f"shards {self.pattern!r}: epoch {epoch} done; skipped so far: {self.skipped}",
                              DataWarning)
            epoch = min(p[0] for p in self.positions)
            yield images, tokens
        # only with resample=False: the epoch is over
        if delivered == 0 and fresh:
            raise ValueError(f"shards {self.pattern!r}: no valid sample in epoch {epoch} "
                             f"({self._what_was_skipped()})")
        if self.skipped:
            warnings.warn(f"shards {self.pattern!r}: epoch {epoch} done; skipped so far: {self.skipped}", DataWarning)
        self.positions, self.next_role = [(epoch + 1, 0, 0)] * self.roles, 0
