"""
Reading WebDataset tar shards as img2dataset writes them: brace patterns, directories and
pipe: URLs, members grouped by sample key, captions from KEY.txt or KEY.json, every problem
counted instead of raised, and clip_benchmark's zero-shot shards (KEY.cls). data.ShardLoader
streams these into batches; data.py's docstring says what a shard holds and what is skipped.

    python -m pytest tests/test_data.py -q
"""
import functools
import glob
import io
import json
import os
import re
import stat
import subprocess
import tarfile
import warnings

from images import IMAGE_EXTENSIONS, SHARD_IMAGE_KEYS, open_image, to_rgb

# ----------------------------------------------------------------------------- shards
MAX_SHARDS = 10_000_000   # a brace pattern naming more is refused before it is expanded


def _braces(pattern):
    """'a/{000..002}.tar' -> ['a/000.tar', 'a/001.tar', 'a/002.tar']; '{x,y}' alternatives too."""
    m = re.search(r'\{([^{}]*)\}', pattern)
    if not m:
        return [pattern]
    count = 1   # how many names the pattern makes, before making any: bounded
    for body in re.findall(r'\{([^{}]*)\}', pattern):
        numbers = re.fullmatch(r'(\d+)\.\.(\d+)', body)
        count *= max(1, int(numbers[2]) - int(numbers[1]) + 1) if numbers else len(body.split(','))
    if count > MAX_SHARDS:
        raise ValueError(f"shard pattern {pattern!r} names {count:,} files, more than "
                         f"{MAX_SHARDS:,}: a typo?")
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
        if os.path.isdir(pattern):   # regular files only: a FIFO named b.tar would block
            paths = sorted(p for p in glob.glob(os.path.join(pattern, '*.tar'))
                           if os.path.isfile(p))
            paths = paths or folder_pieces(pattern)
            if not paths:
                raise ValueError(f"shards {pattern!r}: the directory holds no *.tar file and no "
                                 f"image file (KEY.jpg + KEY.txt)")
            return paths
        paths = []
        for part in pattern.split('::'):
            for path in _braces(part):
                paths += sorted(glob.glob(path)) if any(c in path for c in '*?[') else [path]
    else:
        pattern, paths = str(list(urls)), [os.fspath(u) for u in urls]
    local = [p for p in paths if not p.startswith(('pipe:', 'folder:'))]
    if not paths or (local and not any(os.path.isfile(p) for p in local)):
        raise ValueError(f"shards {pattern!r} match no file (no such file or directory: "
                         f"{paths[0] if paths else pattern})")
    return paths


# ----------------------------------------------------------------------------- caption folders
# A folder of KEY.jpg + KEY.txt (+ KEY.json) files, as eval reads them and img2dataset's "files"
# output holds them, is read as if it were shards: its files, grouped by KEY in sorted order,
# are cut into pieces of FOLDER_PIECE samples, each named by a string 'folder:DIR:START:STOP'
# that stands where a shard's path would. So the loader shuffles, splits among workers and
# resumes a folder exactly as it does shards, and the same checks skip and count bad samples.
FOLDER_PIECE = 1000
FOLDER = re.compile(r'folder:(.*):(\d+):(\d+)')


