r"""
Plots and tables of the miniature reproduction of Llip (arXiv 2405.00740): PNG and markdown files.

    # Figure 5: singular values of the covariance of the visual features, several checkpoints
    python analysis.py spectrum out/llip/ckpt.pt out/cls/ckpt.pt --out=spectrum.png
    # the mixing weights Phi of one image for its own captions and for other images' captions
    python analysis.py mixing out/llip/ckpt.pt --index=0 --unrelated=4 --out=mixing.png
    # where each mixture token looks: its attention over the patches in the last ViT block
    python analysis.py attention out/llip/ckpt.pt --index=0 --out=attention.png
    # training loss and eval metrics against step, one line per run
    python analysis.py curves runs/ablation/*/ --out=curves.png
    # Figure 3: runs grouped by pool, mean +- std over seeds, and each pool minus cls paired by
    # seed, mean [95% t interval], * where the interval excludes zero (default: every metric)
    python analysis.py ablation runs/ablation/*/ --metrics=zeroshot/color/top1,retrieval/i2t_r1 \
        --baseline=cls --out=runs/ablation.png --table=runs/ablation.md
    # Figure 6: against K or tau (--baseline=16: each K minus K = 16, paired by seed)
    python analysis.py sweep runs/k_sweep/*/ --by=num_mixture --baseline=16 --out=runs/k_sweep.png
    python analysis.py sweep runs/tau_sweep/*/ --by=tau --out=runs/tau_sweep.png
    # each pool's learning rate from a grid of runs on the validation split (--eval_split=val):
    # the best mean over seeds of the average of the metrics, written as {pool: lr}
    python analysis.py lr runs/lr/*/ --metrics=zeroshot/color/top1,retrieval/i2t_r1 \
        --out=runs/lr.json --table=runs/lr.md
    # llip - cls paired by seed against a swept setting (embed_dim, synthetic_objects, ...)
    python analysis.py pressure runs/pressure/*/ --by=embed_dim --metrics=retrieval/binding \
        --baseline=cls --pool=llip --out=runs/pressure.png --table=runs/pressure.md

    python -m pytest tests/test_analysis.py      # what these numbers are checked against

Images come from the synthetic retrieval split (data/synthetic/retrieval, written by train.py
on first use), whose .txt holds all of an image's captions; --data takes any shards.
A run directory is what train.py writes into --out_dir: config.json (train.py's flags, such as
'seed', 'lr', 'eval_split', and 'model_config', such as 'pool', 'embed_dim'; --by takes either
kind) and log.jsonl, whose last record with metrics holds the final evaluation.
Paired by seed: seed s of two pools saw the same data order, so the noise the two runs share
cancels in their difference; the interval is mean +- t_{0.975, n-1} std / sqrt(n) over the n
seeds both have.
Everything runs on CPU; `python analysis.py SUBCOMMAND --help` lists the flags.
"""
import argparse
import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path

import matplotlib
matplotlib.use('Agg')   # files only, no display
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from einops import einsum, rearrange

import data
import eval as llip_eval
from model import POOLS

HERE = Path(__file__).resolve().parent
RETRIEVAL = HERE / 'data' / 'synthetic' / 'retrieval'
METRICS = ['zeroshot/color/top1', 'zeroshot/shape/top1', 'retrieval/i2t_r1', 'retrieval/t2i_r1']
MIXER_POOLS = ('avg', 'learned', 'llip')   # pools whose image vector is made from all K tokens


# ----------------------------------------------------------------------------- inputs
def checkpoint_path(path):
    """A train.py checkpoint, or a run directory: its newest checkpoint, ckpt.pt."""
    return Path(path) / 'ckpt.pt' if Path(path).is_dir() else Path(path)


def load_model(path):
    # {'model': ..., 'config': {'model_config': ...}}
    return llip_eval.load_checkpoint(checkpoint_path(path))


def describe(model, path):
    """'llip K=16 (run directory)', for titles and legends."""
    c = model.config
    return f"{c.pool} K={c.num_tokens} ({checkpoint_path(path).resolve().parent.name})"


def load_images(source, image_size, n):
    """The first n images with captions of shards: (images (N, 3, S, S), [captions of each])."""
    transform = data.eval_transform(image_size)
    images, captions = [], []
    for key, image, caps in data.read_shards(str(source)):
        if image is None or not caps:
            continue
        images.append(transform(image))
        captions.append(caps)
        if len(images) == n:
            break
    if not images:
        raise ValueError(f"--data={source}: no image with captions in these shards")
    return torch.stack(images), captions


def check_index(args, images):
    if not 0 <= args.index < len(images):
        raise ValueError(f"--index={args.index}: --data={args.data} has {len(images)} images "
                         f"with captions")


def show_image(ax, image):
    """Undo CLIP's normalisation of one (3, S, S) image and draw it."""
    mean, std = torch.tensor(data.MEAN)[:, None, None], torch.tensor(data.STD)[:, None, None]
    ax.imshow(rearrange((image * std + mean).clamp(0, 1), 'c h w -> h w c').numpy())
    ax.set_xticks([]), ax.set_yticks([])


# ----------------------------------------------------------------------------- spectrum (Figure 5)
def covariance_spectrum(x):
    """Singular values of the covariance of the rows of x (N, D), descending, divided by the
    largest (Jing et al. 2022, as the paper's Figure 5): (min(N, D),)."""
    x = x.double()
    x = x - x.mean(dim=0)
    cov = x.T @ x / (x.shape[0] - 1)                                     # (D, D)
    s = torch.linalg.svdvals(cov)                                        # descending
    return (s / s[0])[:min(x.shape)]


