"""What this proves about loss.py and loss_gram.py (run: python -m pytest tests/test_loss.py):
- llip_loss, in all three forms (plain: chunks of images, each recomputed in backward by
  torch.utils.checkpoint; gram and mixed, loss_gram.py: hand-written gradients taken in the
  forward pass), equals a naive per-pair reference that builds every z_ij by hand — value and
  every gradient, float64, for chunk sizes that do and do not divide N, and for a slice of the
  images whose positives start at an offset (another rank's); so does the materialising
  llip_loss_reference;
- no form keeps anything per pair for backward (the materialising reference does);
- the fast forms agree with the plain one to 1e-5 in fp32 at M K < D and at M K > D (loss,
  every gradient, inference cosines, and the Gram cosines' own autograd gradients); the Gram
  matrix built from H = W_O W_O^T equals U U^T; a scaled loss scales the gradients; an unknown
  form is refused by name; 'auto' takes the form that was measured faster at seven shapes;
- siglip_loss and clip_loss equal their textbook formulas;
- with uniform mixing (all keys zero) Llip's loss is SigLIP's loss on the averaged tokens;
- huge logits stay finite (logsigmoid, no exp/log by hand); bf16 autocast runs and agrees.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import loss_gram
from loss import (clip_loss, contextual_cosine, llip_loss, llip_loss_reference, mix,
                  mixing_weights, pairwise_cosine, pick_form, siglip_loss, sigmoid_loss_sum)
from model import ImageFeatures, TextFeatures

N, M, K, d = 7, 2, 3, 4
D = M * d


def make_inputs(seed=0, dtype=torch.float64, n_img=N, n_txt=N):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    return dict(keys=r(n_img, M, K, d), values=r(n_img, M, K, d), queries=r(n_txt, M, d),
                text_emb=F.normalize(r(n_txt, D), dim=-1), out_proj=r(D, D) / math.sqrt(D),
                a=torch.tensor(3.0, dtype=dtype),
                b=torch.tensor(-2.0, dtype=dtype))


def on_features(fn, tau, **kwargs):
    """fn in the call shape of llip_loss, as a function of make_inputs' flat tensors."""
    def call(keys, values, queries, text_emb, out_proj, a, b):
        image, text = ImageFeatures(keys=keys, values=values), TextFeatures(queries, text_emb)
        return fn(image, text, out_proj, tau, a, b, **kwargs)
    return call


def naive_llip(keys, values, queries, text_emb, out_proj, a, b, tau):
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
            total = total + torch.log1p(torch.exp(-y * (a * cos + b)))
    return total / keys.shape[0]


def value_and_grads(fn, inputs):
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    loss = fn(**leaves)
    loss.backward()
    return loss.detach(), {k: v.grad for k, v in leaves.items()}


FORMS = ['plain', 'gram', 'mixed']


@pytest.mark.parametrize('form', FORMS)
@pytest.mark.parametrize('chunk_size', [1, 2, 3, 7, 100, None])
def test_llip_loss_chunked_equals_naive(chunk_size, form):
    inputs = make_inputs()
    ref_loss, ref_grads = value_and_grads(lambda **x: naive_llip(**x, tau=0.7), inputs)
    llip = on_features(llip_loss, 0.7, chunk_size=chunk_size, form=form)
    loss, grads = value_and_grads(llip, inputs)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    for name in inputs:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_llip_loss_reference_equals_naive():
    inputs = make_inputs(seed=1)
    ref_loss, ref_grads = value_and_grads(lambda **x: naive_llip(**x, tau=5.0), inputs)
    loss, grads = value_and_grads(on_features(llip_loss_reference, 5.0), inputs)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    for name in inputs:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_mix_is_a_softmax_over_mixture_tokens():
    x = make_inputs()
    mixed = mix(x['queries'], x['keys'], x['values'], tau=2.0)                   # (I, T, M*d)
    phi = torch.softmax(torch.einsum('tmd,imkd->itmk', x['queries'], x['keys']) / 2.0, dim=-1)
    by_hand = torch.einsum('itmk,imkd->itmd', phi, x['values']).reshape(N, N, D)
    torch.testing.assert_close(mixed, by_hand)
    torch.testing.assert_close(mixing_weights(x['queries'], x['keys'], tau=2.0), phi)
    assert torch.allclose(phi.sum(-1), torch.ones(()).double())


