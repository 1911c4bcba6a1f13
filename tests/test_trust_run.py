"""What this proves about a training run's evaluations and ranks (issue 23, items 12, 14 and
19), on a very small model and the built-in synthetic data, CPU only
(run: python -m pytest tests/test_trust_run.py):
- the checkpoint of a save step and of the last step, and the step's line in log.jsonl, are
  written before its evaluation begins (what a run killed during an evaluation leaves); an
  evaluation step that is not a save step writes no checkpoint (--save_every decides);
- the final evaluation is printed as eval.py's table;
- ranks started by hand (RANK=0 WORLD_SIZE=2, or RANK=1 with no rank 0) say what they wait for
  and stop after --rendezvous_timeout with one line naming the address, not a silent wait.
"""
import importlib
import io
import os
import subprocess
import sys
import time
from contextlib import redirect_stdout

import pytest

import checkpoint
import eval as llip_eval
import eval_plan
import metrics
from conftest import ROOT, SMALL, free_port, log_lines

# SMALL has --no-eval: these runs evaluate
EVALUATED = [a for a in SMALL if a != '--no-eval'] + ['--eval', '--workers=0']

def test_saved_before_evaluating_and_the_final_evaluation_is_a_table(tmp_path, synthetic,
                                                                     monkeypatch, capsys):
    """A run killed during an evaluation (a crash, kill -9) leaves what was on disk when the
    evaluation began: the spy reads it then."""
    out = str(tmp_path / 'run')
    saved_when_evaluated, logged_when_evaluated, results = [], [], []
    real = eval_plan.evaluate_plan

    def spy(*args):   # the real evaluation at the end; before, a stand-in (faster)
        saved_when_evaluated.append([int(p[-10:-3]) for p in checkpoint.paths(out)])
        logged_when_evaluated.append([r['step'] for r in log_lines(out) if 'loss' in r])
        final = len(saved_when_evaluated) == 3
        results.append(real(*args) if final else {'zeroshot/x': {5.0: {'top1': 0.25}}})
        return results[-1]
    monkeypatch.setattr(eval_plan, 'evaluate_plan', spy)
    monkeypatch.setattr(sys, 'argv', ['train.py', f'--out_dir={out}',
                                      f'--synthetic_dir={synthetic}', *EVALUATED, '--steps=3',
                                      '--save_every=2', '--eval_every=1'])
    importlib.import_module('train').main()
    # step 1: an evaluation step only, no checkpoint; steps 2 and 3 saved before evaluated, and
    # each step's line in log.jsonl before its evaluation
    assert saved_when_evaluated == [[], [2], [3, 2]]
    assert logged_when_evaluated == [[1], [1, 2], [1, 2, 3]]
    printed = capsys.readouterr().out
    table = io.StringIO()
    with redirect_stdout(table):
        metrics.print_table(results[-1])
    assert 'step 3, final evaluation' in printed and table.getvalue() in printed, printed
    assert 'step 1 eval: zeroshot/x/top1 0.250\n' in printed, 'the others: one line each'
    final = [r for r in log_lines(out) if r['step'] == 3]
    assert 'loss' in final[0] and final[-1] == {'step': 3, **llip_eval.flatten(results[-1])}


# ---------------------------------------------------------------- ranks started by hand
def test_ranks_started_by_hand_time_out_with_one_line(tmp_path, synthetic):
    """Rank 0 alone, and rank 1 with no rank 0: side by side (they mostly wait), at two ports
    so that they do not meet."""
    start, ranks = time.time(), {}
    for rank in ('0', '1'):
        port = free_port()
        env = {**os.environ, 'RANK': rank, 'WORLD_SIZE': '2', 'MASTER_ADDR': '127.0.0.1',
               'MASTER_PORT': str(port), 'OMP_NUM_THREADS': '1'}
        ranks[rank] = port, subprocess.Popen(
            [sys.executable, os.path.join(ROOT, 'train.py'), f'--out_dir={tmp_path / rank}',
             f'--synthetic_dir={synthetic}', *SMALL, '--workers=0', '--steps=1',
             '--rendezvous_timeout=2'], cwd=ROOT, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for rank, (port, proc) in ranks.items():
        stderr = proc.communicate(timeout=120)[1]
        lines = stderr.strip().splitlines()
        assert proc.returncode == 1 and 'Traceback' not in stderr, stderr[-3000:]
        assert f'rank {rank}: waiting up to 2 s for 2 ranks at 127.0.0.1:{port}' in lines[0]
        assert lines[-1].startswith(f'error: rank {rank} waited ') and \
            f'127.0.0.1:{port}' in lines[-1]
        assert 'torchrun' in lines[-1] and '--rendezvous_timeout=2' in lines[-1]
        assert len(lines) == 2, 'no C++ trace from torch'
    assert time.time() - start < 60


def test_a_rendezvous_timeout_that_is_not_positive_is_refused():
    train_py = importlib.import_module('train')
    with pytest.raises(SystemExit, match='^error: --rendezvous_timeout=0.0: must be a number'):
        train_py.check_flags(train_py.parser.parse_args(['--rendezvous_timeout=0']))
