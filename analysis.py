"""
Plots of the miniature reproduction of Llip (arXiv 2405.00740), as PNG files.

    # Figure 5: singular values of the covariance of the visual features, several checkpoints
    python analysis.py spectrum out/llip/ckpt.pt out/cls/ckpt.pt --out=spectrum.png
    # the mixing weights Phi of one image for its own captions and for other images' captions
    python analysis.py mixing out/llip/ckpt.pt --index=0 --unrelated=4 --out=mixing.png
    # where each mixture token looks: its attention over the patches in the last ViT block
    python analysis.py attention out/llip/ckpt.pt --index=0 --out=attention.png
    # training loss and eval metrics against step, one line per run
    python analysis.py curves runs/ablation/*/ --out=curves.png
    # Figure 3: runs grouped by pool, mean +- std over seeds; Figure 6: against K or tau
    python analysis.py ablation runs/ablation/*/ --out=runs/ablation.png --table=runs/ablation.md
    python analysis.py sweep runs/k_sweep/*/ --by=num_mixture --out=runs/k_sweep.png
    python analysis.py sweep runs/tau_sweep/*/ --by=tau --out=runs/tau_sweep.png

    python -m pytest tests/test_analysis.py      # what these numbers are checked against

Images come from the synthetic retrieval split (data/synthetic/retrieval, written by train.py
on first use), whose .txt holds all of an image's captions; --data takes any shards.
A run directory is what train.py writes into --out_dir: config.json (with 'model_config' and
'seed') and log.jsonl, whose last record with metrics holds the final evaluation.
Everything runs on CPU; `python analysis.py SUBCOMMAND --help` lists the flags.
"""
import argparse
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
    return llip_eval.load_checkpoint(checkpoint_path(path))   # {'model': ..., 'config': {'model_config': ...}}


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
        raise ValueError(f"--index={args.index}: --data={args.data} has {len(images)} images with captions")


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
    ax.set_title(f'Spectrum of the covariance of the visual features ({args.features}, {len(images)} images)',
                 fontsize=9)
    ax.legend(fontsize=8)
    save(fig, args.out)


# ----------------------------------------------------------------------------- mixing weights (eq. 1)
def mixing_weights(queries, keys, tau):
    """Phi_ij^{mk} = softmax over k of Q_j^m . K_i^{mk} / tau, what loss.mix averages the values
    with. queries (T, M, d), keys (I, M, K, d) -> (I, T, M, K)."""
    return (einsum(queries, keys, 't m d, i m k d -> i t m k') / tau).softmax(dim=-1)


@torch.no_grad()
def caption_mixing(model, image, captions, tau=None):
    """Phi of one image (3, S, S) for each caption: (T, M, K)."""
    if model.config.pool != 'llip':
        raise ValueError(f"mixing weights depend on the caption only for pool=llip; this checkpoint "
                         f"has pool={model.config.pool} (avg: uniform weights, learned: one shared query)")
    c = model.config
    keys = model.encode_image(image[None]).keys                                      # (1, M, K, d)
    queries = model.encode_text(data.tokenize(captions, c.context_length, c.tokenizer)).queries  # (T, M, d)
    return mixing_weights(queries, keys, c.tau if tau is None else tau)[0]


def cmd_mixing(args):
    model = load_model(args.ckpt)
    images, captions = load_images(args.data, model.config.image_size, args.index + 1 + args.unrelated)
    check_index(args, images)
    own = captions[args.index]
    others = [caps[0] for caps in captions[args.index + 1:] if caps[0] not in own][:args.unrelated]
    texts = own + others
    phi = caption_mixing(model, images[args.index], texts, args.tau)                # (T, M, K)
    T, M, K = phi.shape
    entropy = -(phi * phi.clamp_min(1e-12).log()).sum(-1).mean().item()
    print(f'mean entropy of Phi over the K tokens: {entropy:.3f} (uniform weights: log K = {math.log(K):.3f})')

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
    fig.suptitle(f'Mixing weights of image {args.index} ({describe(model, args.ckpt)}, tau={model.config.tau if args.tau is None else args.tau:g})')
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
        raise ValueError(f"--head={args.head}: the last vision block has {attn.shape[0]} heads (or -1: their average)")
    attn = attn.mean(dim=0) if args.head < 0 else attn[args.head]        # (T, T + P)
    T, g = c.num_tokens, c.image_size // c.patch_size
    patches = attn[:, T:]                                                # (T, P)
    share = patches.sum(dim=-1)                                          # attention on patches
    maps = rearrange(patches / share[:, None], 't (gh gw) -> t 1 gh gw', gh=g)
    maps = F.interpolate(maps, size=c.image_size, mode='nearest')[:, 0]  # (T, S, S), one patch = p x p pixels

    cols = min(T + 1, 6)
    rows = math.ceil((T + 1) / cols)
    fig, axes = plt.subplots(rows, cols, layout='constrained', figsize=(2 * cols, 2.1 * rows + 0.6), squeeze=False)
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
                 f'({describe(model, args.ckpt)}; each map normalised over the patches)', fontsize=9)
    fig.text(0.5, 0.01, ' | '.join(captions[args.index][:4]), ha='center', fontsize=7)
    save(fig, args.out)


