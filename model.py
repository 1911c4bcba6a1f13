"""
The Llip model: a ViT that outputs K *mixture tokens*, CLIP's text transformer, and a
small cross-attention (the *mixer*) whose query comes from the caption, so that every
image gets a different vector for every caption (Lavoie et al., arXiv 2405.00740).

    images (N, 3, S, S) --ViT--> h: K mixture tokens (N, K, W_v)
        keys   K_i^{mk} = h_i^k W_K^k            one projection per mixture token k
        values V_i^{mk} = h_i^k W_V^k
    tokens (N, L) --text transformer--> g: EOT state (N, W_t)
        query  Q_j^m   = g_j W_Q                   split into M heads of D/M
        text   z'_j    = g_j W_T
    mixer  Phi_ij^{mk} = softmax_k(Q_j^m . K_i^{mk} / tau)
           z_ij        = concat_m(sum_k Phi_ij^{mk} V_i^{mk}) W_O     (eq. 1-2, Llip.contextualize)
    loss   SigLIP's sigmoid loss on cos(z_ij, z'_j)                   (eq. 3, loss.llip_loss)

With qkv_norm (the H/14 and G/14 presets) keys, values and queries are LayerNorm'ed over the
whole D-vector right after their projection, before the split into heads; otherwise not.

The `pool` setting walks the paper's ablation ladder (Section 5): cls -> registers -> avg
-> learned -> llip; `pool_image` below is the one place where they differ.

Try it:
    python -c "import torch, model; m = model.Llip(model.PRESETS['tiny']); \
print(m(torch.randn(4, 3, 32, 32), torch.randint(1, 49408, (4, 16))))"
"""
import hashlib
import math
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, einsum
from torch.utils.checkpoint import checkpoint

from loss import llip_loss, mix, pairwise_cosine, siglip_loss

POOLS = ('cls', 'registers', 'avg', 'learned', 'llip')


@dataclass
class LlipConfig:
    # image tower
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_head_width: int = 64
    vision_mlp_ratio: float = 4.0
    # text tower
    tokenizer: str = 'clip'            # 'clip' (BPE, 49408 ids) or 'byte' (UTF-8 bytes)
    vocab_size: int = 49408
    context_length: int = 77
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    # the joint space and the mixer
    embed_dim: int = 512               # D
    num_mixture: int = 32              # K, mixture tokens
    mixer_heads: int = 8               # M, heads of the cross-attention (8 in every paper run)
    tau: float = 5.0                   # temperature of the softmax over the K mixture tokens
    qkv_norm: bool = False             # LayerNorm(D) on keys, queries, values (H/14, G/14)
    pool: str = 'llip'                 # cls | registers | avg | learned | llip
    quick_gelu: bool = True            # x * sigmoid(1.702 x), as in the authors' weights
    # SigLIP's init: a = exp(t) = 10, b = -10 (the authors' code kept CLIP's t = log(1/0.07))
    init_logit_scale: float = math.log(10.0)
    init_logit_bias: float = -10.0

    def __post_init__(self):
        # sizes and the temperature must be positive: 0 would divide by zero below or in the
        # mixer, and a negative one would silently build a broken model
        for name in ('num_mixture', 'mixer_heads', 'tau'):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be > 0")
        if self.pool not in POOLS:
            raise ValueError(f"pool={self.pool!r}: expected one of {', '.join(POOLS)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of "
                             f"patch_size={self.patch_size}")
        if self.embed_dim % self.mixer_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by "
                             f"mixer_heads={self.mixer_heads}")

    @property
    def num_tokens(self):
        """Learned tokens prepended in the ViT: SigLIP's single CLS token, else K."""
        return 1 if self.pool == 'cls' else self.num_mixture


