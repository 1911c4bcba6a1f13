"""
The planner: what fits on a GPU, and how long a run takes, before the run starts.

    python bench.py plan --model=vit_g14 --global_batch=32768 --gpus=8,64,256 --gpu_memory=80
    python bench.py plan --model=all --gpu=h100               # every preset, the paper's batch
    python bench.py plan --validate                           # against CPU measurements

Everything is arithmetic on the model's shapes, written out below so it can be checked:
  parameters        counted on the meta device from model.Llip(config) (no memory, no init)
  state per GPU     fp32 weights + fp32 gradients + AdamW's two moments = 16 bytes a parameter;
                    shard=none (DDP) holds all of it on every GPU, shard=fsdp 1/GPUs of it (but
                    the loss head W_O, t, b, whole on every GPU: sharding.HEAD) plus the gathered
                    weights and gradients of two blocks (the one running and the next)
  activations       what autograd keeps per image, tensor by tensor (block_activations), fp32 or
                    under bf16 autocast; with grad_ckpt only each block's input plus one block
                    recomputed in backward
  loss workspace    every caption's features (gathered from all ranks) and one chunk of pairs
  FLOPs             matmuls as torch.utils.flop_counter counts them, forward + backward:
                    towers / mixer (the per-token projections W_K, W_V, W_Q, W_T) / pairwise loss
                    (every local image against every caption of the global batch)
  time              FLOPs executed / (GPUs x peak bf16 FLOP/s x MFU)

It is validated, not guessed: `python bench.py plan --validate` and tests/test_plan.py run the real
model on CPU and compare the predicted peak memory of a training step with the peak of live
tensors measured there (LiveMemory, every tensor torch allocates, within 25 %), and the FLOPs
with FlopCounterMode (within 5 %).
"""
import math
from dataclasses import replace

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import loss_gram
import sharding
from loss import pick_form
from model import PRESETS, Llip

# dense bf16 peak FLOP/s and memory (GB) of the GPUs the planner knows
GPUS = {'h100': (989e12, 80), 'h200': (989e12, 141), 'a100': (312e12, 80),
        'a100-40gb': (312e12, 40), 'l40s': (362e12, 48)}
STATE_BYTES = 4 + 4 + 8        # a parameter: fp32 weight, gradient, AdamW's two moments
PAPER_SAMPLES = 12.8e9         # the paper trains on 12.8 B samples (appendix)
PAPER_BATCH = 32768


# ----------------------------------------------------------------------------- parameters
_COUNTS = {}   # the planner asks for the same config's count many times


def count_parameters(config):
    """Parameters of the towers and of the rest (mixer, projections, a, b), on the meta device;
    'head': the loss head's (W_O, t, b), which fsdp keeps whole on every rank."""
    if repr(config) not in _COUNTS:
        _COUNTS[repr(config)] = _count_parameters(config)
    return _COUNTS[repr(config)]


def _count_parameters(config):
    with torch.device('meta'):
        model = Llip(config)
    count = lambda module: sum(p.numel() for p in module.parameters())
    towers = {'vision': count(model.visual), 'text': count(model.text)}
    block = max(count(model.visual.transformer.blocks[0]), count(model.text.transformer.blocks[0]))
    head = sum(p.numel() for p in sharding.head(model))
    return {**towers, 'mixer': count(model) - sum(towers.values()), 'total': count(model),
            'largest_block': block, 'head': head}


def state_bytes(config, gpus, shard):
    """Weights, gradients and AdamW state on one GPU. fsdp: a 1/gpus slice of everything but
    the loss head (whole on every GPU), plus two blocks' full fp32 weights and gradients gathered
    at a time (the block that runs and the one prefetched) -- an estimate: sharding cannot be
    measured on this CPU-only machine."""
    n = count_parameters(config)
    if shard == 'none':
        return STATE_BYTES * n['total']
    sharded = n['total'] - n['head']
    return STATE_BYTES * (sharded / gpus + n['head']) + 2 * 8 * n['largest_block']


