"""
Data for Llip: tokenizers, image transforms and a loader for WebDataset tar shards. (The
built-in synthetic dataset, whose images each have several captions about different things,
is synthetic.py; it writes shards in the format read here.)

    python -m pytest tests/test_data.py -q                    # what this file promises
    python bench_data.py                                      # loader speed vs the webdataset library

Shards are what img2dataset writes: tar files whose members KEY.jpg|jpeg|png|webp and KEY.txt
(and optionally KEY.json) belong together; a .txt may hold several captions, one per line, and
each time a sample is read one of them is drawn. Shards are named by a brace pattern
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

Bad input never stops a run: a corrupt or truncated image, a sample without image, caption or
with an empty one, an image of an unknown extension (.gif, ...), a truncated tar (its samples
before the damage are kept) and a shard that cannot be opened are skipped and counted in
ShardLoader.skipped, with one DataWarning per kind and a summary at the end of each epoch. A
pattern that names no file, and shards that give no valid sample in a whole epoch, raise an
error that quotes the pattern. (A tar cut exactly between two members looks complete.)
"""
import glob
import gzip
import html
import io
import itertools
import json
import math
import os
import random
import re
import subprocess
import tarfile
import unicodedata
import warnings
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
CLIP_BPE = os.path.join(HERE, 'data', 'bpe_simple_vocab_16e6.txt.gz')
MEAN = (0.48145466, 0.4578275, 0.40821073)   # CLIP's per-channel statistics, RGB
STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp', 'bmp', 'gif', 'tif', 'tiff')   # image folders
SHARD_IMAGE_KEYS = IMAGE_EXTENSIONS[:4]   # shard members: img2dataset's and open_clip's


# ----------------------------------------------------------------------------- tokenizers
def _pack(rows, context_length, sot, eot):
    """Token id lists -> LongTensor (N, context_length): SOT, ids, EOT, zero padding. A row
    that is too long is cut and still ends with EOT, which the text tower pools at."""
    if context_length < 2:
        raise ValueError(f"context_length={context_length}: needs room for the start and end tokens (>= 2)")
    out = torch.zeros(len(rows), context_length, dtype=torch.long)
    for i, ids in enumerate(rows):
        ids = [sot] + ids[:context_length - 2] + [eot]
        out[i, :len(ids)] = torch.tensor(ids)
    return out


class ByteTokenizer:
    """UTF-8 bytes, no vocabulary file: 0 = padding, byte b -> b + 1, 257 = SOT, 258 = EOT.
    EOT is the largest id, so argmax over a row finds it as it does for CLIP's tokenizer."""
    vocab_size, sot, eot = 259, 257, 258

    def encode(self, text):
        return [b + 1 for b in ' '.join(text.split()).encode('utf-8')]

    def decode(self, ids):
        return bytes(i - 1 for i in ids if 1 <= i <= 256).decode('utf-8', errors='replace')

    def __call__(self, texts, context_length):
        texts = [texts] if isinstance(texts, str) else texts
        return _pack([self.encode(t) for t in texts], context_length, self.sot, self.eot)


# ftfy, which CLIP runs first, also straightens quotes, undoes ligatures and full-width forms
# and applies NFC; we do those (so "it’s" tokenizes as CLIP does) but not its mojibake repair.
_FTFY_LITE = str.maketrans({**{c: "'" for c in '\u02bc\u2018\u2019\u201a\u201b'},
                            **{c: '"' for c in '\u201c\u201d\u201e\u201f'},
                            '\ufb00': 'ff', '\ufb01': 'fi', '\ufb02': 'fl', '\ufb03': 'ffi', '\ufb04': 'ffl',
                            '\ufb06': 'st', '\u3000': ' ', **{chr(c): chr(c - 0xfee0) for c in range(0xff01, 0xff5f)}})
# CLIP's pre-tokenizer is r"'s|'t|...|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+" from the `regex` package.
# In `re`: [^\W\d_] is letters plus the non-decimal numbers (No, Nl: '²', '½', 'Ⅻ'), which
# _words splits off afterwards; (?:[^\s\w]|_) is "neither space nor letter nor number".
_WORDS = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+",
                    re.IGNORECASE)


