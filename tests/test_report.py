"""What this proves about report.py and results.py, the plots and tables of run directories
(run: python -m pytest tests/test_report.py):
- runs are grouped with the right mean and sample std over seeds, in the ablation ladder's
  order, from logs with a resumed (repeated) step and a torn last line; a run without
  evaluation is skipped; the markdown table shows them;
- every subcommand (curves, ablation, sweep, pressure) writes a PNG from run directories as
  train.py writes them, and the ablation table goes to --table; curves plots the learning rate,
  gradient norm and throughput where the logs have them and leaves out what no log has;
- runs group by a key of config.json's top level (lr, synthetic_objects, ...) as well as by a
  model_config field; a run from before synthetic_objects / eval_split existed has their old
  values (3, 'test');
- the Student t quantiles, computed without scipy, match the tables (12.706, 4.303, 2.776, ...)
  and the closed forms of df 1 and 2; the paired interval of a set of differences is the one
  computed by hand here, with a * exactly where it excludes zero, and none for one seed;
- pairing uses only the seeds both pools have, and says which it left out;
- lr picks each pool's best mean over seeds of the average of --metrics, a tie going to the
  smaller lr whatever the order of the runs, writes {pool: lr} and warns about test-split runs;
- ablation and pressure write a PNG and markdown that holds those paired numbers; sweep
  --against=cls draws cls as a level and pairs every swept value with it.
"""
import json
import math

import pytest

from runs import report
from runs import results

METRICS = ['zeroshot/color/top1', 'retrieval/i2t_r1']


# ----------------------------------------------------------------------------- runs
def fake_run(root, name, pool, seed, metrics, num_mixture=4, extra_lines=(), top=None, model=None):
    """A run directory as train.py writes it; top: more of config.json's top level (train.py's
    flags), model: more model_config fields."""
    run = root / name
    run.mkdir(parents=True)
    model_config = {'pool': pool, 'num_mixture': num_mixture, 'tau': 5.0, **(model or {})}
    config = {'seed': seed, **(top or {}), 'model_config': model_config}
    (run / 'config.json').write_text(json.dumps(config))
    lines = [json.dumps({'step': 10, 'loss': 3.0})]
    if metrics is not None:
        lines.append(json.dumps({'step': 20, 'loss': 2.0, **metrics}))
    lines += extra_lines
    (run / 'log.jsonl').write_text('\n'.join(lines) + '\n')
    return str(run)


@pytest.fixture
def runs(tmp_path):
    out = [fake_run(tmp_path, f'llip{s}', 'llip', s, {METRICS[0]: v, METRICS[1]: 0.1 * s})
           for s, v in enumerate([0.5, 0.6, 0.7])]
    # a resumed run: step 20 logged twice, the later record wins; the last line was torn
    out.append(fake_run(tmp_path, 'cls0', 'cls', 0, {METRICS[0]: 0.9, METRICS[1]: 0.9},
                        extra_lines=[json.dumps({'step': 20, 'loss': 2.5,
                                                 METRICS[0]: 0.3, METRICS[1]: 0.2}),
                                     json.dumps({'step': 30, 'loss': 1.0})[:-1]]))
    out.append(fake_run(tmp_path, 'avg0', 'avg', 0, None))   # no evaluation yet: skipped
    return out


def test_read_log_keeps_the_later_record_of_a_step(runs):
    records = results.read_log(runs[3])
    assert [r['step'] for r in records] == [10, 20]
    assert records[1][METRICS[0]] == 0.3 and records[1]['loss'] == 2.5


def test_grouping_mean_and_std_over_seeds(runs, capsys):
    groups = results.group_runs(results.load_runs(runs), 'pool', METRICS)
    # ladder order, avg skipped
    assert [(value, n) for value, n, _ in groups] == [('cls', 1), ('llip', 3)]
    cls, llip = groups[0][2], groups[1][2]
    assert cls[METRICS[0]] == (0.3, 0.0) and cls[METRICS[1]] == (0.2, 0.0)
    assert llip[METRICS[0]] == pytest.approx((0.6, 0.1))        # sample std, n - 1
    assert llip[METRICS[1]] == pytest.approx((0.1, 0.1))
    table = results.markdown_table(groups, 'pool', METRICS)
    assert '| llip | 3 | 60.0 ± 10.0 | 10.0 ± 10.0 |' in table
    assert '| cls | 1 | 30.0 ± 0.0 | 20.0 ± 0.0 |' in table
    assert 'avg0' in capsys.readouterr().err


