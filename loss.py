"""
The contrastive objectives, on this rank's images against every rank's captions, in the paper's
order: the mixer (eq. 1-2), the contextual cosine, the sigmoid loss (eq. 3), then

    clip_loss    softmax cross-entropy both ways (CLIP)
    siglip_loss  sigmoid loss on every image-caption pair (SigLIP)
    llip_loss    sigmoid loss on cos(z_ij, z'_j), where z_ij is image i's mixture tokens
                 mixed with caption j's query (Llip, eq. 1-3)

    L = (1/N) sum_i sum_j -log sigmoid( y_ij (a cos_ij + b) ),  y_ii = +1, y_ij = -1 otherwise

llip_loss and pairwise_cosine take the feature tuples the model returns (model.ImageFeatures:
keys, values (N_img, M, K, D/M); model.TextFeatures: queries (N_txt, M, D/M) and emb (N_txt, D),
normalised) and the mixer's parameters (out_proj = W_O (D, D), tau). They never hold more than
one chunk of pairs: `chunk_size` is always images per chunk, against every caption. Two exact
forms, chosen in one place, `pick_form`:
  plain  this file: z_ij built chunk by chunk with `mix`, autograd, each chunk recomputed in
         backward (torch.utils.checkpoint);
  gram   loss_gram.py: W_O moved off the pair axis, gradients written by hand; the default
         when M K <= D, i.e. every paper configuration.
`llip_loss_reference` materialises every z_ij (N_img x N_txt x D) at once: bench.py's baseline.

Across ranks each rank passes its own slice; the captions (and for CLIP the images) are
all-gathered with autograd, so DDP's gradient averaging gives exactly the gradient of the
single-process loss on the global batch (every rank must pass the same batch size).

    python -m pytest tests/test_loss.py     # both forms == a pair-by-pair loop, 1 rank == 2 ranks
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import einsum, rearrange
from torch.utils.checkpoint import checkpoint

import loss_gram

# the plain form's default chunk: chunk x N_txt pairs of z_ij held at once
PAIRS_PER_CHUNK = 2 ** 16


# ----------------------------------------------------------------------------- the mixer (eq. 1-2)
def mixing_weights(queries, keys, tau):
    """Eq. 1: Phi_ij^{mk} = softmax over k of Q_j^m . K_i^{mk} / tau, per head m.
    queries (T, M, d), keys (I, M, K, d) -> (I, T, M, K)."""
    logits = einsum(queries, keys, 't m d, i m k d -> i t m k') / tau   # no 1/sqrt(d): tau only
    return logits.softmax(dim=-1)


def mix(queries, keys, values, tau):
    """Eq. 2 before W_O: every image's K mixture tokens mixed with every caption's query.
    queries (T, M, d), keys and values (I, M, K, d) -> (I, T, M*d)."""
    phi = mixing_weights(queries, keys, tau)                             # (I, T, M, K)
    mixed = einsum(phi, values, 'i t m k, i m k d -> i t m d')
    return rearrange(mixed, 'i t m d -> i t (m d)')                      # concat over heads


def contextual_cosine(image, text, out_proj, tau):
    """cos(z_ij, z'_j) for every image i and caption j: (I, T), with z_ij = mix(...) W_O."""
    z = mix(text.queries, image.keys, image.values, tau) @ out_proj     # (I, T, D): z_ij
    return einsum(F.normalize(z, dim=-1), text.emb, 'i t d, t d -> i t')


# ----------------------------------------------------------------------------- the loss (eq. 3)
def sigmoid_loss_sum(cos, logit_scale, logit_bias, offset=0):
    """sum over pairs of -log sigmoid(y_ij (a cos_ij + b)), cos (I, T); y_ij = +1 where caption
    j = image i + offset (this rank's first image is caption offset of the gathered batch)."""
    cos = cos.to(torch.promote_types(cos.dtype, logit_scale.dtype))     # bf16 pairs -> fp32 loss
    i = torch.arange(cos.shape[0], device=cos.device)[:, None] + offset
    j = torch.arange(cos.shape[1], device=cos.device)[None, :]
    labels = torch.where(i == j, 1.0, -1.0).to(cos.dtype)                # y_ij, (I, T)
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
    return sigmoid_loss_sum(cos, logit_scale, logit_bias, rank * n) / n


# ----------------------------------------------------------------------------- Llip
def llip_loss(image, text, out_proj, tau, logit_scale, logit_bias, chunk_size=None, form='auto'):
    """Eq. 3 for this rank's images against every rank's captions. image: keys and values
    (N_img, M, K, D/M); text: queries (N_txt, M, D/M) and emb (N_txt, D), normalised; out_proj
    (D, D) = W_O; logit_scale = a (already exp'd), logit_bias = b. Image i's positive is
    caption i of the same rank. chunk_size: images per chunk (None: default_chunk); form:
    'plain', 'gram' or 'auto' (see pick_form)."""
    rank, _ = rank_and_world()
    n = image.keys.shape[0]
    text = text._replace(queries=gather(text.queries), emb=gather(text.emb))
    a, b = (x if torch.is_tensor(x) else torch.tensor(float(x), device=image.keys.device)
            for x in (logit_scale, logit_bias))
    form = pick_form(form, image.keys)
    chunk = chunk_size or default_chunk(form, text.emb.shape[0], image.keys)
    if form == 'plain':
        total = 0.0
        for s in range(0, n, chunk):
            # only the chunk's scalar loss is kept; backward recomputes the chunk's z_ij
            part = _image_chunk(image, s, chunk)
            offset = rank * n + s                                        # its first positive
            total = total + checkpoint(_plain_loss_sum, part, text, out_proj, tau, a, b, offset,
                                       use_reentrant=False)
    elif form == 'mixed':
        total = loss_gram.mixed_loss_sum(image.keys, image.values, text.queries, text.emb,
                                         out_proj, tau, a, b, rank * n, chunk)
    else:   # the same sum, fast: loss_gram.py
        total = loss_gram.gram_loss_sum(image.keys, image.values, text.queries, text.emb, out_proj,
                                        tau, a, b, rank * n, chunk)
    return total / n


def _plain_loss_sum(image, text, out_proj, tau, logit_scale, logit_bias, offset):
    return sigmoid_loss_sum(contextual_cosine(image, text, out_proj, tau), logit_scale, logit_bias,
                            offset)


def llip_loss_reference(image, text, out_proj, tau, logit_scale, logit_bias):
    """The plain form without chunks: every z_ij (N_img x N_txt x D) at once, and autograd
    keeps it all. Single process only; what the chunking saves, in bench.py."""
    cos = contextual_cosine(image, text, out_proj, tau)
    return sigmoid_loss_sum(cos, logit_scale, logit_bias) / image.keys.shape[0]


def pairwise_cosine(image, text, out_proj, tau, chunk_size=None, form='auto'):
    """contextual_cosine for every image and caption, `chunk_size` images at a time: (I, T).
    For inference (model.Llip.similarity)."""
    form = pick_form(form, image.keys)
    chunk = chunk_size or default_chunk(form, text.emb.shape[0], image.keys)
    if form == 'plain':
        return torch.cat([contextual_cosine(_image_chunk(image, s, chunk), text, out_proj, tau)
                          for s in range(0, image.keys.shape[0], chunk)])
    fast = loss_gram.mixed_cosine if form == 'mixed' else loss_gram.gram_cosine
    return fast(image.keys, image.values, text.queries, text.emb, out_proj, tau, chunk)


def _image_chunk(image, start, size):
    """Images start .. start + size - 1 of a feature tuple."""
    end = start + size
    return image._replace(keys=image.keys[start:end], values=image.values[start:end])


# ----------------------------------------------------------------------------- the one switch
def pick_form(form, keys):
    """'plain' (this file) or 'gram' (loss_gram.py): the two compute the same numbers. 'auto'
    takes the Gram form when M K <= D: per pair it pays (M K)^2 where the plain form pays D^2
    for W_O (and it writes its gradients by hand instead of recomputing)."""
    if form not in ('auto', 'plain', 'gram', 'mixed'):
        raise ValueError(f"form={form!r}: expected 'auto', 'plain' or 'gram'")
    if form == 'auto':
        heads, k, d = keys.shape[1:]
        return 'gram' if heads * k <= heads * d else 'mixed'
    return form


def default_chunk(form, n_txt, keys):
    """Images per chunk when none is given: PAIRS_PER_CHUNK pairs of z_ij (plain), or
    loss_gram.ELEMENTS_PER_CHUNK mixing weights (gram)."""
    if form == 'plain':
        return max(1, PAIRS_PER_CHUNK // n_txt)
    heads, k = keys.shape[1:3]
    return loss_gram.images_per_chunk(n_txt, heads, k, keys.device.type)


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