def largest_saved_for_backward(fn, inputs):
    """The most elements of any one tensor that autograd keeps for backward while fn runs."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    sizes = [0]

    def pack(t):
        sizes.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(**leaves)
    return max(sizes)


@pytest.mark.parametrize('form', FORMS)
def test_nothing_per_pair_is_kept_for_backward(form):
    """Per pair z_ij has D numbers: the chunked forms keep no tensor that large, only tensors
    of the inputs' size (plain: checkpoint keeps the inputs; gram: the finished gradients)."""
    x = make_inputs(seed=11)
    pairs = N * N * D
    largest_input = max(v.numel() for v in x.values())
    assert largest_input < pairs
    assert largest_saved_for_backward(on_features(llip_loss_reference, 2.0), x) >= pairs
    assert largest_saved_for_backward(on_features(llip_loss, 2.0, chunk_size=2, form=form), x) \
        <= largest_input


def fp32_inputs(seed, I, T, heads, k, d):
    g = torch.Generator().manual_seed(seed)
    return dict(keys=torch.randn(I, heads, k, d, generator=g),
                values=torch.randn(I, heads, k, d, generator=g),
                queries=torch.randn(T, heads, d, generator=g),
                text_emb=F.normalize(torch.randn(T, heads * d, generator=g), dim=-1),
                out_proj=torch.randn(heads * d, heads * d, generator=g) / (heads * d) ** 0.5,
                a=torch.tensor(10.0), b=torch.tensor(-3.0))


def test_gram_cosines_equal_plain_cosines_in_fp32():
    """The derivation itself: W_O moved off the pair axis gives the same cosines, and (through
    the Gram form's own autograd, not its hand-written backward) the same gradients, at M K < D.
    loss_gram.gram_cosine is what Llip.similarity runs; autograd through it is for this test."""
    x = fp32_inputs(6, 9, 11, 4, 3, 8)
    del x['a'], x['b']
    plain = lambda keys, values, queries, text_emb, out_proj: contextual_cosine(
        ImageFeatures(keys=keys, values=values), TextFeatures(queries, text_emb), out_proj, 3.0)
    gram = lambda keys, values, queries, text_emb, out_proj: loss_gram.gram_cosine(
        keys, values, queries, text_emb, out_proj, 3.0, chunk=4)
    weights = torch.randn(9, 11, generator=torch.Generator().manual_seed(6))   # a linear read-out
    results = [value_and_grads(lambda **v: (f(**v) * weights).sum(), x) for f in (plain, gram)]
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for name in x:
        torch.testing.assert_close(results[1][1][name], results[0][1][name], rtol=1e-5, atol=1e-5,
                                   msg=name)


# (heads, K, d): M K = 12 < D = 32, where the Gram form is the default, and M K = 36 > D = 16
SHAPES = [(4, 3, 8), (4, 9, 4)]