def test_sweep_groups_numerically_and_warns_about_mixed_groups(tmp_path, capsys):
    runs = [fake_run(tmp_path, f'k{k}s{s}', 'llip', s, {METRICS[0]: k / 100 + s / 1000},
                     num_mixture=k) for k in (16, 4, 64) for s in range(2)]
    runs.append(fake_run(tmp_path, 'avg16', 'avg', 0, {METRICS[0]: 0.0}, num_mixture=16))
    groups = results.group_runs(results.load_runs(runs), 'num_mixture', METRICS[:1])
    assert [value for value, _, _ in groups] == [4, 16, 64]
    assert groups[0][2][METRICS[0]] == pytest.approx((0.0405, math.sqrt(0.001 ** 2 / 2)))
    assert 'num_mixture=16 also differ in pool' in capsys.readouterr().err


def test_sweep_against_a_pool_pairs_every_value_with_it(tmp_path, is_png):
    # llip at K = 4 and 16 over seeds 0-2, cls (which has no K) a level: K minus cls by seed
    runs = [fake_run(tmp_path, f'k{k}s{s}', 'llip', s, {METRICS[0]: k / 100 + s / 10},
                     num_mixture=k) for k in (4, 16) for s in range(3)]
    runs += [fake_run(tmp_path, f'cls{s}', 'cls', s, {METRICS[0]: 0.1 + s / 10 + d})
             for s, d in enumerate([0.0, 0.01, -0.01])]
    table = tmp_path / 'k.md'
    report.main(['sweep', *runs, '--by=num_mixture', '--baseline=16', '--against=cls',
                 f'--metrics={METRICS[0]}', f'--table={table}', f"--out={tmp_path / 'k.png'}"])
    assert is_png(tmp_path / 'k.png')
    text = table.read_text()
    assert '| cls | 3 | 20.0 ± 9.5 |' in text              # the level, a row of its own
    assert '| 4 | 3 | 14.0 ± 10.0 |' in text                # cls is not a point of the sweep
    # K = 4 minus cls: differences -6, -7, -5 points: mean -6.0 +- 4.303 * 1 / sqrt(3)
    assert '| 4 | 3 | -6.0 [-8.5, -3.5] * |' in text and 'num_mixture − cls' in text
    assert '| 4 | 3 | -12.0 [-12.0, -12.0] * |' in text     # and K = 4 minus K = 16


# ----------------------------------------------------------------------------- every command
def test_every_subcommand_writes_a_png(runs, tmp_path, is_png):
    commands = {
        'curves': ['curves', *runs],
        'ablation': ['ablation', *runs, f"--table={tmp_path / 'ablation.md'}"],
        'sweep': ['sweep', *runs[:3], '--by=num_mixture', f"--metrics={METRICS[0]}"],
        'sweep_paired': ['sweep', *runs, '--by=pool', '--baseline=cls'],
        'pressure': ['pressure', *runs, '--by=num_mixture'],   # one seed paired: no interval
    }
    for name, argv in commands.items():
        report.main([*argv, f'--out={tmp_path / name}.png'])
        assert is_png(tmp_path / f'{name}.png'), name
    assert '60.0 ± 10.0' in (tmp_path / 'ablation.md').read_text()


def test_curves_leaves_out_metrics_no_log_has(runs, tmp_path, capsys, is_png):
    report.main(['curves', *runs, f'--metrics={METRICS[0]},zeroshot/nothing/top1',
                   f"--out={tmp_path / 'curves.png'}"])
    assert is_png(tmp_path / 'curves.png')
    assert 'left out: zeroshot/nothing/top1' in capsys.readouterr().err


def test_curves_panels_for_lr_grad_norm_and_throughput(tmp_path):
    full = {'step': 10, 'loss': 3.0, 'lr': 1e-4, 'grad_norm': 2.0, 'images_per_s': 300.0}
    logs = [('a', [full, {'step': 20, METRICS[0]: 0.5}]), ('b', [{'step': 10, 'loss': 2.0}])]
    assert report.curve_panels(logs, METRICS) == ['loss', 'lr', 'grad_norm', 'images_per_s',
                                                  METRICS[0]]
    # a log with the loss only: no empty lr, gradient or throughput panels
    assert report.curve_panels(logs[1:], METRICS[:1]) == ['loss']
    with pytest.raises(ValueError, match='neither'):
        report.curve_panels([('c', [{'step': 10}])], METRICS)


