"""
Evaluation data on disk, read for eval.py: class folders for zero-shot classification (which
folder is which class), clip_benchmark's WebDataset zero-shot and retrieval roots, the class
names and templates, and batches of images with their labels or with their ground truth
(Truth: the captions true of each image, binding triples). Shards and caption folders (KEY.jpg
+ KEY.txt) are read by shards.py, as training reads them.

Which folder is which class (image_folder), in this order:
- classnames as a dict {folder: name} says it outright (ImageNet's {"n01440764": "tench"});
- a dict {"0": name, "1": name, ...} or a list gives the names of classes 0, 1, ...;
- folders named after the classes are matched by name, ignoring case, '_' and spaces
  ("Golden_Retriever" is "golden retriever");
- folders named by numbers are class indices (ImageNetV2: folder "10" is class 10, whatever
  the string order says);
- otherwise, folders that match no name at all (ImageNet's n01440764, ...): the i-th folder in
  sorted order is class i, and a line says so; folders that match some names but not all are
  refused, since a sorted order would then mislabel in silence.

    python -m pytest tests/test_eval.py -k "folder or classnames or clip_benchmark"
"""
import dataclasses
import itertools
import json
import re
import string
import sys
import unicodedata
import warnings
from pathlib import Path

import torch

import data

SHIPPED = Path(__file__).resolve().parent / 'data'  # data/zeroshot-classnames.json, -templates.json


# ----------------------------------------------------------------------- zero-shot: class folders
def class_names(classnames):
    """The class names in label order from a list, a {"0": name, ...} dict (ordered by the
    number) or a {folder: name} dict (in its order)."""
    if not isinstance(classnames, dict):
        return list(classnames)
    if all(k.isdecimal() for k in classnames):
        by_index = {int(k): name for k, name in classnames.items()}
        if sorted(by_index) != list(range(len(classnames))):
            raise ValueError(
                f"class names {{index: name}}: the indices are not 0..{len(classnames) - 1}"
            )
        return [by_index[i] for i in range(len(by_index))]
    return list(classnames.values())


def _plain(name):
    """What a name match compares: lower case, '_' as a space, single spaces, Unicode NFC (macOS
    names folders in NFD: the folder 'café' is then c, a, f, e and a combining accent)."""
    return ' '.join(unicodedata.normalize('NFC', name).replace('_', ' ').split()).lower()


def folder_labels(root, folders, classnames):
    """{folder name: class index} by the rules in the module docstring."""
    names = class_names(classnames)
    if isinstance(classnames, dict) and not all(
        k.isdecimal() for k in classnames
    ):  # {folder: name}
        unknown = [f for f in folders if f not in classnames]
        if unknown:
            raise ValueError(
                f"{root}: folders missing from the {{folder: name}} class names: {unknown[:10]}"
            )
        index = {k: i for i, k in enumerate(classnames)}
        return {f: index[f] for f in folders}
    if all(f.isdecimal() for f in folders):   # ImageNetV2: folder "10" is class 10
        beyond = [f for f in folders if int(f) >= len(names)]
        if beyond:
            raise ValueError(
                f"{root}: numbered folders {beyond[:5]} but only {len(names)} class names"
            )
        return {f: int(f) for f in folders}
    plain = {}
    for i, name in enumerate(names):
        plain.setdefault(_plain(name), []).append(i)
    matched = [f for f in folders if _plain(f) in plain]
    if matched:   # folders named after the classes: all of them must match, one class each
        unknown = [f for f in folders if _plain(f) not in plain]
        missing = [n for n in names if _plain(n) not in {_plain(f) for f in folders}]
        if unknown or missing:
            raise ValueError(
                f"{root}: class folders and class names differ (compared ignoring case, '_' and "
                f"spaces), and a sorted order would mislabel. Folders not in the names: "
                f"{unknown[:10]}; names without a folder: {missing[:10]}. Give classnames.json "
                f"as {{folder: name}} to say which folder is which class"
            )
        twice = [f for f in folders if len(plain[_plain(f)]) > 1 or
                 sum(_plain(g) == _plain(f) for g in folders) > 1]
        if twice:
            raise ValueError(
                f"{root}: folders {twice[:10]} match the same class name; give classnames.json "
                f"as {{folder: name}}"
            )
        return {f: plain[_plain(f)][0] for f in folders}
    if len(folders) != len(names):   # folders named by id (n01440764, ...)
        raise ValueError(f"{root}: {len(folders)} class folders but {len(names)} class names, and "
                         f"no folder is named after a class (first folders: {folders[:5]})")
    pairs = ', '.join(f'{f} -> {n}' for f, n in list(zip(folders, names))[:3])
    print(f"{root}: no folder is named after a class: the i-th folder in sorted order is class i "
          f"({pairs}, ...); give classnames.json as {{folder: name}} if that is not so")
    return {f: i for i, f in enumerate(folders)}