# ----------------------------------------------------------------------------- runs
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
    """{'name', 'config': model_config + seed, 'metrics': the last record with eval metrics}."""
    run_dir = Path(run_dir)
    config = json.loads((run_dir / 'config.json').read_text())
    evaluated = [r for r in read_log(run_dir) if any(is_metric(k) for k in r)]
    return {'name': run_dir.name, 'config': {**config['model_config'], 'seed': config.get('seed')},
            'metrics': {k: v for k, v in evaluated[-1].items() if is_metric(k)} if evaluated else {}}


def group_runs(runs, by, metrics):
    """Runs grouped by config[by]: [(value, n runs, {metric: (mean, std)})], std over seeds
    (sample std, n - 1; 0 for one run). Groups in POOLS order for pool, else sorted."""
    groups = {}
    for run in runs:
        groups.setdefault(run['config'][by], []).append(run)
    order = sorted(groups, key=lambda v: POOLS.index(v) if by == 'pool' and v in POOLS else v)
    out = []
    for value in order:
        members = groups[value]
        differ = [k for k in members[0]['config'] if k not in (by, 'seed')
                  and len({str(r['config'][k]) for r in members}) > 1]
        if differ:
            print(f"warning: the runs with {by}={value} also differ in {', '.join(differ)}", file=sys.stderr)
        stats = {}
        for metric in metrics:
            xs = [r['metrics'][metric] for r in members if metric in r['metrics']]
            if xs:
                stats[metric] = (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)
        out.append((value, len(members), stats))
    return out


