"""
Feature-cached gradient accumulation: one optimizer step on a contrastive batch of
batch_size x ranks x grad_accum image-caption pairs, every image against every caption of it,
at the activation memory of one micro-batch (Gao et al.'s gradient cache; open_clip's
--accum-freq). The loss's negatives are the whole batch, as the paper's 32,768 needs.

    1. cache    forward every micro-batch's towers without autograd; keep their outputs:
                for pool=llip the mixture keys/values and the caption queries/embeddings
                (model.ImageFeatures, model.TextFeatures), for the other pools the embeddings
    2. loss     the loss of this rank's whole batch against every rank's captions (loss.py
                all-gathers them) on the cached features, and its gradient with respect to
                each cached feature and to the loss head (W_O, logit scale and bias)
    3. replay   for each micro-batch again: its towers with autograd, from the same random
                state as in 1, and backward of the cached gradient of its features; the loss
                head's gradient joins the last backward

With C captions per image (train.py --captions_per_image) a micro-batch is B images with their
B C captions, all C of an image in the same micro-batch; the loss in 2 still sees the whole
batch, every image against every caption of every micro-batch and rank, so C changes nothing
here but the size of the text features.

Exactness: a rank's loss is S_r / n (S_r its images' sum of pair losses, n its images per step)
and the data-parallel average of the ranks' gradients is then the gradient of S / (ranks x n),
the loss of one step on the whole batch. The cost is one more forward of the towers per step.
`split_batch` turns train.py's --global_batch into a micro-batch and a number of them per rank.

DDP, compile: `train_step` calls the towers through `towers`, a `Towers` module that may be
wrapped (DistributedDataParallel, torch.compile), so a wrapper sees every forward. Under DDP the
gradients are all-reduced once per optimizer step: every replay but the last runs in no_sync(),
and the last backward also carries the loss head's gradients, so that every parameter's
gradient is ready in the one synchronised backward. The loss head itself (llip.out_proj,
logit_scale, logit_bias) is read from the plain module, outside any wrapper. Under FSDP
(sharding.py) the Llip itself is sharded and Towers calls its registered forward methods; the
loss head is left out of the shards, whole on every rank (sharding.reduce_head_grads averages its
gradients), and every replay but the last runs with gradient sync off.

    python -m pytest tests/test_accumulation.py    # == one step on the whole batch, 1 and 2 ranks
    python -m pytest tests/test_fsdp_accum.py      # the same under --shard=fsdp, 2 ranks
    python bench.py accum                           # peak memory against --grad_accum
"""
from contextlib import nullcontext

import torch
import torch.nn as nn

import sharding

DEFAULT_BATCH_SIZE = 64   # images per rank per micro-batch unless told otherwise


class Towers(nn.Module):
    """The image and text towers of a Llip as one forward: (images, tokens) -> (ImageFeatures,
    TextFeatures). What a DDP or compile wrapper wraps for training; its parameters are the
    model's own (a state dict is saved from the Llip, not from this)."""

    def __init__(self, llip):
        super().__init__()
        self.llip = llip

    def forward(self, images, tokens):
        return self.llip.encode_image(images), self.llip.encode_text(tokens)


