"""
Retrieval metrics against ground truth, from a matrix of scores: what eval.py reports.

    ranking_metrics(scores, truth)       # R@1/5/10 and mAP, image->text and text->image
    binding_metrics(true, false, kinds)  # how often the true caption beats the swapped one
    clip_benchmark_names(metrics)        # the same numbers under clip_benchmark's names
    write_results(out, results, ...)     # eval.py's result file, ours or clip_benchmark's schema

scores (N_img, N_str) is every image against every distinct caption string; truth (N_img,
N_str) bool says which strings are true of which image, so a caption that many images share
is a hit for each of them (eval.py's docstring says which protocol that is on which data).

    python -m pytest tests/test_eval.py -k "metrics or ties"   # == one query at a time, in loops
"""
import itertools
import json
import math
import re
from pathlib import Path

import torch


# Queries ranked at once by ranking_metrics: bounds its (queries, candidates) temporaries, which
# for COCO's 25k captions against 5k images would otherwise take gigabytes.
RANKED_PER_CHUNK = 2 ** 22


def _ranked_hits(scores, truth):
    """Truth (Q, C) reordered along each row by descending score, a true candidate tied with
    false ones placed after them: the pessimistic rank. Two stable sorts: false before true,
    then by score, which keeps the false-first order inside each group of equal scores."""
    by_truth = truth.to(torch.uint8).argsort(dim=1, stable=True)                      # (Q, C)
    by_score = scores.gather(1, by_truth).argsort(dim=1, descending=True, stable=True)   # (Q, C)
    return truth.gather(1, by_truth.gather(1, by_score))                              # (Q, C)


