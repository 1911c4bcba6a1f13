"""What this proves about the planner, bench_plan.py (run: python -m pytest tests/test_plan.py):
- its memory arithmetic matches the real model on CPU, for two presets (B/16 and H/14 shapes,
  fewer layers, smaller images), with and without grad_ckpt, one fp32 training step at batch 16:
  the whole step's peak (state + activations + the loss's workspace or the block rebuilt in
  backward) within 25 % of the peak of live tensors measured (LiveMemory); the activations kept
  for backward within 15 %; without grad_ckpt the peak of forward + backward alone within 25 %
  (with it, that peak is dominated by the largest weight's gradient, W_K: part of the state);
- its FLOPs match torch.utils.flop_counter.FlopCounterMode on the same step within 5 %, by part
  too (towers, and the loss alone at two ranks' shapes);
- the parameter count is the model's; the largest micro-batch fits, the next divisor does not;
- `bench.py plan` refuses an unknown preset or GPU and a batch that does not divide, in one line.
"""
import runpy
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import bench_plan
from model import PRESETS, ImageFeatures, Llip, TextFeatures

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize('grad_ckpt', [False, True])
@pytest.mark.parametrize('name', ['vit_b16', 'vit_h14'])
def test_memory_and_flops_match_the_real_model(name, grad_ckpt, one_thread):
    config, batch = bench_plan.validation_configs()[name], 16
    measured = bench_plan.measured_step(config, batch, grad_ckpt)
    plan = bench_plan.memory_plan(config, batch, batch, 1, 'none', grad_ckpt, 'float32', 'cpu')
    kept = batch * bench_plan.activation_bytes(config, 'float32', grad_ckpt)['kept']
    assert plan['state'] == pytest.approx(measured['state'], rel=1e-6)   # 16 bytes a parameter
    assert 0.75 < plan['total'] / measured['peak'] < 1.25
    assert 0.85 < kept / measured['kept'] < 1.15
    if not grad_ckpt:
        assert 0.75 < (plan['activations'] + plan['transient']) / measured['activations'] < 1.25
    flops = bench_plan.flops_per_step(config, batch, 1, grad_ckpt)['total']
    assert abs(flops / measured['flops'] - 1) < 0.05


def count_flops(fn):
    from bench import step_flops
    return step_flops(fn)


def test_flops_by_part(one_thread):
    """The towers' FLOPs alone, and the loss alone with the shapes one of two ranks sees (its 4
    images against 8 captions), each within 5 % of what torch counts."""
    c = bench_plan.validation_configs()['vit_b16']
    torch.manual_seed(0)
    model = Llip(c)
    images = torch.randn(4, 3, c.image_size, c.image_size)
    tokens = torch.randint(1, c.vocab_size, (4, c.context_length))

    def towers():
        h, g = model.visual(images), model.text(tokens)
        (h.sum() + g.sum()).backward()
    assert abs(bench_plan.tower_flops(c, 4) / count_flops(towers) - 1) < 0.05

    from loss import llip_loss
    D, M, K = c.embed_dim, c.mixer_heads, c.num_mixture
    leaf = lambda *s: torch.randn(*s).requires_grad_()
    image = ImageFeatures(keys=leaf(4, M, K, D // M), values=leaf(4, M, K, D // M))
    text = TextFeatures(leaf(8, M, D // M), leaf(8, D))
    out_proj = leaf(D, D)
    loss = lambda: llip_loss(image, text, out_proj, 5.0, 10.0, -10.0).backward()
    # all ranks together: twice one rank's count (the per-GPU H and W_O z'_j included)
    assert abs(bench_plan.loss_flops(c, 8, 2) / (2 * count_flops(loss)) - 1) < 0.05


def test_parameter_count_is_the_models():
    for name in ('tiny', 'vit_b16'):
        counted = bench_plan.count_parameters(PRESETS[name])
        # the parameters the model has, built on meta (the same on any device): B/16's 175 M
        # initial values drawn on CPU would be 2 s
        with torch.device('meta'):
            model = Llip(PRESETS[name])
        assert counted['total'] == sum(p.numel() for p in model.parameters())
        assert counted['vision'] + counted['text'] + counted['mixer'] == counted['total']


def test_largest_micro_batch_fits_and_the_next_does_not():
    c, gb, gpus = PRESETS['vit_b16'], 32768, 64
    budget = 0.9 * 40e9
    b = bench_plan.largest_micro_batch(c, 40, gpus, gb)
    local = gb // gpus
    assert b > 0 and local % b == 0
    assert bench_plan.memory_plan(c, b, gb, gpus)['total'] <= budget
    bigger = [d for d in range(b + 1, local + 1) if local % d == 0]
    assert not bigger or bench_plan.memory_plan(c, bigger[0], gb, gpus)['total'] > budget
    # checkpointing frees memory: at least as large a micro-batch; fsdp frees state
    assert bench_plan.largest_micro_batch(c, 40, gpus, gb, grad_ckpt=True) >= b
    assert bench_plan.largest_micro_batch(PRESETS['vit_g14'], 8, 8, gb) == 0
    with pytest.raises(ValueError, match='not divisible'):
        bench_plan.largest_micro_batch(c, 80, 7, gb)


@pytest.mark.parametrize('argv, cause', [
    (['--model=vit_x'], 'unknown preset'),
    (['--gpu=v100'], 'unknown GPU'),
    (['--global_batch=1000', '--gpus=64'], 'not divisible by 64'),
    (['--global_batch=32768', '--gpus=256', '--batch_size=96'], 'does not divide the 128'),
    (['--gpus=8,x'], 'comma'),
])
def test_bad_input_is_one_line(argv, cause):
    error = bench_plan.main(argv)
    assert isinstance(error, str) and '\n' not in error and cause in error


def bench_py(monkeypatch, capsys, *argv):
    """`python bench.py *argv` in this process: bench.py run as __main__ (runpy), as a user's
    python runs it but without starting one and importing torch again (2.5 s each). Returns
    (the exit code, stdout): sys.exit(message) is what python prints to stderr, exiting 1."""
    monkeypatch.setattr(sys, 'argv', ['bench.py', *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / 'bench.py'), run_name='__main__')
    return stop.value.code, capsys.readouterr().out


def test_bench_plan_command_line(monkeypatch, capsys):
    """Through bench.py's command line: the table, and an error without a traceback."""
    code, out = bench_py(monkeypatch, capsys, 'plan', '--model=tiny', '--gpus=8')
    assert code is None                              # exit status 0
    rows = [line for line in out.splitlines() if line.split()[:1] == ['tiny']]
    assert len(rows) == 4                            # shard none / fsdp x grad_ckpt no / yes
    code, _ = bench_py(monkeypatch, capsys, 'plan', '--gpu=tpu')
    # a message, not an exception: python prints it alone on stderr and exits with status 1
    assert isinstance(code, str) and code.strip().count('\n') == 0
    assert 'unknown GPU' in code


def test_flops_scale_as_the_paper_says():
    """The pairwise part grows with the square of the batch (nearly), the towers linearly."""
    c = replace(PRESETS['vit_b16'])
    small, big = (bench_plan.flops_per_step(c, n, 1) for n in (4096, 8192))
    assert big['towers'] == pytest.approx(2 * small['towers'])
    assert big['loss'] / small['loss'] == pytest.approx(4, rel=0.05)   # + per-image G_i
