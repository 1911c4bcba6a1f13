"""
Sharded training with FSDP2 (torch.distributed.fsdp.fully_shard): each of R ranks keeps 1/R of
every parameter, of its gradient and of AdamW's state, and gathers a block's whole weights only
while that block runs. train.py --shard=fsdp calls `shard` once; everything else here is what
the rest of training needs to stay exact when parameters are split across ranks.

    torchrun --standalone --nproc_per_node=2 train.py --shard=fsdp      # CPU: gloo; GPU: NCCL
    python -m pytest tests/test_sharding.py     # 2 ranks with fsdp == 1 process, == DDP

train.py shards the model while it is still on the meta device (shapes, no memory), then each
rank allocates its rows only and model.init_weights gives them their values, the same rows of
the same whole values on any number of ranks (tests/test_init.py).

Where the model is cut (`shard`): every transformer block of both towers is its own unit
(gathered before the block, freed after), each tower is one (its embeddings and norms), and the
root holds the rest: the mixer (W_K, W_V, W_Q), the text projection W_T; the loss head (W_O, t,
b) is not sharded (below). Forward and backward then hold at most one block's whole weights
beyond the root's and the loss head.

What changes with shards, and how each is kept exact:
  - The loss head stays whole on every rank (`ignored_params`): logit_scale t and logit_bias b
    (fully_shard refuses 0-d parameters) and W_O (out_proj, D x D, where pools have it).
    Feature-cached --grad_accum computes the loss on the plain module, outside any FSDP
    forward (accumulation.py), so these must be readable there; `reduce_head_grads` averages
    their gradients over ranks, as DDP would. They stay float32, and reading t and b (logging,
    the clamp) needs no collective and never meets an empty shard.
  - A parameter between steps is a DTensor holding this rank's rows: `.item()`, `state_dict()`
    and a forward pass outside FSDP see only the shard. `full_state_dict` gathers every
    parameter whole (all ranks must call it); `unsharded_copy` builds a plain model from it,
    for evaluation on rank 0 alone (a sharded forward on one rank waits for the others forever).
  - Gradient clipping and the non-finite check need the norm of the whole gradient, not of
    this rank's shard: `clip_grad_norm` adds the squares of every rank's shards.
  - Mixed precision: blocks run with parameters in the compute dtype and reduce gradients in
    float32 (MixedPrecisionPolicy); the root keeps float32 parameters and autocast casts per op,
    as without sharding, so the mixer, t and b stay float32.
  - --grad_accum: the towers run through encode_image / encode_text, registered as FSDP
    forward methods; `set_requires_gradient_sync(False)` on all replays but the last keeps the
    summed gradient unreduced until the last one (FSDP's counterpart of DDP's no_sync).
  - --grad_ckpt composes as PyTorch documents (activation checkpointing inside each block's
    call, then compile, then shard); model.Transformer checkpoints the call of each sharded
    block, so the recomputation in backward gathers the block's weights again.
"""
import sys
import warnings

import torch
import torch.distributed as dist

from model import Llip, is_dtensor
# torch.distributed.fsdp and .tensor are imported where they are used, not here: they add 1.4 s
# to the start of every process, and a run with --shard=none never needs them

# the loss head, whole on every rank: t and b (0-d, which fully_shard cannot split) and W_O
HEAD = ('logit_scale', 'logit_bias', 'out_proj')
SHARDS = ('none', 'fsdp')