# ----------------------------------------------------------------------------- activations
def _towers(c):
    """(layers, width, mlp hidden, heads, tokens per sequence) of the vision and text towers."""
    patches = (c.image_size // c.patch_size) ** 2
    return {'vision': (c.vision_layers, c.vision_width, int(c.vision_width * c.vision_mlp_ratio),
                       c.vision_width // c.vision_head_width, c.num_tokens + patches),
            'text': (c.text_layers, c.text_width, 4 * c.text_width, c.text_heads, c.context_length)}


def block_activations(width, hidden, heads, quick_gelu, low):
    """Bytes autograd keeps per token in one pre-LN block. low: bytes of a matmul's input under
    autocast (2 for bf16, 4 for fp32); the residual stream and LayerNorm stay fp32.
        ln_1 input (residual)  4W      ln_1 output, cast for in_proj   low W
        q, k, v (one buffer)   low 3W  attention output                low W
        ln_2 input (residual)  4W      ln_2 output, cast for c_fc      low W
        c_fc output            low F   GELU: output (c_proj's input)    low F
        QuickGELU x sigmoid(1.702 x) also keeps sigmoid's output        low F
        LayerNorm mean and 1/std: 2 x 2 x 4;  attention's logsumexp: 4 per head"""
    gelu = 3 if quick_gelu else 2
    return 8 * width + low * (6 * width + gelu * hidden) + 16 + 4 * heads


def activation_bytes(config, dtype='bfloat16', grad_ckpt=False):
    """Bytes autograd keeps per image (and its caption) at the end of the forward pass, and the
    part of it that the backward pass of one block adds back with grad_ckpt (the recompute)."""
    c, low = config, 2 if dtype == 'bfloat16' else 4
    kept, recompute = 0, 0
    for name, (layers, width, hidden, heads, n) in _towers(c).items():
        block = n * block_activations(width, hidden, heads, c.quick_gelu, low)
        if grad_ckpt:   # each block keeps only its input; backward rebuilds one block at a time
            kept += layers * 4 * width * n
            recompute = max(recompute, block)
        else:
            kept += layers * block
        kept += 4 * width * n                          # the last block's output (ln_post/ln_final)
    vision, text = c.vision_width, c.text_width
    patches = 3 * c.image_size ** 2
    kept += 4 * patches + 4 * vision * _towers(c)['vision'][4]   # the patches; ln_pre's input
    # the mixture tokens after ln_post (W_K, W_V's input) and the EOT state (W_Q, W_T's input);
    # the loss keeps the gradients of keys, values, queries and z'_j (loss_gram), and with
    # qkv_norm each LayerNorm(D) its input
    # (einsum's bmm keeps its own copy of the mixture tokens for each of W_K and W_V)
    copies = {'cls': 1, 'registers': 1, 'avg': 1}.get(c.pool, 2)
    kept += copies * low * c.num_tokens * vision + 4 * text
    d = c.embed_dim
    kept += 4 * (2 * c.num_tokens * d + 2 * d) * (2 if c.qkv_norm else 1)
    return {'kept': kept, 'recompute': recompute}


def loss_form(config, captions):
    """The form model.Llip's loss runs at this many captions: loss.pick_form, the one switch."""
    c = config
    keys = torch.empty(1, c.mixer_heads, c.num_mixture, c.embed_dim // c.mixer_heads,
                       device='meta')
    return pick_form('auto', keys, captions)


def loss_workspace_bytes(config, local_images, global_batch, device='cuda', dtype='bfloat16'):
    """The loss's memory beyond the activations, while it runs (loss_gram.py): every caption's
    query, z'_j and W_O z'_j and the gradients of both, in fp32 (about 10 numbers of D per
    caption); the gradient of H = W_O W_O^T (D x D); and per chunk of images (against every
    caption) six pair-sized buffers of mixing weights (_GramSigmoidLoss.forward) and, per image,
    G_i's construction and its gradient: V_i H (M K x D, twice: it and einsum's copy, and once
    more in backward) and G_i (M K x M K, and its gradient). The mixed form (loss.pick_form's
    choice when M K > D, or at few captions) keeps per pair 2 M K + 5 D numbers instead."""
    c = config
    chunk = min(local_images, loss_gram.images_per_chunk(global_batch, c.mixer_heads,
                                                          c.num_mixture, device))
    mk, d = c.mixer_heads * c.num_mixture, c.embed_dim
    if loss_form(c, global_batch) == 'mixed':   # e and its gradient (M K); x, x_rows, H x,
        per_image = global_batch * (2 * mk + 5 * d)  # the product and g (D): _MixedSigmoidLoss
    else:
        per_image = global_batch * mk * 6 + 3 * mk * d + 2 * mk ** 2
    low = 2 if dtype == 'bfloat16' else 4
    return 10 * 4 * global_batch * d + 4 * d ** 2 + low * chunk * per_image


def memory_plan(config, micro_batch, global_batch, gpus, shard='none', grad_ckpt=False,
                dtype='bfloat16', device='cuda'):
    """Predicted peak bytes of one training step on one GPU, by part: the state, the activations
    kept for backward, and the larger of what comes on top of them at two different moments:
    the loss's workspace at the end of the forward pass, or (grad_ckpt) one block rebuilt in
    backward."""
    act = activation_bytes(config, dtype, grad_ckpt)
    parts = {'state': state_bytes(config, gpus, shard),
             'activations': micro_batch * act['kept'],
             'transient': max(loss_workspace_bytes(config, micro_batch, global_batch, device,
                                                   dtype), micro_batch * act['recompute'])}
    return {**parts, 'total': sum(parts.values())}


def largest_micro_batch(config, gpu_memory_gb, gpus, global_batch, shard='none',
                        grad_ckpt=False, dtype='bfloat16', headroom=0.9):
    """The largest images-per-GPU micro-batch that fits in headroom x gpu_memory_gb (the rest for
    the CUDA context, the allocator's fragmentation and NCCL) and divides this GPU's share of
    global_batch, so that the accumulation count is a whole number. 0: not even one image fits."""
    if global_batch % gpus:
        raise ValueError(f"global_batch={global_batch} is not divisible by gpus={gpus}")
    local = global_batch // gpus
    budget = headroom * gpu_memory_gb * 1e9
    fits = lambda b: memory_plan(config, b, global_batch, gpus, shard, grad_ckpt,
                                 dtype)['total'] <= budget
    return max((b for b in range(1, local + 1) if local % b == 0 and fits(b)), default=0)


# ----------------------------------------------------------------------------- FLOPs
def tower_flops(c, images, grad_ckpt=False):
    """Matmul FLOPs (2 per multiply-add) of both towers, forward + backward, for `images` images
    and as many captions. Backward is twice the forward for a linear layer (input and weight
    gradients) but once for the patch embedding (the images need no gradient); attention's
    backward is 2.5x its forward (FlopCounterMode counts the recomputed scores); grad_ckpt runs
    every block's forward once more but for c_proj, whose output nothing keeps (torch's
    checkpoint stops its recompute at the last tensor backward needs)."""
    total = 0
    for name, (layers, width, hidden, heads, n) in _towers(c).items():
        linear = n * (4 * width ** 2 + 2 * width * hidden)       # qkv, out, c_fc, c_proj
        attention = 2 * n * n * width                           # Q K^T and Phi V
        recompute = grad_ckpt * (linear - n * width * hidden + attention)
        block = 2 * layers * (3 * linear + 3.5 * attention + recompute)
        total += images * block
    total += images * 2 * 2 * (c.image_size // c.patch_size) ** 2 * 3 * c.patch_size ** 2 * \
        c.vision_width
    return total


def mixer_flops(c, images):
    """The projections around the mixer, forward + backward: W_K, W_V per mixture token, W_Q
    and W_T per caption (pool=llip; the other pools as model.pool_image computes them)."""
    d, per_token = c.embed_dim, c.vision_width * c.embed_dim
    if c.pool in ('cls', 'registers'):
        image = per_token
    elif c.pool in ('avg', 'learned'):
        image = (2 if c.pool == 'learned' else 1) * c.num_tokens * per_token + d * d
    else:
        image = 2 * c.num_tokens * per_token
    text = (2 if c.pool == 'llip' else 1) * c.text_width * d
    return images * 3 * 2 * (image + text)


def loss_flops(c, global_batch, gpus, form=None):
    """The pairwise part at the global batch, all GPUs together, forward + backward: each GPU's
    global_batch / gpus images against all global_batch captions (B^2 pairs in all), as loss.py
    and loss_gram.py compute it (loss.pair_cost gives the same per-pair counts), plus per image
    G_i (gram) and per GPU W_O z'_j for every caption and H = W_O W_O^T. form: None for the one
    the model picks (loss.pick_form). Caption-independent pools score one vector per image:
    2 D per pair, forward, backward twice."""
    b, d, mk = global_batch, c.embed_dim, c.mixer_heads * c.num_mixture
    if c.pool != 'llip':
        return 3 * 2 * b * b * d
    form = form or loss_form(c, global_batch)
    if form == 'plain':   # logits, mixing, W_O and the cosine; recomputed once in backward
        return 4 * 2 * b * b * (2 * c.num_tokens * d + d * d + d)
    per_gpu = gpus * 3 * (b * d * d + d ** 3)
    if form == 'mixed':   # logits, x, H x, dH; and by hand the four gradients of logits and x
        return 2 * (b * b * (6 * c.num_tokens * d + 2 * d * d) + per_gpu)
    pairs = b * b * (6 * c.num_tokens * d + 2 * mk ** 2)
    images = b * 3 * (c.num_tokens * d * d + mk ** 2 * d // c.mixer_heads)
    return 2 * (pairs + images + per_gpu)


def flops_per_step(config, global_batch, gpus, grad_ckpt=False, form=None):
    """FLOPs of one optimizer step on all GPUs, by part. form: the loss's (None: the one
    model.Llip runs, loss.pick_form)."""
    c = config
    parts = {'towers': tower_flops(c, global_batch, grad_ckpt),
             'mixer': mixer_flops(c, global_batch),
             'loss': loss_flops(c, global_batch, gpus, form)}
    return {**parts, 'total': sum(parts.values())}


# ----------------------------------------------------------------------------- measurement
class LiveMemory(TorchDispatchMode):
    """Peak bytes of live tensor storage while the mode is on: every tensor an operator returns
    is counted until its storage is freed (a weak reference to the storage says when), so what
    autograd saves, temporaries and new gradients are all seen. Storages that existed before
    (parameters, optimizer state, inputs: `known`) are not counted; add them yourself."""

    def __init__(self, known=()):
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in known}
        self.live, self.now, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == 'meta':
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            old = self.live.get(key)
            if key in self.known or (old is not None and not old[0].expired()):
                continue                                  # a view of a counted storage
            self.now += storage.nbytes() - (old[1] if old else 0)
            self.live[key] = (StorageWeakRef(storage), storage.nbytes())
        if self.now > self.peak:   # perhaps a new peak: first forget what was freed
            self.sweep()
            self.peak = max(self.peak, self.now)
        return out

    def sweep(self):
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(key)[1]

    def __exit__(self, *exc):
        self.sweep()
        return super().__exit__(*exc)


def measured_step(config, batch, grad_ckpt=False, dtype='float32', seed=0):
    """One training step (forward, backward, AdamW) of the real model on CPU, measured: bytes
    autograd keeps after the forward pass ('kept'), the peak of live tensors during forward and
    backward ('activations', the gradients preallocated so that only activations and backward's
    temporaries are counted), the state (weights, gradients, AdamW moments) and the peak of the
    whole step with it ('peak'); and the step's FLOPs (FlopCounterMode). After one warm-up step,
    so that AdamW's state exists, as in training."""
    from bench import step_flops
    torch.manual_seed(seed)
    model = Llip(config)
    model.set_grad_checkpointing(grad_ckpt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, config.image_size, config.image_size)
    tokens = torch.randint(1, config.vocab_size, (batch, config.context_length))
    autocast = torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == 'bfloat16')

    def step():
        opt.zero_grad(set_to_none=False)
        with autocast:
            loss = model(images, tokens)
        loss.backward()
        opt.step()
    step()
    opt.zero_grad(set_to_none=False)
    params = list(model.parameters())
    state = [*params, *(p.grad for p in params), *(t for s in opt.state.values()
                                                  for t in s.values())]
    seen = {}

    def tracked():   # counted by FlopCounterMode and LiveMemory at once
        with LiveMemory(known=[*state, images, tokens]) as live:
            with autocast:
                loss = model(images, tokens)
            live.sweep()
            seen['kept'] = live.now                       # what autograd keeps for backward
            loss.backward()
            del loss
        seen['activations'] = live.peak
    flops = step_flops(tracked)
    with LiveMemory(known=[*state, images, tokens]) as live_opt:
        opt.step()                                        # foreach AdamW's temporaries
    held = sum(t.untyped_storage().nbytes() for t in state)
    return {**seen, 'state': held, 'peak': held + max(seen['activations'], live_opt.peak),
            'flops': flops}


def validation_configs():
    """Two presets at shapes a CPU runs in seconds: the planner's arithmetic is the same for
    any config, so fewer layers, smaller images and (H/14) narrower towers test it as well.
    B/16: its widths, D, K = 32, QuickGELU, pool=llip. H/14: qkv_norm, K = 64, 80-wide heads,
    a 4-wide MLP ratio; its D must stay >= M K = 512 for the Gram form, so D = 512."""
    small = dict(image_size=64, vision_layers=2, text_layers=2, vocab_size=1000,
                 context_length=32)
    return {'vit_b16': replace(PRESETS['vit_b16'], **small),
            'vit_h14': replace(PRESETS['vit_h14'], **{**small, 'image_size': 56},
                               vision_width=320, text_width=256, embed_dim=512)}


# ----------------------------------------------------------------------------- the table
def executed_flops(config, global_batch, gpus, micro_batch, grad_ckpt):
    """FLOPs a step runs: the model's (flops_per_step), and with accumulation (micro-batches
    smaller than the GPU's share) one more forward pass of the towers and the mixer, the
    feature-cached accumulation's price (forward: a third of a linear layer's forward+backward,
    2/7 of attention's; estimated as a third)."""
    flops = flops_per_step(config, global_batch, gpus, grad_ckpt)
    accumulating = micro_batch < global_batch // gpus
    extra = accumulating * (tower_flops(config, global_batch) + mixer_flops(config, global_batch))
    return flops, flops['total'] + extra / 3


def plan_rows(presets, global_batch, gpu_counts, gpu, gpu_memory, mfu, dtype='bfloat16',
              micro_batch=None, headroom=0.9):
    """One row per preset x GPU count x shard x grad_ckpt: what fits and what it costs."""
    peak_flops = GPUS[gpu][0]
    for name in presets:
        c = PRESETS[name]
        params = count_parameters(c)['total']
        for gpus in gpu_counts:
            for shard in ('none', 'fsdp'):
                for ckpt in (False, True):
                    local = global_batch // gpus
                    best = largest_micro_batch(c, gpu_memory, gpus, global_batch, shard, ckpt,
                                               dtype, headroom)
                    micro = min(best, micro_batch) if micro_batch else best
                    flops, executed = executed_flops(c, global_batch, gpus, micro or local, ckpt)
                    seconds = executed / (gpus * peak_flops * mfu)
                    act = activation_bytes(c, dtype, ckpt)
                    mem = memory_plan(c, micro or 1, global_batch, gpus, shard, ckpt, dtype)
                    yield dict(preset=name, gpus=gpus, shard=shard, grad_ckpt=ckpt,
                               params=params, state_gb=mem['state'] / 1e9,
                               act_mb=(act['kept'] + act['recompute']) / 1e6, micro=micro,
                               accum=local // micro if micro else None,
                               memory_gb=mem['total'] / 1e9 if micro else None,
                               tflop_towers=flops['towers'] / 1e12,
                               tflop_mixer=flops['mixer'] / 1e12, tflop_loss=flops['loss'] / 1e12,
                               loss_share=flops['loss'] / flops['total'], step_s=seconds,
                               days=PAPER_SAMPLES / global_batch * seconds / 86400)


def print_table(rows, args):
    print(f"$ python bench.py plan {' '.join(args.argv)}")
    print(f"global batch {args.global_batch}, {args.gpu} ({GPUS[args.gpu][0] / 1e12:.0f} TFLOP/s "
          f"bf16 dense), {args.gpu_memory:g} GB a GPU ({args.headroom:.0%} usable), "
          f"{args.dtype}, MFU {args.mfu:.0%}, {PAPER_SAMPLES / 1e9:.1f} B samples")
    print("state: fp32 weights + gradients + AdamW moments per GPU (fsdp: estimated, not measured)"
          "; act: per image; micro: largest micro-batch that fits and divides the GPU's share "
          "(-: none fits); TFLOP: per step, all GPUs; loss%: pairwise loss / all")
    head = (f"{'preset':>8} {'GPUs':>4} {'shard':>5} {'ckpt':>4} {'params':>7} {'state GB':>8} "
            f"{'act MB':>7} {'micro':>5} {'accum':>5} {'mem GB':>6} {'towers':>8} {'mixer':>6} "
            f"{'loss':>6} {'loss%':>5} {'step s':>7} {'days':>6}")
    print(head)
    for r in rows:
        micro = (f"{r['micro']:>5} {r['accum']:>5} {r['memory_gb']:>6.1f}" if r['micro']
                 else f"{'-':>5} {'-':>5} {'-':>6}")
        ckpt = 'yes' if r['grad_ckpt'] else 'no'
        print(f"{r['preset']:>8} {r['gpus']:>4} {r['shard']:>5} {ckpt:>4}"
              f" {r['params'] / 1e6:>6.0f}M {r['state_gb']:>8.1f} {r['act_mb']:>7.1f} {micro}"
              f" {r['tflop_towers']:>8.0f} {r['tflop_mixer']:>6.1f} {r['tflop_loss']:>6.0f}"
              f" {r['loss_share']:>5.1%} {r['step_s']:>7.2f} {r['days']:>6.1f}")


def validate():
    """The planner's memory and FLOPs against the real model on CPU (tests/test_plan.py pins it)."""
    torch.set_num_threads(1)
    print("predicted / measured on CPU, fp32, one training step (LiveMemory, FlopCounterMode)")
    print(f"{'config':>8} {'ckpt':>4} {'batch':>5} {'peak MB':>8} {'peak':>6} {'kept':>6} "
          f"{'act':>6} {'FLOPs':>7}")
    for name, c in validation_configs().items():
        for ckpt in (False, True):
            b = 16
            m = measured_step(c, b, ckpt)
            pred = memory_plan(c, b, b, 1, 'none', ckpt, 'float32', 'cpu')
            kept = b * activation_bytes(c, 'float32', ckpt)['kept']
            flops = flops_per_step(c, b, 1, ckpt)['total']
            print(f"{name:>8} {'yes' if ckpt else 'no':>4} {b:>5} {m['peak'] / 1e6:>8.0f} "
                  f"{pred['total'] / m['peak']:>6.3f} {kept / m['kept']:>6.3f} "
                  f"{(pred['activations'] + pred['transient']) / m['activations']:>6.3f} "
                  f"{flops / m['flops']:>7.4f}", flush=True)


def main(argv):
    import argparse
    p = argparse.ArgumentParser(prog='bench.py plan', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='all', help="a preset of model.PRESETS, or 'all'")
    p.add_argument('--global_batch', type=int, default=PAPER_BATCH,
                   help='the contrastive batch: images (and captions) per step, all GPUs')
    p.add_argument('--gpus', default='8,64,256', help='GPU counts, comma-separated')
    p.add_argument('--gpu', default='h100', help=f"which GPU: {', '.join(GPUS)}")
    p.add_argument('--gpu_memory', type=float, default=None,
                   help="GB a GPU (default: the GPU's)")
    p.add_argument('--headroom', type=float, default=0.9,
                   help='share of the memory the plan may fill (the rest: CUDA context, '
                        'fragmentation, NCCL)')
    p.add_argument('--mfu', type=float, default=0.4,
                   help='model FLOPs utilisation assumed for the step time')
    p.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'],
                   help='autocast dtype of the run')
    p.add_argument('--batch_size', type=int, default=None,
                   help="images per GPU per micro-step, if fixed (must divide the GPU's share)")
    p.add_argument('--validate', action='store_true',
                   help='compare the arithmetic with the real model on CPU instead')
    args = p.parse_args(argv)
    args.argv = argv
    if args.validate:
        return validate()
    presets = list(PRESETS) if args.model == 'all' else [args.model]
    if args.model != 'all' and args.model not in PRESETS:
        return f"error: --model={args.model}: unknown preset; expected all or {', '.join(PRESETS)}"
    if args.gpu not in GPUS:
        return f"error: --gpu={args.gpu}: unknown GPU; expected one of {', '.join(GPUS)}"
    try:
        counts = [int(n) for n in args.gpus.split(',')]
    except ValueError:
        return f"error: --gpus={args.gpus}: expected GPU counts separated by commas, e.g. 8,64"
    args.gpu_memory = args.gpu_memory or GPUS[args.gpu][1]
    for name, value in (('global_batch', args.global_batch), ('gpu_memory', args.gpu_memory),
                        ('mfu', args.mfu), ('headroom', args.headroom),
                        *(('gpus', n) for n in counts)):
        if not value > 0:
            return f"error: --{name}={value}: must be > 0"
    for n in counts:
        if args.global_batch % n:
            return (f"error: --global_batch={args.global_batch} is not divisible by {n} GPUs: "
                    f"every GPU needs the same share")
        if args.batch_size and (args.global_batch // n) % args.batch_size:
            return (f"error: --batch_size={args.batch_size} does not divide the "
                    f"{args.global_batch // n} images a GPU gets of --global_batch="
                    f"{args.global_batch} on {n} GPUs")
    print_table(plan_rows(presets, args.global_batch, counts, args.gpu, args.gpu_memory,
                          args.mfu, args.dtype, args.batch_size, args.headroom), args)
