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
    python eval.py --official=llip_b16_k32.pt --task=retrieval \
        --data='/datasets/coco/{00000..00004}.tar'

Zero-shot data is an image folder with one subfolder per class (eval_data.py says which folder
is which class: by a {folder: name} classnames.json, by name ignoring case and '_', numbered
folders as class indices, else sorted order, which is printed), or clip_benchmark's WebDataset
zero-shot layout (ROOT/classnames.txt, ROOT/test/N.tar of KEY.webp + KEY.cls), or shards of
KEY.jpg + KEY.cls with --classnames. Class names and templates come from --classnames /
--templates (a JSON list or {folder: name} file, a .txt with one per line, or a key of
data/zeroshot-*.json: the CLIP protocol's names and templates, also as clip_benchmark spells
them: cifar10, imagenet1k), else from classnames.json / templates.json inside --data (or
clip_benchmark's .txt files). Zero-shot reports top1, top5 (n/a below 5 classes) and
mean_per_class_recall. Retrieval data is WebDataset shards, a folder of KEY.jpg + KEY.txt with
one caption per line, or clip_benchmark's WebDataset retrieval layout (ROOT/dataset_type.txt,
ROOT/test/N.tar of KEY.webp + KEY.txt); each may have a KEY.json with ground truth (below). An
image that does not decode or is beyond images.MAX_PIXELS is skipped and counted, in every
format.

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