def _recall_and_ap(scores, truth, ks):
    """Per query (row): whether a true candidate is among the k best, for each k, and the
    average precision: ({k: (Q,) bool}, (Q,) float64)."""
    n_queries, n_cand = scores.shape
    per_chunk = max(1, RANKED_PER_CHUNK // n_cand)
    rank = torch.arange(1, n_cand + 1, device=scores.device)                               # (C,)
    hits_at, ap = {k: [] for k in ks}, []
    for s in range(0, n_queries, per_chunk):
        hits = _ranked_hits(scores[s:s + per_chunk], truth[s:s + per_chunk])           # (q, C)
        found = hits.cumsum(dim=1)                          # true candidates at or above each rank
        for k in ks:
            hits_at[k].append(found[:, min(k, n_cand) - 1] > 0)
        precision = found.double() / rank                                                   # (q, C)
        ap.append((precision * hits).sum(dim=1) / hits.sum(dim=1))                          # (q,)
    return {k: torch.cat(v) for k, v in hits_at.items()}, torch.cat(ap)


def ranking_metrics(scores, truth, ks=(1, 5, 10)):
    """Recall@k and mean average precision both ways from scores (N_img, N_str) of each image
    against each distinct candidate string, and truth (N_img, N_str): string s is true of image i.
    image->text: for each image, its strings ranked; R@k is the fraction of images with a true
    string among the k best; AP the mean over its true strings of the precision at their ranks.
    text->image: the same for each string over the images. Ties are counted pessimistically: a
    true item tied with false ones ranks after them (so a constant score gets no credit).
    Returns {'i2t_r1', .., 'i2t_map', 't2i_r1', .., 't2i_map'}. Every image and every string
    must have a true match, as in retrieval(): an image's own captions are candidates, and
    each candidate is some image's caption."""
    truth = truth.to(scores.device)
    if not (truth.any(dim=1).all() and truth.any(dim=0).all()):
        raise ValueError("ranking_metrics: an image or a string has no true match")
    out = {}
    for way, (s, t) in {'i2t': (scores, truth), 't2i': (scores.T, truth.T)}.items():
        hits_at, ap = _recall_and_ap(s, t, ks)
        out |= {f'{way}_r{k}': hits_at[k].double().mean().item() for k in ks}
        out[f'{way}_map'] = ap.mean().item()
    return out


def binding_metrics(true_scores, false_scores, kinds):
    """How often an image scores its true caption above the same words with an attribute
    swapped between two of its objects: true_scores, false_scores (N_pairs,) of the image
    against each caption, kinds (N_pairs,) str. A tie is a miss. {'binding': fraction of all
    pairs, 'binding_<kind>': fraction for each kind}."""
    hit = true_scores > false_scores                                                  # (N_pairs,)
    out = {'binding': hit.double().mean().item()}
    for kind in sorted(set(kinds)):
        of_kind = torch.tensor([k == kind for k in kinds], device=hit.device)
        out[f'binding_{kind}'] = hit[of_kind].double().mean().item()
    return out


def clip_benchmark_names(metrics):
    """Our metrics under clip_benchmark's names, for those it reports: zero-shot top1 -> acc1,
    top5 -> acc5 (None below 5 classes, where clip_benchmark writes NaN), mean_per_class_recall;
    retrieval t2i_rK -> image_retrieval_recall@K (a caption finds its image), i2t_rK ->
    text_retrieval_recall@K (an image finds one of its captions). Others are left out."""
    out = {}
    for name, value in metrics.items():
        way = re.fullmatch(r'(t2i|i2t)_r(\d+)', name)
        if way:
            out[f"{'image' if way[1] == 't2i' else 'text'}_retrieval_recall@{way[2]}"] = value
        elif name in ('top1', 'top5'):
            out[f'acc{name[-1]}'] = value
        elif name == 'mean_per_class_recall':
            out[name] = value
    return out


# ----------------------------------------------------------------------------- result files
# Folder names that say which split, not which dataset: the name above them is kept too
SPLITS = {'val', 'valid', 'validation', 'test', 'train', 'eval', 'images', 'data'}


def data_name(data_arg):
    """A short name for --data: its last folder ('synthetic'), with the one above where that
    is a split or a number ('inet_val', 'imagenetv2_0'); a shard pattern's folder ('coco' for
    coco/{00000..00004}.tar)."""
    parts = [p for p in re.split(r'[/\\]+', data_arg.split('::')[0]) if p not in ('', '.', '..')]
    while parts and re.search(r'[{*?\[]|\.tar$', parts[-1]):   # shards, not a folder
        parts.pop()
    keep = parts[-2:] if parts and (parts[-1].lower() in SPLITS or parts[-1].isdecimal()) \
        else parts[-1:]
    return re.sub(r'[^A-Za-z0-9]+', '_', '_'.join(keep)).strip('_')[-80:] or 'data'


def default_out(weights, task, data_arg, schema='llip'):
    """eval_<task>_<data name>.json next to the weights (data_name; '_clip_benchmark' before
    .json for that schema). Each dataset keeps its own file: one that holds another --data's
    results is never replaced, the name takes _2, _3, ... instead."""
    stem = f"eval_{task}_{data_name(data_arg)}{'_clip_benchmark' if schema != 'llip' else ''}"
    for n in itertools.count(1):
        out = Path(weights).with_name(f"{stem}{f'_{n}' if n > 1 else ''}.json")
        try:
            earlier = json.loads(out.read_text()).get('data') if out.is_file() else data_arg
        except (ValueError, AttributeError, OSError):   # not ours: never replaced
            earlier = None
        if earlier == data_arg:
            return str(out)


CLIP_BENCHMARK_TASKS = {'zeroshot': 'zeroshot_classification', 'retrieval': 'zeroshot_retrieval'}


def write_results(out, results, weights, task, data_arg, schema='llip'):
    """results {name: {tau: metrics}} as JSON. schema 'llip': every name and tau, our metrics and
    the same numbers under clip_benchmark's names. 'clip_benchmark': the file its cli writes
    and its build_csv reads, for one dataset at one tau: {dataset, model, pretrained, task,
    metrics, language} (acc5 NaN below 5 classes, as clip_benchmark writes it), with --data
    and tau beside them."""
    if schema == 'clip_benchmark':
        ((name, by_tau),) = results.items()
        ((tau, metrics),) = by_tau.items()
        dump = {'dataset': data_name(data_arg), 'model': 'llip', 'pretrained': str(weights),
                'task': CLIP_BENCHMARK_TASKS[task], 'language': 'en',
                'metrics': {k: math.nan if v is None else v
                            for k, v in clip_benchmark_names(metrics).items()},
                'data': data_arg, 'tau': tau}
    else:
        dump = {'weights': str(weights), 'task': task, 'data': data_arg,
                'results': {name: {f'{t:g}': m for t, m in by_tau.items()}
                            for name, by_tau in results.items()},
                'clip_benchmark': {name: {f'{t:g}': clip_benchmark_names(m)
                                          for t, m in by_tau.items()}
                                   for name, by_tau in results.items()}}
    with open(out, 'w') as f:
        json.dump(dump, f, indent=1)


def print_table(results):
    for name, by_tau in results.items():
        for tau, metrics in by_tau.items():
            cells = '  '.join(
                f'{k} {"n/a" if v is None else f"{100 * v:6.2f}"}' for k, v in metrics.items()
            )
            print(f'{name:<28} tau {tau:<5g} {cells}')