def image_folder(root, classnames):
    """[(path, label)] for root/<class>/<image>, checked against the class names (a list or a
    dict, see class_names); label indexes class_names(classnames)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root}: no such folder (expected one subfolder of images per class)"
        )
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith('.'))
    if not folders:
        raise ValueError(f"{root}: no class subfolders (expected {root}/<class name>/<image>.jpg)")
    labels = folder_labels(root, [f.name for f in folders], classnames)
    samples = []
    for folder in folders:
        files = sorted(
            f
            for f in folder.iterdir()
            if f.suffix.lower()[1:] in data.IMAGE_EXTENSIONS and f.is_file()
        )
        if not files:
            warnings.warn(f"{folder}: no images in this class folder")
        samples += [(str(f), labels[folder.name]) for f in files]
    if not samples:
        raise ValueError(
            f"{root}: the class folders hold no images ({' '.join(data.IMAGE_EXTENSIONS)})"
        )
    return samples


class ImageFolder(torch.utils.data.Dataset):
    """Decodes one image; an image that fails to decode or is too large (data.open_image) comes
    back as a string, its path and why, to be skipped and counted."""

    def __init__(self, samples, transform):
        self.samples, self.transform = samples, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            with data.open_image(path) as im:   # within images.MAX_PIXELS
                return self.transform(im), label
        except Exception as e:   # PIL raises many kinds: corrupt, truncated, a decompression bomb
            return f'{path} ({type(e).__name__})'


def collate_skipping(batch):
    """DataLoader collate for ImageFolder: (images (B, 3, S, S) or None, labels (B,), [skipped
    paths])."""
    good = [b for b in batch if not isinstance(b, str)]
    images = torch.stack([b[0] for b in good]) if good else None
    return (
        images,
        torch.tensor([b[1] for b in good], dtype=torch.long),
        [b for b in batch if isinstance(b, str)],
    )


# --------------------------------------------------------------- zero-shot: clip_benchmark's shards
def clip_benchmark_shards(root):
    """The shards of clip_benchmark's WebDataset layout, [] where there are none: ROOT/test/0.tar
    .. N-1.tar with N from ROOT/test/nshards.txt where it is there (clip_benchmark reads that
    file: a shard missing from the folder is then counted as unreadable, not left out in
    silence), else the *.tar of ROOT/test, or of ROOT, in the order of their numbers."""
    root = Path(root)
    count = root / 'test' / 'nshards.txt'
    if count.is_file() and count.read_text().strip().isdecimal():
        return [str(root / 'test' / f'{i}.tar') for i in range(int(count.read_text()))]
    for folder in (root / 'test', root):
        shards = sorted((p for p in folder.glob('*.tar') if p.is_file()),
                        key=lambda p: (not p.stem.isdecimal(), int(p.stem) if
                                       p.stem.isdecimal() else 0, p.name))
        if shards:
            return [str(p) for p in shards]
    return []


def clip_benchmark_layout(root):
    """clip_benchmark's WebDataset zero-shot layout (ROOT/classnames.txt, ROOT/test/0.tar ..
    or ROOT/*.tar, optionally ROOT/zeroshot_classification_templates.txt), or None:
    (shard paths, class names, templates or None). Their templates' '{c}' becomes '{}'."""
    root = Path(root)
    if not (root.is_dir() and (root / 'classnames.txt').is_file()):
        return None
    shards = clip_benchmark_shards(root)
    if not shards:
        return None
    names = load_names(str(root / 'classnames.txt'), 'classnames', root)
    file = root / 'zeroshot_classification_templates.txt'
    templates = (
        [t.replace('{c}', '{}') for t in load_names(str(file), 'templates', root)]
        if file.is_file()
        else None
    )
    return shards, names, templates


def retrieval_shards(source):
    """What retrieval reads: clip_benchmark's retrieval root (ROOT/test/N.tar of KEY.webp +
    KEY.txt, one caption a line; ROOT/dataset_type.txt says 'retrieval') as its shards, else
    the source itself: shards (a pattern, a list, a folder of *.tar) or a folder of KEY.jpg +
    KEY.txt, which shards.py reads as shards."""
    is_folder = isinstance(source, (str, Path)) and Path(source).is_dir()
    return (clip_benchmark_shards(source) if is_folder else None) or source


class LabelledShards:
    """Shards of KEY.jpg|png|webp + KEY.cls (data.read_labelled_shards) as eval.py's zero-shot
    reads them: iterating gives (image (3, S, S), label), or a string (what and why) for an
    image that is skipped."""

    def __init__(self, urls, transform, n_classes):
        self.urls, self.transform, self.n_classes = urls, transform, n_classes

    def __iter__(self):
        for key, image, label in data.read_labelled_shards(self.urls):
            if image is None:
                yield f'{key} (does not decode or is beyond images.MAX_PIXELS)'
            elif not 0 <= label < self.n_classes:   # -1 would index the last class's counts
                yield f'{key} (class {label}, but {self.n_classes} class names: 0 to ' \
                    f'{self.n_classes - 1})'
            else:
                yield self.transform(image), label


# ----------------------------------------------------------------------------- batches for eval.py
def labelled_batches(source, batch_size, workers, skipped):
    """(images (B, 3, S, S), labels (B,)) from an ImageFolder, LabelledShards, or an (images,
    labels) pair of tensors; what is skipped is added to `skipped`."""
    if isinstance(source, LabelledShards):
        batch = []
        for item in itertools.chain(source, [None]):   # None: the end, for the last short batch
            if isinstance(item, str):
                skipped.append(item)
            elif item is not None:
                batch.append(item)
            if batch and (len(batch) == batch_size or item is None):
                yield torch.stack([x for x, _ in batch]), torch.tensor([y for _, y in batch])
                batch = []
    elif isinstance(source, ImageFolder):
        loader = torch.utils.data.DataLoader(source, batch_size=batch_size, num_workers=workers,
                                             collate_fn=collate_skipping)
        for images, labels, bad in loader:
            skipped += bad
            if images is not None:
                yield images, labels
    else:
        images, labels = source
        for s in range(0, len(images), batch_size):
            yield images[s:s + batch_size], labels[s:s + batch_size]


@dataclasses.dataclass
class Truth:
    """What retrieval knows of one image besides its pixels."""
    captions: list                # its caption lines: what it adds to the candidate strings
    true: set                     # every string true of it: captions + KEY.json's true_captions
    binding: list = dataclasses.field(default_factory=list)   # (true, false, kind) caption triples


def truth_of(captions, meta=None, key='image'):
    """Truth from an image's caption lines and its parsed KEY.json: None, or a dict whose
    optional 'true_captions' (strings) and 'binding' ([true, false, kind] triples) are read and
    whose other keys ('scene', ...) are not. A malformed field is an error that names the key."""
    meta = meta if isinstance(meta, dict) else {}
    extra, binding = meta.get('true_captions', []), meta.get('binding', [])
    if not (isinstance(extra, list) and all(isinstance(c, str) for c in extra)):
        raise ValueError(f"{key}.json: 'true_captions' is not a list of strings: {extra!r:.200}")
    if not (isinstance(binding, list) and all(isinstance(t, (list, tuple)) and len(t) == 3 and
                                              all(isinstance(x, str) for x in t) for t in binding)):
        raise ValueError(f"{key}.json: 'binding' is not a list of [true, false, kind] strings: "
                         f"{binding!r:.200}")
    return Truth(list(captions), set(captions) | set(extra), [tuple(t) for t in binding])


def captioned_batches(source, image_size, batch_size, skipped, max_images=None):
    """(images (B, 3, S, S), [Truth of each image]) from shards, a caption folder, or a tuple
    (images (N, 3, S, S), [captions of each image][, [extra true strings of each image or None]
    [, [binding triples of each image]]]); the first max_images images if given."""
    if not isinstance(source, (str, Path, list)):
        images, captions, extra, binding = (*source, None, None)[:4]
        n = len(images) if max_images is None else min(max_images, len(images))
        extra, binding = extra or [None] * n, binding or [None] * n
        if not all(captions[:n]):
            raise ValueError(f"image {[bool(c) for c in captions].index(False)} has no caption")
        truths = [Truth(list(captions[i]), set(captions[i]) | set(extra[i] or ()),
                        [tuple(t) for t in binding[i] or ()]) for i in range(n)]
        for s in range(0, n, batch_size):
            yield images[s:min(n, s + batch_size)], truths[s:min(n, s + batch_size)]
        return
    samples = data.read_shards(retrieval_shards(source), with_json=True)   # a folder of pairs too
    transform = data.eval_transform(image_size)
    images, truths, n = [], [], 0
    for key, image, caps, meta in samples:
        if n == max_images:
            break
        if not caps:
            continue   # an image without captions can be neither a query nor a target
        if image is None:   # did not decode
            skipped.append(key)
            continue
        images.append(transform(image))
        truths.append(truth_of(caps, meta, key))
        n += 1
        if len(images) == batch_size:
            yield torch.stack(images), truths
            images, truths = [], []
    if images:
        yield torch.stack(images), truths


def count_images(source, max_images=None):
    """How many images an evaluation source holds, or None where that is unknown (a pipe)."""
    if isinstance(source, LabelledShards):
        n = data.count_samples(source.urls)
    elif isinstance(source, ImageFolder):
        n = len(source)
    elif isinstance(source, (str, Path, list)):   # retrieval shards or a caption folder
        n = data.count_samples(data.expand_urls(retrieval_shards(source)))
    else:   # tensors
        n = len(source[0])
    return n if n is None or max_images is None else min(n, max_images)


# --------------------------------------------------------------------- class names and templates
def bad_templates(templates):
    """The templates that do not put the class name in exactly one place, each with why: '{{}}'
    is a literal {} (the name never inserted), '{}{}' needs two names, '{0}' or '{c}' a
    numbered or named one."""
    bad = []
    for template in templates:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        except ValueError as e:   # an unmatched '{' or '}'
            bad.append(f'{template!r} ({e})')
            continue
        if fields != ['']:
            bad.append(f"{template!r} ({len(fields)} '{{}}' fields" +
                       (f', named {fields}' if any(fields) else '') + ')')
    return bad


# clip_benchmark's dataset names that are not the shipped keys in another case
CLIP_BENCHMARK_NAMES = {
    'imagenet1k': 'imagenet', 'imagenetv2': 'imagenet_v2', 'imagenet-a': 'imagenet_A',
    'imagenet-r': 'imagenet_R', 'imagenet-o': 'imagenet_O', 'cars': 'StanfordCars',
    'fgvc_aircraft': 'FGVCAircraft', 'voc2007': 'PascalVOC2007', 'renderedsst2': 'SST2',
    'fer2013': 'FacialEmotionRecognition2013', 'vtab/flowers': 'Flowers102',
    'vtab/pets': 'OxfordPets', 'vtab/dtd': 'DescribableTextures', 'vtab/eurosat': 'EuroSAT',
    'vtab/caltech101': 'Caltech101', 'vtab/resisc45': 'RESISC45', 'vtab/pcam': 'PatchCamelyon',
    'vtab/cifar10': 'CIFAR10', 'vtab/cifar100': 'CIFAR100', 'dollar_street': 'DollarStreet'}


def load_names(value, kind, folder):
    """--classnames / --templates: a JSON file (a list of strings; for class names also a dict
    {folder: name} or {"0": name}), a text file with one per line (clip_benchmark's
    classnames.txt), or a key of the shipped data/zeroshot-<kind>.json; without the flag,
    <folder>/<kind>.json if it exists, else None."""
    if value is None:
        local = Path(folder) / f'{kind}.json'
        if not local.is_file():
            return None
        value = str(local)
    if Path(value).is_file():
        try:
            text = Path(value).read_bytes().decode('utf-8')
            items = ([line.strip() for line in text.splitlines() if line.strip()]
                     if value.endswith('.txt') else json.loads(text))
        except ValueError as e:   # not UTF-8 or not JSON
            raise SystemExit(f"error: --{kind}={value}: not a JSON file ({e})")
    else:
        shipped = SHIPPED / f'zeroshot-{kind}.json'
        table = json.loads(shipped.read_text()) if shipped.is_file() else {}
        spelled = {k.lower(): k for k in table}   # cifar10 is CIFAR10; clip_benchmark's names
        value = spelled.get(CLIP_BENCHMARK_NAMES.get(value, value).lower(), value)
        if value not in table:
            raise SystemExit(f"error: --{kind}={value}: neither a file nor a key of {shipped} "
                             f"(keys: {', '.join(sorted(table)) or 'none, the file is missing'})")
        items = table[value]
    strings = lambda xs: bool(xs) and all(isinstance(x, str) for x in xs)   # noqa: E731
    if kind == 'classnames' and isinstance(items, dict) and strings(list(items.values())):
        try:
            class_names(items)
        except ValueError as e:
            raise SystemExit(f"error: --{kind}={value}: {e}")
        return items
    if not (isinstance(items, list) and strings(items)):
        raise SystemExit(f"error: --{kind}={value}: expected a non-empty JSON list of strings"
                         + (' or a {folder: name} dict' if kind == 'classnames' else ''))
    return items


def class_names_and_templates(folder, classnames=None, templates=None):
    """Zero-shot class names and templates: the flags, else the folder's classnames.json /
    templates.json, else clip_benchmark's layout, else the subfolder names and 'a photo of a
    {}.'. The one resolution eval.py and train.py --zeroshot_data share."""
    bench = clip_benchmark_layout(folder) or (None, None, None)
    names = load_names(classnames, 'classnames', folder) or bench[1]
    templates = load_names(templates, 'templates', folder) or bench[2] or ['a photo of a {}.']
    if names is None:   # no names anywhere: the folder names are the class names
        names = sorted(f.name for f in Path(folder).iterdir() if f.is_dir())
        print(f'no class names given and no {folder}/classnames.json: using the {len(names)} '
              'folder names')
        if names and all(re.fullmatch(r'n\d{8}', n) for n in names):   # text would read 'n01440764'
            print(f'warning: the folder names look like WordNet ids ({names[0]}, ...): the text '
                  'tower reads them as they are; give the class names, e.g. '
                  '--classnames=imagenet', file=sys.stderr)
    if len(class_names(names)) < 2:   # one class: every image is a hit, top-1 1.000 says nothing
        raise ValueError(f'{folder}: {len(class_names(names))} class(es) ({class_names(names)}); '
                         'zero-shot classification needs at least 2')
    bad = bad_templates(templates)
    if bad:
        raise ValueError(f"templates must contain '{{}}' once, where the class name goes: "
                         f'{bad[:3]}')
    return names, templates