# ----------------------------------------------------------------------------- config keys
def test_group_by_top_level_keys_and_runs_without_the_key(tmp_path, capsys):
    new = dict(top={'lr': 3e-3, 'synthetic_objects': 5, 'eval_split': 'val'},
               model={'embed_dim': 64})
    runs = [fake_run(tmp_path, 'other', 'llip', 0, {METRICS[0]: 0.5},
                     top={'synthetic_objects': 3}),                  # no lr in its config
            fake_run(tmp_path, 'new', 'llip', 0, {METRICS[0]: 0.7}, **new),
            fake_run(tmp_path, 'new1', 'llip', 1, {METRICS[0]: 0.9}, **new)]
    loaded = results.load_runs(runs)
    groups = results.group_runs(loaded, 'synthetic_objects', METRICS[:1])
    assert [(value, n) for value, n, _ in groups] == [(3, 1), (5, 2)]
    assert groups[1][2][METRICS[0]][0] == pytest.approx(0.8)
    groups = results.group_runs(loaded, 'lr', METRICS[:1])          # 'other' has no lr
    assert [(value, n) for value, n, _ in groups] == [(3e-3, 2)]
    assert 'no lr in the config.json of other' in capsys.readouterr().err
    assert [v for v, _, _ in results.group_runs(loaded, 'embed_dim', METRICS[:1])] == [64]
    with pytest.raises(ValueError, match='nothing'):
        results.group_runs(loaded, 'nothing', METRICS[:1])


# ----------------------------------------------------------------------------- paired differences
@pytest.mark.parametrize('df, expected', [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776),
                                          (5, 2.571), (9, 2.262), (30, 2.042)])
def test_t_quantile_matches_the_tables(df, expected):
    assert results.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-3)
    assert results.t_quantile(0.025, df) == -results.t_quantile(0.975, df)


def test_t_quantile_closed_forms():
    for p in (0.6, 0.9, 0.975, 0.995):
        # df = 1 is the Cauchy distribution; df = 2 has t_p = (2p - 1) / sqrt(2 p (1 - p))
        assert results.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
        df2 = (2 * p - 1) / math.sqrt(2 * p * (1 - p))
        assert results.t_quantile(p, 2) == pytest.approx(df2, rel=1e-9)
    # many degrees of freedom: the normal's 1.95996, approached from above
    assert 0 < results.t_quantile(0.975, 10000) - 1.959964 < 3e-4
    with pytest.raises(ValueError):
        results.t_quantile(0.975, 0)


def test_paired_difference_by_hand():
    llip = {0: 0.60, 1: 0.80, 2: 0.75, 4: 0.90}
    cls = {0: 0.50, 1: 0.60, 2: 0.70, 3: 0.40}
    d = [0.10, 0.20, 0.05]                                   # seeds 0, 1, 2; 3 and 4 are unpaired
    mean = sum(d) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    half = 4.302653 * std / math.sqrt(3)                     # t_{0.975, 2}
    p = results.paired_difference(llip, cls)
    assert (p.n, p.seeds, p.unpaired) == (3, [0, 1, 2], [3, 4])
    assert (p.mean, p.std) == (pytest.approx(mean), pytest.approx(std))
    assert p.lo == pytest.approx(mean - half, rel=1e-6)
    assert p.hi == pytest.approx(mean + half, rel=1e-6)
    assert not p.excludes_zero and p.cell() == '+11.7 [-7.3, +30.6]'
    # a smaller spread: the interval [0.085, 0.135] excludes zero, and the cell says so
    p = results.paired_difference({0: 0.2, 1: 0.32, 2: 0.41}, {0: 0.1, 1: 0.2, 2: 0.3})
    assert p.excludes_zero and p.cell() == '+11.0 [+8.5, +13.5] *'
    p = results.paired_difference({0: 0.1, 1: 0.2, 2: 0.3}, {0: 0.2, 1: 0.3, 2: 0.41})
    assert p.excludes_zero and p.hi < 0                      # below zero counts too
    # one seed: a difference but no interval; none in common: nothing
    p = results.paired_difference({0: 0.5, 1: 0.6}, {0: 0.3})
    assert (p.n, p.lo, p.hi, p.unpaired) == (1, None, None, [1]) and not p.excludes_zero
    assert p.cell() == '+20.0 (1 seed: no interval)'
    assert results.paired_difference({1: 0.5}, {0: 0.3}).cell() == '– (no seed in common)'