def train_step(towers, llip, micro_batches, chunk_size=None, form='auto', autocast=None,
               scale=None):
    """Forward and backward of one optimizer step over `micro_batches`, a list of (images,
    tokens) on the device (every rank's whole batch the same size, as loss.py needs). Leaves
    the gradients in .grad (under DDP averaged over ranks) and returns this rank's loss,
    detached. towers: Towers(llip), maybe wrapped; llip: the plain model. autocast: the
    precision context of the forwards; scale: applied to the loss before its gradient
    (GradScaler.scale under fp16). One micro-batch: the plain step, one forward with autograd.
    Several: cache, loss, replay (this file's docstring). The micro-batches' inputs stay on
    the device for the step (at 224 px, fp32: 0.6 MB an image)."""
    autocast = autocast or nullcontext()
    scale = scale or (lambda loss: loss)
    if len(micro_batches) == 1:
        (images, tokens), = micro_batches
        with autocast:
            loss = llip.loss(*towers(images, tokens), chunk_size, form)
        scale(loss).backward()
        return loss.detach()

    # 1. cache: every micro-batch's features without a graph, and the random state before each
    states, cached = [], []
    with torch.no_grad(), autocast:
        for images, tokens in micro_batches:
            states.append(RandomState(images.device))
            cached.append(towers(images, tokens))

    # 2. loss over the whole batch; gradients w.r.t. the cached features and the loss head
    image, text = (concat([f[i] for f in cached]) for i in (0, 1))
    leaves = [t.requires_grad_() for t in tensors(image) + tensors(text)]
    image_leaves = len(tensors(image))
    head = [p for p in (llip.logit_scale, llip.logit_bias, getattr(llip, 'out_proj', None))
            if p is not None]
    with autocast:
        loss = llip.loss(image, text, chunk_size, form)
    grads = torch.autograd.grad(scale(loss), leaves + head, allow_unused=True)
    feature_grads = grads[:len(leaves)]                                    # whole batch
    head_grads = [(p, g) for p, g in zip(head, grads[len(leaves):]) if g is not None]
    del cached, image, text, leaves

    # 3. replay: each micro-batch's towers with autograd, from the same random state; backward
    # of its slice of the feature gradients. Gradient sync (DDP) only in the last backward.
    # (with C captions per image a micro-batch's text features are C times its image features)
    image_sizes = [images.shape[0] for images, _ in micro_batches]
    text_sizes = [tokens.shape[0] for _, tokens in micro_batches]
    per_micro = list(zip(*(g.split(image_sizes if f < image_leaves else text_sizes)
                           for f, g in enumerate(feature_grads))))         # [micro][feature]
    last = len(micro_batches) - 1
    for m, ((images, tokens), state) in enumerate(zip(micro_batches, states)):
        state.restore()
        sync = towers.no_sync() if hasattr(towers, 'no_sync') and m < last else nullcontext()
        sharding.set_gradient_sync(llip, m == last)   # fsdp's no_sync; no-op unsharded
        with sync:
            with autocast:
                image, text = towers(images, tokens)
            outputs, outputs_grads = tensors(image) + tensors(text), list(per_micro[m])
            if m == last:   # the loss head's gradient joins the synchronised backward
                outputs += [p for p, _ in head_grads]
                outputs_grads += [g for _, g in head_grads]
            torch.autograd.backward(outputs, outputs_grads)
    return loss.detach()


# ----------------------------------------------------------------------------- the batch
def split_batch(global_batch, world, batch_size=None, grad_accum=None):
    """(batch_size, grad_accum) per rank, so that batch_size x world x grad_accum is
    --global_batch; the flags given are kept and checked, the others derived (batch_size: the
    largest divisor of global_batch / world up to DEFAULT_BATCH_SIZE). Without --global_batch,
    the defaults. A ValueError names what does not divide or agree."""
    if global_batch is None:
        return batch_size or DEFAULT_BATCH_SIZE, grad_accum or 1
    what = f'--global_batch={global_batch}'
    if global_batch % world:
        raise ValueError(f'{what} is not divisible by the {world} ranks')
    per_rank = global_batch // world
    if batch_size is None and grad_accum is not None:
        if per_rank % grad_accum:
            raise ValueError(f'{what}: {per_rank} images a rank ({world} ranks) is not divisible '
                             f'by --grad_accum={grad_accum}')
        batch_size = per_rank // grad_accum
    if batch_size is None:
        batch_size = max(b for b in range(1, min(per_rank, DEFAULT_BATCH_SIZE) + 1)
                         if per_rank % b == 0)
    if per_rank % batch_size:
        raise ValueError(f'{what}: {per_rank} images a rank ({world} ranks) is not a multiple '
                         f'of --batch_size={batch_size}')
    if grad_accum is not None and batch_size * grad_accum != per_rank:
        raise ValueError(f'{what} contradicts --batch_size={batch_size} x {world} ranks x '
                         f'--grad_accum={grad_accum} = {batch_size * world * grad_accum}')
    return batch_size, per_rank // batch_size


# ----------------------------------------------------------------------------- helpers
class RandomState:
    """The generator state of the CPU and of the micro-batch's CUDA device, taken now and put
    back by restore(): the replay of a micro-batch draws the same numbers (dropout, if any)."""

    def __init__(self, device):
        self.cpu = torch.get_rng_state()
        self.device = device if device.type == 'cuda' else None
        self.cuda = torch.cuda.get_rng_state(device) if self.device else None

    def restore(self):
        torch.set_rng_state(self.cpu)
        if self.device:
            torch.cuda.set_rng_state(self.cuda, self.device)


def tensors(features):
    """The tensors of an ImageFeatures or TextFeatures, in field order, without the Nones."""
    return [t for t in features if t is not None]


def concat(parts):
    """Micro-batches' features (a list of one feature tuple type) -> one tuple of the whole
    batch, each field concatenated along the batch and detached (a leaf)."""
    kind = type(parts[0])
    fields = [None if p[0] is None else torch.cat(p).detach() for p in zip(*parts)]
    return kind(*fields)