def _words(text):
    for word in _WORDS.findall(text):
        if word[0].isalnum() and not word.isalpha() and not word.isdecimal():   # letters mixed with '²'
            for is_number, chars in itertools.groupby(word, lambda c: unicodedata.category(c)[0] == 'N'):
                yield from chars if is_number else [''.join(chars)]   # each number a word of its own
        else:
            yield word


class ClipTokenizer:
    """CLIP's byte-level BPE: 49,408 ids, SOT 49406, EOT 49407, lower-cased, padded with 0.
    Gives the ids of OpenAI's tokenizer for ordinary text (see _FTFY_LITE for the difference)."""
    vocab_size, sot, eot = 49408, 49406, 49407

    def __init__(self, vocab_path=None):
        path = vocab_path or CLIP_BPE
        if not os.path.exists(path):
            raise FileNotFoundError(f"ClipTokenizer: no BPE vocabulary at {path} (expected CLIP's "
                                    f"bpe_simple_vocab_16e6.txt.gz; the repository ships one in data/)")
        with gzip.open(path, 'rt', encoding='utf-8') as f:
            lines = f.read().split('\n')
        merges = [tuple(line.split()) for line in lines[1:1 + 49408 - 256 * 2 - 2]]   # the first line is a header
        # Every byte gets a printable stand-in character so BPE works on str; the printable
        # ASCII/Latin-1 bytes stand for themselves and come first in the vocabulary.
        printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
        others = [b for b in range(256) if b not in printable]
        self.byte_char = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
        chars = list(self.byte_char.values())
        vocab = chars + [c + '</w>' for c in chars] + [''.join(m) for m in merges] + ['<|startoftext|>', '<|endoftext|>']
        assert len(vocab) == self.vocab_size, f"{path}: {len(vocab)} tokens, expected {self.vocab_size}"
        self.ids = {token: i for i, token in enumerate(vocab)}
        self.tokens = vocab
        self.rank = {pair: i for i, pair in enumerate(merges)}
        self.cache = {}

    def bpe(self, word):
        """Word (as byte stand-in characters) -> list of vocabulary tokens: merge the adjacent
        pair with the lowest merge rank, everywhere it occurs, until no listed pair is left."""
        parts = list(word[:-1]) + [word[-1] + '</w>']
        while len(parts) > 1:
            pair = min(zip(parts, parts[1:]), key=lambda p: self.rank.get(p, math.inf))
            if pair not in self.rank:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text):
        text = html.unescape(html.unescape(text))
        text = ' '.join(unicodedata.normalize('NFC', text).translate(_FTFY_LITE).split()).lower()
        ids = []
        for word in _words(text):
            if word in ('<|startoftext|>', '<|endoftext|>'):
                ids.append(self.ids[word])
                continue
            if word not in self.cache:
                if len(self.cache) > 100_000:   # bounded: web captions have endless rare words
                    self.cache.clear()
                chars = ''.join(self.byte_char[b] for b in word.encode('utf-8'))
                self.cache[word] = [self.ids[t] for t in self.bpe(chars)]
            ids += self.cache[word]
        return ids

    def decode(self, ids):
        """Ids (a row of __call__'s output or encode's) -> the cleaned, lower-cased text."""
        ids = [int(i) for i in ids]
        ids = ids[:ids.index(self.eot)] if self.eot in ids else ids   # what follows EOT is padding
        text = ''.join(self.tokens[i] for i in ids if i != self.sot).replace('</w>', ' ')
        char_byte = {c: b for b, c in self.byte_char.items()} | {' ': 32}
        return bytes(char_byte[c] for c in text).decode('utf-8', errors='replace').strip()

    def __call__(self, texts, context_length):
        texts = [texts] if isinstance(texts, str) else texts
        return _pack([self.encode(t) for t in texts], context_length, self.sot, self.eot)


