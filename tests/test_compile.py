"""What this proves about the precision and compile paths train.py takes on a GPU, run here on CPU
(python -m pytest tests/test_compile.py):
- torch.compile of a tiny Llip gives the loss of the eager model, step after step of AdamW, to
  float tolerance, and gradients equal to eager's. Backend aot_eager: dynamo's graph capture and
  AOTAutograd's joint graph, where our code meets the compiler (the Gram loss's autograd
  Function, checkpointed blocks, einops); inductor's code generation, what `--compile` adds on
  top, takes minutes of gcc on a shared CPU and is left to `bench.py gpu` (c) on a GPU;
- training under bfloat16 autocast (as `--dtype=bfloat16`) runs through the whole step, the loss
  (computed in fp32 from bf16 pairs) falls on a fixed batch and follows the fp32 run loosely.
"""
from dataclasses import replace

import pytest
import torch

from model import PRESETS, Llip

CONFIG = replace(PRESETS['tiny'], vision_layers=1, text_layers=1, vocab_size=500,
                 context_length=8)


def losses(steps, compile=False, dtype=torch.float32, grad_ckpt=False, seed=0):
    """`steps` AdamW steps on one fixed batch: the loss of each, and the last gradients."""
    torch.manual_seed(seed)
    model = Llip(CONFIG)
    model.set_grad_checkpointing(grad_ckpt)
    run = torch.compile(model, backend='aot_eager') if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(16, 3, CONFIG.image_size, CONFIG.image_size)
    tokens = torch.randint(1, CONFIG.vocab_size, (16, CONFIG.context_length))
    out = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = run(images, tokens)
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize('grad_ckpt', [False, True])
def test_compiled_model_gives_the_eager_loss(grad_ckpt, one_thread):
    torch._dynamo.reset()
    eager, eager_grads = losses(3, grad_ckpt=grad_ckpt)
    compiled, compiled_grads = losses(3, compile=True, grad_ckpt=grad_ckpt)
    assert compiled == pytest.approx(eager, rel=1e-4)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_bfloat16_training_learns_and_follows_fp32(one_thread):
    fp32, _ = losses(15)
    bf16, grads = losses(15, dtype=torch.bfloat16)
    assert all(torch.isfinite(g).all() for g in grads)
    assert bf16[-1] < 0.7 * bf16[0]                      # it learns the fixed batch
    assert bf16 == pytest.approx(fp32, rel=0.1)          # and tracks fp32 loosely
