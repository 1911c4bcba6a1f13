"""
What train.py --eval runs during training, decided from its flags before step 1 (an EvalPlan)
and run on rank 0 at each evaluation: the synthetic splits with --data=synthetic, else the
zero-shot folder and the retrieval data given. The evaluations themselves are eval.py's.

    python -m pytest tests/test_trust_inputs.py -k "plan or class"   # bad inputs before step 1
"""
import os
import sys
from typing import NamedTuple

import torch

from eval import retrieval, synthetic_results, zeroshot
from eval_data import class_names_and_templates, clip_benchmark_layout, image_folder


class EvalPlan(NamedTuple):
    """What train.py --eval runs: a zero-shot (folder, class names, templates), a retrieval
    source, or the synthetic splits' root; each None when absent. `summary` says it in a line."""
    zeroshot: tuple | None
    retrieval: str | None
    synthetic_root: str | None
    summary: str

    @property
    def any(self):
        return any((self.zeroshot, self.retrieval, self.synthetic_root))


def training_plan(args):
    """train.py's EvalPlan, from its flags."""
    if not args.eval:
        return EvalPlan(None, None, None, 'eval: off')
    if args.data == 'synthetic':
        root = os.path.join(args.synthetic_dir, 'val' if args.eval_split == 'val' else '')
        return EvalPlan(None, None, root, f'eval: the synthetic {args.eval_split} splits ({root})')
    zeroshot_plan, said = None, []
    if args.zeroshot_data:
        try:   # before step 1, not at the first evaluation
            names, templates = class_names_and_templates(
                args.zeroshot_data, args.zeroshot_classnames, args.zeroshot_templates)
        except (ValueError, OSError) as e:
            raise SystemExit(f'error: --zeroshot_data={args.zeroshot_data}: {e}') from None
        if os.path.isdir(args.zeroshot_data) and not clip_benchmark_layout(args.zeroshot_data):
            try:   # which folder is which class, also before step 1
                image_folder(args.zeroshot_data, names)
            except (ValueError, OSError) as e:
                raise SystemExit(f'error: --zeroshot_data: {e}') from None
        zeroshot_plan = (args.zeroshot_data, names, templates)
        said.append(f'zero-shot on {args.zeroshot_data} ({len(names)} classes, '
                    f'{len(templates)} templates)')
    if args.retrieval_data:
        said.append(f'retrieval on {args.retrieval_data}')
    if not said:
        return EvalPlan(None, None, None, 'eval: nothing (real --data: give --zeroshot_data '
                                          'and/or --retrieval_data)')
    return EvalPlan(zeroshot_plan, args.retrieval_data, None, 'eval: ' + ', '.join(said))


def evaluate_plan(model, plan, device, autocast):
    """The EvalPlan's results as eval.py has them, {'zeroshot/<folder>': {tau: metrics},
    'retrieval': {tau: metrics}, ...} (eval.flatten makes log.jsonl's keys, eval.print_table a
    table); {} and a warning if the evaluation fails (the data changed under the run, ...):
    training goes on, a week of it is not lost to a bad image folder."""
    try:
        return _evaluate_plan(model, plan, device, autocast)
    except Exception as e:
        print(f'warning: the evaluation failed, training goes on: {type(e).__name__}: '
              f'{str(e).strip().splitlines()[0] if str(e).strip() else ""}', file=sys.stderr)
        return {}
    finally:
        model.train()


def _evaluate_plan(model, plan, device, autocast):
    model.eval()
    with torch.no_grad(), autocast:
        if plan.synthetic_root is not None:
            return synthetic_results(model, plan.synthetic_root, device=device)
        results = {}
        if plan.zeroshot:
            folder, names, templates = plan.zeroshot
            name = f'zeroshot/{os.path.basename(os.path.normpath(folder))}'
            results[name] = zeroshot(model, folder, names, templates, device=device)
        if plan.retrieval:
            results['retrieval'] = retrieval(model, plan.retrieval, device=device)
        return results