@torch.no_grad()
def visual_features(model, images, features='tokens', batch_size=256):
    """The rows whose covariance the spectrum is taken of.
    tokens: the visual encoder's output, as the paper: the K mixture tokens concatenated along
            the batch axis (N*K, W_v) for avg / learned / llip, the first token (N, W_v) for cls
            and registers (their image vector reads only that one);
    values: after the projections: the values V (N*K, D) for avg / learned / llip, the
            projected first token (N, D), before normalisation, for cls and registers."""
    rows = []
    for s in range(0, len(images), batch_size):
        h = model.visual(images[s:s + batch_size])                       # (B, T, W_v)
        if model.config.pool not in MIXER_POOLS:
            rows.append(h[:, 0] if features == 'tokens' else h[:, 0] @ model.proj)
        elif features == 'tokens':
            rows.append(rearrange(h, 'b k w -> (b k) w'))
        else:
            values = model.project_mixture_tokens(h, model.v_proj, model.v_norm)   # (B, M, K, d)
            rows.append(rearrange(values, 'b m k d -> (b k) (m d)'))
    return torch.cat(rows)


def cmd_spectrum(args):
    images = None
    fig, ax = plt.subplots(layout='constrained', figsize=(6, 4.5))
    labels = args.labels.split(',') if args.labels else []
    for n, path in enumerate(args.ckpts):
        model = load_model(path)
        if images is None or images.shape[-1] != model.config.image_size:
            images, _ = load_images(args.data, model.config.image_size, args.images)
        rows = visual_features(model, images, args.features)
        s = covariance_spectrum(rows)
        label = labels[n] if n < len(labels) else describe(model, path)
        # numerically zero directions are left out: ln_post's output, for one, spans D - 1 of D
        s = s[s > 1e-12]
        ax.plot(torch.arange(1, len(s) + 1), s, label=f'{label}: {rows.shape[0]} x {rows.shape[1]}')
        print(f'{label}: {tuple(rows.shape)} rows, rank {len(s)}, '
              f'singular values above 1e-3 of the largest: {(s > 1e-3).sum().item()}')
    ax.set_yscale('log')
    ax.set_xlabel('singular value rank')
    ax.set_ylabel('singular value / largest')
    ax.set_title(f'Spectrum of the covariance of the visual features ({args.features}, '
                 f'{len(images)} images)', fontsize=9)
    ax.legend(fontsize=8)
    save(fig, args.out)


# ------------------------------------------------------------------------- mixing weights (eq. 1)
def mixing_weights(queries, keys, tau):
    """Phi_ij^{mk} = softmax over k of Q_j^m . K_i^{mk} / tau, what loss.mix averages the values
    with. queries (T, M, d), keys (I, M, K, d) -> (I, T, M, K)."""
    return (einsum(queries, keys, 't m d, i m k d -> i t m k') / tau).softmax(dim=-1)


@torch.no_grad()
def caption_mixing(model, image, captions, tau=None):
    """Phi of one image (3, S, S) for each caption: (T, M, K)."""
    if model.config.pool != 'llip':
        raise ValueError(f"mixing weights depend on the caption only for pool=llip; this "
                         f"checkpoint has pool={model.config.pool} (avg: uniform weights, "
                         f"learned: one shared query)")
    c = model.config
    keys = model.encode_image(image[None]).keys                                      # (1, M, K, d)
    tokens = data.tokenize(captions, c.context_length, c.tokenizer)
    queries = model.encode_text(tokens).queries                                       # (T, M, d)
    return mixing_weights(queries, keys, c.tau if tau is None else tau)[0]


def cmd_mixing(args):
    model = load_model(args.ckpt)
    images, captions = load_images(args.data, model.config.image_size,
                                   args.index + 1 + args.unrelated)
    check_index(args, images)
    own = captions[args.index]
    others = [caps[0] for caps in captions[args.index + 1:] if caps[0] not in own][:args.unrelated]
    texts = own + others
    phi = caption_mixing(model, images[args.index], texts, args.tau)                # (T, M, K)
    T, M, K = phi.shape
    entropy = -(phi * phi.clamp_min(1e-12).log()).sum(-1).mean().item()
    print(f'mean entropy of Phi over the K tokens: {entropy:.3f} '
          f'(uniform weights: log K = {math.log(K):.3f})')

    # top row: the image and the heads' average (with the captions); below: one panel per head
    cols = min(M, 4)
    rows = 1 + math.ceil(M / cols)
    fig = plt.figure(layout='constrained', figsize=(3 * cols + 3, 0.28 * T * rows + 1.5))
    grid = fig.add_gridspec(rows, cols + 1, width_ratios=[1.2] + [1] * cols)
    vmax = phi.max().item()
    show_image(fig.add_subplot(grid[0, 0]), images[args.index])
    ax = fig.add_subplot(grid[0, 1:])
    im = ax.imshow(phi.mean(dim=1).numpy(), aspect='auto', cmap='viridis', vmin=0, vmax=vmax)
    ax.set_yticks(range(T), texts, fontsize=7)
    for n, tick in enumerate(ax.get_yticklabels()):
        tick.set_color('tab:green' if n < len(own) else 'tab:red')
    ax.set_xticks(range(K))
    ax.set_xlabel('mixture token k')
    ax.set_title(f'Phi averaged over the {M} heads (uniform: 1/K = {1 / K:.3f}); '
                 f'green: this image\'s captions, red: other images\'', fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.02)
    for m in range(M):
        ax = fig.add_subplot(grid[1 + m // cols, 1 + m % cols])
        ax.imshow(phi[:, m].numpy(), aspect='auto', cmap='viridis', vmin=0, vmax=vmax)
        ax.set_title(f'head {m}', fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
    tau = model.config.tau if args.tau is None else args.tau
    fig.suptitle(f'Mixing weights of image {args.index} '
                 f'({describe(model, args.ckpt)}, tau={tau:g})')
    save(fig, args.out)


# ----------------------------------------------------------------------------- attention maps
@torch.no_grad()
def mixture_attention(model, images):
    """Attention of the T learned tokens over all T + P tokens in the last vision block,
    recomputed from the block's input (captured by a hook) with its ln_1 and in_proj:
    (N, heads, T, T + P); each row sums to 1, the patches are the last P columns."""
    block = model.visual.transformer.blocks[-1]
    captured = []
    hook = block.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0]))
    try:
        model.visual(images)
    finally:
        hook.remove()
    x = block.ln_1(captured[0])                                          # (N, T + P, W)
    qkv = F.linear(x, block.attn.in_proj_weight, block.attn.in_proj_bias)
    q, k, _ = rearrange(qkv, 'n l (three h d) -> three n h l d', three=3, h=block.attn.heads)
    T = model.config.num_tokens
    logits = einsum(q[:, :, :T], k, 'n h t d, n h l d -> n h t l') / math.sqrt(q.shape[-1])
    return logits.softmax(dim=-1)


