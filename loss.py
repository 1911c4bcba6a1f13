"""
The three contrastive objectives, on this rank's images against every rank's captions:

    clip_loss    softmax cross-entropy both ways (CLIP)
    siglip_loss  sigmoid loss on every image-caption pair (SigLIP)
    llip_loss    sigmoid loss on cos(z_ij, z'_j), where z_ij is image i's mixture tokens
                 mixed with caption j's query (Llip, eq. 1-3)

    L = (1/N) sum_i sum_j -log sigmoid( y_ij (a cos_ij + b) ),  y_ii = +1, y_ij = -1 otherwise

Across ranks each rank passes its own slice; the captions (and for CLIP the images) are
all-gathered with autograd, so DDP's gradient averaging gives exactly the gradient of the
single-process loss on the global batch (every rank must pass the same batch size).

llip_loss never holds more than one chunk of pairs. Two exact forms:
  gram   (the default when M K <= D, i.e. every paper configuration) W_O moved off the pair
         axis, a chunk of images against all captions as batched matmuls, gradients written
         by hand and taken in the forward pass: nothing is recomputed, nothing per pair kept;
  plain  the readable one: z_ij built chunk by chunk of captions, autograd, each chunk
         recomputed in backward.
`llip_loss_reference` materialises every z_ij (N_img x N_txt x D), for tests and bench.py.

    python -m pytest tests/test_loss.py     # chunked == reference, 1 rank == 2 ranks
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import einsum, rearrange

PAIRS_PER_CHUNK = 2 ** 16      # plain form's default chunk: N_img x chunk pairs of z_ij held at once
# Gram form's default chunk: chunk x N_txt x M x K mixing weights at once. On CPU a chunk that
# stays in cache wins (one thread, fwd+bwd: 3.0 s at 2^20 vs 3.9 s at 2^23 for N = 512, D = 512,
# K = 32; 0.20 s vs 0.31 s at the tiny preset's shapes, N = 256); on a GPU bigger chunks mean
# fewer kernel launches (2^24: not measured, no GPU was at hand).
ELEMENTS_PER_CHUNK = {'cpu': 2 ** 20, 'cuda': 2 ** 24}


# ----------------------------------------------------------------------------- the mixer (eq. 1-2)
def mix(queries, keys, values, tau):
    """Mix every image's K mixture tokens with every caption's query, per head.
    queries (T, M, d), keys and values (I, M, K, d) -> (I, T, M*d), before W_O."""
    logits = einsum(queries, keys, 't m d, i m k d -> i t m k') / tau   # no 1/sqrt(d): tau only
    phi = logits.softmax(dim=-1)                                         # mixing weights over K
    mixed = einsum(phi, values, 'i t m k, i m k d -> i t m d')
    return rearrange(mixed, 'i t m d -> i t (m d)')                      # concat over heads


def contextual_cosine(keys, values, queries, text_emb, out_proj, tau):
    """cos(z_ij, z'_j) for every image i and caption j: (I, T). text_emb is normalised.
    The plain form: build every z_ij, D^2 work per pair for W_O."""
    z = mix(queries, keys, values, tau) @ out_proj                       # (I, T, D) z_ij
    return einsum(F.normalize(z, dim=-1), text_emb, 'i t d, t d -> i t')


# The same cosines with W_O moved off the pair axis. Write U_i^{mk} = V_i^{mk} W_O^m (what
# token k of head m adds to z_ij per unit of mixing weight; W_O^m = rows m*d..(m+1)*d of W_O).
# Then z_ij = sum_mk Phi_ij^{mk} U_i^{mk}, so
#     z_ij . z'_j = sum_mk Phi_ij^{mk} A_ij^{mk},  A_ij^{mk} = V_i^{mk} . s_j^m,  s_j = W_O z'_j per caption
#     |z_ij|^2    = Phi_ij^T G_i Phi_ij                           G_i = U_i U_i^T per image (MK x MK)
# Per pair this costs 2 K D + (M K)^2 instead of 2 K D + D^2: cheaper whenever M K < D
# (ViT-B/16: M K = 256, D = 512; bigG: 512 vs 1280). Every step is a batched matmul:
#     logits and A   (2M, I K, d) @ (2M, d, T)      heads (and keys | values) as the batch axis
#     G_i Phi_i      (I, MK, MK) @ (I, MK, T)       images as the batch axis
# so the pair tensors live head-major, (M, I, K, T), with one copy to image-major for G.
def mixer_gram(values, out_proj):
    """G_i = U_i U_i^T over the M*K (head, token) pairs of image i: (I, MK, MK)."""
    return gram_from_out_gram(values, out_proj @ out_proj.T)


def gram_from_out_gram(values, out_gram):
    """G_i^{mk,nl} = V_i^{mk} H^{mn} V_i^{nl}, with H = W_O W_O^T (D, D) formed once: per image
    K D^2 + (MK)^2 D/M, instead of K D^2 for U_i and (MK)^2 D for U_i U_i^T."""
    h = rearrange(out_gram, '(m d) (n e) -> m n d e', m=values.shape[1], n=values.shape[1])   # H^{mn}
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
    qs = rearrange(torch.stack([queries / tau, text_out]), 'two t m d -> (two m) t d').contiguous()
    return qs.transpose(1, 2)


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


def contextual_cosine_gram(keys, values, queries, text_out, gram, tau):
    """contextual_cosine from mixer_gram and text_through_out_proj: (I, T)."""
    *_, dot, norm = _gram_pairs(_image_side(keys, values), _caption_side(queries, text_out, tau), gram)
    return dot / norm


# ----------------------------------------------------------------------------- across ranks
def rank_and_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's x along dim 0; in backward each rank gets back the sum over
    ranks of the gradient for its own slice (every rank's loss used it)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)   # sum of every rank's gradient for the whole gathered tensor
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather(x):
    return _AllGather.apply(x) if rank_and_world()[1] > 1 else x


def _labels(n_img, start, end, offset, like):
    """y_ij for images 0..n_img-1 and captions start..end-1: +1 where caption j = i + offset."""
    i = torch.arange(n_img, device=like.device)[:, None] + offset
    j = torch.arange(start, end, device=like.device)[None, :]
    return torch.where(i == j, 1.0, -1.0).to(like.dtype)                # (I, T)


def _sigmoid_loss_sum(cos, logit_scale, logit_bias, start, offset):
    cos = cos.to(torch.promote_types(cos.dtype, logit_scale.dtype))     # bf16 pairs -> fp32 loss
    labels = _labels(cos.shape[0], start, start + cos.shape[1], offset, cos)
    return -F.logsigmoid(labels * (logit_scale * cos + logit_bias)).sum()


# ----------------------------------------------------------------------------- CLIP and SigLIP
def clip_loss(image_emb, text_emb, logit_scale):
    """Image->text and text->image cross-entropy; embeddings (N, D) normalised."""
    rank, _ = rank_and_world()
    n = image_emb.shape[0]
    all_images, all_texts = gather(image_emb), gather(text_emb)
    targets = torch.arange(n, device=image_emb.device) + rank * n
    return (F.cross_entropy(logit_scale * image_emb @ all_texts.T, targets)
            + F.cross_entropy(logit_scale * text_emb @ all_images.T, targets)) / 2


def siglip_loss(image_emb, text_emb, logit_scale, logit_bias):
    """Sigmoid loss of every local image against every caption; embeddings (N, D) normalised."""
    rank, _ = rank_and_world()
    n = image_emb.shape[0]
    cos = image_emb @ gather(text_emb).T                                 # (N, N_global)
    return _sigmoid_loss_sum(cos, logit_scale, logit_bias, 0, rank * n) / n


# ----------------------------------------------------------------------------- Llip
class _ChunkedSigmoidLoss(torch.autograd.Function):
    """sum over pairs of -log sigmoid(y (a cos + b)), computed `chunk` captions at a time, with
    cos = cosine(keys, values, queries, caption_side, image_side, tau). Nothing per pair is
    saved: backward recomputes one chunk, takes its gradients, frees it."""

    @staticmethod
    def forward(ctx, cosine, tau, chunk, offset, keys, values, queries, caption_side, image_side, a, b):
        ctx.save_for_backward(keys, values, queries, caption_side, image_side, a, b)
        ctx.cosine, ctx.tau, ctx.chunk, ctx.offset = cosine, tau, chunk, offset
        # backward must run under the same autocast as forward (what torch.amp.custom_bwd does)
        device = keys.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        total = 0.0
        for s in range(0, queries.shape[0], chunk):
            cos = cosine(keys, values, queries[s:s + chunk], caption_side[s:s + chunk], image_side, tau)
            total = total + _sigmoid_loss_sum(cos, a, b, s, offset)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        keys, values, queries, caption_side, image_side, a, b = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        shared = [x.detach().requires_grad_() for x in (keys, values, image_side, a, b)]
        shared_grads = [torch.zeros_like(x) for x in shared]
        grad_queries, grad_captions = torch.zeros_like(queries), torch.zeros_like(caption_side)
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            for s in range(0, queries.shape[0], ctx.chunk):
                q, c = (x[s:s + ctx.chunk].detach().requires_grad_() for x in (queries, caption_side))
                k, v, i, a, b = shared
                part = _sigmoid_loss_sum(ctx.cosine(k, v, q, c, i, ctx.tau), a, b, s, ctx.offset)
                grads = torch.autograd.grad(part, shared + [q, c], grad_total)
                for acc, g in zip(shared_grads, grads):
                    acc += g
                grad_queries[s:s + ctx.chunk], grad_captions[s:s + ctx.chunk] = grads[-2:]
        gk, gv, gi, ga, gb = shared_grads
        return None, None, None, None, gk, gv, grad_queries, grad_captions, gi, ga, gb


class _GramSigmoidLoss(torch.autograd.Function):
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
    def forward(ctx, tau, chunk, offset, keys, values, queries, text_out, out_gram, a, b):
        device = keys.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else keys.dtype
        exact = torch.promote_types(torch.promote_types(dtype, torch.float32), a.dtype)   # bf16 pairs -> fp32
        need_grads = any(ctx.needs_input_grad)
        with torch.autocast(device, enabled=False):
            kv = _image_side(keys, values).to(dtype)                      # (2, M, I, K, d)
            qs = _caption_side(queries, text_out, tau).to(dtype)          # (2M, d, T)
            out_gram_ = out_gram.detach().to(dtype).requires_grad_(need_grads)
            a_, b_ = a.to(exact), b.to(exact)
            total = torch.zeros((), dtype=exact, device=keys.device)
            if need_grads:
                grad_kv, grad_qs = torch.zeros_like(kv, dtype=exact), torch.zeros_like(qs, dtype=exact)
                grad_values_g, grad_out_gram = torch.zeros_like(values, dtype=exact), 0.0
                grad_a, grad_b = torch.zeros_like(total), torch.zeros_like(total)
            for s in range(0, kv.shape[2], chunk):
                kv_c = kv[:, :, s:s + chunk]
                values_c = values[s:s + chunk].detach().to(dtype).requires_grad_(need_grads)
                with torch.enable_grad():
                    gram = gram_from_out_gram(values_c, out_gram_)       # (I, MK, MK)
                out, phi_a, phi, phi_img, phi_g_phi, dot, norm = _gram_pairs(kv_c, qs, gram.detach())
                cos = dot.to(exact) / norm.to(exact)                      # (I, T)
                x = a_ * cos + b_                                         # (I, T), y x is eq. 3's logit
                # -log sigmoid(y x) is softplus(x) for y = -1 and softplus(x) - x for y = +1; the
                # positives (image s + r, caption offset + s + r) are a diagonal of the chunk
                total += -F.logsigmoid(-x).sum() - x.diagonal(offset + s).sum()
                if not need_grads:
                    continue
                grad_x = torch.sigmoid(x)                                 # dl/dx = sigmoid(x) - [y = +1]
                grad_x.diagonal(offset + s).sub_(1)
                grad_a += (grad_x * cos).sum()
                grad_b += grad_x.sum()
                along = a_ * grad_x / norm                                # dl/dc / n
                across = (along * cos / norm)[:, None].to(dtype)          # dl/dc c / n^2, (I, 1, T)
                along = along[:, None].to(dtype)                          # broadcast over (M, I, K, T)
                # Phi dl/dPhi, in place of Phi A; the softmax's backward goes into the logits' slot
                phi_grad = phi_a.mul_(along).sub_(rearrange(phi_g_phi, 'i (m k) t -> m i k t', k=phi.shape[2])
                                                  .mul_(across))
                torch.addcmul(phi_grad, phi, phi_grad.sum(dim=2, keepdim=True), value=-1, out=out[0])
                torch.mul(phi, along, out=out[1])                         # dl/dA
                grad_pairs = rearrange(out, 'two m i k t -> (two m) (i k) t')
                grad_kv[:, :, s:s + chunk] = rearrange(torch.bmm(grad_pairs, qs.transpose(1, 2)),
                                                       '(two m) (i k) d -> two m i k d', two=2, k=kv.shape[3])
                grad_qs += torch.bmm(kv_c.reshape(grad_pairs.shape[0], -1, kv.shape[4]).transpose(1, 2),
                                     grad_pairs)                          # (2M, d, T)
                # dl/dG_i, in place of Phi G Phi, then back through G_i to V_i and H by autograd
                torch.mul(phi_img, across / -2, out=phi_g_phi)
                grad_gram = torch.bmm(phi_g_phi, phi_img.transpose(1, 2))
                g_v, g_h = torch.autograd.grad(gram, [values_c, out_gram_], grad_gram)
                grad_values_g[s:s + chunk] = g_v
                grad_out_gram = grad_out_gram + g_h
        if need_grads:
            grad_keys, grad_values = rearrange(grad_kv, 'two m i k d -> two i m k d')
            grad_queries, grad_text = rearrange(grad_qs, '(two m) d t -> two t m d', two=2)
            ctx.save_for_backward(grad_keys.to(keys.dtype), (grad_values + grad_values_g).to(values.dtype),
                                  (grad_queries / tau).to(queries.dtype), grad_text.to(text_out.dtype),
                                  grad_out_gram.to(out_gram.dtype), grad_a.to(a.dtype), grad_b.to(b.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grads = [g * grad_total.to(g.dtype) if need else None
                 for g, need in zip(ctx.saved_tensors, ctx.needs_input_grad[3:])]
        return (None, None, None, *grads)


def use_gram(keys):
    """The Gram form pays (M K)^2 per pair, the plain form D^2 for W_O."""
    heads, k, d = keys.shape[1:]
    embed_dim = heads * d                                                # D
    return heads * k <= embed_dim


def pairwise_cosine(keys, values, queries, text_emb, out_proj, tau, chunk_size, form='auto'):
    """cos(z_ij, z'_j) for every image and caption, `chunk_size` captions at a time: (I, T).
    For inference (model.Llip.similarity); the image side is prepared once for all chunks."""
    chunks = range(0, queries.shape[0], chunk_size)
    if form == 'gram' or (form == 'auto' and use_gram(keys)):
        kv, gram = _image_side(keys, values), mixer_gram(values, out_proj)
        qs = _caption_side(queries, text_through_out_proj(text_emb, out_proj, keys.shape[1]), tau)
        parts = (_gram_pairs(kv, qs[:, :, s:s + chunk_size], gram)[-2:] for s in chunks)
        return torch.cat([dot / norm for dot, norm in parts], dim=1)
    return torch.cat([contextual_cosine(keys, values, queries[s:s + chunk_size], text_emb[s:s + chunk_size],
                                        out_proj, tau) for s in chunks], dim=1)


def default_chunk(form, n_img, n_txt, heads, k, device_type='cpu'):
    """llip_loss's chunk when none is given: captions per chunk for the plain form (N_img x chunk
    pairs of z_ij held), images per chunk for the Gram form (chunk x N_txt x M x K mixing weights)."""
    if form == 'plain':
        return max(1, PAIRS_PER_CHUNK // n_img)
    return max(1, ELEMENTS_PER_CHUNK.get(device_type, ELEMENTS_PER_CHUNK['cuda']) // (n_txt * heads * k))


def llip_loss(keys, values, queries, text_emb, out_proj, logit_scale, logit_bias, tau, chunk_size=None,
              form='auto'):
    """Eq. 3 for this rank's images against every rank's captions.
    keys, values (N_img, M, K, D/M): the projected mixture tokens; queries (N_txt, M, D/M);
    text_emb (N_txt, D) normalised; out_proj (D, D) = W_O; logit_scale = a (already exp'd);
    logit_bias = b. Image i's positive is caption i of the same rank.
    form: 'plain' (contextual_cosine, autograd, recomputed chunk by chunk in backward), 'gram'
    (_GramSigmoidLoss) or 'auto' (gram when M K <= D, as in every paper configuration).
    chunk_size: captions per chunk (plain) or images per chunk (gram); None picks it from
    PAIRS_PER_CHUNK or ELEMENTS_PER_CHUNK."""
    rank, _ = rank_and_world()
    n = keys.shape[0]
    queries, text_emb = gather(queries), gather(text_emb)
    a, b = (x if torch.is_tensor(x) else torch.tensor(float(x), device=keys.device)
            for x in (logit_scale, logit_bias))
    if form == 'gram' or (form == 'auto' and use_gram(keys)):
        chunk = chunk_size or default_chunk('gram', n, queries.shape[0], *keys.shape[1:3], keys.device.type)
        total = _GramSigmoidLoss.apply(tau, chunk, rank * n, keys, values, queries,
                                       text_through_out_proj(text_emb, out_proj, keys.shape[1]),
                                       out_proj @ out_proj.T, a, b)
    else:
        chunk = chunk_size or default_chunk('plain', n, queries.shape[0], *keys.shape[1:3], keys.device.type)
        total = _ChunkedSigmoidLoss.apply(contextual_cosine, tau, chunk, rank * n, keys, values, queries,
                                          text_emb, out_proj, a, b)
    return total / n


def llip_loss_reference(keys, values, queries, text_emb, out_proj, logit_scale, logit_bias, tau):
    """The plain form: materialise every z_ij (N_img x N_txt x D) and let autograd keep it all.
    Single process only; for tests and benchmarks."""
    cos = contextual_cosine(keys, values, queries, text_emb, out_proj, tau)
    return _sigmoid_loss_sum(cos, logit_scale, logit_bias, 0, 0) / keys.shape[0]