def is_sharded(model):
    fsdp = sys.modules.get('torch.distributed.fsdp')   # not loaded: nothing is sharded
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def shard(model: Llip, device_type='cpu', param_dtype=None, compile=False):
    """fully_shard every transformer block of both towers, then each tower, then the root,
    over all ranks of the default process group; returns the same module, now sharded.
    param_dtype: the dtype blocks compute in (bf16 under --dtype=bfloat16; None: keep the
    parameters' own), gradients then reduced in float32. compile: torch.compile each block
    before it is sharded. Build the optimizer after this: it must hold the sharded parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (MixedPrecisionPolicy, fully_shard,
                                        register_fsdp_forward_method)
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    low = param_dtype is not None and param_dtype != torch.float32
    blocks = MixedPrecisionPolicy(param_dtype=param_dtype if low else None,
                                  reduce_dtype=torch.float32 if low else None)
    root = MixedPrecisionPolicy(reduce_dtype=torch.float32 if low else None)
    for tower in (model.visual, model.text):
        for block in tower.transformer.blocks:
            if compile:
                block.compile()
            fully_shard(block, mesh=mesh, mp_policy=blocks)
        fully_shard(tower, mesh=mesh, mp_policy=root)
    fully_shard(model, mesh=mesh, mp_policy=root,
                ignored_params=set(head(model)))
    # the towers' entry points gather the root's parameters as forward does, so a caller may run
    # encode_image / encode_text alone (feature-cached accumulation does)
    for method in ('encode_image', 'encode_text'):
        register_fsdp_forward_method(model, method)
    # FSDP warns that a view it returns (the heads of the features, rearranged) loses its hook
    # if changed in place; nothing here changes features in place
    warnings.filterwarnings('ignore', message='FSDP2-wrapped module .* returned a view tensor')
    return model


def set_gradient_sync(model, sync):
    """False on inner micro-steps of --grad_accum: gradients add up locally, unreduced; True
    on the last. No-op for an unsharded model (DDP's no_sync is train.py's)."""
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)


def head(model):
    """The loss head's parameters the model has (W_O only where its pool uses it)."""
    return [getattr(model, name) for name in HEAD if hasattr(model, name)]


def reduce_head_grads(model):
    """Average the replicated t, b and W_O gradients over ranks: what FSDP's reduce-scatter does
    for every other parameter. Call once per optimizer step, after the last backward. No-op for
    an unsharded model (DDP averaged them)."""
    if not is_sharded(model):
        return
    world = dist.get_world_size()
    for param in head(model):
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= world


def clip_grad_norm(parameters, max_norm):
    """torch.nn.utils.clip_grad_norm_ over the whole gradient, whether sharded or not: a DTensor
    gradient is this rank's rows of the parameter (its squares are summed over ranks), a plain
    one is whole on every rank (DDP's, or the loss head's under fsdp) and counted once. Returns
    the norm (a 0-d tensor, the same on every rank); scales the gradients in place by
    min(1, max_norm / (norm + 1e-6))."""
    grads = [p.grad for p in parameters if p.grad is not None]
    local = [g.to_local() if is_dtensor(g) else g for g in grads]
    zero = torch.zeros((), dtype=torch.float64, device=local[0].device)
    sharded = sum((g.double().square().sum() for g, full in zip(local, grads)
                   if is_dtensor(full)), zero)
    whole = sum((g.double().square().sum() for g, full in zip(local, grads)
                 if not is_dtensor(full)), zero)
    if any(is_dtensor(g) for g in grads):
        dist.all_reduce(sharded)   # every rank's rows of every parameter, each counted once
    norm = (sharded + whole).sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in local:
        g.mul_(scale.to(g.dtype))
    return norm.float()


def full_state_dict(model):
    """The model's state dict with every tensor whole, on CPU. Under fsdp this gathers every
    parameter from every rank: all ranks must call it, together."""
    out = {}
    for name, value in model.state_dict().items():
        if is_dtensor(value):
            value = value.full_tensor()
        out[name] = value.detach().cpu()
    return out


def load_full_state_dict(model, state):
    """Copy a whole state dict (full_state_dict's, or an unsharded checkpoint's) into a sharded
    or plain model: each rank keeps its own rows. No communication: every rank holds `state`."""
    with torch.no_grad():
        for name, target in model.state_dict().items():
            source = state[name].to(target.dtype)
            if is_dtensor(target):   # this rank's rows, as fully_shard cut them
                from torch.distributed.tensor import distribute_tensor
                source = distribute_tensor(source.to(target.device), target.device_mesh,
                                           target.placements, src_data_rank=None).to_local()
                target = target.to_local()
            target.copy_(source)


def unsharded_copy(model, device, keep):
    """A plain Llip with the sharded model's weights, on `device`, built only where keep is true
    (rank 0, for evaluation); every rank must call this (the gather is a collective). An
    unsharded model is returned as it is."""
    if not is_sharded(model):
        return model
    state = full_state_dict(model)
    if not keep:
        return None
    with torch.device('meta'):
        copy = Llip(model.config)
    copy.load_state_dict(state, assign=True)
    return copy.to(device)