def cmd_attention(args):
    model = load_model(args.ckpt)
    c = model.config
    images, captions = load_images(args.data, c.image_size, args.index + 1)
    check_index(args, images)
    image = images[args.index]
    attn = mixture_attention(model, image[None])[0]                     # (H, T, T + P)
    if not -1 <= args.head < attn.shape[0]:
        raise ValueError(f"--head={args.head}: the last vision block has {attn.shape[0]} heads "
                         f"(or -1: their average)")
    attn = attn.mean(dim=0) if args.head < 0 else attn[args.head]        # (T, T + P)
    T, g = c.num_tokens, c.image_size // c.patch_size
    patches = attn[:, T:]                                                # (T, P)
    share = patches.sum(dim=-1)                                          # attention on patches
    maps = rearrange(patches / share[:, None], 't (gh gw) -> t 1 gh gw', gh=g)
    # (T, S, S), one patch = p x p pixels
    maps = F.interpolate(maps, size=c.image_size, mode='nearest')[:, 0]

    cols = min(T + 1, 6)
    rows = math.ceil((T + 1) / cols)
    fig, axes = plt.subplots(rows, cols, layout='constrained', figsize=(2 * cols, 2.1 * rows + 0.6),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis('off')
    show_image(axes[0, 0], image)
    axes[0, 0].axis('on')
    axes[0, 0].set_title('image', fontsize=8)
    for t in range(T):
        ax = axes.flat[t + 1]
        show_image(ax, image)
        ax.imshow(maps[t].numpy(), cmap='inferno', alpha=args.alpha)
        ax.set_title(f'token {t}: {100 * share[t]:.0f}% on patches', fontsize=7)
    heads = 'heads averaged' if args.head < 0 else f'head {args.head}'
    fig.suptitle(f'Attention of each mixture token over the patches, last vision block, {heads}\n'
                 f'({describe(model, args.ckpt)}; each map normalised over the patches)',
                 fontsize=9)
    fig.text(0.5, 0.01, ' | '.join(captions[args.index][:4]), ha='center', fontsize=7)
    save(fig, args.out)


# ----------------------------------------------------------------------------- runs
# train.py flags added after some runs were made, with the value those older runs had without
# saying so: scenes of 1 to 3 objects, evaluation on the test split
IMPLICIT = {'synthetic_objects': 3, 'eval_split': 'test'}
# config.json keys in which the runs of one experiment differ by design (where and how a run is
# saved and logged, not what it trains): runs differing only in them are not a mixed group;
# what synthetic_dir holds is fixed by synthetic_objects and image_size, which are compared
BOOKKEEPING = {'out_dir', 'resume', 'seed', 'save_every', 'keep', 'log_every', 'eval_every',
               'workers', 'device', 'compile', 'synthetic_dir'}
LEVEL = 0.95   # of the paired intervals


def read_log(path):
    """log.jsonl (or the run directory holding it) -> records sorted by step; a step logged
    twice (a resumed run) keeps its later values; a torn last line is skipped."""
    path = Path(path)
    path = path / 'log.jsonl' if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such log (expected train.py's out_dir/log.jsonl)")
    by_step = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        by_step[record['step']] = {**by_step.get(record['step'], {}), **record}
    return [by_step[s] for s in sorted(by_step)]


def is_metric(key):
    return '/' in key   # 'zeroshot/color/top1', 'retrieval/i2t_r1', ...


def read_run(run_dir):
    """{'name', 'config', 'metrics'}: config is config.json in one flat dict, train.py's flags
    (seed, lr, steps, eval_split, ...) and the model_config fields (pool, embed_dim, tau, ...)
    alike, so that any of them can group runs; metrics: the last record with eval metrics."""
    run_dir = Path(run_dir)
    config = json.loads((run_dir / 'config.json').read_text())
    model_config = config.pop('model_config', {})
    evaluated = [r for r in read_log(run_dir) if any(is_metric(k) for k in r)]
    metrics = {k: v for k, v in evaluated[-1].items() if is_metric(k)} if evaluated else {}
    # the model's fields last: train.py's flags that override one of them are None when not given
    return {'name': run_dir.name, 'config': {**IMPLICIT, **config, **model_config},
            'metrics': metrics}


def load_runs(paths):
    runs = []
    for path in paths:
        run = read_run(path)
        if not run['metrics']:
            print(f'skipping {path}: its log.jsonl has no evaluation yet', file=sys.stderr)
            continue
        runs.append(run)
    if not runs:
        raise ValueError('no run with eval metrics among ' + ' '.join(map(str, paths)))
    return runs


def metrics_found(runs):
    """Every metric of the runs, in the order they were logged."""
    return list(dict.fromkeys(k for run in runs for k in run['metrics']))


def order_key(by, value):
    """The ablation ladder's order for pool, numbers ascending, anything else by its text."""
    if by == 'pool' and value in POOLS:
        return 0, POOLS.index(value), ''
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return 1, value, ''
    return 2, 0, str(value)


def same_value(value, text):
    """Whether a config value is what a flag spelled: '16' is 16, '5' is 5.0."""
    if str(value) == str(text):
        return True
    try:
        return float(value) == float(text)
    except (TypeError, ValueError):
        return False


def split_runs(runs, by):
    """[(value, [the runs whose config[by] is value])] in order_key's order; runs whose
    config.json lacks the key are left out, with a message."""
    groups, lacking = {}, []
    for run in runs:
        if by in run['config']:
            groups.setdefault(run['config'][by], []).append(run)
        else:
            lacking.append(run['name'])
    if not groups:
        raise ValueError(f"{by}: in no run's config.json (neither a train.py flag nor a "
                         f"model_config field)")
    if lacking:
        print(f"warning: no {by} in the config.json of {', '.join(lacking)}: left out",
              file=sys.stderr)
    return [(value, groups[value]) for value in sorted(groups, key=lambda v: order_key(by, v))]


def warn_if_mixed(members, label, ignore=()):
    """A message when the runs of one group differ in more than the seed (then their spread is
    not the seeds' alone), or when two of them share a seed (then pairing by seed cannot tell
    which one: seed_values leaves that seed out)."""
    keys = set().union(*(run['config'] for run in members)) - BOOKKEEPING - set(ignore)
    differ = sorted(k for k in keys if len({json.dumps(r['config'].get(k)) for r in members}) > 1)
    if differ:
        print(f"warning: the runs with {label} also differ in {', '.join(differ)}", file=sys.stderr)
    seeds = {}
    for run in members:
        seeds.setdefault(run['config'].get('seed'), []).append(run['name'])
    for seed, names in seeds.items():
        if len(names) > 1:
            print(f"warning: the runs with {label} have seed {seed} more than once "
                  f"({', '.join(names)}): paired differences leave that seed out",
                  file=sys.stderr)


def metric_stats(members, metrics):
    """{metric: (mean, std)} over the runs that have it: sample std (n - 1), 0 for one run."""
    stats = {}
    for metric in metrics:
        xs = [run['metrics'][metric] for run in members if metric in run['metrics']]
        if xs:
            stats[metric] = (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)
    return stats


def group_stats(grouped, by, metrics):
    """split_runs' groups -> [(value, n runs, {metric: (mean, std)})], std over seeds."""
    out = []
    for value, members in grouped:
        warn_if_mixed(members, f'{by}={value}', ignore=[by])
        out.append((value, len(members), metric_stats(members, metrics)))
    return out


def group_runs(runs, by, metrics):
    """Runs grouped by config[by]: [(value, n runs, {metric: (mean, std)})], std over seeds
    (sample std, n - 1; 0 for one run). Groups in POOLS order for pool, else sorted."""
    return group_stats(split_runs(runs, by), by, metrics)


def markdown_table(groups, by, metrics):
    """Mean +- std over seeds in percent, one row per group."""
    lines = [f"| {by} | runs | " + ' | '.join(metrics) + ' |', '|---' * (len(metrics) + 2) + '|']
    for value, n, stats in groups:
        cells = [f'{100 * stats[m][0]:.1f} ± {100 * stats[m][1]:.1f}' if m in stats else '–'
                 for m in metrics]
        lines.append(f'| {value} | {n} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


# ----------------------------------------------------------------------------- paired differences
def t_central(t, df):
    """P(|T| < t) for Student's t with df = 1, 2, ... degrees of freedom and t >= 0: the finite
    series in theta = atan(t / sqrt(df)) that integer df allow (Abramowitz & Stegun 26.7.3-4),
    exact up to rounding, so no special function (nor scipy) is needed."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    term, total = 1.0, 1.0
    if df % 2:   # 2/pi (theta + sin cos (1 + 2/3 c^2 + 2*4/(3*5) c^4 + ... up to c^(df-3)))
        if df == 1:
            return 2 * theta / math.pi
        for j in range(1, (df - 3) // 2 + 1):
            term *= 2 * j / (2 * j + 1) * c2
            total += term
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    for j in range(1, (df - 2) // 2 + 1):   # sin (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ... up to c^(df-2))
        term *= (2 * j - 1) / (2 * j) * c2
        total += term
    return math.sin(theta) * total


def t_quantile(p, df):
    """The p-quantile of Student's t with df = 1, 2, ... degrees of freedom, by bisection on
    t_central (which increases with t); t_quantile(0.975, 4) = 2.776."""
    if not (isinstance(df, int) and df >= 1):
        raise ValueError(f'degrees of freedom: a positive integer, not {df!r}')
    if not 0 < p < 1:
        raise ValueError(f'p={p}: a probability strictly between 0 and 1')
    if p < 0.5:
        return -t_quantile(1 - p, df)
    target = 2 * p - 1               # P(|T| < t) = 2 P(T < t) - 1 by symmetry
    lo, hi = 0.0, 1.0
    while t_central(hi, df) < target:
        lo, hi = hi, 2 * hi
    for _ in range(200):             # far below 1e-10 well before the 200th halving
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_central(mid, df) < target else (lo, mid)
        if hi - lo < 1e-12 * hi:
            break
    return (lo + hi) / 2


@dataclasses.dataclass
class Paired:
    """A pool's metric minus the baseline's, over the seeds both have (paired_difference)."""
    n: int                 # seeds paired
    mean: float            # of the differences; nan for n = 0
    std: float             # their sample std (n - 1); nan for n < 2
    lo: float | None       # the t interval mean -+ t_{(1+level)/2, n-1} std / sqrt(n);
    hi: float | None       # None for n < 2: one difference says nothing of the spread
    seeds: list            # the seeds paired
    unpaired: list         # seeds that only one side has: left out

    @property
    def excludes_zero(self):
        """Whether a difference is claimed: the interval lies on one side of zero."""
        return self.lo is not None and (self.lo > 0 or self.hi < 0)

    def cell(self, scale=100):
        """'+1.8 [-2.1, +5.7]' in percentage points, ' *' added where the interval excludes 0."""
        if self.n == 0:
            return '– (no seed in common)'
        if self.lo is None:
            return f'{scale * self.mean:+.1f} (1 seed: no interval)'
        star = ' *' if self.excludes_zero else ''
        return f'{scale * self.mean:+.1f} [{scale * self.lo:+.1f}, {scale * self.hi:+.1f}]{star}'


def paired_difference(values, baseline, level=LEVEL):
    """values - baseline, each {seed: value}, over the seeds both have (the same seed, the same
    data order: the noise the two runs share cancels): n, mean, sample std and the
    two-sided t interval of the mean difference; no interval for fewer than two seeds."""
    seeds = sorted(set(values) & set(baseline), key=lambda s: order_key('seed', s))
    unpaired = sorted(set(values) ^ set(baseline), key=lambda s: order_key('seed', s))
    d = [values[s] - baseline[s] for s in seeds]
    n = len(d)
    mean = statistics.fmean(d) if d else math.nan
    if n < 2:
        return Paired(n, mean, math.nan, None, None, seeds, unpaired)
    std = statistics.stdev(d)
    half = t_quantile((1 + level) / 2, n - 1) * std / math.sqrt(n)
    return Paired(n, mean, std, mean - half, mean + half, seeds, unpaired)


def seed_values(members, metrics):
    """{seed: the mean of the metrics (one metric: its value)} over the runs of one group that
    have them all; a seed that two runs share is left out (which of the two would pair?)."""
    values, count = {}, {}
    for run in members:
        seed = run['config'].get('seed')
        count[seed] = count.get(seed, 0) + 1
        if all(m in run['metrics'] for m in metrics):
            values[seed] = statistics.fmean(run['metrics'][m] for m in metrics)
    return {seed: v for seed, v in values.items() if count[seed] == 1}


def paired_rows(grouped, baseline, metrics, by):
    """split_runs' groups -> [(value, {metric: Paired})]: each group's runs minus the runs of
    the group whose value is baseline, paired by seed; [] (with a message) without that group."""
    base = [members for value, members in grouped if same_value(value, baseline)]
    if not base:
        print(f"warning: no runs with {by}={baseline}: no paired differences", file=sys.stderr)
        return []
    rows = []
    for value, members in grouped:
        if members is base[0]:
            continue
        diffs = {m: paired_difference(seed_values(members, [m]), seed_values(base[0], [m]))
                 for m in metrics}
        report_unpaired(diffs, f'{by}={value} − {baseline}')
        rows.append((value, diffs))
    return rows


def unpaired_seeds(diffs):
    """The seeds left out of any of the {metric: Paired}, for they were not on both sides."""
    return sorted({s for d in diffs.values() for s in d.unpaired}, key=lambda s: order_key('', s))


def report_unpaired(diffs, label):
    if seeds := unpaired_seeds(diffs):
        print(f"warning: {label}: seed {', '.join(map(str, seeds))} only on one side, left out "
              f"of the pairing", file=sys.stderr)


def seeds_cell(diffs):
    """How many seeds were paired: '5', or '3–5' where some metric has fewer."""
    ns = sorted({d.n for d in diffs})
    return str(ns[0]) if len(ns) == 1 else f'{ns[0]}–{ns[-1]}'


def paired_legend(difference, level=LEVEL):
    """The line above a table of Paired cells that says how to read them."""
    return (f'{difference}, paired by seed, in percentage points: mean [{100 * level:g}% t '
            f'interval]; * where the interval excludes zero.\n\n')


def paired_table(rows, by, baseline, metrics):
    """paired_rows -> markdown: a legend, one row per group, and which seeds were left out."""
    lines = [f'| {by} − {baseline} | seeds | ' + ' | '.join(metrics) + ' |',
             '|---' * (len(metrics) + 2) + '|']
    for value, diffs in rows:
        cells = [diffs[m].cell() for m in metrics]
        lines.append(f'| {value} | {seeds_cell(diffs.values())} | ' + ' | '.join(cells) + ' |')
    return (paired_legend(f'{by} − {baseline}') + '\n'.join(lines) + '\n'
            + unpaired_notes(rows, by))


def unpaired_notes(rows, by):
    """A markdown line under a table: which seeds of [(value, {metric: Paired})] were left out."""
    left_out = [f"{by}={value}: seed {', '.join(map(str, seeds))}"
                for value, diffs in rows if (seeds := unpaired_seeds(diffs))]
    if not left_out:
        return ''
    return f"\nLeft out of the pairing, on one side only: {'; '.join(left_out)}.\n"


# ----------------------------------------------------------------------------- commands on runs
def cmd_curves(args):
    metrics = args.metrics.split(',')
    logs = [(Path(path).name if Path(path).is_dir() else Path(path).parent.name, read_log(path))
            for path in args.runs]
    # a panel only for what some log holds: an old run's metric, a typo, leave no empty axes
    wanted = ['loss', *metrics]
    keys = [k for k in wanted if any(k in r for _, records in logs for r in records)]
    if len(keys) < len(wanted):
        print(f"warning: in no log, left out: {', '.join(k for k in wanted if k not in keys)}",
              file=sys.stderr)
    if not keys:
        raise ValueError('these logs hold neither a training loss nor any of --metrics')
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, layout='constrained', figsize=(4 * cols, 3.2 * rows),
                             squeeze=False)
    axes = axes.flat
    for ax, key in zip(axes, keys):
        for name, records in logs:
            points = [r for r in records if key in r]
            if points:   # eval metrics are sparse: markers show where they were taken
                ax.plot([r['step'] for r in points], [r[key] for r in points],
                        marker=None if key == 'loss' else 'o', label=name)
        ax.set_title('training loss' if key == 'loss' else key, fontsize=9)
        ax.set_xlabel('step')
    for ax in axes[len(keys):]:
        ax.axis('off')
    axes[0].legend(fontsize=7)
    save(fig, args.out)


def cmd_ablation(args):
    runs = load_runs(args.runs)
    metrics = args.metrics.split(',') if args.metrics else metrics_found(runs)
    grouped = split_runs(runs, args.by)
    groups = group_stats(grouped, args.by, metrics)
    rows = dict(paired_rows(grouped, args.baseline, metrics, args.by))
    fig, ax = plt.subplots(layout='constrained',
                           figsize=(1.6 * len(metrics) * max(1, len(groups) / 3) + 2, 4))
    width = 0.8 / len(groups)
    for n, (value, count, stats) in enumerate(groups):
        x = [i + (n - (len(groups) - 1) / 2) * width for i in range(len(metrics))]
        mean = [100 * stats.get(m, (math.nan, 0))[0] for m in metrics]
        std = [100 * stats.get(m, (0, 0))[1] for m in metrics]
        ax.bar(x, mean, width, yerr=std, capsize=3, label=f'{value} ({count} runs)')
        for i, m in enumerate(metrics):
            if value in rows and rows[value][m].excludes_zero:
                ax.text(x[i], mean[i] + std[i], '*', ha='center', va='bottom')
    ax.set_xticks(range(len(metrics)), metrics, fontsize=8, rotation=15, ha='right')
    ax.set_ylabel('%, mean ± std over seeds')
    star = (f'; *: the {100 * LEVEL:g}% interval of the paired difference to {args.baseline} '
            f'excludes zero' if rows else '')
    ax.set_title(f'Ablation by {args.by} (paper Figure 3){star}', fontsize=10)
    ax.legend(fontsize=8)
    table = markdown_table(groups, args.by, metrics)
    if rows:
        table += '\n' + paired_table(list(rows.items()), args.by, args.baseline, metrics)
    write_table(table, args.table)
    save(fig, args.out)


def x_axis(ax, values):
    """Put the swept values on ax's x axis and return where to plot them: on a log2 scale when
    all are powers of two (K = 1, 4, 16, 64 evenly spaced), one slot each when not numbers."""
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    xs = list(values) if numeric else list(range(len(values)))
    if numeric and len(values) > 1 and all(v > 0 and math.log2(v).is_integer() for v in values):
        ax.set_xscale('log', base=2)
    ax.set_xticks(xs, [f'{v:g}' if numeric else str(v) for v in values])
    ax.minorticks_off()
    return xs


def dodge(ax, xs, i, n):
    """xs shifted for the i-th of n series, so that their error bars do not hide each other:
    by a fixed factor on a log axis, by a fixed share of the range on a linear one."""
    shift = (i - (n - 1) / 2) * 0.04
    if ax.get_xscale() == 'log':
        return [x * 2 ** shift for x in xs]
    span = (max(xs) - min(xs)) or 1
    return [x + shift * span for x in xs]


def cmd_sweep(args):
    metrics = args.metrics.split(',')
    grouped = split_runs(load_runs(args.runs), args.by)
    groups = group_stats(grouped, args.by, metrics)
    fig, ax = plt.subplots(layout='constrained', figsize=(6, 4))
    xs = dict(zip([v for v, _, _ in groups], x_axis(ax, [v for v, _, _ in groups])))
    for metric in metrics:
        points = [(v, stats[metric]) for v, _, stats in groups if metric in stats]
        ax.errorbar([xs[v] for v, _ in points], [100 * s[0] for _, s in points],
                    yerr=[100 * s[1] for _, s in points], marker='o', capsize=3, label=metric)
    ax.set_xlabel(args.by)
    ax.set_ylabel('%, mean ± std over seeds')
    ax.set_title(f'Sweep over {args.by} (paper Figure 6)', fontsize=10)
    ax.legend(fontsize=8)
    table = markdown_table(groups, args.by, metrics)
    if args.baseline is not None:
        rows = paired_rows(grouped, args.baseline, metrics, args.by)
        if rows:
            table += '\n' + paired_table(rows, args.by, args.baseline, metrics)
    write_table(table, args.table)
    save(fig, args.out)


def lr_scores(runs, metrics):
    """{pool: {lr: [the score of each run]}}, a run's score the mean of the metrics; runs
    without all of them are left out, with a message."""
    lacking = [run['name'] for run in runs if not all(m in run['metrics'] for m in metrics)]
    if lacking:
        print(f"warning: not all of {', '.join(metrics)} in {', '.join(lacking)}: left out",
              file=sys.stderr)
    scores = {}
    for pool, members in split_runs(runs, 'pool'):
        seeds = {}
        for lr, group in split_runs(members, 'lr'):
            warn_if_mixed(group, f'pool={pool}, lr={lr:g}', ignore=['pool', 'lr'])
            scored = [run for run in group if run['name'] not in lacking]
            if scored:
                scores.setdefault(pool, {})[lr] = [
                    statistics.fmean(run['metrics'][m] for m in metrics) for run in scored]
                seeds[lr] = tuple(sorted((run['config'].get('seed') for run in scored),
                                         key=lambda s: order_key('', s)))
        if len(set(seeds.values())) > 1:   # then a seed's luck can pass for the lr's merit
            print(f'warning: pool={pool}: the learning rates were not run with the same seeds',
                  file=sys.stderr)
    return scores


def pick_lr(by_lr):
    """The lr of {lr: [scores]} with the best mean score; a tie (to 1e-12) goes to the smallest
    of them, the gentlest step, and never to the order the runs came in."""
    means = {lr: statistics.fmean(scores) for lr, scores in by_lr.items()}
    best = max(means.values())
    return min(lr for lr, mean in means.items() if mean >= best - 1e-12)


def lr_table(scores, best, metrics):
    """Pool x lr, each cell the mean score over seeds in percent and how many runs; bold: the
    lr picked."""
    lrs = sorted({lr for by_lr in scores.values() for lr in by_lr})
    lines = [f'Score: the mean of {", ".join(metrics)} in percent, averaged over seeds (how '
             f'many in brackets); bold: the learning rate picked for each pool.\n',
             '| pool | ' + ' | '.join(f'lr={lr:g}' for lr in lrs) + ' | best lr |',
             '|---' * (len(lrs) + 2) + '|']
    for pool, by_lr in scores.items():
        cells = []
        for lr in lrs:
            if lr not in by_lr:
                cells.append('–')
                continue
            cell = f'{100 * statistics.fmean(by_lr[lr]):.1f} ({len(by_lr[lr])})'
            cells.append(f'**{cell}**' if lr == best[pool] else cell)
        lines.append(f'| {pool} | ' + ' | '.join(cells) + f' | {best[pool]:g} |')
    return '\n'.join(lines) + '\n'


def cmd_lr(args):
    metrics = args.metrics.split(',')
    runs = load_runs(args.runs)
    on_test = [run['name'] for run in runs if run['config'].get('eval_split') == 'test']
    if on_test:   # a learning rate chosen on the test split flatters the reported test numbers
        print(f"warning: evaluated on the test split (eval_split='test', or from before train.py "
              f"had --eval_split), choose the learning rate on --eval_split=val runs: "
              f"{', '.join(on_test)}", file=sys.stderr)
    scores = lr_scores(runs, metrics)
    if not scores:
        raise ValueError(f"no run has all of --metrics={args.metrics}")
    best = {pool: pick_lr(by_lr) for pool, by_lr in scores.items()}
    write_table(lr_table(scores, best, metrics), args.table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(best, indent=2) + '\n')
    print(f'wrote {args.out}')


def pressure_rows(runs, by, pool, baseline, metrics):
    """[(value, {pool: {metric: (mean, std)}}, {metric: Paired})] for each value of by that has
    runs of both pools: their means over seeds and pool - baseline paired by seed."""
    rows = []
    for value, members in split_runs(runs, by):
        pools = {p: group for p, group in split_runs(members, 'pool') if p in (pool, baseline)}
        if len(pools) < 2:
            print(f'warning: {by}={value}: no runs of pool={pool} and pool={baseline} both: '
                  'left out', file=sys.stderr)
            continue
        for p, group in pools.items():
            warn_if_mixed(group, f'{by}={value}, pool={p}', ignore=[by, 'pool'])
        diffs = {m: paired_difference(seed_values(pools[pool], [m]),
                                      seed_values(pools[baseline], [m])) for m in metrics}
        report_unpaired(diffs, f'{by}={value}, {pool} − {baseline}')
        rows.append((value, {p: metric_stats(group, metrics) for p, group in pools.items()}, diffs))
    if not rows:
        raise ValueError(f'no value of {by} has runs of both pool={pool} and pool={baseline}')
    return rows


def pressure_table(rows, by, pool, baseline, metrics):
    """For each value of by and metric: each pool's mean ± std, and their paired difference."""
    head = [f'{m}: {p}' for m in metrics for p in (pool, baseline, f'{pool} − {baseline}')]
    lines = [f'| {by} | seeds | ' + ' | '.join(head) + ' |', '|---' * (len(head) + 2) + '|']
    for value, stats, diffs in rows:
        cells = []
        for m in metrics:
            for p in (pool, baseline):
                mean, std = stats[p].get(m, (math.nan, math.nan))
                cells.append(f'{100 * mean:.1f} ± {100 * std:.1f}' if m in stats[p] else '–')
            cells.append(diffs[m].cell())
        lines.append(f'| {value} | {seeds_cell(diffs.values())} | ' + ' | '.join(cells) + ' |')
    return (paired_legend(f'{pool} − {baseline} against {by}') + '\n'.join(lines) + '\n'
            + unpaired_notes([(value, diffs) for value, _, diffs in rows], by))


def cmd_pressure(args):
    runs = load_runs(args.runs)
    metrics = args.metrics.split(',') if args.metrics else metrics_found(runs)
    rows = pressure_rows(runs, args.by, args.pool, args.baseline, metrics)
    fig, (left, right) = plt.subplots(1, 2, layout='constrained', figsize=(11, 4.2))
    values = [value for value, _, _ in rows]
    xs = x_axis(left, values)
    x_axis(right, values)
    for i, m in enumerate(metrics):
        color = f'C{i % 10}'
        d = [diffs[m] for _, _, diffs in rows]
        # one seed: the point without a bar (no interval), not a bar of zero length that looks sure
        below = [100 * (x.mean - x.lo) if x.lo is not None else 0 for x in d]
        above = [100 * (x.hi - x.mean) if x.hi is not None else 0 for x in d]
        at = dodge(left, xs, i, len(metrics))
        left.errorbar(at, [100 * x.mean for x in d], yerr=[below, above], color=color,
                      marker='o', capsize=3, label=m)
        for x, diff in zip(at, d):
            if diff.excludes_zero:
                left.annotate('*', (x, 100 * diff.hi), ha='center', va='bottom', color=color)
        for j, (p, style) in enumerate(((args.pool, '-o'), (args.baseline, '--s'))):
            at = dodge(right, xs, 2 * i + j, 2 * len(metrics))
            points = [(x, stats[p][m]) for x, (_, stats, _) in zip(at, rows) if m in stats[p]]
            right.errorbar([x for x, _ in points], [100 * s[0] for _, s in points],
                           yerr=[100 * s[1] for _, s in points], fmt=style, color=color,
                           capsize=3, label=f'{m}: {p}')
    left.axhline(0, color='gray', linewidth=0.8)
    left.set_ylabel(f'{args.pool} − {args.baseline}, percentage points')
    left.set_title(f'Paired by seed: mean, {100 * LEVEL:g}% t interval (* excludes 0)', fontsize=9)
    right.set_ylabel('%, mean ± std over seeds')
    right.set_title(f'{args.pool} (solid) and {args.baseline} (dashed)', fontsize=9)
    for ax in (left, right):
        ax.set_xlabel(args.by)
        ax.legend(fontsize=7)
    fig.suptitle(f'{args.pool} against {args.baseline} as {args.by} varies', fontsize=10)
    write_table(pressure_table(rows, args.by, args.pool, args.baseline, metrics), args.table)
    save(fig, args.out)


def write_table(table, path):
    print(table, end='')
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(table)
        print(f'wrote {path}')


def save(fig, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f'wrote {path}')


# ----------------------------------------------------------------------------- command line
def parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)

    def command(name, func, help, out, out_help='the PNG file to write'):
        s = sub.add_parser(name, help=help, description=help)
        s.set_defaults(func=func)
        s.add_argument('--out', default=out, help=f'{out_help} (default: {out})')
        return s

    def images(s):
        s.add_argument('--data', default=str(RETRIEVAL), help='shards with captioned images (brace '
                       'pattern, directory or list); default: the synthetic retrieval split')

    s = command('spectrum', cmd_spectrum,
                'singular values of the covariance of the visual features (Figure 5)',
                'spectrum.png')
    s.add_argument('ckpts', nargs='+',
                   help='train.py checkpoints or run directories, one line each')
    images(s)
    s.add_argument('--images', type=int, default=1000, help='how many images (the paper: 5000)')
    s.add_argument('--features', choices=['tokens', 'values'], default='tokens',
                   help="tokens: the ViT's output (K mixture tokens along the batch axis, or the "
                        "first token for cls/registers); values: after the value projection "
                        "(or proj)")
    s.add_argument('--labels', help='comma-separated legend labels, one per checkpoint '
                                    '(default: pool, K, directory)')

    s = command('mixing', cmd_mixing,
                "mixing weights Phi of one image for its captions and others' (pool=llip)",
                'mixing.png')
    s.add_argument('ckpt', help='a train.py checkpoint (or run directory) with pool=llip')
    images(s)
    s.add_argument('--index', type=int, default=0, help='which image of --data')
    s.add_argument('--unrelated', type=int, default=4,
                   help="how many other images' captions to add")
    s.add_argument('--tau', type=float, default=None,
                   help="mixing temperature (default: the model's)")

    s = command('attention', cmd_attention,
                "each mixture token's attention over the patches, last vision block",
                'attention.png')
    s.add_argument('ckpt', help='a train.py checkpoint or run directory')
    images(s)
    s.add_argument('--index', type=int, default=0, help='which image of --data')
    s.add_argument('--head', type=int, default=-1,
                   help='one attention head, or -1 for the average over heads')
    s.add_argument('--alpha', type=float, default=0.6,
                   help='opacity of the heat map over the image')

    s = command('curves', cmd_curves,
                'training loss and eval metrics against step, one line per run', 'curves.png')
    s.add_argument('runs', nargs='+',
                   help="run directories (train.py's --out_dir) or log.jsonl files")
    s.add_argument('--metrics', default=','.join(METRICS),
                   help='comma-separated eval metrics to plot; those in no log get no panel')

    def run_groups(s, by, by_help):
        s.add_argument('runs', nargs='+',
                       help='run directories, each with config.json and log.jsonl')
        s.add_argument('--by', default=by,
                       help=f'the config.json key to group by, a train.py flag or a model_config '
                            f'field (default: {by}; {by_help})')
        s.add_argument('--table', help='also write the markdown tables to this file')

    every = 'comma-separated eval metrics (default: every metric the runs logged)'
    s = command('ablation', cmd_ablation, 'bars per metric, runs grouped by pool (Figure 3), and '
                'each pool minus the baseline paired by seed', 'ablation.png')
    run_groups(s, 'pool', 'e.g. pool, num_mixture, tau')
    s.add_argument('--metrics', help=every)
    s.add_argument('--baseline', default='cls',
                   help='the group the others are paired with, seed by seed (default: cls)')

    s = command('sweep', cmd_sweep, 'metrics against K or tau with error bars (Figure 6)',
                'sweep.png')
    run_groups(s, 'num_mixture', 'e.g. num_mixture, tau')
    s.add_argument('--metrics', default=','.join(METRICS), help='comma-separated eval metrics')
    s.add_argument('--baseline', help='a value of --by (e.g. 16): also the table of every other '
                                      'value minus this one, paired by seed')

    s = command('lr', cmd_lr, "each pool's learning rate: the best mean over seeds of the average "
                'of --metrics (runs on the validation split)', 'lr.json',
                out_help='the JSON file {pool: learning rate} to write')
    s.add_argument('runs', nargs='+',
                   help='run directories, each with config.json and log.jsonl')
    s.add_argument('--metrics', required=True,
                   help='comma-separated eval metrics whose average scores a run')
    s.add_argument('--table', help='also write the markdown table (pool x lr) to this file')

    s = command('pressure', cmd_pressure, '--pool minus --baseline paired by seed, against a '
                'swept setting such as embed_dim or synthetic_objects', 'pressure.png')
    run_groups(s, 'embed_dim', 'e.g. embed_dim, synthetic_objects')
    s.add_argument('--metrics', help=every)
    s.add_argument('--pool', default='llip', help='the pool compared (default: llip)')
    s.add_argument('--baseline', default='cls', help='the pool it is compared with (default: cls)')
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        with torch.no_grad():
            args.func(args)
    # bad input: the message, not a traceback
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise SystemExit(f'error: {e}')


if __name__ == '__main__':
    main()