Results: a table on stdout and a JSON file (--out; default eval_<task>_<name>.json beside the
weights, <name> the data's folder, e.g. eval_zeroshot_imagenet_val.json; one per dataset, never
replacing another dataset's) holding our metrics and the same numbers under clip_benchmark's
names (acc1, acc5, mean_per_class_recall, image_retrieval_recall@k = t2i_rk,
text_retrieval_recall@k = i2t_rk); --format=clip_benchmark writes clip_benchmark's own file
instead (metrics.write_results). Loading the weights is llip.py; the readers of class folders,
caption folders, clip_benchmark's roots and class names are eval_data.py.
    python -m pytest tests/test_eval.py      # chunked evaluation == one pair at a time, metrics ==
                                             # one query at a time
"""

import argparse
import json
import math
import os
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from tqdm import tqdm

import data
from eval_data import (ImageFolder, LabelledShards, bad_templates, captioned_batches, class_names,
                       class_names_and_templates, clip_benchmark_layout, count_images,
                       image_folder, labelled_batches)
from metrics import binding_metrics, default_out, print_table, ranking_metrics, write_results
import llip
from llip import load_checkpoint  # noqa: F401  (eval.load_checkpoint, as analysis.py calls it)
from model import TextFeatures


# ----------------------------------------------------------------------------- scoring
# model.similarity scores a chunk of images against all captions or classes, (N_img, N_txt),
# sizing its own chunks of images for the form it runs (loss.default_chunk)
def _dtype(model):
    return next(model.parameters()).dtype


def _taus(model, taus):
    """None means the model's own tau; the results are keyed by the tau actually used."""
    return [float(model.config.tau if t is None else t) for t in taus]


@torch.no_grad()
def encode_texts(model, texts, device='cpu', batch_size=256):
    """Tokenize and encode captions in batches -> TextFeatures (queries (N, M, D/M) or None,
    emb (N, D))."""
    c = model.config
    parts = [
        model.encode_text(
            data.tokenize(texts[s : s + batch_size], c.context_length, c.tokenizer).to(device)
        )
        for s in range(0, len(texts), batch_size)
    ]
    queries = None if parts[0].queries is None else torch.cat([p.queries for p in parts])
    return TextFeatures(queries, torch.cat([p.emb for p in parts]))


@torch.no_grad()
def class_prototypes(model, classnames, templates, device='cpu', batch_size=256, progress=False):
    """One TextFeatures row per class, averaged over the prompt templates (paper appendix 9):
    emb = normalize(mean_t normalize(z'_{c,t})), query = mean_t Q_{c,t} (not normalised)."""
    bad = bad_templates(templates)
    if bad:
        raise ValueError(f"templates must contain '{{}}' once, where the class name goes: "
                         f'{bad[:3]}')
    T = len(templates)
    per_batch = max(1, batch_size // T)   # whole classes per text batch, so averaging stays local
    queries, embs = [], []
    for s in tqdm(range(0, len(classnames), per_batch), desc='classes', disable=not progress):
        prompts = [
            t.format(name) for name in classnames[s : s + per_batch] for t in templates
        ]  # class-major
        txt = encode_texts(model, prompts, device, len(prompts))
        embs.append(F.normalize(reduce(txt.emb, '(c t) d -> c d', 'mean', t=T), dim=-1))  # (C, D)
        if txt.queries is not None:
            queries.append(reduce(txt.queries, '(c t) m d -> c m d', 'mean', t=T))  # (C, M, D/M)
    return TextFeatures(torch.cat(queries) if queries else None, torch.cat(embs))


# ----------------------------------------------------------------------------- image folders
def _warn_skipped(source, skipped):
    if skipped:
        warnings.warn(
            f"{source}: skipped {len(skipped)} images that failed to decode or were beyond the "
            f"pixel budget (images.MAX_PIXELS), e.g. {skipped[:3]}"
        )


def load_image_folder(root, classnames, image_size):
    """A small class folder decoded into memory once, (images (N, 3, S, S), labels (N,)), so that
    both zero-shot protocols below score the same tensors; unreadable images are skipped."""
    skipped = []
    folder = ImageFolder(image_folder(root, classnames), data.eval_transform(image_size))
    batches = list(labelled_batches(folder, 256, 0, skipped))
    _warn_skipped(root, skipped)
    if not batches:
        raise ValueError(f"{root}: no image could be decoded")
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


# ----------------------------------------------------------------------------- zero-shot
@torch.no_grad()
def zeroshot(model, images, classnames, templates, taus=(None,), device='cpu', batch_size=256,
             workers=0, progress=False):
    """Top-1 and top-5 accuracy and the mean over classes of each class's top-1 recall:
    {tau: {'top1', 'top5', 'mean_per_class_recall'}}; top5 is None (not applicable) below 5 classes.
    images: a folder with one subfolder per class, clip_benchmark's WebDataset zero-shot root
    or shards with KEY.cls, or a pair (images (N, 3, S, S), labels (N,)).
    classnames: a list, or a dict {folder: name} / {"0": name} (eval_data.py: which folder is
    which class).
    Each chunk of images is encoded once and scored against every class for every tau."""
    if not classnames or not templates:
        raise ValueError(
            f"zero-shot needs class names and templates, got {len(classnames)} and {len(templates)}"
        )
    source = images if isinstance(images, (str, Path)) else 'images'
    transform = data.eval_transform(model.config.image_size)
    if isinstance(images, (str, Path)) and clip_benchmark_layout(images):  # clip_benchmark's shards
        images = LabelledShards(
            clip_benchmark_layout(images)[0], transform, len(class_names(classnames))
        )
    elif isinstance(images, (str, Path)) and not Path(images).is_dir():     # shards with KEY.cls
        images = LabelledShards(data.expand_urls(images), transform, len(class_names(classnames)))
    elif isinstance(images, (str, Path)):   # check the folder before the text tower runs
        images = ImageFolder(image_folder(images, classnames), transform)
    classnames = class_names(classnames)   # a {folder: name} dict -> the names in label order
    classes = class_prototypes(model, classnames, templates, device, batch_size, progress)
    taus, C = _taus(model, taus), len(classnames)
    per_class = torch.zeros(C, dtype=torch.long)  # images of each class
    top1 = {tau: torch.zeros(C, dtype=torch.long) for tau in taus}             # hits of each class
    top5, skipped = dict.fromkeys(taus, 0), []
    bar = _progress('zero-shot', count_images(images), progress)
    for x, labels in labelled_batches(images, batch_size, workers, skipped):
        img = model.encode_image(x.to(device, _dtype(model)))
        labels = labels.to(device)
        per_class += torch.bincount(labels.cpu(), minlength=C)
        for tau in taus:
            top = model.similarity(img, classes, tau).topk(min(5, C), dim=1).indices  # (B, 5)
            hit = top == labels[:, None]
            top1[tau] += torch.bincount(labels[hit[:, 0]].cpu(), minlength=C)
            top5[tau] += hit.any(dim=1).sum().item()
        bar.update(int(per_class.sum()) + len(skipped) - bar.n)   # the skipped images were read too
    bar.close()
    _warn_skipped(source, skipped)
    n = per_class.sum().item()
    if n == 0:
        raise ValueError(f"{source}: no image could be decoded")
    seen = (
        per_class > 0
    )  # mean per-class recall: over the classes that have images, as clip_benchmark
    return {
        tau: {
            'top1': top1[tau].sum().item() / n,
            'top5': top5[tau] / n if C >= 5 else None,  # not applicable: every image is a hit
            'mean_per_class_recall': (top1[tau][seen].double() / per_class[seen]).mean().item(),
        }
        for tau in taus
    }


def _progress(desc, total, progress):
    """A progress bar counting images: with a total (and so an ETA) where it is known."""
    return tqdm(total=total, desc=desc, unit='image', disable=not progress, dynamic_ncols=True)


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
            scores = rearrange(model.similarity(img, text, tau), 'b (c t) -> b c t', t=T)
            best = reduce(scores, 'b c t -> b c', 'max').argmax(dim=1)        # (B,)
            hits[tau] += (best.cpu() == labels[s:s + batch_size]).sum().item()
    return {tau: {'top1_best': hits[tau] / len(images)} for tau in taus}


# ----------------------------------------------------------------------------- retrieval
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
    batches = captioned_batches(source, model.config.image_size, batch_size, skipped, max_images)
    bar = _progress('images', count_images(source, max_images), progress)
    for x, batch_truths in batches:
        features.append(model.encode_image(x.to(device, _dtype(model))))
        truths += batch_truths
        bar.update(len(truths) + len(skipped) - bar.n)   # the skipped images were read too
    bar.close()
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
        scores = torch.cat([model.similarity(f, texts, tau).float() for f in features])
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
    """{'zeroshot/<split>': {tau: metrics}, 'retrieval': {tau: metrics}} on
    synthetic.make_synthetic's layout."""
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
        results[f'zeroshot/{split.name}'] = zeroshot(
            model, (images, labels), names, templates, taus, device, batch_size, progress=progress
        )
        best = zeroshot_best_prompt(
            model, images, labels, names, templates, taus, device, batch_size
        )
        for tau, metrics in best.items():
            results[f'zeroshot/{split.name}'][tau].update(metrics)
    if (root / 'retrieval').is_dir():
        results['retrieval'] = retrieval(
            model,
            root / 'retrieval',
            taus,
            device,
            batch_size,
            progress,
            max_images=SYNTHETIC_RETRIEVAL_IMAGES,
        )
    return results


def flatten(results):
    """{'name': {tau: {metric: v}}} -> {'name/metric': v}, with a tau level only for several taus;
    metrics that do not apply (None: top5 below 5 classes) are left out."""
    flat = {}
    for name, by_tau in results.items():
        for tau, metrics in by_tau.items():
            prefix = name if len(by_tau) == 1 else f'{name}/tau{tau:g}'
            flat.update(
                {f'{prefix}/{k}': v for k, v in metrics.items() if v is not None}
            )  # not n/a
    return flat


def evaluate_synthetic(model, root, device='cpu', batch_size=256, taus=(None,)):
    """Every synthetic zero-shot split and the retrieval split as one flat dict, e.g.
    {'zeroshot/shape/top1': .., 'retrieval/i2t_r1': ..}; what train.py logs at eval intervals."""
    return flatten(synthetic_results(model, root, device, batch_size, taus))


def positive(text):
    """--tau's type: finite numbers > 0 (0 or inf would divide the mixing weights' logits), one
    or several joined by commas (--tau 1 5 and --tau=1,5 alike)."""
    values = []
    for part in text.split(','):
        try:
            values.append(float(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f'{part!r}: not a number') from None
        if not (math.isfinite(values[-1]) and values[-1] > 0):
            raise argparse.ArgumentTypeError(f'{part}: must be a finite number > 0')
    return values


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument('--ckpt', help='a checkpoint written by train.py, e.g. out/ckpt.pt')
    which.add_argument('--official', help="the authors' released weights, e.g. llip_b16_k32.pt "
                                          "(CLIP BPE tokenizer, CLIP preprocessing)")
    p.add_argument(
        '--task',
        choices=['zeroshot', 'retrieval', 'synthetic'],
        required=True,
        help='zeroshot: image folder; retrieval: shards or caption folder; synthetic: all '
        'synthetic splits',
    )
    p.add_argument('--data', required=True, help='the image folder, shards, or the synthetic root')
    p.add_argument(
        '--classnames',
        help='zero-shot class names: a JSON list file, or a key of '
        'data/zeroshot-classnames.json (e.g. imagenet); default: DATA/classnames.json',
    )
    p.add_argument('--templates', help='prompt templates with {}: a JSON list file or a key of '
                                       'data/zeroshot-templates.json; default: DATA/templates.json')
    p.add_argument(
        '--tau',
        type=positive,
        nargs='+',
        default=[None],
        help="mixing temperatures to evaluate (the authors sweep 1 3 5 8 10); default: the model's",
    )
    p.add_argument('--batch_size', type=int, default=256, help='images (and captions) per batch')
    p.add_argument(
        '--workers', type=int, default=min(8, os.cpu_count() or 1), help='image decoding processes'
    )
    p.add_argument(
        '--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cuda or cpu'
    )
    p.add_argument(
        '--out',
        help='JSON file of results (default: eval_<task>_<name>.json next to the weights, '
        '<name> the last folder of --data, with the one above it when that is a split: '
        'imagenet_val)',
    )
    p.add_argument('--format', choices=['llip', 'clip_benchmark'], default='llip',
                   help="the result file's schema: llip (every tau and dataset, our metrics and "
                   "clip_benchmark's names) or clip_benchmark (its cli's file: dataset, model, "
                   'pretrained, task, metrics, language; one dataset at one --tau)')
    args = p.parse_args(argv)
    args.tau = [t for group in args.tau for t in (group if isinstance(group, list) else [group])]
    if args.ckpt:   # a run directory: its ckpt.pt or newest checkpoint, as analysis.py reads it
        args.ckpt = str(llip.checkpoint_path(args.ckpt))
    try:
        run(args)
    except (
        FileNotFoundError,
        ValueError,
        KeyError,
    ) as e:  # bad input: the message, not a traceback
        raise SystemExit(f'error: {e}')


def run(args):
    weights = args.official or args.ckpt
    out = args.out or default_out(weights, args.task, args.data, args.format)
    folder = os.path.dirname(os.path.abspath(out))   # before the whole evaluation, not after
    if not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
        raise ValueError(f'--out={out}: the folder {folder} does not exist or is not writable')
    if args.format == 'clip_benchmark' and (args.task == 'synthetic' or len(args.tau) > 1):
        raise ValueError('--format=clip_benchmark: its file holds one dataset at one tau; give '
                         'one --tau and --task=zeroshot or retrieval (or --format=llip)')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f'--device={args.device}: no CUDA GPU is available here; use '
                         '--device=cpu')
    model = llip.load_checkpoint(args.ckpt) if args.ckpt else llip.load_official_file(weights)
    model = llip.finite(model, weights).to(args.device).eval()
    # bf16 on GPUs that support it; the scores are cosines, far from bf16's range limits
    autocast = (torch.autocast('cuda', dtype=torch.bfloat16) if args.device.startswith('cuda')
                and torch.cuda.is_bf16_supported() else nullcontext())
    with autocast:
        if args.task == 'synthetic':
            results = synthetic_results(
                model, args.data, args.device, args.batch_size, args.tau, progress=True
            )
        elif args.task == 'retrieval':
            results = {'retrieval': retrieval(model, args.data, args.tau, args.device,
                                              args.batch_size, progress=True)}
        else:
            if not Path(args.data).is_dir():
                data.expand_urls(args.data)   # shards with KEY.cls: a pattern naming no file
                if args.classnames is None:
                    raise ValueError(f"--data={args.data}: shards with KEY.cls need --classnames")
            names, templates = class_names_and_templates(args.data, args.classnames, args.templates)
            results = {f'zeroshot/{Path(args.data).name}': zeroshot(
                model, args.data, names, templates, args.tau, args.device, args.batch_size,
                args.workers, progress=True)}
    print_table(results)
    write_results(out, results, weights, args.task, args.data, args.format)
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