@pytest.fixture
def paired_runs(tmp_path):
    """cls seeds 0-3, llip seeds 0-2 and 4 (so seeds 0-2 pair), avg seed 0; the differences
    llip - cls are those of test_paired_difference_by_hand."""
    values = {'cls': {0: (0.50, 0.1), 1: (0.60, 0.2), 2: (0.70, 0.3), 3: (0.40, 0.0)},
              'llip': {0: (0.60, 0.2), 1: (0.80, 0.32), 2: (0.75, 0.41), 4: (0.90, 0.5)},
              'avg': {0: (0.30, 0.3)}}
    return [fake_run(tmp_path / 'runs', f'pool={pool},seed={seed}', pool, seed,
                     dict(zip(METRICS, v)))
            for pool, by_seed in values.items() for seed, v in by_seed.items()]


def test_pairing_uses_the_seeds_both_pools_have(paired_runs, capsys):
    grouped = results.split_runs(results.load_runs(paired_runs), 'pool')
    rows = dict(results.paired_rows(grouped, 'cls', METRICS, 'pool'))
    assert list(rows) == ['avg', 'llip']                                     # ladder order, no cls
    assert rows['llip'][METRICS[0]].seeds == [0, 1, 2]
    assert rows['llip'][METRICS[0]].unpaired == [3, 4]
    assert rows['avg'][METRICS[0]].n == 1 and rows['avg'][METRICS[0]].unpaired == [1, 2, 3]
    err = capsys.readouterr().err
    assert 'pool=llip − cls: seed 3, 4 only on one side' in err
    assert 'pool=avg − cls: seed 1, 2, 3 only on one side' in err
    table = results.paired_table(list(rows.items()), 'pool', 'cls', METRICS)
    assert ('Left out of the pairing, on one side only: pool=avg: seed 1, 2, 3; '
            'pool=llip: seed 3, 4.') in table
    # two runs with one seed in one pool: which would pair is unknown, so that seed is left out
    twice = results.read_run(paired_runs[4])                                 # llip, seed 0
    members = [twice, *grouped[-1][1]]
    assert results.seed_values(members, METRICS[:1]) == {1: 0.80, 2: 0.75, 4: 0.90}
    results.warn_if_mixed(members, 'pool=llip')
    assert 'seed 0 more than once' in capsys.readouterr().err


def test_ablation_writes_the_paired_table(paired_runs, tmp_path, is_png):
    table = tmp_path / 'ablation.md'
    report.main(['ablation', *paired_runs, f'--table={table}',
                   f"--out={tmp_path / 'ablation.png'}"])
    assert is_png(tmp_path / 'ablation.png')
    text = table.read_text()
    # every metric by default; the per-pool table, then pool - cls paired by seed
    assert f'| pool | runs | {METRICS[0]} | {METRICS[1]} |' in text
    assert '| cls | 4 | 55.0 ± 12.9 | 15.0 ± 12.9 |' in text
    assert f'| pool − cls | seeds | {METRICS[0]} | {METRICS[1]} |' in text
    assert '| llip | 3 | +11.7 [-7.3, +30.6] | +11.0 [+8.5, +13.5] * |' in text
    assert '| avg | 1 | -20.0 (1 seed: no interval) | +20.0 (1 seed: no interval) |' in text
    # --metrics picks the columns; a baseline without runs: no paired table, no crash
    report.main(['ablation', *paired_runs, f'--metrics={METRICS[1]}', '--baseline=learned',
                   f'--table={table}', f"--out={tmp_path / 'ablation.png'}"])
    text = table.read_text()
    assert METRICS[0] not in text and METRICS[1] in text and '−' not in text


