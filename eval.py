"""
Zero-shot classification and image-text retrieval with caption-contextualised features.

A Llip image has no single embedding: every image is mixed with every candidate caption
(paper section 3 "Inference", appendix 9), so the score of image i for class c is
cos(z_ic, z'_c) with z_ic = mixer(image i's mixture tokens, class c's query). For the
caption-independent pools (cls, registers, avg, learned) the same code is ordinary CLIP
evaluation: model.similarity reduces to one matrix product.

    python eval.py --ckpt=out/ckpt.pt --task=synthetic --data=data/synthetic
    python eval.py --ckpt=out/ckpt.pt --task=zeroshot --data=data/synthetic/zeroshot/shape
    python eval.py --ckpt=out/ckpt.pt --task=retrieval --data=data/synthetic/retrieval
    python eval.py --official=llip_b16_k32.pt --task=zeroshot --data=/datasets/imagenet/val \
        --classnames=imagenet --templates=imagenet --tau 1 3 5 8 10
    python eval.py --official=llip_b16_k32.pt --task=retrieval --data='/datasets/coco/{00000..00004}.tar'

Zero-shot data is an image folder with one subfolder per class. Class folders named after
the classes are matched by name; otherwise (ImageNet's n01440764, ...) the i-th folder in
sorted order is class i. Class names and templates come from --classnames / --templates (a
JSON file holding a list, or a key of data/zeroshot-*.json: the CLIP protocol's names and
templates), else from classnames.json / templates.json inside --data. Retrieval data is
WebDataset shards, or a folder of KEY.jpg + KEY.txt with one caption per line; either may have
a KEY.json with ground truth (below).

Retrieval is measured over distinct caption strings, each scored once: the candidates are the
distinct lines of the evaluated images' .txt files, and string s is a match of image i when s
is in i's truth set: its own captions, plus the "true_captions" of KEY.json when it has one.
image->text R@k: the fraction of images with a true string among their k best strings;
text->image R@k: the fraction of strings with a true image among their k best images; mAP:
mean average precision over all true items of each query. A true item tied in score with false
ones ranks after them (and a binding tie is a miss). Which protocol that is depends on the data:
- unique captions, no KEY.json (COCO, Flickr30k): every string is true of one image, and R@k
  is the standard protocol (text->image: the caption's own image; image->text: any of its
  captions); a caption that a few images share word for word is one query, true of each;
- the synthetic data: captions are shared ("one shape" is true of hundreds of images) and
  KEY.json adds the ones its .txt leaves out ("a blue square right of a red circle" for "a red
  circle left of a blue square"), so every image a string is true of counts as a hit.
Binding (only where KEY.json has "binding": [true caption, false caption, kind] triples, the
false one being the true one with an attribute swapped between two objects of the image): the
fraction of triples whose image scores the true caption above the false one, overall and per
kind. The false captions are scored against their own image only, never ranked.

Results: a table on stdout and a JSON file (--out).
    python -m pytest tests/test_eval.py      # chunked evaluation == one pair at a time, metrics ==
                                             # one query at a time
"""
import argparse
import dataclasses
import json
import os
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from PIL import Image
from tqdm import tqdm

import data
from metrics import binding_metrics, ranking_metrics
from model import Llip, LlipConfig, TextFeatures, UnsafeCheckpointError, load_official, load_weights

SHIPPED = Path(__file__).resolve().parent / 'data'   # data/zeroshot-classnames.json, -templates.json


# ----------------------------------------------------------------------------- scoring
def score(model, image_features, text_features, tau=None):
    """cos(z_ij, z'_j) of a chunk of images against all captions or classes: (N_img, N_txt).
    model.similarity sizes its chunks of images for the form it runs (loss.default_chunk)."""
    return model.similarity(image_features, text_features, tau=tau)


def _dtype(model):
    return next(model.parameters()).dtype