@lru_cache(maxsize=None)
def get_tokenizer(name):
    """'byte' or 'clip' (the values of LlipConfig.tokenizer) -> a shared tokenizer instance."""
    if name == 'byte':
        return ByteTokenizer()
    if name == 'clip':
        return ClipTokenizer()
    raise ValueError(f"tokenizer={name!r}: expected 'byte' or 'clip'")


def tokenize(texts, context_length, tokenizer='byte'):
    """list of str -> LongTensor (len(texts), context_length). tokenizer: 'byte', 'clip' or a
    tokenizer object (ClipTokenizer(path) with another vocabulary file)."""
    tok = tokenizer if callable(tokenizer) else get_tokenizer(tokenizer)
    return tok(texts, context_length)


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
        raise ValueError(f"shards {pattern!r} match no file")
    return paths


def _open(url):
    """A readable binary stream of one shard: a local file, or 'pipe:COMMAND''s stdout."""
    if url.startswith('pipe:'):
        return subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout
    return open(url, 'rb')


def _tar_groups(tar):
    """Consecutive members with the same KEY (path up to the first dot of the file name) ->
    (key, {extension: bytes}), as img2dataset writes them and webdataset reads them."""
    key, group = None, {}
    for member in tar:
        if not member.isfile():
            continue
        folder, name = os.path.split(member.name)
        stem, _, ext = name.partition('.')
        if os.path.join(folder, stem) != key:
            if group:
                yield key, group
            key, group = os.path.join(folder, stem), {}
        group[ext.lower()] = tar.extractfile(member).read()   # raises on a truncated tar
    if group:
        yield key, group


def _shard_items(url, with_json=False):
    """Everything a shard holds, undecoded and in tar order, as items (problem, key, image
    bytes, captions): problem is None for a usable sample, else (kind, detail) for a sample
    or a shard that will be skipped and counted. Shard problems are items too, so they are
    counted where they happen in the stream, once, also after a resume. with_json: a fifth
    element, the bytes of KEY.json or None (evaluation reads ground truth from it)."""
    stream = tar = None
    try:
        stream = _open(url)
        tar = tarfile.open(fileobj=stream, mode='r|*')
        for key, group in _tar_groups(tar):
            item = _check(url, key, group)
            yield (*item, group.get('json')) if with_json else item
    except (OSError, EOFError, tarfile.TarError) as e:   # a truncated tar loses the group in progress
        problem = ('truncated tar' if tar is not None else 'unreadable shard', f'{url}: {e}')
        yield (problem, None, None, None) + ((None,) if with_json else ())
    finally:
        if stream is not None:
            stream.close()


def _check(url, key, group):
    """The cheap checks, made before any image is decoded."""
    ext = next((e for e in SHARD_IMAGE_KEYS if e in group), None)
    if ext is None:
        unknown = sorted(e for e in group if e not in ('txt', 'json'))
        kind = 'unknown extension' if unknown else 'no image'
        return (kind, f'{url}: {key}: members {sorted(group)}'), key, None, None
    if 'txt' not in group:
        return ('no caption', f'{url}: {key}: no {key}.txt'), key, None, None
    captions = [c.strip() for c in group['txt'].decode('utf-8', errors='replace').splitlines() if c.strip()]
    if not captions:
        return ('empty caption', f'{url}: {key}.txt has no text'), key, None, None
    return None, key, group[ext], captions


