"""What this proves about loss.py (run: python -m pytest tests/test_loss.py):
- llip_loss, in both forms (plain: chunked with recomputation in backward; gram: hand-written
  gradients taken in the forward pass), equals a naive per-pair reference that builds every
  z_ij by hand — value and every gradient, float64, for chunk sizes that do and do not divide
  N; so does the materialising llip_loss_reference;
- the two forms agree to 1e-5 in fp32 at M K < D (loss, every gradient, inference cosines);
  the Gram matrix built from H = W_O W_O^T equals U U^T; a scaled loss scales the gradients;
- siglip_loss and clip_loss equal their textbook formulas;
- with uniform mixing (all keys zero) Llip's loss is SigLIP's loss on the averaged tokens;
- huge logits stay finite (logsigmoid, no exp/log by hand); bf16 autocast runs and agrees.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from loss import (clip_loss, contextual_cosine, contextual_cosine_gram, llip_loss, llip_loss_reference, mix,
                  mixer_gram, pairwise_cosine, siglip_loss, text_through_out_proj)

N, M, K, d = 7, 2, 3, 4
D = M * d


def make_inputs(seed=0, dtype=torch.float64, n_img=N, n_txt=N):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    return dict(keys=r(n_img, M, K, d), values=r(n_img, M, K, d), queries=r(n_txt, M, d),
                text_emb=F.normalize(r(n_txt, D), dim=-1), out_proj=r(D, D) / math.sqrt(D),
                logit_scale=torch.tensor(3.0, dtype=dtype), logit_bias=torch.tensor(-2.0, dtype=dtype))


def naive_llip(keys, values, queries, text_emb, out_proj, logit_scale, logit_bias, tau):
    """Eq. 1-3 written pair by pair, head by head, with no shared helper."""
    total = 0.0
    for i in range(keys.shape[0]):
        for j in range(queries.shape[0]):
            heads = []
            for m in range(M):
                phi = torch.softmax(keys[i, m] @ queries[j, m] / tau, dim=0)     # (K,)
                heads.append(phi @ values[i, m])                                # (d,)
            z = torch.cat(heads) @ out_proj
            cos = torch.dot(z / z.norm(), text_emb[j])
            y = 1.0 if i == j else -1.0
            total = total + torch.log1p(torch.exp(-y * (logit_scale * cos + logit_bias)))
    return total / keys.shape[0]


def value_and_grads(fn, inputs):
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    loss = fn(**leaves)
    loss.backward()
    return loss.detach(), {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize('form', ['plain', 'gram'])
@pytest.mark.parametrize('chunk_size', [1, 2, 3, 7, 100, None])
def test_llip_loss_chunked_equals_naive(chunk_size, form):
    inputs = make_inputs()
    ref_loss, ref_grads = value_and_grads(lambda **x: naive_llip(**x, tau=0.7), inputs)
    loss, grads = value_and_grads(lambda **x: llip_loss(**x, tau=0.7, chunk_size=chunk_size, form=form), inputs)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    for name in inputs:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_llip_loss_reference_equals_naive():
    inputs = make_inputs(seed=1)
    ref_loss, ref_grads = value_and_grads(lambda **x: naive_llip(**x, tau=5.0), inputs)
    loss, grads = value_and_grads(lambda **x: llip_loss_reference(**x, tau=5.0), inputs)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    for name in inputs:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_mix_is_a_softmax_over_mixture_tokens():
    x = make_inputs()
    mixed = mix(x['queries'], x['keys'], x['values'], tau=2.0)                   # (I, T, M*d)
    phi = torch.softmax(torch.einsum('tmd,imkd->itmk', x['queries'], x['keys']) / 2.0, dim=-1)
    by_hand = torch.einsum('itmk,imkd->itmd', phi, x['values']).reshape(N, N, D)
    torch.testing.assert_close(mixed, by_hand)
    assert torch.allclose(phi.sum(-1), torch.ones(()).double())


def test_gram_form_equals_plain_form_in_fp32():
    """W_O moved off the pair axis: same cosines and gradients to 1e-5 in fp32, at M K < D."""
    g = torch.Generator().manual_seed(6)
    I, T, heads, k, d = 9, 11, 4, 3, 8
    x = dict(keys=torch.randn(I, heads, k, d, generator=g), values=torch.randn(I, heads, k, d, generator=g),
             queries=torch.randn(T, heads, d, generator=g),
             text_emb=F.normalize(torch.randn(T, heads * d, generator=g), dim=-1),
             out_proj=torch.randn(heads * d, heads * d, generator=g) / (heads * d) ** 0.5)
    plain = lambda keys, values, queries, text_emb, out_proj: contextual_cosine(
        keys, values, queries, text_emb, out_proj, 3.0)
    gram = lambda keys, values, queries, text_emb, out_proj: contextual_cosine_gram(
        keys, values, queries, text_through_out_proj(text_emb, out_proj, heads), mixer_gram(values, out_proj), 3.0)
    weights = torch.randn(I, T, generator=g)           # a random linear read-out of the cosines
    results = [value_and_grads(lambda **v: (f(**v) * weights).sum(), x) for f in (plain, gram)]
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for name in x:
        torch.testing.assert_close(results[1][1][name], results[0][1][name], rtol=1e-5, atol=1e-5, msg=name)


def fp32_inputs(seed, I, T, heads, k, d):
    g = torch.Generator().manual_seed(seed)
    return dict(keys=torch.randn(I, heads, k, d, generator=g), values=torch.randn(I, heads, k, d, generator=g),
                queries=torch.randn(T, heads, d, generator=g),
                text_emb=F.normalize(torch.randn(T, heads * d, generator=g), dim=-1),
                out_proj=torch.randn(heads * d, heads * d, generator=g) / (heads * d) ** 0.5,
                logit_scale=torch.tensor(10.0), logit_bias=torch.tensor(-3.0))


@pytest.mark.parametrize('chunk_size', [4, 5, None])
def test_llip_loss_gram_equals_plain_in_fp32(chunk_size):
    """The fast form (gradients by hand, images chunked) against the readable one, M K < D."""
    x = fp32_inputs(7, 12, 12, 4, 3, 8)
    plain = value_and_grads(lambda **v: llip_loss(**v, tau=2.0, chunk_size=5, form='plain'), x)
    gram = value_and_grads(lambda **v: llip_loss(**v, tau=2.0, chunk_size=chunk_size, form='gram'), x)
    torch.testing.assert_close(gram[0], plain[0], rtol=1e-5, atol=1e-5)
    for name in x:
        torch.testing.assert_close(gram[1][name], plain[1][name], rtol=1e-5, atol=1e-5, msg=name)


def test_llip_loss_gram_scaled_loss_and_partial_grads():
    """backward scales the stored gradients by the incoming gradient; inputs without
    requires_grad get none; under no_grad the value is the same."""
    x = make_inputs(seed=8)
    loss, grads = value_and_grads(lambda **v: llip_loss(**v, tau=1.5, chunk_size=3, form='gram'), x)
    keys = x['keys'].clone().requires_grad_()
    (3 * llip_loss(**{**x, 'keys': keys}, tau=1.5, chunk_size=3, form='gram')).backward()
    torch.testing.assert_close(keys.grad, 3 * grads['keys'], rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(llip_loss(**x, tau=1.5, form='gram'), loss, rtol=1e-12, atol=1e-12)


def test_gram_from_out_gram_equals_u_ut():
    x = make_inputs(seed=9)
    u = torch.einsum('imkd,mde->imke', x['values'], x['out_proj'].reshape(M, d, D)).reshape(N, M * K, D)
    torch.testing.assert_close(mixer_gram(x['values'], x['out_proj']), u @ u.transpose(1, 2))


@pytest.mark.parametrize('chunk_size', [1, 4, 100])
def test_pairwise_cosine_forms_agree(chunk_size):
    x = fp32_inputs(10, 9, 11, 4, 3, 8)
    args = [x[k] for k in ('keys', 'values', 'queries', 'text_emb', 'out_proj')]
    plain = contextual_cosine(*args, 3.0)
    with torch.no_grad():
        for form in ('plain', 'gram', 'auto'):
            torch.testing.assert_close(pairwise_cosine(*args, 3.0, chunk_size, form), plain, rtol=1e-5, atol=1e-5)


def test_siglip_and_clip_match_formulas():
    g = torch.Generator().manual_seed(2)
    img = F.normalize(torch.randn(5, 6, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(5, 6, generator=g, dtype=torch.float64), dim=-1)
    a, b = torch.tensor(4.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    logits = a * img @ txt.T + b
    y = 2 * torch.eye(5, dtype=torch.float64) - 1
    expected = torch.log1p(torch.exp(-y * logits)).sum() / 5
    torch.testing.assert_close(siglip_loss(img, txt, a, b), expected)
    sims = a * img @ txt.T
    i2t = -(sims.diag() - sims.logsumexp(dim=1)).mean()
    t2i = -(sims.diag() - sims.logsumexp(dim=0)).mean()
    torch.testing.assert_close(clip_loss(img, txt, a), (i2t + t2i) / 2)


def test_uniform_mixing_reduces_to_siglip():
    x = make_inputs(seed=3)
    x['keys'] = torch.zeros_like(x['keys'])            # every logit 0 -> Phi = 1/K
    z = x['values'].mean(dim=2).reshape(N, D) @ x['out_proj']
    expected = siglip_loss(F.normalize(z, dim=-1), x['text_emb'], x['logit_scale'], x['logit_bias'])
    torch.testing.assert_close(llip_loss(**x, tau=5.0, chunk_size=3), expected)


def test_huge_logits_stay_finite():
    x = make_inputs(seed=4, dtype=torch.float32)
    x['logit_scale'] = torch.tensor(1e6)
    loss, grads = value_and_grads(lambda **v: llip_loss(**v, tau=5.0, chunk_size=2), x)
    assert torch.isfinite(loss) and loss > 1e4
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_bf16_autocast_agrees_with_fp32():
    x = make_inputs(seed=5, dtype=torch.float32)
    loss32, grads32 = value_and_grads(lambda **v: llip_loss(**v, tau=5.0, chunk_size=3), x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss16, grads16 = value_and_grads(lambda **v: llip_loss(**v, tau=5.0, chunk_size=3), x)
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(loss16, loss32, rtol=3e-2, atol=3e-2)
    for name in x:
        assert grads16[name].dtype == x[name].dtype
        torch.testing.assert_close(grads16[name], grads32[name], rtol=0.1, atol=0.05, msg=name)
