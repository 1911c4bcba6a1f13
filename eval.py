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
WebDataset shards, or a folder of KEY.jpg + KEY.txt with one caption per line.

Results: a table on stdout and a JSON file (--out) for analysis.py.
    python -m pytest tests/test_eval.py      # chunked evaluation == one pair at a time
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
from einops import reduce
from PIL import Image
from tqdm import tqdm

import data
from loss import PAIRS_PER_CHUNK
from model import Llip, LlipConfig, TextFeatures, load_official

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff')
SHIPPED = Path(__file__).resolve().parent / 'data'   # data/zeroshot-classnames.json, -templates.json


# ----------------------------------------------------------------------------- scoring
def score(model, image_features, text_features, tau=None):
    """cos(z_ij, z'_j) of a chunk of images against all captions or classes: (N_img, N_txt).
    model.similarity walks the captions in chunks sized so that one chunk holds about
    PAIRS_PER_CHUNK pairs of z_ij, whatever the number of images."""
    n_images = len(image_features.emb if image_features.emb is not None else image_features.keys)
    return model.similarity(image_features, text_features, tau=tau,
                            chunk_size=max(1, PAIRS_PER_CHUNK // max(1, n_images)))


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


# ----------------------------------------------------------------------------- retrieval
def caption_folder(root):
    """(key, PIL image or None when it does not decode, captions) for root/KEY.jpg + root/KEY.txt."""
    for path in sorted(p for p in Path(root).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
        text = path.with_suffix('.txt')
        captions = [line.strip() for line in text.read_text().splitlines() if line.strip()] if text.exists() else []
        try:
            with Image.open(path) as im:
                image = data.to_rgb(im)
                image.load()
        except (OSError, ValueError):
            image = None
        yield path.stem, image, captions


def _captioned_batches(source, image_size, batch_size, skipped, max_images=None):
    """(images (B, 3, S, S), [captions of each image]) from shards, a caption folder, or a pair
    (images (N, 3, S, S), [captions of each image]); the first max_images images if given."""
    if not isinstance(source, (str, Path, list)):
        images, captions = source
        n = len(images) if max_images is None else min(max_images, len(images))
        for s in range(0, n, batch_size):
            yield images[s:min(n, s + batch_size)], captions[s:min(n, s + batch_size)]
        return
    is_folder = isinstance(source, (str, Path)) and Path(source).is_dir()
    if is_folder and not any(Path(source).glob('*.tar')):
        samples = caption_folder(source)
    else:
        samples = data.read_shards(source if not is_folder else str(source))
    transform = data.eval_transform(image_size)
    images, captions, n = [], [], 0
    for key, image, caps in samples:
        if n == max_images:
            break
        if not caps:
            continue   # an image without captions can be neither a query nor a target
        if image is None:   # did not decode
            skipped.append(key)
            continue
        images.append(transform(image))
        captions.append(caps)
        n += 1
        if len(images) == batch_size:
            yield torch.stack(images), captions
            images, captions = [], []
    if images:
        yield torch.stack(images), captions


def recalls(scores, owner, ks=(1, 5, 10)):
    """Recall@k both ways from scores (N_img, N_txt); owner (N_txt,) is each caption's image.
    text->image: the caption's own image is among its k best images;
    image->text: any of the image's captions is among its k best captions."""
    n_img, n_txt = scores.shape
    best_images = scores.topk(min(max(ks), n_img), dim=0).indices              # (k, N_txt)
    t2i = best_images == owner[None]
    best_captions = scores.topk(min(max(ks), n_txt), dim=1).indices            # (N_img, k)
    i2t = owner[best_captions] == torch.arange(n_img, device=scores.device)[:, None]
    out = {f'i2t_r{k}': i2t[:, :k].any(dim=1).float().mean().item() for k in ks}
    return {**out, **{f't2i_r{k}': t2i[:k].any(dim=0).float().mean().item() for k in ks}}


@torch.no_grad()
def retrieval(model, source, taus=(None,), device='cpu', batch_size=256, progress=False, max_images=None):
    """Recall@1/5/10 image->text and text->image: {tau: {'i2t_r1': .., ..., 't2i_r10': ..}}.
    source: shards (brace pattern, list or folder of .tar), a folder of KEY.jpg + KEY.txt, or
    a pair (images (N, 3, S, S), [captions of each image]); max_images: only the first ones.
    The image features are kept
    (N x 2 x K x D for Llip) so each image is encoded once; the scores of every
    image-caption pair (N_img, N_txt) are computed one chunk of images at a time."""
    features, captions, owner, skipped, n_images = [], [], [], [], 0
    batches = _captioned_batches(source, model.config.image_size, batch_size, skipped, max_images)
    for x, caps in tqdm(batches, desc='images', unit='batch', disable=not progress):
        features.append(model.encode_image(x.to(device, _dtype(model))))
        for caps_of_one in caps:
            owner += [n_images] * len(caps_of_one)   # caption -> index of its image
            captions += caps_of_one
            n_images += 1
    _warn_skipped(source if isinstance(source, (str, Path)) else 'images', skipped)
    if not captions:
        raise ValueError(f"{source}: no image with captions could be read "
                         f"(expected .tar shards, or KEY.jpg + KEY.txt pairs in a folder)")
    # identical captions (common in the synthetic data: "one shape") are encoded and scored once
    unique = list(dict.fromkeys(captions))
    column = {c: i for i, c in enumerate(unique)}
    inverse = torch.tensor([column[c] for c in captions], device=device)
    texts = encode_texts(model, unique, device, batch_size)
    owner = torch.tensor(owner, device=device)
    results = {}
    for tau in _taus(model, taus):
        scores = torch.cat([score(model, f, texts, tau).float() for f in features])   # (N_img, N_unique)
        results[tau] = recalls(scores[:, inverse], owner)                             # (N_img, N_txt)
    return results


# ----------------------------------------------------------------------------- the synthetic splits
# Retrieval over the synthetic split's first 250 images (of 1000): a fixed set, so the curve over
# training is comparable, and a few seconds on CPU for the tiny preset where all 1000 take ~15 s.
# For the whole split: python eval.py --task=retrieval --data=data/synthetic/retrieval
SYNTHETIC_RETRIEVAL_IMAGES = 250


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
        results[f'zeroshot/{split.name}'] = zeroshot(model, split, names, templates, taus, device,
                                                     batch_size, progress=progress)
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
        ckpt = torch.load(path, map_location='cpu', weights_only=False)   # our own files: configs are plain dicts
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
