"""
The results of train.py runs, read from their run directories (config.json and log.jsonl, no
model), grouped by a setting, and compared pool against pool pair by pair over seeds: the
numbers behind runs/report.py's plots and tables, with the markdown that shows them.

    python -m runs.report ablation runs/study/ladder/*/ --baseline=cls    # what uses it
    python -m pytest tests/test_report.py                             # what it is checked against
    python -c "from runs import results; print(results.t_quantile(0.975, 4))"  # 2.776

A run directory is what train.py writes into --out_dir: config.json (train.py's flags, such as
'seed', 'lr', 'eval_split', and 'model_config', such as 'pool', 'embed_dim'; grouping takes
either kind) and log.jsonl, whose last record with metrics holds the final evaluation.
Paired by seed: seed s of two pools saw the same data order, so the noise the two runs share
cancels in their difference; the interval is mean +- t_{0.975, n-1} std / sqrt(n) over the n
seeds both have, with the Student t quantile computed here (no scipy).
"""
import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path

from model import POOLS

# ----------------------------------------------------------------------------- runs
# config.json keys in which the runs of one experiment differ by design (where and how a run is
# saved and logged, not what it trains): runs differing only in them are not a mixed group;
# what synthetic_dir holds is fixed by synthetic_objects, synthetic_captions and image_size,
# which are compared
BOOKKEEPING = {'out_dir', 'resume', 'seed', 'save_every', 'keep', 'log_every', 'eval_every',
               'workers', 'device', 'compile', 'synthetic_dir', 'stop_grace', 'rendezvous_timeout'}
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
    return {'name': run_dir.name, 'config': {**config, **model_config},
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