# The authors' configurations (their released model configs: image 224, QuickGELU, M = 8,
# context 77 unless given), plus `tiny` for a CPU smoke test.
PRESETS = {
    # CLIP's BPE, not bytes: words come as single tokens, and on the synthetic data zero-shot colour
    # accuracy after 500 steps was 0.35 against 0.14 with byte tokens (ctx 16 holds every caption).
    # Width 64, not 128: a step costs 2.5x less, and shape, the slowest attribute to learn, needs
    # the steps (README, "What each attribute needs")
    'tiny': LlipConfig(image_size=32, patch_size=8, vision_width=64, vision_layers=4,
                       vision_head_width=32, tokenizer='clip', vocab_size=49408, context_length=16,
                       text_width=64, text_layers=4, text_heads=2, embed_dim=64, num_mixture=16,
                       quick_gelu=False),
    'vit_b32': LlipConfig(
        patch_size=32, vision_width=768, vision_layers=12, vision_head_width=64,
        text_width=512, text_layers=12, text_heads=8,
        embed_dim=512, num_mixture=64),
    'vit_b16': LlipConfig(
        patch_size=16, vision_width=768, vision_layers=12, vision_head_width=64,
        text_width=512, text_layers=12, text_heads=8,
        embed_dim=512, num_mixture=32),
    'vit_l14': LlipConfig(
        patch_size=14, vision_width=1024, vision_layers=24, vision_head_width=64,
        text_width=768, text_layers=12, text_heads=12, context_length=64,
        embed_dim=768, num_mixture=32, tau=1.0),
    'vit_h14': LlipConfig(
        patch_size=14, vision_width=1280, vision_layers=32, vision_head_width=80,
        text_width=1024, text_layers=24, text_heads=16,
        embed_dim=1024, num_mixture=64, qkv_norm=True),
    'vit_g14': LlipConfig(
        patch_size=14, vision_width=1664, vision_layers=48, vision_head_width=104,
        vision_mlp_ratio=8192 / 1664,
        text_width=1280, text_layers=32, text_heads=20,
        embed_dim=1280, num_mixture=64, qkv_norm=True),
}


# ----------------------------------------------------------------------------- transformer
class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with the packed q,k,v projection of nn.MultiheadAttention,
    so the authors' `attn.in_proj_weight` loads as it is."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))   # values: init_weights
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, causal=False):                                  # x (B, N, W)
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)        # (B, N, 3W)
        q, k, v = rearrange(qkv, 'b n (three h d) -> three b h n d', three=3, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, h, N, d)
        return self.out_proj(rearrange(out, 'b h n d -> b n (h d)'))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width, heads, mlp_ratio, quick_gelu):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, hidden),
                                             gelu=QuickGELU() if quick_gelu else nn.GELU(),
                                             c_proj=nn.Linear(hidden, width)))

    def forward(self, x, causal=False):
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp_ratio, quick_gelu):
        super().__init__()
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio, quick_gelu)
                                     for _ in range(layers)])
        self.grad_ckpt = False   # recompute each block's activations in backward (H/14, G/14)
        # CLIP's init (init_weights reads init_std): residual-branch outputs scaled down with depth
        for block in self.blocks:
            block.attn.out_proj.init_std = width ** -0.5 * (2 * layers) ** -0.5
            block.mlp.c_fc.init_std = (2 * width) ** -0.5
            block.mlp.c_proj.init_std = width ** -0.5 * (2 * layers) ** -0.5

    def forward(self, x, causal=False):
        for block in self.blocks:
            if self.grad_ckpt and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal)
        return x