# ----------------------------------------------------------------------------- lr and pressure
def lr_runs(root, order=1):
    """Two seeds per (pool, lr); with both metrics llip is best at lr 3e-3, with the first alone
    at 1e-2; cls ties between 1e-3 and 3e-3. order=-1 writes them in the reverse order."""
    scores = {('llip', 1e-3): [(0.4, 0.2), (0.5, 0.3)], ('llip', 3e-3): [(0.6, 0.4), (0.7, 0.5)],
              ('llip', 1e-2): [(0.9, 0.0), (0.9, 0.0)],
              ('cls', 1e-3): [(0.5, 0.5), (0.6, 0.6)], ('cls', 3e-3): [(0.6, 0.6), (0.5, 0.5)]}
    return [fake_run(root, f'{pool},lr={lr:g},seed={seed}', pool, seed, dict(zip(METRICS, v)),
                     top={'lr': lr, 'eval_split': 'val'})
            for (pool, lr), by_seed in list(scores.items())[::order]
            for seed, v in enumerate(by_seed)]


def test_lr_picks_the_best_mean_and_breaks_ties_the_same_way(tmp_path, capsys):
    for order in (1, -1):
        runs = lr_runs(tmp_path / str(order), order)
        out, table = tmp_path / f'lr{order}.json', tmp_path / f'lr{order}.md'
        report.main(['lr', *runs, f"--metrics={','.join(METRICS)}", f'--out={out}',
                       f'--table={table}'])
        assert json.loads(out.read_text()) == {'cls': 1e-3, 'llip': 3e-3}
        assert '| llip | 35.0 (2) | **55.0 (2)** | 45.0 (2) | 0.003 |' in table.read_text()
        report.main(['lr', *runs, f'--metrics={METRICS[0]}', f'--out={out}'])
        assert json.loads(out.read_text()) == {'cls': 1e-3, 'llip': 1e-2}
    assert 'test split' not in capsys.readouterr().err
    # a tie up to rounding goes to the smaller lr, whatever the order of the dict
    assert report.pick_lr({3e-3: [0.3], 1e-3: [0.1 + 0.2], 1e-2: [0.2]}) == 1e-3
    assert report.pick_lr({1e-3: [0.2, 0.2], 3e-3: [0.1, 0.4]}) == 3e-3


def test_lr_warns_about_test_split_runs(tmp_path, capsys):
    runs = [fake_run(tmp_path, name, 'llip', seed, {METRICS[0]: 0.5},
                     top={'lr': 1e-3, 'eval_split': split})
            for seed, (name, split) in enumerate([('a', 'test'), ('b', 'test'), ('c', 'val')])]
    report.main(['lr', *runs, f'--metrics={METRICS[0]}', f"--out={tmp_path / 'lr.json'}"])
    err = capsys.readouterr().err
    assert 'test split' in err and 'val runs: a, b\n' in err    # the test runs, not val


@pytest.mark.parametrize('by', ['embed_dim', 'synthetic_objects'])
def test_pressure_writes_paired_numbers(tmp_path, by, is_png):
    """llip - cls at two values of a model_config field (embed_dim) or of a top-level flag
    (synthetic_objects)."""
    diffs = {0: [(0.60, 0.50), (0.80, 0.60), (0.75, 0.70)],        # llip, cls at seeds 0, 1, 2
             1: [(0.20, 0.10), (0.32, 0.20), (0.41, 0.30)]}
    values = {'embed_dim': (16, 64), 'synthetic_objects': (3, 5)}[by]
    runs = []
    for value, pairs in zip(values, diffs.values()):
        for seed, pair in enumerate(pairs):
            for pool, v in zip(('llip', 'cls'), pair):
                place = 'model' if by == 'embed_dim' else 'top'
                where = {} if value is None else {place: {by: value}}
                runs.append(fake_run(tmp_path, f'{pool},{by}={value},seed={seed}', pool, seed,
                                     {METRICS[0]: v}, **where))
    table, png = tmp_path / 'pressure.md', tmp_path / 'pressure.png'
    report.main(['pressure', *runs, f'--by={by}', f'--metrics={METRICS[0]}', '--baseline=cls',
                   '--pool=llip', f'--out={png}', f'--table={table}'])
    assert is_png(png)
    text = table.read_text()
    first, second = (16, 64) if by == 'embed_dim' else (3, 5)
    m = METRICS[0]
    assert f'| {by} | seeds | {m}: llip | {m}: cls | {m}: llip − cls |' in text
    assert f'| {first} | 3 | 71.7 ± 10.4 | 60.0 ± 10.0 | +11.7 [-7.3, +30.6] |' in text
    assert f'| {second} | 3 | 31.0 ± 10.5 | 20.0 ± 10.0 | +11.0 [+8.5, +13.5] * |' in text
