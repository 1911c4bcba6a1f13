r"""
Plots and tables of finished (or running) trainings of the miniature Llip reproduction
(arXiv 2405.00740), from their run directories alone: no model is loaded.

    # loss, lr, gradient norm, throughput and eval metrics against step, one line per run
    python -m runs.report curves runs/ablation/*/ --out=curves.png
    # Figure 3: runs grouped by pool, mean +- std over seeds, and each pool minus cls paired by
    # seed, mean [95% t interval], * where the interval excludes zero (default: every metric)
    python -m runs.report ablation runs/ablation/*/ --metrics=zeroshot/color/top1,retrieval/i2t_r1 \
        --baseline=cls --out=runs/ablation.png --table=runs/ablation.md
    # Figure 6: against K or tau (--baseline=16: each K minus K = 16, paired by seed)
    # (--against=cls: the cls runs drawn as a level, every K minus cls, paired by seed)
    python -m runs.report sweep runs/k_sweep/*/ --by=num_mixture --baseline=16 --against=cls \
        --out=runs/k_sweep.png
    python -m runs.report sweep runs/tau_sweep/*/ --by=tau --out=runs/tau_sweep.png
    # each pool's learning rate from a grid of runs on the validation split (--eval_split=val):
    # the best mean over seeds of the average of the metrics, written as {pool: lr}
    python -m runs.report lr runs/lr/*/ --metrics=zeroshot/color/top1,retrieval/i2t_r1 \
        --out=runs/lr.json --table=runs/lr.md
    # llip - cls paired by seed against a swept setting (embed_dim, synthetic_objects, ...)
    python -m runs.report pressure runs/pressure/*/ --by=embed_dim --metrics=retrieval/binding \
        --baseline=cls --pool=llip --out=runs/pressure.png --table=runs/pressure.md

    python -m pytest tests/test_report.py      # what these numbers are checked against

A run directory is what train.py writes into --out_dir: config.json (train.py's flags, such as
'seed', 'lr', 'eval_split', and 'model_config', such as 'pool', 'embed_dim'; --by takes either
kind) and log.jsonl, whose last record with metrics holds the final evaluation.
Paired by seed: seed s of two pools saw the same data order, so the noise the two runs share
cancels in their difference; the interval is mean +- t_{0.975, n-1} std / sqrt(n) over the n
seeds both have.
Reading, grouping and the paired statistics are in runs/results.py; what needs the trained weights
themselves is in analysis.py (feature spectra, mixing weights, attention maps) and runs/diagnose.py
(captions, probe, spread).
`python -m runs.report SUBCOMMAND --help` lists the flags.
"""

import json
import math
import statistics
import sys
from pathlib import Path

import matplotlib
matplotlib.use('Agg')   # files only, no display
import matplotlib.pyplot as plt

from analysis import add_command, run_command, save, subcommands
from runs.results import (
    LEVEL,
    group_stats,
    load_runs,
    markdown_table,
    metric_stats,
    metrics_found,
    order_key,
    paired_difference,
    paired_legend,
    paired_rows,
    paired_table,
    read_log,
    report_unpaired,
    seed_values,
    seeds_cell,
    split_runs,
    unpaired_notes,
    warn_if_mixed,
)

METRICS = ['zeroshot/color/top1', 'zeroshot/shape/top1', 'retrieval/i2t_map', 'retrieval/t2i_map',
           'retrieval/binding']


# ----------------------------------------------------------------------------- commands on runs
# what train.py logs every --log_every steps, plotted before the eval metrics
TRAINING = {'loss': 'training loss', 'lr': 'learning rate', 'grad_norm': 'gradient norm',
            'images_per_s': 'images / s (throughput)'}


def curve_panels(logs, metrics):
    """The keys that get a panel: the training ones, then metrics, each only if some log holds
    it (an old run's metric, a typo or a log without throughput gets no empty axes)."""
    wanted = [*TRAINING, *metrics]
    keys = [k for k in wanted if any(k in r for _, records in logs for r in records)]
    missing = [k for k in wanted if k not in keys and k not in TRAINING]
    if missing:
        print(f"warning: in no log, left out: {', '.join(missing)}", file=sys.stderr)
    if not keys:
        raise ValueError('these logs hold neither training records nor any of --metrics')
    return keys