# ----------------------------------------------------------------------------- the towers
class VisionTransformer(nn.Module):
    """ViT with T learned tokens prepended to the patches; returns their outputs (N, T, W)."""

    def __init__(self, c: LlipConfig):
        super().__init__()
        self.patch_size = c.patch_size
        width, num_patches = c.vision_width, (c.image_size // c.patch_size) ** 2
        self.patch_embed = nn.Linear(3 * c.patch_size ** 2, width, bias=False)
        self.mixture_tokens = nn.Parameter(torch.empty(c.num_tokens, width))
        positions = c.num_tokens + num_patches
        self.pos_embed = nn.Parameter(torch.empty(positions, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, c.vision_layers, width // c.vision_head_width,
                                       c.vision_mlp_ratio, c.quick_gelu)
        self.ln_post = nn.LayerNorm(width)

    def forward(self, images):                                           # (N, 3, S, S)
        p = self.patch_size
        patches = rearrange(images, 'n c (h p1) (w p2) -> n (h w) (p1 p2 c)', p1=p, p2=p)
        x = self.patch_embed(patches)                                    # (N, P, W)
        tokens = self.mixture_tokens.expand(x.shape[0], -1, -1)          # (N, T, W)
        x = torch.cat([tokens.to(x.dtype), x], dim=1) + self.pos_embed   # (N, T + P, W)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, :tokens.shape[1]])                      # (N, T, W)


class TextTransformer(nn.Module):
    """CLIP's causal text transformer; returns the state at the EOT token (N, W_t)."""

    def __init__(self, c: LlipConfig):
        super().__init__()
        # given an empty weight, nn.Embedding draws none of its own (init_weights does): its normal_
        # on the meta device would import torch._dynamo, 2 s more at the start of every process
        self.token_embed = nn.Embedding(c.vocab_size, c.text_width,
                                        _weight=torch.empty(c.vocab_size, c.text_width))
        self.pos_embed = nn.Parameter(torch.empty(c.context_length, c.text_width))
        self.transformer = Transformer(c.text_width, c.text_layers, c.text_heads, 4.0, c.quick_gelu)
        self.ln_final = nn.LayerNorm(c.text_width)

    def forward(self, tokens):                                           # (N, L) int64
        x = self.token_embed(tokens) + self.pos_embed[:tokens.shape[1]]  # (N, L, W_t)
        x = self.ln_final(self.transformer(x, causal=True))
        # EOT has the largest id in every row; causal attention makes padding after it harmless
        return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]


# ----------------------------------------------------------------------------- features
class ImageFeatures(NamedTuple):
    keys: Optional[torch.Tensor] = None     # (N, M, K, D/M), only for pool=llip
    values: Optional[torch.Tensor] = None   # (N, M, K, D/M), only for pool=llip
    emb: Optional[torch.Tensor] = None      # (N, D) normalised, for caption-independent pools


class TextFeatures(NamedTuple):
    queries: Optional[torch.Tensor]         # (N, M, D/M), None unless pool=llip
    emb: torch.Tensor                       # (N, D) normalised text embedding z'_j


class Llip(nn.Module):
    """Llip(config, seed=None): the model with its initial weights, drawn by init_weights from
    `seed` and each parameter's name (seed None: one drawn from torch's global generator, so
    torch.manual_seed decides the weights, as for any torch module). Under
    `with torch.device('meta')` only the shapes are built: train.py then shards the model
    and materialises each rank's part (to_empty, then init_weights with its --seed)."""

    def __init__(self, config: LlipConfig, seed=None):
        super().__init__()
        device = torch.get_default_device()   # 'meta' inside `with torch.device('meta')`
        with torch.device('meta'):   # the shapes only: each value is drawn once, below
            self.build(config)
        if device.type != 'meta':
            self.to_empty(device=device)
            init_weights(self, torch.randint(2 ** 62, (), device='cpu').item()
                         if seed is None else seed)

    def build(self, config):
        """The modules and parameters, without values (init_weights gives them theirs)."""
        c = self.config = config
        D, K, Wv, Wt = c.embed_dim, c.num_tokens, c.vision_width, c.text_width
        self.visual = VisionTransformer(c)
        self.text = TextTransformer(c)
        self.text_proj = nn.Parameter(torch.empty(Wt, D))                        # W_T
        self.logit_scale = nn.Parameter(torch.empty(()))                         # t, a = exp(t)
        self.logit_bias = nn.Parameter(torch.empty(()))                          # b
        # the image side of each pool; parameters a pool does not use are not created
        if c.pool in ('cls', 'registers'):
            self.proj = nn.Parameter(torch.empty(Wv, D))                         # first token -> D
        else:
            self.v_proj = nn.Parameter(torch.empty(K, Wv, D))                    # W_V, per token
            self.out_proj = nn.Parameter(torch.empty(D, D))                      # W_O
            self.v_norm = nn.LayerNorm(D) if c.qkv_norm else nn.Identity()
        if c.pool in ('learned', 'llip'):
            self.k_proj = nn.Parameter(torch.empty(K, Wv, D))                    # W_K, per token
            self.k_norm = nn.LayerNorm(D) if c.qkv_norm else nn.Identity()
        if c.pool == 'learned':   # one query shared by every sample (paper: "learned average")
            self.learned_query = nn.Parameter(torch.empty(c.mixer_heads, D // c.mixer_heads))
        if c.pool == 'llip':      # the caption's query
            self.q_proj = nn.Parameter(torch.empty(Wt, D))                       # W_Q
            self.q_norm = nn.LayerNorm(D) if c.qkv_norm else nn.Identity()

    def set_grad_checkpointing(self, enabled=True):
        self.visual.transformer.grad_ckpt = enabled
        self.text.transformer.grad_ckpt = enabled

    def project_mixture_tokens(self, h, proj, norm):
        """Each mixture token k has its own projection: (N, K, W_v) -> (N, M, K, D/M)."""
        x = norm(einsum(h, proj, 'n k w, k w d -> n k d'))
        return rearrange(x, 'n k (m d) -> n m k d', m=self.config.mixer_heads)

    def pool_image(self, h):
        """The ablation ladder: how the mixture tokens h (N, K, W_v) become image features."""
        pool = self.config.pool
        if pool in ('cls', 'registers'):           # SigLIP: the first token, projected
            return ImageFeatures(emb=F.normalize(h[:, 0] @ self.proj, dim=-1))
        values = self.project_mixture_tokens(h, self.v_proj, self.v_norm)            # (N, M, K, d)
        if pool == 'avg':                          # uniform weights over the K tokens
            mixed = rearrange(values.mean(dim=2), 'n m d -> n (m d)')
        else:
            keys = self.project_mixture_tokens(h, self.k_proj, self.k_norm)          # (N, M, K, d)
            if pool == 'llip':                     # the caption decides: mixing happens per pair
                return ImageFeatures(keys=keys, values=values)
            query = self.learned_query[None]                                          # (1, M, d)
            mixed = mix(query, keys, values, self.config.tau)[:, 0]                  # (N, D)
        return ImageFeatures(emb=F.normalize(mixed @ self.out_proj, dim=-1))

    def encode_image(self, images) -> ImageFeatures:
        return self.pool_image(self.visual(images))

    def encode_text(self, tokens) -> TextFeatures:
        g = self.text(tokens)                                                         # (N, W_t)
        queries = None
        if self.config.pool == 'llip':
            queries = rearrange(self.q_norm(g @ self.q_proj), 'n (m d) -> n m d',
                                m=self.config.mixer_heads)
        return TextFeatures(queries=queries, emb=F.normalize(g @ self.text_proj, dim=-1))

    def contextualize(self, image_features: ImageFeatures, text_features: TextFeatures, tau=None):
        """z_ij, image i's mixture tokens mixed with caption j's query (eq. 1-2): (N_img, N_txt, D).
        Every pair at once, to read and inspect; the loss and `similarity` compute the same
        pairs a chunk at a time (loss.py)."""
        tau = self.config.tau if tau is None else tau
        mixed = mix(text_features.queries, image_features.keys, image_features.values, tau)
        return mixed @ self.out_proj                                    # (I, T, M*d) @ W_O

    def similarity(self, image_features: ImageFeatures, text_features: TextFeatures, tau=None,
                   chunk_size=None):
        """cos(z_ij, z'_j) for every image i and caption j: (N_img, N_txt). For pool=llip the
        pairs are contextualised `chunk_size` images at a time (None: loss.default_chunk for the
        form that runs), against every caption."""
        if image_features.emb is not None:
            return image_features.emb @ text_features.emb.T
        tau = self.config.tau if tau is None else tau
        return pairwise_cosine(image_features, text_features, self.out_proj, tau, chunk_size)

    def forward(self, images, tokens, chunk_size=None):
        """The training loss (eq. 3) of this rank's images (N, 3, S, S) against every rank's
        captions; tokens (N C, L): C captions of each image, image-major (see `loss`)."""
        return self.loss(self.encode_image(images), self.encode_text(tokens), chunk_size)

    def loss(self, image_features: ImageFeatures, text_features: TextFeatures, chunk_size=None,
             form='auto'):
        """The training loss on the towers' features (what accumulation.py calls on the features
        it cached). For pool=llip the sigmoid loss on cos(z_ij, z'_j), z_ij as in
        `contextualize`, which loss.llip_loss computes a chunk of images at a time; SigLIP's
        loss on the one vector per image for the other pools. N images come with N C captions,
        C of each image in a row (train.py --captions_per_image): C is read from the sizes, and
        each image's C captions are its positives, every other caption a negative."""
        img, txt = image_features, text_features
        n_img, n_txt = (img.keys if img.emb is None else img.emb).shape[0], txt.emb.shape[0]
        if n_txt % n_img:
            raise ValueError(f'{n_txt} captions for {n_img} images: expected the same number of '
                             f'captions (C) of each image')
        a = self.logit_scale.exp()
        if img.emb is not None:
            return siglip_loss(img.emb, txt.emb, a, self.logit_bias, n_txt // n_img)
        return llip_loss(img, txt, self.out_proj, self.config.tau, a, self.logit_bias,
                         chunk_size=chunk_size, form=form, captions_per_image=n_txt // n_img)


def for_loading(config):
    """A Llip for weights read from a file: built on meta and allocated, no initial value drawn
    (every rank drawing every parameter is minutes of CPU for vit_g14). Its values are garbage
    until a strict load_state_dict (or DCP's load, which also fails on a missing key) fills all."""
    with torch.device('meta'):
        model = Llip(config)
    return model.to_empty(device='cpu')


# ----------------------------------------------------------------------------- initial weights
# Why by name: a parameter's initial value is a function of (seed, its name) alone, drawn whole on
# CPU from its own generator. Then 1 process, 8 DDP ranks or 64 FSDP ranks, each keeping its own
# rows, start from the same weights; drawing takes host memory for one parameter at a time, never
# the whole model; the order in which modules are built or visited changes nothing; and a GPU run
# starts where a CPU test does (CUDA's generator would draw other numbers). The price: every
# rank draws every parameter whole, a few minutes of one CPU core for vit_g14.
def is_dtensor(x):
    """isinstance(x, DTensor) (a sharded parameter or gradient) without importing
    torch.distributed.tensor: 1.4 s more at the start of every process, which a run without
    --shard=fsdp never needs; no DTensor can exist before that module is loaded."""
    dtensor = sys.modules.get('torch.distributed.tensor')
    return dtensor is not None and isinstance(x, dtensor.DTensor)


def init_weights(model, seed):
    """Give every parameter of `model` (a Llip, plain or sharded by sharding.shard, or any of its
    parts) its initial value from `seed` and its name. A sharded parameter (a DTensor) gets its
    rows of the whole value: every rank draws the whole parameter, keeps its own rows."""
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            full_name = f'{module_name}.{name}' if module_name else name
            digest = hashlib.sha256(f'{seed}/{full_name}'.encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], 'little') >> 1)
            value = initial_value(module, name, param.shape, generator)
            with torch.no_grad():
                if is_dtensor(param):   # this rank's rows, as fully_shard cut them
                    from torch.distributed.tensor import distribute_tensor
                    value = distribute_tensor(value.to(param.device), param.device_mesh,
                                              param.placements, src_data_rank=None)
                    param.to_local().copy_(value.to_local())
                else:
                    param.copy_(value)


def initial_value(module, name, shape, generator):
    """The whole initial value of `module`'s own parameter `name`: the authors' init (CLIP's,
    with SigLIP's t and b), float32 on CPU, random draws from `generator` only."""
    normal = lambda std: std * torch.randn(shape, generator=generator)                # noqa: E731
    uniform = lambda bound: bound * (2 * torch.rand(shape, generator=generator) - 1)  # noqa: E731
    if isinstance(module, nn.LayerNorm):
        return torch.ones(shape) if name == 'weight' else torch.zeros(shape)
    if isinstance(module, nn.Embedding):
        return normal(0.02)
    if isinstance(module, nn.Linear):   # torch's default, U(+-1/sqrt(fan_in)), unless init_std
        std = getattr(module, 'init_std', None)   # set by Transformer on the residual branches
        return normal(std) if name == 'weight' and std else uniform(module.in_features ** -0.5)
    if isinstance(module, Attention):   # the packed q, k, v projection (W_in, W) and its bias
        return normal(shape[1] ** -0.5) if name == 'in_proj_weight' else torch.zeros(shape)
    if isinstance(module, VisionTransformer):   # mixture tokens and positions (T or T + P, W)
        return normal(shape[-1] ** -0.5)
    if isinstance(module, TextTransformer):     # positions
        return normal(0.01)
    if isinstance(module, Llip):
        c = module.config
        if name in ('logit_scale', 'logit_bias'):
            return torch.full(shape, c.init_logit_scale if name == 'logit_scale'
                              else c.init_logit_bias)
        if name == 'learned_query':
            return normal(1.0)
        return normal(shape[-2] ** -0.5)   # x @ W with W (..., in, D): std 1/sqrt(in)
    raise TypeError(f'{type(module).__name__}.{name}: no initial value; add its rule here')


# ----------------------------------------------------------------------------- the authors' weights
def load_official(path_or_state_dict, **overrides):
    """Build a Llip from the authors' weights: a released file (llip_b16_k32.pt, llip_G14_k64.pt)
    or a training checkpoint of their code ({'state_dict': ...}). Their names -> ours, the config
    from the shapes: official.py."""
    import official   # here, not above: official.py builds its Llip with this module
    return official.load_official(path_or_state_dict, **overrides)
