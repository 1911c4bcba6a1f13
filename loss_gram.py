"""
The fast exact forms of Llip's pairwise part: the same cosines cos(z_ij, z'_j) and the same loss
as loss.py's readable form, with W_O moved off the pair axis and, for the loss, the gradients
written by hand. loss.pick_form is the one place that chooses between them (form='auto': the
gram form when M K < D, as in ViT-B/16 and larger; the mixed form when M K > D, as in the tiny
preset); tests/test_loss.py checks both against the readable form.

Write U_i^{mk} = V_i^{mk} W_O^m (what token k of head m adds to z_ij per unit of mixing weight;
W_O^m = rows m*d..(m+1)*d of W_O). Then z_ij = sum_mk Phi_ij^{mk} U_i^{mk}, so

    z_ij . z'_j = sum_mk Phi_ij^{mk} A_ij^{mk}    A_ij^{mk} = V_i^{mk} . s_j^m,  s_j = W_O z'_j
    |z_ij|^2    = Phi_ij^T G_i Phi_ij             G_i = U_i U_i^T per image (MK x MK)

Per pair this costs 2 K D + (M K)^2 instead of 2 K D + D^2: cheaper whenever M K < D
(ViT-B/16: M K = 256, D = 512; bigG: 512 vs 1280). Every step is a batched matmul:
    logits and A   (2M, I K, d) @ (2M, d, T)      heads (and keys | values) as the batch axis
    G_i Phi_i      (I, MK, MK) @ (I, MK, T)       images as the batch axis
so the pair tensors live head-major, (M, I, K, T), with one copy to image-major for G.
The mixed form (below) takes |z_ij|^2 through H = W_O W_O^T instead, for when M K > D.

Shapes as in loss.py: keys, values (I, M, K, d); queries (T, M, d); text_emb (T, D), normalised;
out_proj (D, D) = W_O; d = D/M. Every entry point takes `chunk` images at a time, against every
caption:
    gram_cosine     (I, T) cosines, for inference (model.Llip.similarity), autograd if enabled
    gram_loss_sum   the summed sigmoid loss of eq. 3, gradients by hand (_GramSigmoidLoss)
    mixed_cosine, mixed_loss_sum    the same two in the mixed form (_MixedSigmoidLoss)

    python -m pytest tests/test_loss.py     # these forms == the readable one, value and gradients
"""
import functools
import math

import torch
import torch.nn.functional as F
from einops import einsum, rearrange

# Default chunk: chunk x N_txt x M x K mixing weights at once. On CPU a chunk that stays in
# cache wins (one thread, fwd+bwd: 3.0 s at 2^20 vs 3.9 s at 2^23 for N = 512, D = 512,
# K = 32). 2^19 against 2^20, CPU time, N = 256: the mixed form at the tiny preset's shapes
# 168 ms vs 202 ms (median of 40, with exp2 below against exp); the Gram form at D = 512, K = 32
# no clear difference (1.21 s vs 1.27 s, then 1.40 s vs 1.28 s, medians of 6 on a shared
# machine). On a GPU bigger chunks mean fewer kernel launches (2^24: not measured, no GPU).
ELEMENTS_PER_CHUNK = {'cpu': 2 ** 19, 'cuda': 2 ** 24}


