"""
Evaluation data on disk, read for eval.py: class folders for zero-shot classification (which
folder is which class), caption folders for retrieval, and the class names and templates.

    python -m pytest tests/test_eval.py -k "folder or classnames"
"""
import json
import warnings
from pathlib import Path

import torch
from PIL import Image

import data

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff')
SHIPPED = Path(__file__).resolve().parent / 'data'   # data/zeroshot-classnames.json, -templates.json


# ----------------------------------------------------------------------------- zero-shot: class folders
def image_folder(root, classnames):
    """[(path, label)] for root/<class>/<image>, checked against the class names."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (expected one subfolder of images per class)")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith('.'))
    if not folders:
        raise ValueError(f"{root}: no class subfolders (expected {root}/<class name>/<image>.jpg)")
    names = [f.name for f in folders]
    if set(names) & set(classnames):   # folders named after the classes: match by name
        unknown = [n for n in names if n not in classnames]
        missing = [c for c in classnames if c not in names]
        if unknown or missing:
            raise ValueError(f"{root}: class folders and class names differ. Folders not in the names: "
                             f"{unknown[:10]}; names without a folder: {missing[:10]}")
        labels = [classnames.index(n) for n in names]
    else:                              # folders named by id (n01440764, ...): sorted folder i is class i
        if len(folders) != len(classnames):
            raise ValueError(f"{root}: {len(folders)} class folders but {len(classnames)} class names, and "
                             f"no folder is named after a class (first folders: {names[:5]})")
        labels = list(range(len(folders)))
    samples = []
    for folder, label in zip(folders, labels):
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            warnings.warn(f"{folder}: no images in this class folder")
        samples += [(str(f), label) for f in files]
    if not samples:
        raise ValueError(f"{root}: the class folders hold no images ({' '.join(IMAGE_EXTENSIONS)})")
    return samples


class ImageFolder(torch.utils.data.Dataset):
    """Decodes one image; an image that fails to decode comes back as its path, to be skipped."""

    def __init__(self, samples, transform):
        self.samples, self.transform = samples, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                return self.transform(im), label
        except (OSError, ValueError):   # PIL's UnidentifiedImageError and truncated files are OSErrors
            return path


def collate_skipping(batch):
    """DataLoader collate for ImageFolder: (images (B, 3, S, S) or None, labels (B,), [skipped paths])."""
    good = [b for b in batch if not isinstance(b, str)]
    images = torch.stack([b[0] for b in good]) if good else None
    return images, torch.tensor([b[1] for b in good], dtype=torch.long), [b for b in batch if isinstance(b, str)]


# ----------------------------------------------------------------------------- retrieval: caption folders
def caption_folder(root, with_json=False):
    """(key, PIL image or None when it does not decode, captions) for root/KEY.jpg + root/KEY.txt;
    with_json=True: and a fourth element, root/KEY.json parsed, or None when there is none or
    it does not parse (those are counted in one warning)."""
    bad_json = []
    for path in sorted(p for p in Path(root).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
        text = path.with_suffix('.txt')
        lines = text.read_text().splitlines() if text.exists() else []
        captions = [line.strip() for line in lines if line.strip()]
        try:
            with Image.open(path) as im:
                image = data.to_rgb(im)
                image.load()
        except (OSError, ValueError):
            image = None
        if not with_json:
            yield path.stem, image, captions
            continue
        meta, file = None, path.with_suffix('.json')
        if file.exists():
            try:
                meta = json.loads(file.read_bytes())
            except ValueError:   # not UTF-8 or not JSON
                bad_json.append(file.name)
        yield path.stem, image, captions, meta
    if bad_json:
        warnings.warn(f"{root}: ignored {len(bad_json)} KEY.json that do not parse, "
                      f"e.g. {bad_json[:3]}")



# ----------------------------------------------------------------------------- class names and templates
def load_names(value, kind, folder):
    """--classnames / --templates: a JSON file holding a list of strings, or a key of the shipped
    data/zeroshot-<kind>.json; without the flag, <folder>/<kind>.json if it exists, else None."""
    if value is None:
        local = Path(folder) / f'{kind}.json'
        return json.loads(local.read_text()) if local.is_file() else None
    if Path(value).is_file():
        try:
            items = json.loads(Path(value).read_text())
        except ValueError as e:   # not UTF-8 or not JSON
            raise SystemExit(f"error: --{kind}={value}: not a JSON file ({e})")
    else:
        shipped = SHIPPED / f'zeroshot-{kind}.json'
        table = json.loads(shipped.read_text()) if shipped.is_file() else {}
        if value not in table:
            raise SystemExit(f"error: --{kind}={value}: neither a file nor a key of {shipped} "
                             f"(keys: {', '.join(sorted(table)) or 'none, the file is missing'})")
        items = table[value]
    if not (isinstance(items, list) and items and all(isinstance(s, str) for s in items)):
        raise SystemExit(f"error: --{kind}={value}: expected a non-empty JSON list of strings")
    return items
