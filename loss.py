"""
The contrastive objectives, on this rank's images against every rank's captions, in the paper's
order: the mixer (eq. 1-2), the contextual cosine, the sigmoid loss (eq. 3), then

    clip_loss    softmax cross-entropy both ways (CLIP)
    siglip_loss  sigmoid loss on every image-caption pair (SigLIP)
    llip_loss    sigmoid loss on cos(z_ij, z'_j), where z_ij is image i's mixture tokens
                 mixed with caption j's query (Llip, eq. 1-3)

    L = (1/N) sum_i sum_j -log sigmoid( y_ij (a cos_ij + b) ),  y_ii = +1, y_ij = -1 otherwise

With C captions per image (train.py --captions_per_image) the captions come image-major, C of
image 0, then C of image 1, ...: caption j belongs to image j // C, here and across ranks (rank
r's captions follow ranks 0..r-1's, so its caption j is global caption r N C + j, of global
image r N + j // C). y_ij = +1 for each of image i's C captions, -1 for every other pair, and
the sum is still divided by N, the images (C = 1 is the line above).

llip_loss and pairwise_cosine take the feature tuples the model returns (model.ImageFeatures:
keys, values (N_img, M, K, D/M); model.TextFeatures: queries (N_txt, M, D/M) and emb (N_txt, D),
normalised) and the mixer's parameters (out_proj = W_O (D, D), tau). They never hold more than
one chunk of pairs: `chunk_size` is always images per chunk, against every caption. Three exact
forms, chosen in one place, `pick_form`:
  plain  this file: z_ij built chunk by chunk with `mix`, autograd, each chunk recomputed in
         backward (torch.utils.checkpoint): the readable reference the tests hold the others to;
  gram   loss_gram.py: W_O moved off the pair axis, |z_ij|^2 through a per-image (MK x MK) Gram
         matrix, gradients written by hand: the default when M K < D (ViT-B/16, L/14, H/14, G/14);
  mixed  loss_gram.py: the same, |z_ij|^2 through H = W_O W_O^T (D x D) on the mixed heads: the
         default when M K > D (the tiny preset); at M K = D (ViT-B/32) pick_form weighs them.
`llip_loss_reference` materialises every z_ij (N_img x N_txt x D) at once: bench.py's baseline.

Across ranks each rank passes its own slice; the captions (and for CLIP the images) are
all-gathered with autograd, so DDP's gradient averaging gives exactly the gradient of the
single-process loss on the global batch (every rank must pass the same batch size).

    python -m pytest tests/test_loss.py     # every form == a pair-by-pair loop
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
def sigmoid_loss_sum(cos, a, b, offset=0, captions=1):
    """sum over pairs of -log sigmoid(y_ij (a cos_ij + b)), cos (I, T); y_ij = +1 where caption
    j belongs to image i + offset, j // captions = i + offset (row i is global image offset + i;
    the columns are every rank's captions, `captions` per image, image-major)."""
    cos = cos.to(torch.promote_types(cos.dtype, a.dtype))   # bf16 pairs -> fp32 loss
    i = torch.arange(cos.shape[0], device=cos.device)[:, None] + offset
    j = torch.arange(cos.shape[1], device=cos.device)[None, :]
    labels = torch.where(i == j // captions, 1.0, -1.0).to(cos.dtype)    # y_ij, (I, T)
    return -F.logsigmoid(labels * (a * cos + b)).sum()


# ----------------------------------------------------------------------------- CLIP and SigLIP
def clip_loss(image_emb, text_emb, a, captions_per_image=1):
    """Image->text and text->image cross-entropy; embeddings (N, D) and (N C, D) normalised.
    With C > 1 an image's target is its C captions, 1/C each; a caption's is its one image."""
    rank, _ = rank_and_world()
    n, c = image_emb.shape[0], captions_per_image
    check_captions(n, text_emb.shape[0], c)
    all_images, all_texts = gather(image_emb), gather(text_emb)
    targets = torch.arange(n * c, device=image_emb.device) // c + rank * n    # captions' images
    logits = a * image_emb @ all_texts.T                                 # (N, N_global C)
    if c == 1:
        image_to_text = F.cross_entropy(logits, targets)
    else:   # every image's row: 1/C on each of its own captions
        owner = torch.arange(logits.shape[1], device=logits.device) // c
        mine = owner[None, :] == torch.arange(n, device=logits.device)[:, None] + rank * n
        image_to_text = F.cross_entropy(logits, mine.to(logits.dtype) / c)
    return (image_to_text + F.cross_entropy(a * text_emb @ all_images.T, targets)) / 2


def siglip_loss(image_emb, text_emb, a, b, captions_per_image=1):
    """Sigmoid loss of every local image against every caption; embeddings (N, D) normalised,
    the captions (N C, D), C of each image, image-major (the module docstring)."""
    rank, _ = rank_and_world()
    n = image_emb.shape[0]
    check_captions(n, text_emb.shape[0], captions_per_image)
    cos = image_emb @ gather(text_emb).T                                 # (N, N_global C)
    return sigmoid_loss_sum(cos, a, b, rank * n, captions_per_image) / n


def check_captions(n_img, n_txt, captions_per_image):
    """C > 1 needs exactly C captions of each image (C = 1 also allows more, as today: caption i
    is image i's, the rest are negatives only)."""
    if captions_per_image < 1 or (captions_per_image > 1 and n_txt != n_img * captions_per_image):
        raise ValueError(f'captions_per_image={captions_per_image}: {n_txt} captions for {n_img} '
                         f'images (expected C captions of each image, image-major)')


# ----------------------------------------------------------------------------- Llip
def llip_loss(image, text, out_proj, tau, a, b, chunk_size=None, form='auto',
              captions_per_image=1):
    """Eq. 3 for this rank's images against every rank's captions. image: keys and values
    (N_img, M, K, D/M); text: queries (N_txt, M, D/M) and emb (N_txt, D), normalised; out_proj
    (D, D) = W_O; a and b as in eq. 3: a = exp(t) (the model's logit_scale is t), b the model's
    logit_bias. Image i's positives are captions i C .. i C + C - 1 of the same rank, C =
    captions_per_image (N_txt = N_img C). chunk_size: images per chunk (None: default_chunk);
    form: 'plain', 'gram', 'mixed' or 'auto' (see pick_form)."""
    rank, _ = rank_and_world()
    n, c = image.keys.shape[0], captions_per_image
    check_captions(n, text.emb.shape[0], c)
    text = text._replace(queries=gather(text.queries), emb=gather(text.emb))
    a, b = (x if torch.is_tensor(x) else torch.tensor(float(x), device=image.keys.device)
            for x in (a, b))
    form = pick_form(form, image.keys, text.emb.shape[0])
    chunk = chunk_size or default_chunk(form, text.emb.shape[0], image.keys)
    if form == 'plain':
        total = 0.0
        for s in range(0, n, chunk):
            # only the chunk's scalar loss is kept; backward recomputes the chunk's z_ij
            part = _image_chunk(image, s, chunk)
            offset = rank * n + s                           # the global index of its first image
            total = total + checkpoint(_plain_loss_sum, part, text, out_proj, tau, a, b, offset,
                                       c, use_reentrant=False)
    else:   # the same sum, fast: loss_gram.py
        fast = loss_gram.mixed_loss_sum if form == 'mixed' else loss_gram.gram_loss_sum
        total = fast(image.keys, image.values, text.queries, text.emb, out_proj, tau, a, b,
                     rank * n, chunk, c)
    return total / n


def _plain_loss_sum(image, text, out_proj, tau, a, b, offset, captions):
    return sigmoid_loss_sum(contextual_cosine(image, text, out_proj, tau), a, b,
                            offset, captions)


def llip_loss_reference(image, text, out_proj, tau, a, b, captions_per_image=1):
    """The plain form without chunks: every z_ij (N_img x N_txt x D) at once, and autograd
    keeps it all. Single process only; what the chunking saves, in bench.py."""
    cos = contextual_cosine(image, text, out_proj, tau)
    return sigmoid_loss_sum(cos, a, b, 0, captions_per_image) / image.keys.shape[0]


def pairwise_cosine(image, text, out_proj, tau, chunk_size=None, form='auto'):
    """contextual_cosine for every image and caption, `chunk_size` images at a time: (I, T).
    For inference (model.Llip.similarity); differentiable where autograd is on."""
    form = pick_form(form, image.keys, text.emb.shape[0])
    if form == 'mixed' and torch.is_grad_enabled():
        form = 'plain'      # mixed_cosine works in place, without autograd: the same numbers
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
# 'auto' takes the form whose training step (forward + backward) costs least per image-caption
# pair, counted from the code: its multiply-adds, plus TRAFFIC_MACS for every element of a
# pair-sized tensor it reads or writes (softmax, sums, copies: work at memory speed, not matmul
# speed). Both fast forms pay 6 K D for eq. 1-2 and its gradients; beyond that
#     gram   2 (MK)^2 (G_i Phi and dl/dG_i), G_i per image shared by the captions; ~39 MK moved
#     mixed  2 D^2 (H x and dl/dH); ~17 MK + 29 D moved
#     plain  its forward twice (checkpoint) and backward: 4 (2 K D + D^2), never the cheapest.
# Measured (llip_loss forward + backward as bench.py loss runs it, N = 256, M = 8, CPU time of
# one thread on a shared machine), the faster form was mixed at D, K = 64, 16; 128, 16; 128, 32;
# 256, 32; 512, 64 (by 1.3 to 2.7x) and gram at 256, 16; 512, 32 (by 1.3x); this model agrees
# at every TRAFFIC_MACS from 0 to 6.8 (mixed wins at M K = D: gram's G_i costs K D^2 per image).
# GPUs: not measured, no GPU was at hand.
TRAFFIC_MACS = 4


def pair_cost(form, heads, k, d, n_txt):
    """Multiply-adds per image-caption pair of a training step in form 'gram' or 'mixed', memory
    traffic included at TRAFFIC_MACS per element (see above)."""
    dim, mk = heads * d, heads * k
    if form == 'gram':
        per_image = k * dim * dim + mk * mk * d                 # G_i from H, forward
        return 6 * k * dim + 2 * mk * mk + 3 * per_image / n_txt + TRAFFIC_MACS * 39 * mk
    return 6 * k * dim + 2 * dim * dim + TRAFFIC_MACS * (17 * mk + 29 * dim)


def pick_form(form, keys, n_txt):
    """'plain' (this file), 'gram' or 'mixed' (loss_gram.py): all three compute the same
    numbers. 'auto': the cheapest by pair_cost for keys (I, M, K, d) against n_txt captions."""
    if form not in ('auto', 'plain', 'gram', 'mixed'):
        raise ValueError(f"form={form!r}: expected 'auto', 'plain', 'gram' or 'mixed'")
    if form == 'auto':
        heads, k, d = keys.shape[1:]
        return min(('gram', 'mixed'), key=lambda f: pair_cost(f, heads, k, d, n_txt))
    return form


def default_chunk(form, n_txt, keys):
    """Images per chunk when none is given: PAIRS_PER_CHUNK pairs of z_ij (plain), or
    loss_gram.ELEMENTS_PER_CHUNK mixing weights (gram, mixed)."""
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