@pytest.mark.parametrize('form', ['gram', 'mixed'])
@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('chunk_size', [4, 5, None])
def test_fast_forms_equal_plain_in_fp32(chunk_size, shape, form):
    """The fast forms (gradients by hand, images chunked) against the readable one."""
    x = fp32_inputs(7, 12, 12, *shape)
    plain = value_and_grads(on_features(llip_loss, 2.0, chunk_size=5, form='plain'), x)
    fast = value_and_grads(on_features(llip_loss, 2.0, chunk_size=chunk_size, form=form), x)
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-5, atol=1e-5)
    for name in x:
        torch.testing.assert_close(fast[1][name], plain[1][name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize('form', ['gram', 'mixed'])
@pytest.mark.parametrize('shape', SHAPES)
def test_fast_forms_on_another_ranks_slice_equal_plain_in_float64(shape, form):
    """Images 3..8 of a batch against all 12 captions: their positives are captions 3..8 (the
    offset a rank passes), value and every gradient as the plain sum, float64."""
    x = {k: v.double() for k, v in fp32_inputs(12, 12, 12, *shape).items()}
    x['keys'], x['values'] = x['keys'][3:9], x['values'][3:9]
    fast_sum = loss_gram.mixed_loss_sum if form == 'mixed' else loss_gram.gram_loss_sum

    def fast(keys, values, queries, text_emb, out_proj, a, b):
        return fast_sum(keys, values, queries, text_emb, out_proj, 2.0, a, b,
                        offset=3, chunk=4)

    def plain(keys, values, queries, text_emb, out_proj, a, b):
        cos = contextual_cosine(ImageFeatures(keys=keys, values=values),
                                TextFeatures(queries, text_emb), out_proj, 2.0)
        return sigmoid_loss_sum(cos, a, b, offset=3)
    expected, expected_grads = value_and_grads(plain, x)
    loss, grads = value_and_grads(fast, x)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for name in x:
        assert grads[name].shape == x[name].shape, name      # a, b: 0-d
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-10, atol=1e-12,
                                   msg=name)


@pytest.mark.parametrize('form', ['gram', 'mixed'])
def test_fast_forms_scaled_loss_and_partial_grads(form):
    """backward scales the stored gradients by the incoming gradient; inputs without
    requires_grad get none; under no_grad the value is the same."""
    x = make_inputs(seed=8)
    fast = on_features(llip_loss, 1.5, chunk_size=3, form=form)
    loss, grads = value_and_grads(fast, x)
    keys = x['keys'].clone().requires_grad_()
    (3 * fast(**{**x, 'keys': keys})).backward()
    torch.testing.assert_close(keys.grad, 3 * grads['keys'], rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(on_features(llip_loss, 1.5, form=form)(**x), loss,
                                   rtol=1e-12, atol=1e-12)


def test_gram_from_out_gram_equals_u_ut():
    x = make_inputs(seed=9)
    u = torch.einsum('imkd,mde->imke', x['values'], x['out_proj'].reshape(M, d, D))
    u = u.reshape(N, M * K, D)
    out_gram = x['out_proj'] @ x['out_proj'].T
    torch.testing.assert_close(loss_gram.gram_from_out_gram(x['values'], out_gram),
                               u @ u.transpose(1, 2))


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('chunk_size', [1, 4, 100, None])
def test_pairwise_cosine_forms_agree(chunk_size, shape):
    x = fp32_inputs(10, 9, 11, *shape)
    image = ImageFeatures(keys=x['keys'], values=x['values'])
    text = TextFeatures(x['queries'], x['text_emb'])
    plain = contextual_cosine(image, text, x['out_proj'], 3.0)
    with torch.no_grad():
        for form in ('plain', 'gram', 'mixed', 'auto'):
            torch.testing.assert_close(pairwise_cosine(image, text, x['out_proj'], 3.0, chunk_size,
                                                       form), plain, rtol=1e-5, atol=1e-5)
    # the mixed form has no autograd: asked for gradients it gives the plain form's
    out_proj = x['out_proj'].clone().requires_grad_()
    with_grad = pairwise_cosine(image, text, out_proj, 3.0, chunk_size, 'mixed')
    assert with_grad.requires_grad
    torch.testing.assert_close(with_grad.detach(), plain, rtol=1e-5, atol=1e-5)


def test_the_switch_takes_the_form_measured_faster_and_refuses_unknown_forms():
    """pick_form('auto') against the forms measured faster (loss.py's comment at the switch:
    bench.py loss, N = 256, M = 8, one CPU thread), by (D, K)."""
    measured = {(64, 16): 'mixed', (128, 16): 'mixed', (128, 32): 'mixed', (256, 16): 'gram',
                (256, 32): 'mixed', (512, 32): 'gram', (512, 64): 'mixed'}
    for (dim, k), faster in measured.items():
        assert pick_form('auto', torch.zeros(1, 8, k, dim // 8), 256) == faster, (dim, k)
    assert pick_form('plain', torch.zeros(1, 4, 3, 8), 256) == 'plain'
    x = make_inputs()
    with pytest.raises(ValueError, match='form='):
        on_features(llip_loss, 1.0, form='fast')(**x)


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


@pytest.mark.parametrize('form', FORMS)
def test_uniform_mixing_reduces_to_siglip(form):
    x = make_inputs(seed=3)
    x['keys'] = torch.zeros_like(x['keys'])            # every logit 0 -> Phi = 1/K
    z = x['values'].mean(dim=2).reshape(N, D) @ x['out_proj']
    expected = siglip_loss(F.normalize(z, dim=-1), x['text_emb'], x['a'], x['b'])
    torch.testing.assert_close(on_features(llip_loss, 5.0, chunk_size=3, form=form)(**x), expected)


@pytest.mark.parametrize('form', FORMS)
def test_huge_logits_stay_finite(form):
    x = make_inputs(seed=4, dtype=torch.float32)
    x['a'] = torch.tensor(1e6)
    loss, grads = value_and_grads(on_features(llip_loss, 5.0, chunk_size=2, form=form), x)
    assert torch.isfinite(loss) and loss > 1e4
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize('form', FORMS)
def test_bf16_autocast_agrees_with_fp32(form):
    x = make_inputs(seed=5, dtype=torch.float32)
    llip = on_features(llip_loss, 5.0, chunk_size=3, form=form)
    loss32, grads32 = value_and_grads(llip, x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss16, grads16 = value_and_grads(llip, x)
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(loss16, loss32, rtol=3e-2, atol=3e-2)
    for name in x:
        assert grads16[name].dtype == x[name].dtype
        torch.testing.assert_close(grads16[name], grads32[name], rtol=0.1, atol=0.05, msg=name)