def images_per_chunk(n_txt, heads, k, device_type):
    """The default chunk of this form: images per chunk, from ELEMENTS_PER_CHUNK."""
    elements = ELEMENTS_PER_CHUNK.get(device_type, ELEMENTS_PER_CHUNK['cuda'])
    return max(1, elements // (n_txt * heads * k))


def eager_when_compiled(fn):
    """torch.compiler.disable(fn), taken when a compiled model first reaches fn rather than at
    import: the decorator imports torch._dynamo, 2 s more at the start of every process that
    loads this module (eval.py, analysis.py: they build no optimizer, which would import it)."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return torch.compiler.disable(fn)(*args, **kwargs)
        return fn(*args, **kwargs)
    return call


# ----------------------------------------------------------------------------- the pieces
def gram_from_out_gram(values, out_gram):
    """G_i^{mk,nl} = V_i^{mk} H^{mn} V_i^{nl}, with H = W_O W_O^T (D, D) formed once: per image
    K D^2 + (MK)^2 D/M, instead of K D^2 for U_i and (MK)^2 D for U_i U_i^T. -> (I, MK, MK)"""
    heads = values.shape[1]
    h = rearrange(out_gram, '(m d) (n e) -> m n d e', m=heads, n=heads)          # H^{mn}
    vh = einsum(values, h, 'i m k d, m n d e -> i m k n e')              # V_i^{mk} H^{mn}
    gram = einsum(vh, values, 'i m k n e, i n l e -> i m k n l')
    return rearrange(gram, 'i m k n l -> i (m k) (n l)')


def text_through_out_proj(text_emb, out_proj, heads):
    """s_j = W_O z'_j, split into heads: (T, M, d)."""
    return rearrange(text_emb @ out_proj.T, 't (m d) -> t m d', m=heads)


def _image_side(keys, values):
    """Keys and values stacked, heads first: (2, M, I, K, d)."""
    return rearrange(torch.stack([keys, values]), 'two i m k d -> two m i k d').contiguous()


def _caption_side(queries, text_out, tau):
    """Queries / tau and s_j stacked, heads first, as the right factor of a bmm: (2M, d, T)."""
    qs = rearrange(torch.stack([queries / tau, text_out]), 'two t m d -> (two m) t d')
    return qs.contiguous().transpose(1, 2)


def _gram_pairs(kv, qs, gram):
    """The Gram form on images x captions. kv (2, M, I, K, d), qs (2M, d, T), gram (I, MK, MK).
    Returns (in one buffer, (2, M, I, K, T)) the logits and Phi A; Phi head-major (M, I, K, T);
    Phi image-major and Phi G Phi (I, MK, T); z_ij . z'_j and |z_ij| (I, T).
    Without autograd the products overwrite their first factor (no new pair-sized tensors)."""
    _, heads, n_img, k, _ = kv.shape
    mul = torch.mul if torch.is_grad_enabled() else torch.Tensor.mul_
    out = torch.bmm(kv.reshape(2 * heads, n_img * k, -1), qs)             # (2M, I K, T)
    out = rearrange(out, '(two m) (i k) t -> two m i k t', two=2, k=k)
    logits, along_text = out                                             # Q_j.K_i / tau, A_ij
    phi = logits.softmax(dim=2)                                          # eq. 1: over the K tokens
    phi_img = rearrange(phi, 'm i k t -> i (m k) t').contiguous()
    phi_a = mul(along_text, phi)                                         # Phi A
    phi_g_phi = mul(torch.bmm(gram, phi_img), phi_img)                   # Phi (G_i Phi): (I, MK, T)
    dot = phi_a.sum(dim=(0, 2))                                          # z_ij . z'_j
    norm = phi_g_phi.sum(dim=1).clamp_min(1e-24).sqrt()                  # |z_ij|, as F.normalize
    return out, phi_a, phi, phi_img, phi_g_phi, dot, norm


# ----------------------------------------------------------------------------- inference
def gram_cosine(keys, values, queries, text_emb, out_proj, tau, chunk):
    """cos(z_ij, z'_j) for every image and caption, `chunk` images at a time: (I, T).
    Differentiable where autograd is on (tests/test_loss.py checks the derivation so)."""
    out_gram = out_proj @ out_proj.T                                     # H, (D, D)
    qs = _caption_side(queries, text_through_out_proj(text_emb, out_proj, keys.shape[1]), tau)
    parts = []
    for s in range(0, keys.shape[0], chunk):
        keys_c, values_c = keys[s:s + chunk], values[s:s + chunk]
        gram = gram_from_out_gram(values_c, out_gram)                    # (chunk, MK, MK)
        *_, dot, norm = _gram_pairs(_image_side(keys_c, values_c), qs, gram)
        parts.append(dot / norm)
    return torch.cat(parts)


# ----------------------------------------------------------------------------- the loss
# torch.compile runs it eagerly (a graph break): the torch.autograd.grad inside the Function's
# forward breaks dynamo's graph anyway, and compiling the rest frame by frame, recompiled per
# chunk shape, gained nothing over matmuls batched already and cost most of the warm-up
# (tests/test_compile.py, the Gram-form model: 33.5 s -> 11.8 s, 14.0 s -> 7.5 s with grad_ckpt)
@eager_when_compiled
def gram_loss_sum(keys, values, queries, text_emb, out_proj, tau, a, b, offset,
                  chunk, captions=1):
    """sum over pairs of -log sigmoid(y_ij (a cos_ij + b)), y_ij = +1 where caption j is one of
    image i + offset's (j // captions = i + offset); keys and values are this rank's images,
    queries and text_emb every caption, `captions` per image, image-major."""
    text_out = text_through_out_proj(text_emb, out_proj, keys.shape[1])
    return _GramSigmoidLoss.apply(tau, chunk, (offset, captions), keys, values, queries, text_out,
                                  out_proj @ out_proj.T, a, b)


def positives(x, first):
    """The positive pairs of a chunk x (I, T) whose row r is global image first[0] + r, against
    every caption, C = first[1] of each image, image-major: row r's are columns (first[0] + r) C
    to (first[0] + r) C + C - 1. A view, (C, I): with C = 1 the diagonal first[0] of x."""
    image, captions = first
    return x.view(x.shape[0], -1, captions).diagonal(image, dim1=0, dim2=1)


def _sigmoid_pairs(dot, norm, a, b, first, exact, grad_ab=None):
    """Eq. 3 on a chunk of pairs from z_ij . z'_j and |z_ij| (I, T): (the summed loss, the
    cosines, along = dl/dc / n or None), x = a cos + b; with grad_ab = (dl/da, dl/db), the
    chunk's share is added to them. first = (the global index of the chunk's first image, C
    captions per image): where the positives are (`positives`)."""
    cos = dot.to(exact) / norm.to(exact)                                  # (I, T)
    x = a * cos + b
    # -log sigmoid(y x) is softplus(x) for y = -1 and softplus(x) - x for y = +1
    loss = -F.logsigmoid(-x).sum() - positives(x, first).sum()
    if grad_ab is None:
        return loss, cos, None
    grad_x = torch.sigmoid(x)                                             # dl/dx
    positives(grad_x, first).sub_(1)                                      # sigmoid(x) - [y = +1]
    grad_ab[0].add_((grad_x * cos).sum())
    grad_ab[1].add_(grad_x.sum())
    return loss, cos, a * grad_x / norm


def precision(keys, a):
    """(device type, the dtype the pairs are computed in: autocast's if it is on, else the
    features', the dtype of the loss: at least float32, so bf16 pairs give an fp32 loss)."""
    device = keys.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else keys.dtype
    return device, dtype, torch.promote_types(torch.promote_types(dtype, torch.float32), a.dtype)


class _GradientsInForward(torch.autograd.Function):
    """A loss whose forward computes its gradients too, in the same pass over the pairs, and
    saves them (for the inputs after tau, chunk and first = (offset, captions per image)):
    backward only scales them."""

    @staticmethod
    def backward(ctx, grad_total):
        grads = [g * grad_total.to(g.dtype) if need else None
                 for g, need in zip(ctx.saved_tensors, ctx.needs_input_grad[3:])]
        return (None, None, None, *grads)


class _GramSigmoidLoss(_GradientsInForward):
    """The Gram form of the summed sigmoid loss, `chunk` images (against every caption) at a time,
    with the gradients written by hand and taken in the same pass as the loss. The loss of pair
    (i, j) depends on no other pair, so nothing is recomputed and nothing per pair is kept:
    backward only scales the stored gradients (the size of the inputs). G_i is formed per chunk
    and its gradient taken there by autograd, so memory is O(chunk x N_txt x M K).

    Per pair, with x = a c + b, c = dot / n, n^2 = Phi^T G Phi, l = -log sigmoid(y x):
        dl/dc      = a (sigmoid(x) - [y = +1])
        dl/dPhi    = along A - across G Phi,      along = dl/dc / n,  across = dl/dc c / n^2
        dl/dA      = along Phi                    dl/dG_i = sum_j -across / 2 Phi Phi^T
        dl/dlogits = Phi dl/dPhi - Phi sum_k (Phi dl/dPhi)        (the softmax over k)
    and logits and A are matmuls, so their gradients are the transposed matmuls."""

    @staticmethod
    def forward(ctx, tau, chunk, first, keys, values, queries, text_out, out_gram, a, b):
        (offset, captions), (device, dtype, exact) = first, precision(keys, a)
        need_grads = any(ctx.needs_input_grad)
        with torch.autocast(device, enabled=False):
            kv = _image_side(keys, values).to(dtype)                      # (2, M, I, K, d)
            qs = _caption_side(queries, text_out, tau).to(dtype)          # (2M, d, T)
            out_gram_ = out_gram.detach().to(dtype).requires_grad_(need_grads)
            a_, b_ = a.to(exact), b.to(exact)
            total = torch.zeros((), dtype=exact, device=keys.device)
            if need_grads:
                grad_kv = torch.zeros_like(kv, dtype=exact)
                grad_qs = torch.zeros_like(qs, dtype=exact)
                grad_values_g, grad_out_gram = torch.zeros_like(values, dtype=exact), 0.0
                grad_a, grad_b = torch.zeros_like(total), torch.zeros_like(total)
            for s in range(0, kv.shape[2], chunk):
                kv_c = kv[:, :, s:s + chunk]
                values_c = values[s:s + chunk].detach().to(dtype).requires_grad_(need_grads)
                with torch.enable_grad():
                    gram = gram_from_out_gram(values_c, out_gram_)       # (I, MK, MK)
                pairs = _gram_pairs(kv_c, qs, gram.detach())
                out, phi_a, phi, phi_img, phi_g_phi, dot, norm = pairs
                loss, cos, along = _sigmoid_pairs(dot, norm, a_, b_, (offset + s, captions),
                                                  exact, (grad_a, grad_b) if need_grads else None)
                total += loss
                if not need_grads:
                    continue                                # dl/dc / n
                across = (along * cos / norm)[:, None].to(dtype)          # dl/dc c / n^2, (I, 1, T)
                along = along[:, None].to(dtype)                          # broadcast: (M, I, K, T)
                # Phi dl/dPhi, in place of Phi A; the softmax's backward goes into the logits' slot
                phi_g_phi_heads = rearrange(phi_g_phi, 'i (m k) t -> m i k t', k=phi.shape[2])
                phi_grad = phi_a.mul_(along).sub_(phi_g_phi_heads.mul_(across))
                phi_grad_sum = phi_grad.sum(dim=2, keepdim=True)
                torch.addcmul(phi_grad, phi, phi_grad_sum, value=-1, out=out[0])
                torch.mul(phi, along, out=out[1])                         # dl/dA
                grad_pairs = rearrange(out, 'two m i k t -> (two m) (i k) t')
                grad_kv[:, :, s:s + chunk] = rearrange(torch.bmm(grad_pairs, qs.transpose(1, 2)),
                                                       '(two m) (i k) d -> two m i k d', two=2,
                                                       k=kv.shape[3])
                kv_rows = kv_c.reshape(grad_pairs.shape[0], -1, kv.shape[4])   # (2M, I K, d)
                grad_qs += torch.bmm(kv_rows.transpose(1, 2), grad_pairs)       # (2M, d, T)
                # dl/dG_i, in place of Phi G Phi, then back through G_i to V_i and H by autograd
                torch.mul(phi_img, across / -2, out=phi_g_phi)
                grad_gram = torch.bmm(phi_g_phi, phi_img.transpose(1, 2))
                g_v, g_h = torch.autograd.grad(gram, [values_c, out_gram_], grad_gram)
                grad_values_g[s:s + chunk] = g_v
                grad_out_gram = grad_out_gram + g_h
        if need_grads:
            grad_keys, grad_values = rearrange(grad_kv, 'two m i k d -> two i m k d')
            grad_queries, grad_text = rearrange(grad_qs, '(two m) d t -> two t m d', two=2)
            ctx.save_for_backward(grad_keys.to(keys.dtype),
                                  (grad_values + grad_values_g).to(values.dtype),
                                  (grad_queries / tau).to(queries.dtype),
                                  grad_text.to(text_out.dtype),
                                  grad_out_gram.to(out_gram.dtype), grad_a.to(a.dtype),
                                  grad_b.to(b.dtype))
        return total



# ----------------------------------------------------------------------------- the mixed form
# When M K > D (the tiny preset: 128 > 64) G_i is bigger than W_O itself. The mixed form keeps
# the mixed heads x_ij = concat_m Phi_ij^m V_i^m (D per pair, what loss.mix returns) and takes
#     z_ij . z'_j = x_ij . s_j        |z_ij|^2 = x_ij^T H x_ij,   H = W_O W_O^T (D x D, once)
# so per pair it pays D^2 where the Gram form pays (M K)^2, the rest alike; one (D, D) @ (D, I T)
# matmul for a chunk. The softmax is left unnormalised: e = exp(logits - max_k), S = sum_k e,
# and 1/S is applied to x and to dl/dx (d numbers per head) instead of to e (K per head).
# e is taken as 2^(log2(e) logits - max_k): the same numbers, and on CPU exp2 costs half of exp
# (0.34 ms against 0.72 ms for 2^19 floats, one thread), a tenth of the whole loss at the tiny
# preset; the factor log2(e) goes into the queries, T M d numbers.
LOG2_E = 1 / math.log(2)


def _heads_side(keys, values, queries, text_out, tau, dtype):
    """Keys (M, I K, d) and values (M, I, K, d) heads first; queries / tau and s_j as (M, d, T)."""
    return (rearrange(keys, 'i m k d -> m (i k) d').to(dtype).contiguous(),
            rearrange(values, 'i m k d -> m i k d').to(dtype).contiguous(),
            rearrange(queries / tau, 't m d -> m d t').to(dtype).contiguous(),
            rearrange(text_out, 't m d -> m d t').to(dtype).contiguous())


def _mixed_pairs(keys_c, values_c, q2, s, out_gram, scratch):
    """The mixed form on a chunk of I images x T captions. keys_c (M, I K, d), values_c
    (M I, K, d), q2 = log2(e) queries / tau and s (M, d, T), out_gram = H (D, D). Returns
    e (M I, K, T), S (M I, 1, T), x (M I, d, T) and x with (m d) rows (D, I T), H x (D, I T),
    and z_ij . z'_j, |z_ij| (I, T). Every big tensor is written into `scratch` (_Scratch): fresh
    ones cost more than the arithmetic here."""
    heads, d, n_txt = q2.shape
    n_img = values_c.shape[0] // heads
    logits2 = torch.bmm(keys_c, q2, out=scratch.pairs('e', heads, keys_c.shape[1], n_txt))
    logits2 = logits2.view(heads * n_img, -1, n_txt)            # (M I, K, T): log2(e) logits
    e = logits2.sub_(logits2.amax(dim=1, keepdim=True)).exp2_()          # eq. 1, unnormalised
    total = e.sum(dim=1, keepdim=True)                                   # S, >= 1
    x = torch.bmm(values_c.transpose(1, 2), e, out=scratch.pairs('x', heads * n_img, d, n_txt))
    x.div_(total)                                                        # eq. 2: (M I, d, T)
    x_rows = scratch.pairs('x_rows', heads * d, n_img * n_txt)           # the same, (m d) rows
    x_rows.view(heads, d, n_img, n_txt).copy_(rearrange(x, '(m i) d t -> m d i t', m=heads))
    hx = torch.mm(out_gram, x_rows, out=scratch.pairs('hx', heads * d, n_img * n_txt))
    product = scratch.pairs('product', heads * d, n_img, n_txt)
    dot = torch.mul(x_rows.view_as(product), s.view(heads * d, 1, n_txt), out=product).sum(0)
    norm = torch.mul(x_rows, hx, out=product.view_as(hx)).sum(dim=0)
    norm = norm.clamp_min_(1e-24).sqrt_().view(n_img, n_txt)             # |z_ij|, as F.normalize
    return e, total, x, x_rows, hx, dot, norm


class _Scratch:
    """Flat buffers, one per name, allocated for the first (largest) chunk and reused: a view of
    the first elements is contiguous whatever the chunk's size. (Fresh tensors of a chunk's size
    come from the OS page by page: with them the tiny preset's loss took 170 ms, 131 ms without,
    CPU time, one thread.)"""

    def __init__(self, dtype, device):
        self.dtype, self.device, self.flat = dtype, device, {}

    def pairs(self, name, *shape):
        numel = math.prod(shape)
        if name not in self.flat or self.flat[name].numel() < numel:
            self.flat[name] = torch.empty(numel, dtype=self.dtype, device=self.device)
        return self.flat[name][:numel].view(shape)


# torch.compile runs these two eagerly (a graph break): they write into views of reused buffers
# (out=...), which AOTAutograd cannot trace, and are hand-written kernels already
@eager_when_compiled
def mixed_cosine(keys, values, queries, text_emb, out_proj, tau, chunk):
    """cos(z_ij, z'_j) for every image and caption in the mixed form, `chunk` images at a time:
    (I, T). For inference only (its steps work in place): no gradients."""
    device, dtype, _ = precision(keys, keys)
    with torch.no_grad():
        text_out = text_through_out_proj(text_emb, out_proj, keys.shape[1])   # as in the loss
        out_gram = out_proj @ out_proj.T
        # the steps write into buffers of one dtype: autocast must not pick another per op
        with torch.autocast(device, enabled=False):
            keys_h, values_h, q, s = _heads_side(keys, values, queries, text_out, tau, dtype)
            heads, k = keys.shape[1:3]
            scratch, parts = _Scratch(dtype, keys.device), []
            q2, out_gram = q * LOG2_E, out_gram.to(dtype)       # once, not per chunk
            for st in range(0, keys.shape[0], chunk):
                keys_c = keys_h[:, st * k:(st + chunk) * k]
                values_c = values_h[:, st:st + chunk].reshape(-1, k, values_h.shape[3])
                *_, dot, norm = _mixed_pairs(keys_c, values_c, q2, s, out_gram, scratch)
                parts.append(dot / norm)
        return torch.cat(parts)


@eager_when_compiled
def mixed_loss_sum(keys, values, queries, text_emb, out_proj, tau, a, b,
                   offset, chunk, captions=1):
    """gram_loss_sum in the mixed form: the same sum, the same arguments."""
    text_out = text_through_out_proj(text_emb, out_proj, keys.shape[1])
    return _MixedSigmoidLoss.apply(tau, chunk, (offset, captions), keys, values, queries, text_out,
                                   out_proj @ out_proj.T, a, b)


class _MixedSigmoidLoss(_GradientsInForward):
    """The summed sigmoid loss in the mixed form, gradients by hand in the same pass, as in
    _GramSigmoidLoss (same inputs, same gradients returned). Per pair, with c = dot / n:
        dl/dx      = along s_j - across H x       (along = dl/dc / n, across = dl/dc c / n^2)
        dl/ds_j    = sum_i along x_ij             dl/dH = sum_ij -across / 2 x_ij x_ij^T
        dl/dV^mk   = sum_j Phi^mk dl/dx^m         dl/dPhi^mk = V^mk . dl/dx^m
        dl/dlogits = Phi (dl/dPhi - x^m . dl/dx^m)   (the softmax: sum_k Phi^k V^k = x^m)
    with Phi = e / S, the 1/S goes into g = dl/dx / S: dl/dlogits = e (V . g - x . g)."""

    @staticmethod
    def forward(ctx, tau, chunk, first, keys, values, queries, text_out, out_gram, a, b):
        (offset, captions), (device, dtype, exact) = first, precision(keys, a)
        need_grads = any(ctx.needs_input_grad)
        n_img, heads, k, d = keys.shape
        with torch.autocast(device, enabled=False):
            keys_h, values_h, q, s = _heads_side(keys, values, queries, text_out, tau, dtype)
            out_gram_ = out_gram.detach().to(dtype)
            a_, b_ = a.to(exact), b.to(exact)
            total = torch.zeros((), dtype=exact, device=keys.device)
            scratch, q2 = _Scratch(dtype, keys.device), q * LOG2_E
            if need_grads:
                grad_keys = torch.empty_like(keys_h, dtype=exact)
                grad_values = torch.empty_like(values_h, dtype=exact)
                grad_q, grad_s = torch.zeros_like(q, dtype=exact), torch.zeros_like(s, dtype=exact)
                grad_out_gram = torch.zeros_like(out_gram_, dtype=exact)
                grad_a, grad_b = torch.zeros_like(total), torch.zeros_like(total)
            for st in range(0, n_img, chunk):
                n = min(chunk, n_img - st)                                # images in this chunk
                keys_c = keys_h[:, st * k:(st + n) * k]                   # (M, I K, d)
                values_c = values_h[:, st:st + n].reshape(heads * n, k, d)   # (M I, K, d)
                e, sums, x, x_rows, hx, dot, norm = _mixed_pairs(keys_c, values_c, q2, s,
                                                                 out_gram_, scratch)
                loss, cos, along = _sigmoid_pairs(dot, norm, a_, b_, (offset + st, captions),
                                                  exact, (grad_a, grad_b) if need_grads else None)
                total += loss
                if not need_grads:
                    continue                                # dl/dc / n, (I, T)
                across = (along * cos / norm).to(dtype).view(1, -1)       # dl/dc c / n^2
                along = along.to(dtype).view(1, n, -1)
                x_pairs = x_rows.view(heads * d, n, -1)                   # (D, I, T)
                product = scratch.pairs('product', heads * d, n, x_pairs.shape[2])
                grad_s += torch.mul(x_pairs, along, out=product).sum(dim=1).view_as(s)
                grad_out_gram += x_rows @ torch.mul(x_rows, across / -2, out=product.view_as(hx)).T
                # dl/dx in place of H x, then g = dl/dx / S, heads first like x
                grad_mixed = hx.mul_(-across).view(heads * d, n, -1)
                grad_mixed.addcmul_(s.view(heads * d, 1, -1), along)
                g = scratch.pairs('g', heads * n, d, x_pairs.shape[2])
                torch.div(rearrange(grad_mixed, '(m d) i t -> m i d t', m=heads),
                          sums.view(heads, n, 1, -1), out=g.view(heads, n, d, -1))
                x_dot_g = torch.mul(x, g, out=product.view_as(g)).sum(dim=1, keepdim=True)
                grad_logits = torch.bmm(values_c, g, out=scratch.pairs('grad', *e.shape))
                grad_logits.sub_(x_dot_g).mul_(e)                         # (M I, K, T)
                grad_values[:, st:st + n] = torch.bmm(e, g.transpose(1, 2)).view(heads, n, k, d)
                grad_logits = grad_logits.view(heads, n * k, -1)          # (M, I K, T)
                grad_keys[:, st * k:(st + n) * k] = torch.bmm(grad_logits, q.transpose(1, 2))
                grad_q += torch.bmm(keys_c.transpose(1, 2), grad_logits)
        if need_grads:
            ctx.save_for_backward(
                rearrange(grad_keys, 'm (i k) d -> i m k d', k=k).to(keys.dtype),
                rearrange(grad_values, 'm i k d -> i m k d').to(values.dtype),
                (rearrange(grad_q, 'm d t -> t m d') / tau).to(queries.dtype),
                rearrange(grad_s, 'm d t -> t m d').to(text_out.dtype),
                grad_out_gram.to(out_gram.dtype), grad_a.to(a.dtype), grad_b.to(b.dtype))
        return total