def _taus(model, taus):
    """None means the model's own tau; the results are keyed by the tau actually used."""
    return [float(model.config.tau if t is None else t) for t in taus]


@torch.no_grad()
def encode_texts(model, texts, device='cpu', batch_size=256):
    """Tokenize and encode captions in batches -> TextFeatures (queries (N, M, D/M) or None, emb (N, D))."""
    c = model.config
    parts = [model.encode_text(data.tokenize(texts[s:s + batch_size], c.context_length, c.tokenizer).to(device))
             for s in range(0, len(texts), batch_size)]
    queries = None if parts[0].queries is None else torch.cat([p.queries for p in parts])
    return TextFeatures(queries, torch.cat([p.emb for p in parts]))


@torch.no_grad()
def class_prototypes(model, classnames, templates, device='cpu', batch_size=256, progress=False):
    """One TextFeatures row per class, averaged over the prompt templates (paper appendix 9):
    emb = normalize(mean_t normalize(z'_{c,t})), query = mean_t Q_{c,t} (not normalised)."""
    bad = [t for t in templates if '{}' not in t]
    if bad:
        raise ValueError(f"templates must contain '{{}}' where the class name goes: {bad[:3]}")
    T = len(templates)
    per_batch = max(1, batch_size // T)   # whole classes per text batch, so averaging stays local
    queries, embs = [], []
    for s in tqdm(range(0, len(classnames), per_batch), desc='classes', disable=not progress):
        prompts = [t.format(name) for name in classnames[s:s + per_batch] for t in templates]  # class-major
        txt = encode_texts(model, prompts, device, len(prompts))
        embs.append(F.normalize(reduce(txt.emb, '(c t) d -> c d', 'mean', t=T), dim=-1))     # (C, D)
        if txt.queries is not None:
            queries.append(reduce(txt.queries, '(c t) m d -> c m d', 'mean', t=T))          # (C, M, D/M)
    return TextFeatures(torch.cat(queries) if queries else None, torch.cat(embs))


# ----------------------------------------------------------------------------- image folders
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
        files = sorted(f for f in folder.iterdir()
                       if f.suffix.lower()[1:] in data.IMAGE_EXTENSIONS)
        if not files:
            warnings.warn(f"{folder}: no images in this class folder")
        samples += [(str(f), label) for f in files]
    if not samples:
        raise ValueError(f"{root}: the class folders hold no images "
                         f"({' '.join(data.IMAGE_EXTENSIONS)})")
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


def _collate_skipping(batch):
    good = [b for b in batch if not isinstance(b, str)]
    images = torch.stack([b[0] for b in good]) if good else None
    return images, torch.tensor([b[1] for b in good], dtype=torch.long), [b for b in batch if isinstance(b, str)]


def _labelled_batches(source, batch_size, workers, skipped):
    """(images (B, 3, S, S), labels (B,)) from an ImageFolder, or from an (images, labels) pair of tensors."""
    if isinstance(source, ImageFolder):
        loader = torch.utils.data.DataLoader(source, batch_size=batch_size, num_workers=workers,
                                             collate_fn=_collate_skipping)
        for images, labels, bad in loader:
            skipped += bad
            if images is not None:
                yield images, labels
    else:
        images, labels = source
        for s in range(0, len(images), batch_size):
            yield images[s:s + batch_size], labels[s:s + batch_size]


def _warn_skipped(source, skipped):
    if skipped:
        warnings.warn(f"{source}: skipped {len(skipped)} images that failed to decode, e.g. {skipped[:3]}")


def load_image_folder(root, classnames, image_size):
    """A small class folder decoded into memory once, (images (N, 3, S, S), labels (N,)), so that
    both zero-shot protocols below score the same tensors; unreadable images are skipped."""
    skipped = []
    folder = ImageFolder(image_folder(root, classnames), data.eval_transform(image_size))
    batches = list(_labelled_batches(folder, 256, 0, skipped))
    _warn_skipped(root, skipped)
    if not batches:
        raise ValueError(f"{root}: no image could be decoded")
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


# ----------------------------------------------------------------------------- zero-shot
@torch.no_grad()
def zeroshot(model, images, classnames, templates, taus=(None,), device='cpu', batch_size=256,
             workers=0, progress=False):
    """Top-1 and top-5 accuracy: {tau: {'top1': .., 'top5': ..}}.
    images: a folder with one subfolder per class, or a pair (images (N, 3, S, S), labels (N,)).
    Each chunk of images is encoded once and scored against every class for every tau."""
    if not classnames or not templates:
        raise ValueError(f"zero-shot needs class names and templates, got {len(classnames)} and {len(templates)}")
    source = images if isinstance(images, (str, Path)) else 'images'
    if isinstance(images, (str, Path)):   # check the folder before the text tower runs
        images = ImageFolder(image_folder(images, classnames), data.eval_transform(model.config.image_size))
    classes = class_prototypes(model, classnames, templates, device, batch_size, progress)
    taus = _taus(model, taus)
    top1, top5, n, skipped = dict.fromkeys(taus, 0), dict.fromkeys(taus, 0), 0, []
    batches = _labelled_batches(images, batch_size, workers, skipped)
    for x, labels in tqdm(batches, desc='zero-shot', unit='batch', disable=not progress):
        img = model.encode_image(x.to(device, _dtype(model)))
        labels = labels.to(device)
        for tau in taus:
            top = score(model, img, classes, tau).topk(min(5, len(classnames)), dim=1).indices  # (B, 5)
            hit = top == labels[:, None]
            top1[tau] += hit[:, 0].sum().item()
            top5[tau] += hit.any(dim=1).sum().item()
        n += len(labels)
    _warn_skipped(source, skipped)
    if n == 0:
        raise ValueError(f"{source}: no image could be decoded")
    return {tau: {'top1': top1[tau] / n, 'top5': top5[tau] / n} for tau in taus}


@torch.no_grad()
def zeroshot_best_prompt(model, images, labels, classnames, templates, taus=(None,),
                         device='cpu', batch_size=256):
    """Top-1 accuracy with every prompt scored on its own and each class scored by its best one:
    argmax_c max_t cos(z_{i,(c,t)}, z'_{(c,t)}), {tau: {'top1_best': ..}}. images (N, 3, S, S).
    Not the paper's protocol (zeroshot above averages the prompts); it matters where the prompts
    name more than the class: the synthetic templates name a colour and a shape ("a large red
    circle"), which the image mostly lacks. llip mixes its tokens for each prompt, and a query
    averaged over 48 such prompts selects no object; the best prompt is the one that names
    what the image shows. For one vector (cls) the averaged and the best prompt differ less."""
    T = len(templates)
    prompts = [t.format(name) for name in classnames for t in templates]   # class-major
    text = encode_texts(model, prompts, device, batch_size)
    taus = _taus(model, taus)
    hits = dict.fromkeys(taus, 0)
    for s in range(0, len(images), batch_size):
        img = model.encode_image(images[s:s + batch_size].to(device, _dtype(model)))
        for tau in taus:
            scores = rearrange(score(model, img, text, tau), 'b (c t) -> b c t', t=T)
            best = reduce(scores, 'b c t -> b c', 'max').argmax(dim=1)        # (B,)
            hits[tau] += (best.cpu() == labels[s:s + batch_size]).sum().item()
    return {tau: {'top1_best': hits[tau] / len(images)} for tau in taus}


# ----------------------------------------------------------------------------- retrieval
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


def caption_folder(root, with_json=False):
    """(key, PIL image or None when it does not decode, captions) for root/KEY.jpg + root/KEY.txt;
    with_json=True: and a fourth element, root/KEY.json parsed, or None when there is none or
    it does not parse (those are counted in one warning)."""
    bad_json = []
    images = (p for p in Path(root).iterdir() if p.suffix.lower()[1:] in data.IMAGE_EXTENSIONS)
    for path in sorted(images):
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


def _captioned_batches(source, image_size, batch_size, skipped, max_images=None):
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
    is_folder = isinstance(source, (str, Path)) and Path(source).is_dir()
    if is_folder and not any(Path(source).glob('*.tar')):
        samples = caption_folder(source, with_json=True)
    else:
        samples = data.read_shards(source if not is_folder else str(source), with_json=True)
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


def _strings_to_score(truths):
    """The strings to encode and what their columns mean: (strings, n, truth (N_img, n) bool,
    binding (image, true column, false column, kind) per triple). The first n strings are the
    candidates: the distinct captions, in order of appearance; the binding captions that are
    no one's caption come after them, scored but never ranked."""
    candidates = list(dict.fromkeys(c for t in truths for c in t.captions))
    triples = [(i, *triple) for i, t in enumerate(truths) for triple in t.binding]
    said_in_binding = [c for _, true, false, _ in triples for c in (true, false)]
    strings = list(dict.fromkeys(candidates + said_in_binding))
    column, n = {c: j for j, c in enumerate(strings)}, len(candidates)
    truth = torch.zeros(len(truths), n, dtype=torch.bool)                              # (N_img, n)
    for i, t in enumerate(truths):
        truth[i, [column[c] for c in t.true if column.get(c, n) < n]] = True
    binding = [(i, column[true], column[false], kind) for i, true, false, kind in triples]
    return strings, n, truth, binding


@torch.no_grad()
def retrieval(model, source, taus=(None,), device='cpu', batch_size=256, progress=False,
              max_images=None):
    """Retrieval over distinct caption strings (the module docstring says which protocol):
    {tau: {'i2t_r1', 'i2t_r5', 'i2t_r10', 'i2t_map', 't2i_r1', .., 't2i_map'}}, with 'binding'
    and 'binding_<kind>' when the source has binding triples.
    source: shards (brace pattern, list or folder of .tar), a folder of KEY.jpg + KEY.txt (each
    with an optional KEY.json), or a tuple (images (N, 3, S, S), [captions of each image]
    [, [extra true strings of each image]][, [(true, false, kind) triples of each image]]);
    max_images: only the first ones. The image features are kept (N x 2 x K x D for Llip) so
    each image is encoded once; the scores of every image-string pair are computed one chunk of
    images at a time."""
    features, truths, skipped = [], [], []
    batches = _captioned_batches(source, model.config.image_size, batch_size, skipped, max_images)
    for x, batch_truths in tqdm(batches, desc='images', unit='batch', disable=not progress):
        features.append(model.encode_image(x.to(device, _dtype(model))))
        truths += batch_truths
    _warn_skipped(source if isinstance(source, (str, Path)) else 'images', skipped)
    if not truths:
        raise ValueError(f"{source}: no image with captions could be read "
                         f"(expected .tar shards, or KEY.jpg + KEY.txt pairs in a folder)")
    strings, n, truth, binding = _strings_to_score(truths)
    texts = encode_texts(model, strings, device, batch_size)
    triples = torch.tensor([b[:3] for b in binding], dtype=torch.long).reshape(-1, 3)   # (N_tri, 3)
    image, true, false = triples.to(device).unbind(dim=1)                                 # (N_tri,)
    results = {}
    for tau in _taus(model, taus):
        scores = torch.cat([score(model, f, texts, tau).float() for f in features])
        # (N_img, N_all): the first n columns are the candidates, the rest binding captions
        results[tau] = ranking_metrics(scores[:, :n], truth)
        if binding:
            results[tau] |= binding_metrics(scores[image, true], scores[image, false],
                                            [kind for *_, kind in binding])
    return results


# ----------------------------------------------------------------------------- the synthetic splits
# Retrieval over the synthetic split's first 500 images (of 1000): a fixed set, so the curve over
# training is comparable. For the tiny preset (pool llip) on 2 busy CPU cores, 250 / 500 / 1000
# images (454 / 736 / 1292 distinct strings) took 2.2 / 4.4 / 10 s, almost all of it scoring.
# For the whole split: python eval.py --task=retrieval --data=data/synthetic/retrieval
SYNTHETIC_RETRIEVAL_IMAGES = 500


def synthetic_results(model, root, device='cpu', batch_size=256, taus=(None,), progress=False):
    """{'zeroshot/<split>': {tau: metrics}, 'retrieval': {tau: metrics}} on synthetic.make_synthetic's layout."""
    root = Path(root)
    splits = sorted(p for p in (root / 'zeroshot').glob('*') if p.is_dir())
    if not splits and not (root / 'retrieval').is_dir():
        raise FileNotFoundError(f"{root}: no zeroshot/<split>/ or retrieval/ folder; "
                                f"write the synthetic data with: python synthetic.py --out={root}")
    results = {}
    for split in splits:
        names = json.loads((split / 'classnames.json').read_text())
        templates = json.loads((split / 'templates.json').read_text())
        images, labels = load_image_folder(split, names, model.config.image_size)
        results[f'zeroshot/{split.name}'] = zeroshot(model, (images, labels), names, templates, taus,
                                                     device, batch_size, progress=progress)
        best = zeroshot_best_prompt(model, images, labels, names, templates, taus, device, batch_size)
        for tau, metrics in best.items():
            results[f'zeroshot/{split.name}'][tau].update(metrics)
    if (root / 'retrieval').is_dir():
        results['retrieval'] = retrieval(model, root / 'retrieval', taus, device, batch_size, progress,
                                         max_images=SYNTHETIC_RETRIEVAL_IMAGES)
    return results


def flatten(results):
    """{'name': {tau: {metric: v}}} -> {'name/metric': v}, with a tau level only for several taus."""
    flat = {}
    for name, by_tau in results.items():
        for tau, metrics in by_tau.items():
            prefix = name if len(by_tau) == 1 else f'{name}/tau{tau:g}'
            flat.update({f'{prefix}/{k}': v for k, v in metrics.items()})
    return flat


def evaluate_synthetic(model, root, device='cpu', batch_size=256, taus=(None,)):
    """Every synthetic zero-shot split and the retrieval split as one flat dict, e.g.
    {'zeroshot/shape/top1': .., 'retrieval/i2t_r1': ..}; what train.py logs at eval intervals."""
    return flatten(synthetic_results(model, root, device, batch_size, taus))


# ----------------------------------------------------------------------------- loading
def load_checkpoint(path):
    """A Llip from a train.py checkpoint: {'model': state dict, 'config': {'model_config': {...}}}."""
    try:
        ckpt = load_weights(path)   # train.py writes only tensors and plain containers
    except UnsafeCheckpointError as e:
        raise ValueError(f"--ckpt={path}: {e}") from None
    except Exception as e:
        raise ValueError(f"--ckpt={path}: not a checkpoint torch.load can read ({type(e).__name__}: {e})") from None
    if not (isinstance(ckpt, dict) and 'model' in ckpt and isinstance(ckpt.get('config'), dict)):
        hint = (" It looks like the authors' weights: use --official." if isinstance(ckpt, dict) and
                any('class_embedding' in k for k in ckpt.get('state_dict', ckpt)) else '')
        raise ValueError(f"--ckpt={path}: not a train.py checkpoint (expected a dict with 'model' and "
                         f"'config').{hint}")
    config = ckpt['config'].get('model_config', ckpt['config'])
    fields = {f.name for f in dataclasses.fields(LlipConfig)}
    model = Llip(LlipConfig(**{k: v for k, v in config.items() if k in fields}))
    # a state dict saved from a compiled or DDP-wrapped model carries these prefixes
    state = {k.removeprefix('_orig_mod.').removeprefix('module.'): v for k, v in ckpt['model'].items()}
    model.load_state_dict(state)
    return model.eval()


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


def print_table(results):
    for name, by_tau in results.items():
        for tau, metrics in by_tau.items():
            cells = '  '.join(f'{k} {100 * v:6.2f}' for k, v in metrics.items())
            print(f'{name:<28} tau {tau:<5g} {cells}')


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument('--ckpt', help='a checkpoint written by train.py, e.g. out/ckpt.pt')
    which.add_argument('--official', help="the authors' released weights, e.g. llip_b16_k32.pt "
                                          "(CLIP BPE tokenizer, CLIP preprocessing)")
    p.add_argument('--task', choices=['zeroshot', 'retrieval', 'synthetic'], required=True,
                   help='zeroshot: image folder; retrieval: shards or caption folder; synthetic: all synthetic splits')
    p.add_argument('--data', required=True, help='the image folder, shards, or the synthetic root')
    p.add_argument('--classnames', help='zero-shot class names: a JSON list file, or a key of '
                                        'data/zeroshot-classnames.json (e.g. imagenet); default: DATA/classnames.json')
    p.add_argument('--templates', help='prompt templates with {}: a JSON list file or a key of '
                                       'data/zeroshot-templates.json; default: DATA/templates.json')
    p.add_argument('--tau', type=float, nargs='+', default=[None],
                   help="mixing temperatures to evaluate (the authors sweep 1 3 5 8 10); default: the model's")
    p.add_argument('--batch_size', type=int, default=256, help='images (and captions) per batch')
    p.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1), help='image decoding processes')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cuda or cpu')
    p.add_argument('--out', help='JSON file of results (default: eval_<task>.json next to the weights)')
    args = p.parse_args()
    try:
        run(args)
    except (FileNotFoundError, ValueError, KeyError) as e:   # bad input: the message, not a traceback
        raise SystemExit(f'error: {e}')