def markdown_table(groups, by, metrics):
    """Mean +- std over seeds in percent, one row per group."""
    lines = [f"| {by} | runs | " + ' | '.join(metrics) + ' |', '|---' * (len(metrics) + 2) + '|']
    for value, n, stats in groups:
        cells = [f'{100 * stats[m][0]:.1f} ± {100 * stats[m][1]:.1f}' if m in stats else '–' for m in metrics]
        lines.append(f'| {value} | {n} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


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


def cmd_curves(args):
    metrics = args.metrics.split(',')
    cols = min(3, 1 + len(metrics))
    rows = math.ceil((1 + len(metrics)) / cols)
    fig, axes = plt.subplots(rows, cols, layout='constrained', figsize=(4 * cols, 3.2 * rows), squeeze=False)
    axes = axes.flat
    for path in args.runs:
        records = read_log(path)
        name = Path(path).name if Path(path).is_dir() else Path(path).parent.name
        losses = [r for r in records if 'loss' in r]
        axes[0].plot([r['step'] for r in losses], [r['loss'] for r in losses], label=name)
        for ax, metric in zip(axes[1:], metrics):
            points = [r for r in records if metric in r]
            ax.plot([r['step'] for r in points], [r[metric] for r in points], marker='o', label=name)
    for n, ax in enumerate(axes):
        if n > len(metrics):
            ax.axis('off')
            continue
        ax.set_title(['training loss', *metrics][n], fontsize=9)
        ax.set_xlabel('step')
    axes[0].legend(fontsize=7)
    save(fig, args.out)


def cmd_ablation(args):
    metrics = args.metrics.split(',')
    groups = group_runs(load_runs(args.runs), args.by, metrics)
    fig, ax = plt.subplots(layout='constrained', figsize=(1.6 * len(metrics) * max(1, len(groups) / 3) + 2, 4))
    width = 0.8 / len(groups)
    for n, (value, count, stats) in enumerate(groups):
        x = [i + (n - (len(groups) - 1) / 2) * width for i in range(len(metrics))]
        mean = [100 * stats.get(m, (math.nan, 0))[0] for m in metrics]
        std = [100 * stats.get(m, (0, 0))[1] for m in metrics]
        ax.bar(x, mean, width, yerr=std, capsize=3, label=f'{value} ({count} runs)')
    ax.set_xticks(range(len(metrics)), metrics, fontsize=8)
    ax.set_ylabel('%, mean ± std over seeds')
    ax.set_title(f'Ablation by {args.by} (paper Figure 3)', fontsize=10)
    ax.legend(fontsize=8)
    finish_table(groups, args, metrics)
    save(fig, args.out)


def cmd_sweep(args):
    metrics = args.metrics.split(',')
    groups = group_runs(load_runs(args.runs), args.by, metrics)
    fig, ax = plt.subplots(layout='constrained', figsize=(6, 4))
    values = [v for v, _, _ in groups]
    for metric in metrics:
        points = [(v, stats[metric]) for v, _, stats in groups if metric in stats]
        ax.errorbar([v for v, _ in points], [100 * s[0] for _, s in points],
                    yerr=[100 * s[1] for _, s in points], marker='o', capsize=3, label=metric)
    if args.by == 'num_mixture' and min(values) > 0:
        ax.set_xscale('log', base=2)
    ax.set_xticks(values, [f'{v:g}' for v in values])
    ax.minorticks_off()
    ax.set_xlabel(args.by)
    ax.set_ylabel('%, mean ± std over seeds')
    ax.set_title(f'Sweep over {args.by} (paper Figure 6)', fontsize=10)
    ax.legend(fontsize=8)
    finish_table(groups, args, metrics)
    save(fig, args.out)


def finish_table(groups, args, metrics):
    table = markdown_table(groups, args.by, metrics)
    print(table, end='')
    if args.table:
        Path(args.table).write_text(table)
        print(f'wrote {args.table}')


def save(fig, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f'wrote {path}')


# ----------------------------------------------------------------------------- command line
def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)

    def command(name, func, help, out):
        s = sub.add_parser(name, help=help, description=help)
        s.set_defaults(func=func)
        s.add_argument('--out', default=out, help=f'the PNG file to write (default: {out})')
        return s

    def images(s):
        s.add_argument('--data', default=str(RETRIEVAL), help='shards with captioned images (brace '
                       'pattern, directory or list); default: the synthetic retrieval split')

    s = command('spectrum', cmd_spectrum, 'singular values of the covariance of the visual features (Figure 5)',
                'spectrum.png')
    s.add_argument('ckpts', nargs='+', help='train.py checkpoints or run directories, one line each')
    images(s)
    s.add_argument('--images', type=int, default=1000, help='how many images (the paper: 5000)')
    s.add_argument('--features', choices=['tokens', 'values'], default='tokens',
                   help="tokens: the ViT's output (K mixture tokens along the batch axis, or the first "
                        "token for cls/registers); values: after the value projection (or proj)")
    s.add_argument('--labels', help='comma-separated legend labels, one per checkpoint (default: pool, K, directory)')

    s = command('mixing', cmd_mixing, "mixing weights Phi of one image for its captions and others' (pool=llip)",
                'mixing.png')
    s.add_argument('ckpt', help='a train.py checkpoint (or run directory) with pool=llip')
    images(s)
    s.add_argument('--index', type=int, default=0, help='which image of --data')
    s.add_argument('--unrelated', type=int, default=4, help="how many other images' captions to add")
    s.add_argument('--tau', type=float, default=None, help="mixing temperature (default: the model's)")

    s = command('attention', cmd_attention, "each mixture token's attention over the patches, last vision block",
                'attention.png')
    s.add_argument('ckpt', help='a train.py checkpoint or run directory')
    images(s)
    s.add_argument('--index', type=int, default=0, help='which image of --data')
    s.add_argument('--head', type=int, default=-1, help='one attention head, or -1 for the average over heads')
    s.add_argument('--alpha', type=float, default=0.6, help='opacity of the heat map over the image')

    s = command('curves', cmd_curves, 'training loss and eval metrics against step, one line per run',
                'curves.png')
    s.add_argument('runs', nargs='+', help="run directories (train.py's --out_dir) or log.jsonl files")
    s.add_argument('--metrics', default=','.join(METRICS), help='comma-separated eval metrics to plot')

    for name, func, by, help in (
            ('ablation', cmd_ablation, 'pool', 'bars per metric, runs grouped by pool (Figure 3)'),
            ('sweep', cmd_sweep, 'num_mixture', 'metrics against K or tau with error bars (Figure 6)')):
        s = command(name, func, help, f'{name}.png')
        s.add_argument('runs', nargs='+', help='run directories, each with config.json and log.jsonl')
        s.add_argument('--by', default=by, help=f'the model_config field to group by (default: {by}; '
                                                 'e.g. pool, num_mixture, tau)')
        s.add_argument('--metrics', default=','.join(METRICS), help='comma-separated eval metrics')
        s.add_argument('--table', help='also write the markdown table (mean ± std, runs) to this file')
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        with torch.no_grad():
            args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as e:   # bad input: the message, not a traceback
        raise SystemExit(f'error: {e}')


if __name__ == '__main__':
    main()
