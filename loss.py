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

llip_loss never holds more than one chunk of captions' z_ij (N_img x chunk x D): the
forward pass keeps only the loss, and the backward pass recomputes each chunk.
`llip_loss_reference` is the plain materialising form, kept for tests and bench.py.

    python -m pytest tests/test_loss.py     # chunked == reference, 1 rank == 2 ranks
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import einsum, rearrange

PAIRS_PER_CHUNK = 2 ** 16   # default chunk: N_img x chunk pairs of z_ij held at once


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
#     z_ij . z'_j = sum_mk Phi_ij^{mk} (V_i^{mk} . s_j^m)   with s_j = W_O z'_j, per caption
#     |z_ij|^2    = Phi_ij^T G_i Phi_ij                       with G_i = U_i U_i^T, per image
# Per pair this costs 2 K D + (M K)^2 instead of 2 K D + D^2: cheaper whenever M K < D
# (ViT-B/16: M K = 256, D = 512; bigG: 512 vs 1280).
def mixer_gram(values, out_proj):
    """G_i = U_i U_i^T over the M*K (head, token) pairs of image i: (I, MK, MK)."""
    w = rearrange(out_proj, '(m d) e -> m d e', m=values.shape[1])        # W_O^m: (M, d, D)
    u = rearrange(einsum(values, w, 'i m k d, m d e -> i m k e'), 'i m k e -> i (m k) e')
    return u @ u.transpose(1, 2)


def text_through_out_proj(text_emb, out_proj, heads):
    """s_j = W_O z'_j, split into heads: (T, M, d)."""
    return rearrange(text_emb @ out_proj.T, 't (m d) -> t m d', m=heads)


def contextual_cosine_gram(keys, values, queries, text_out, gram, tau):
    """contextual_cosine from mixer_gram and text_through_out_proj: (I, T)."""
    phi = (einsum(queries, keys, 't m d, i m k d -> i t m k') / tau).softmax(dim=-1)
    along_text = einsum(values, text_out, 'i m k d, t m d -> i t m k')  # V_i^{mk} . s_j^m
    dot = (phi * along_text).sum(dim=(2, 3))                             # z_ij . z'_j
    phi = rearrange(phi, 'i t m k -> i t (m k)')
    squared_norm = ((phi @ gram) * phi).sum(dim=-1)                      # |z_ij|^2
    return dot / squared_norm.sqrt().clamp_min(1e-12)                    # as F.normalize does


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


def use_gram(keys):
    """The Gram form pays (M K)^2 per pair, the plain form D^2 for W_O."""
    heads, k, d = keys.shape[1:]
    return heads * k < heads * d                                         # M K < D


def pair_inputs(keys, values, text_emb, out_proj, form='auto'):
    """(cosine function, caption-side tensor, image-side tensor) of the chosen exact form."""
    if form == 'gram' or (form == 'auto' and use_gram(keys)):
        return (contextual_cosine_gram, text_through_out_proj(text_emb, out_proj, keys.shape[1]),
                mixer_gram(values, out_proj))
    return contextual_cosine, text_emb, out_proj


def llip_loss(keys, values, queries, text_emb, out_proj, logit_scale, logit_bias, tau, chunk_size=None,
              form='auto'):
    """Eq. 3 for this rank's images against every rank's captions.
    keys, values (N_img, M, K, D/M): the projected mixture tokens; queries (N_txt, M, D/M);
    text_emb (N_txt, D) normalised; out_proj (D, D) = W_O; logit_scale = a (already exp'd);
    logit_bias = b. Image i's positive is caption i of the same rank.
    form: 'plain' (contextual_cosine), 'gram' (contextual_cosine_gram) or 'auto' (cheaper one)."""
    rank, _ = rank_and_world()
    n = keys.shape[0]
    queries, text_emb = gather(queries), gather(text_emb)
    chunk = chunk_size or max(1, PAIRS_PER_CHUNK // n)
    a, b = (x if torch.is_tensor(x) else torch.tensor(float(x), device=keys.device)
            for x in (logit_scale, logit_bias))
    cosine, caption_side, image_side = pair_inputs(keys, values, text_emb, out_proj, form)
    total = _ChunkedSigmoidLoss.apply(cosine, tau, chunk, rank * n, keys, values, queries,
                                      caption_side, image_side, a, b)
    return total / n


def llip_loss_reference(keys, values, queries, text_emb, out_proj, logit_scale, logit_bias, tau):
    """The plain form: materialise every z_ij (N_img x N_txt x D) and let autograd keep it all.
    Single process only; for tests and benchmarks."""
    cos = contextual_cosine(keys, values, queries, text_emb, out_proj, tau)
    return _sigmoid_loss_sum(cos, logit_scale, logit_bias, 0, 0) / keys.shape[0]