def read_shards(urls, with_json=False):
    """Every sample with an image and a caption, in shard order, for evaluation: (key, PIL RGB
    image or None if it does not decode, [captions]). What was skipped is warned about at the end.
    with_json=True: a fourth element, KEY.json parsed, or None when the sample has none or it
    does not parse (those are counted and warned about, the sample is still yielded)."""
    skipped, bad_json = {}, []
    for url in expand_urls(urls):
        for problem, key, image_bytes, captions, *raw_json in _shard_items(url, with_json):
            if problem is not None:
                skipped[problem[0]] = skipped.get(problem[0], 0) + 1
                continue
            try:
                with Image.open(io.BytesIO(image_bytes)) as im:
                    image = to_rgb(im)
                    image.load()
            except Exception:   # PIL raises many kinds of errors on a broken file
                image = None
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
    (images (B, 3, S, S), tokens (B, L), info) where info = {'role', 'position', 'problems'}.
    ShardLoader sets .start (per role: epoch, shard index, sample index) and .first_role."""

    def __init__(self, urls, pattern, batch_size, image_size, context_length, tokenizer, rank,
                 world_size, roles, seed, shuffle_buffer, resample, train):
        super().__init__()
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
        items = (item for j, item in enumerate(_shard_items(self.urls[s])) if keep is None or j % n == keep)
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
                with Image.open(io.BytesIO(image_bytes)) as im:
                    return self.transform(im, rng), caption
            except Exception as e:   # PIL raises many kinds; one bad JPEG must not end a multi-day run
                problem = ('corrupt image', f'{self.urls[s]}: {key}: {type(e).__name__}: {e}')
        kind, detail = problem
        count, first = problems.get(kind, (0, detail))
        problems[kind] = (count + 1, first)
        return None

    def batch(self, samples, role, position, problems):
        # default_collate stacks into shared memory when in a worker: no copy on the way to the trainer
        images = torch.utils.data.default_collate([x for x, _ in samples]) if samples else None       # (B, 3, S, S)
        tokens = tokenize([c for _, c in samples], self.context_length, self.tokenizer) if samples else None  # (B, L)
        return images, tokens, {'role': role, 'position': position, 'problems': problems}

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
            if valid == 0 and (k0, n0) == (0, 0):   # never spin forever on shards with nothing usable
                raise RuntimeError(
                    f"shards {self.pattern!r}: rank {self.rank} worker {role} found no valid sample in epoch "
                    f"{epoch} in its {len(shards)} of {len(self.urls)} shards ({self.world_size} ranks x "
                    f"{self.roles} workers); problems: {problems or 'no samples at all'}")
            epoch, k0, n0 = epoch + 1, 0, 0
        if samples or problems:   # resample=False: the rest, and the count of what was skipped
            yield self.batch(samples, role, (epoch, len(shards), 0), problems)


class ShardLoader:
    """Batches (images (B, 3, S, S) float32, tokens (B, L) int64) from WebDataset shards, for
    one rank: `for images, tokens in loader`. See the module docstring for the order of
    samples; state_dict() / load_state_dict() resume exactly after the batches taken.

    urls: brace pattern, list or directory. workers: DataLoader processes (0: in this
    process, the same batches as 1). resample=True repeats epochs forever (training);
    False gives one epoch per `for` loop, the last batch of each worker possibly short.
    train=False: eval transform, first caption, shards in the given order, no shuffling.
    Skipped samples are counted by kind in .skipped; each kind warns once (DataWarning)."""

    def __init__(self, urls, batch_size, image_size, context_length, tokenizer='byte', rank=0, world_size=1,
                 workers=2, seed=0, shuffle_buffer=1000, resample=True, train=True):
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
        self.stream = _ShardStream(self.urls, self.pattern, batch_size, image_size, context_length, tokenizer,
                                   rank, world_size, self.roles, seed, shuffle_buffer, resample, train)
        self.positions = [(0, 0, 0)] * self.roles   # per role: (epoch, shard index, sample index) delivered
        self.next_role, self.batches, self.skipped, self._warned = 0, 0, {}, set()

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

    def _count(self, problems):
        for kind, (count, first) in problems.items():
            if kind not in self._warned:
                self._warned.add(kind)
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
            if images is None:
                continue
            self.positions[info['role']] = tuple(info['position'])
            self.next_role = (info['role'] + 1) % self.roles
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
                             f"(skipped: {self.skipped or 'nothing readable'})")
        if self.skipped:
            warnings.warn(f"shards {self.pattern!r}: epoch {epoch} done; skipped so far: {self.skipped}", DataWarning)
        self.positions, self.next_role = [(epoch + 1, 0, 0)] * self.roles, 0