def run(args):
    model = load_official(args.official) if args.official else load_checkpoint(args.ckpt)
    model = model.to(args.device).eval()
    # bf16 on GPUs that support it; the scores are cosines, far from bf16's range limits
    autocast = (torch.autocast('cuda', dtype=torch.bfloat16) if args.device.startswith('cuda')
                and torch.cuda.is_bf16_supported() else nullcontext())
    with autocast:
        if args.task == 'synthetic':
            results = synthetic_results(model, args.data, args.device, args.batch_size, args.tau, progress=True)
        elif args.task == 'retrieval':
            results = {'retrieval': retrieval(model, args.data, args.tau, args.device, args.batch_size, progress=True)}
        else:
            if not Path(args.data).is_dir():
                raise FileNotFoundError(f"--data={args.data}: no such folder (expected one subfolder per class)")
            names = load_names(args.classnames, 'classnames', args.data)
            templates = load_names(args.templates, 'templates', args.data) or ['a photo of a {}.']
            if names is None:   # no names anywhere: the folder names are the class names
                names = sorted(f.name for f in Path(args.data).iterdir() if f.is_dir())
                print(f'no --classnames and no {args.data}/classnames.json: using the {len(names)} folder names')
            results = {f'zeroshot/{Path(args.data).name}': zeroshot(model, args.data, names, templates, args.tau,
                                                                     args.device, args.batch_size, args.workers,
                                                                     progress=True)}
    print_table(results)
    out = args.out or str(Path(args.official or args.ckpt).with_name(f'eval_{args.task}.json'))
    with open(out, 'w') as f:
        json.dump({'weights': args.official or args.ckpt, 'task': args.task, 'data': args.data,
                   'results': {name: {f'{t:g}': m for t, m in by_tau.items()} for name, by_tau in results.items()}},
                  f, indent=1)
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