def _folder_samples(folder):
    """The samples of a folder's top level, sorted by KEY: ((key, ((ext, path), ...)), ...).
    Regular files only (a FIFO would block), no hidden files; KEY as in a tar (_key). Listed
    once per process while the folder's modification time stays the same."""
    return _listing(folder, os.stat(folder).st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _listing(folder, mtime):
    groups = {}
    for entry in os.scandir(folder):
        if entry.is_file() and not entry.name.startswith('.'):
            key, _, ext = entry.name.partition('.')
            groups.setdefault(key, []).append((ext.lower(), entry.path))
    return tuple((key, tuple(sorted(groups[key]))) for key in sorted(groups))


def folder_pieces(folder):
    """The piece names of a caption folder (see FOLDER_PIECE), [] when it holds no image file."""
    samples = _folder_samples(os.path.abspath(folder))
    if not any(ext in IMAGE_EXTENSIONS for _, files in samples for ext, _ in files):
        return []
    n, folder = len(samples), os.path.abspath(folder)
    return [f'folder:{folder}:{start}:{min(start + FOLDER_PIECE, n)}'
            for start in range(0, n, FOLDER_PIECE)]


def _folder_groups(url):
    """A folder piece's samples as a tar's: (key, {extension: bytes}); a caption file beyond
    MAX_TEXT_BYTES is None, never read, as in a shard."""
    folder, start, stop = FOLDER.fullmatch(url).groups()
    for key, files in _folder_samples(folder)[int(start):int(stop)]:
        group = {}
        for ext, path in files:
            if ext in ('txt', 'json') and os.path.getsize(path) > MAX_TEXT_BYTES:
                group[ext] = None
                continue
            with open(path, 'rb') as f:
                group[ext] = f.read()
        yield key, group


def _open(url):
    """A readable binary stream of one shard: a local file, or 'pipe:COMMAND''s stdout."""
    if url.startswith('pipe:'):
        return subprocess.Popen(
            url[5:], shell=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        ).stdout
    if not stat.S_ISREG(os.stat(url).st_mode):   # a FIFO would block open() forever
        raise OSError(f'not a regular file ({stat.filemode(os.stat(url).st_mode)})')
    return open(url, 'rb')


def _key(member_name):
    """A sample's KEY: the member's path up to the first dot of its file name."""
    folder, name = os.path.split(member_name)
    return os.path.join(folder, name.partition('.')[0])


# A KEY.txt or KEY.json beyond this is skipped and counted ('caption too long'), never read: a
# 1.4 MB gzip shard can hold a 1.5 GB caption, of which the context keeps 77 tokens.
MAX_TEXT_BYTES = 1 << 20


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
        ext = ext.lower()
        if ext in ('txt', 'json') and member.size > MAX_TEXT_BYTES:   # not read: a caption bomb
            group[ext] = None
            continue
        group[ext] = tar.extractfile(member).read()   # raises on a truncated tar
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
    if FOLDER.fullmatch(url):   # a piece of a caption folder: its files, not a tar
        try:
            for key, group in _folder_groups(url):
                item = check(url, key, group)
                yield (*item, group.get('json')) if with_json else item
        except OSError as e:   # a file removed or unreadable since the folder was listed
            yield (('unreadable file', f'{url}: {e}'), None, None, None) + \
                ((None,) if with_json else ())
        return
    stream = tar = None
    try:
        stream = _open(url)
        tar = tarfile.open(fileobj=stream, mode='r|*')
        for key, group in _tar_groups(tar):
            item = check(url, key, group)
            yield (*item, group.get('json')) if with_json else item
    except (
        OSError,
        EOFError,
        tarfile.TarError,
    ) as e:  # a truncated tar loses the group in progress
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
    for ext in ('txt', 'json'):
        if ext in group and group[ext] is None:   # beyond MAX_TEXT_BYTES: not read
            return ('caption too long',
                    f'{url}: {key}.{ext}: more than {MAX_TEXT_BYTES} bytes'), None
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
            return (
                'no caption',
                f'{url}: {key}: no {key}.txt, and {key}.json does not parse ({e})',
            ), None
        texts = meta.get(caption_key) if isinstance(meta, dict) else None
        texts = [texts] if isinstance(texts, str) else texts
        if not (isinstance(texts, list) and all(isinstance(t, str) for t in texts)):
            return ('no caption', f'{url}: {key}: no {key}.txt, and {key}.json has no string '
                                  f'{caption_key!r}'), None
    else:
        return (
            'no caption',
            f'{url}: {key}: no {key}.txt' + (' or .json' if caption_key else ''),
        ), None
    if caption_lines:
        texts = [line for text in texts for line in text.splitlines()]
    captions = [t.strip() for t in texts if t.strip()]
    if not captions:
        return ('empty caption', f'{url}: {key}: the caption has no text'), None
    return None, captions


def _check(url, key, group, caption_lines=True, caption_key='caption'):
    """The cheap checks, made before any image is decoded. A shard's image is one of
    SHARD_IMAGE_KEYS (img2dataset's and open_clip's); a folder's, any file image folders take."""
    keys = IMAGE_EXTENSIONS if FOLDER.fullmatch(url) else SHARD_IMAGE_KEYS
    ext = next((e for e in keys if e in group), None)
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
        piece = FOLDER.fullmatch(url)
        if piece:   # a caption folder: its samples with an image file
            samples = _folder_samples(piece[1])[int(piece[2]):int(piece[3])]
            n += sum(any(ext in IMAGE_EXTENSIONS for ext, _ in files) for _, files in samples)
            continue
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