def cmd_curves(args):
    metrics = args.metrics.split(',')
    logs = [(Path(path).name if Path(path).is_dir() else Path(path).parent.name, read_log(path))
            for path in args.runs]
    keys = curve_panels(logs, metrics)
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
                        marker=None if key in TRAINING else 'o', label=name)
        ax.set_title(TRAINING.get(key, key), fontsize=9)
        if key == 'lr':
            ax.ticklabel_format(axis='y', style='sci', scilimits=(0, 0))
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
    runs = load_runs(args.runs)
    # --against: that pool's runs are one level drawn across the plot, not a point of the sweep
    # (cls has no mixture tokens and no tau: it is the same run at every K)
    reference = [run for run in runs if run['config'].get('pool') == args.against]
    grouped = split_runs([run for run in runs if run not in reference], args.by)
    groups = group_stats(grouped, args.by, metrics)
    fig, ax = plt.subplots(layout='constrained', figsize=(6, 4))
    xs = dict(zip([v for v, _, _ in groups], x_axis(ax, [v for v, _, _ in groups])))
    level = metric_stats(reference, metrics)
    for i, metric in enumerate(metrics):
        points = [(v, stats[metric]) for v, _, stats in groups if metric in stats]
        ax.errorbar([xs[v] for v, _ in points], [100 * s[0] for _, s in points], color=f'C{i}',
                    yerr=[100 * s[1] for _, s in points], marker='o', capsize=3, label=metric)
        if metric in level:
            mean, std = (100 * x for x in level[metric])
            ax.axhline(mean, color=f'C{i}', linestyle='--', linewidth=1)
            ax.axhspan(mean - std, mean + std, color=f'C{i}', alpha=0.08)
    ax.set_xlabel(args.by)
    ax.set_ylabel('%, mean ± std over seeds')
    against = f'; dashed: {args.against} ({len(reference)} runs)' if reference else ''
    ax.set_title(f'Sweep over {args.by} (paper Figure 6){against}', fontsize=10)
    ax.legend(fontsize=8)
    if reference:
        groups = groups + group_stats([(args.against, reference)], 'pool', metrics)
    table = markdown_table(groups, args.by, metrics)
    # each value minus --baseline (a value of --by), then each value minus the --against pool
    for baseline, pairs in ((args.baseline, grouped),
                            (args.against, grouped + [(args.against, reference)])):
        rows = paired_rows(pairs, baseline, metrics, args.by) if baseline is not None else []
        if rows:
            table += '\n' + paired_table(rows, args.by, baseline, metrics)
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
        print("warning: evaluated on the test split (eval_split='test'): choose the learning "
              f"rate on --eval_split=val runs: {', '.join(on_test)}", file=sys.stderr)
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


# ----------------------------------------------------------------------------- output files
def write_table(table, path):
    """Print a markdown table and, if path is given, write it there too."""
    print(table, end='')
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(table)
        print(f'wrote {path}')


def parser():
    p, sub = subcommands(__doc__)
    s = add_command(sub, 'curves', cmd_curves, 'training loss, learning rate, gradient norm, '
                    'throughput and eval metrics against step, one line per run', 'curves.png')
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
    s = add_command(sub, 'ablation', cmd_ablation, 'bars per metric, runs grouped by pool '
                    '(Figure 3), and each pool minus the baseline paired by seed', 'ablation.png')
    run_groups(s, 'pool', 'e.g. pool, num_mixture, tau')
    s.add_argument('--metrics', help=every)
    s.add_argument('--baseline', default='cls',
                   help='the group the others are paired with, seed by seed (default: cls)')

    s = add_command(sub, 'sweep', cmd_sweep,
                    'metrics against K or tau with error bars (Figure 6)', 'sweep.png')
    run_groups(s, 'num_mixture', 'e.g. num_mixture, tau')
    s.add_argument('--metrics', default=','.join(METRICS), help='comma-separated eval metrics')
    s.add_argument('--baseline', help='a value of --by (e.g. 16): also the table of every other '
                                      'value minus this one, paired by seed')
    s.add_argument('--against', help='a pool (e.g. cls) whose runs are not swept: drawn as a '
                                     'dashed level, and every value minus it, paired by seed')

    s = add_command(sub, 'lr', cmd_lr, "each pool's learning rate: the best mean over seeds of "
                    'the average of --metrics (runs on the validation split)', 'lr.json',
                    out_help='the JSON file {pool: learning rate} to write')
    s.add_argument('runs', nargs='+',
                   help='run directories, each with config.json and log.jsonl')
    s.add_argument('--metrics', required=True,
                   help='comma-separated eval metrics whose average scores a run')
    s.add_argument('--table', help='also write the markdown table (pool x lr) to this file')

    s = add_command(sub, 'pressure', cmd_pressure, '--pool minus --baseline paired by seed, '
                    'against a swept setting such as embed_dim or synthetic_objects',
                    'pressure.png')
    run_groups(s, 'embed_dim', 'e.g. embed_dim, synthetic_objects')
    s.add_argument('--metrics', help=every)
    s.add_argument('--pool', default='llip', help='the pool compared (default: llip)')
    s.add_argument('--baseline', default='cls', help='the pool it is compared with (default: cls)')
    return p


def main(argv=None):
    run_command(parser().parse_args(argv))


if __name__ == '__main__':
    main()
