"""What this proves about model.load_official (run: python -m pytest tests/test_official.py):
- a state dict laid out exactly as the authors' released checkpoints (their key names, shapes,
  conv patchify, packed in_proj, per-token k_proj/v_proj, optional K/Q/V LayerNorms) loads,
  wrapped in {'state_dict'} with 'module.' prefixes or not, from a dict or a file;
- what the authors' own loader also accepts loads to the same model: the '_orig_mod.module.'
  prefix of their compiled DDP training checkpoints, W_O as a top-level 'out_proj', and a
  single mixture token saved as a vector;
- the loaded model's similarities equal an independent re-implementation of the authors'
  forward pass (seq-first nn.MultiheadAttention maths, conv1, QuickGELU) on those weights;
- the config is read off the shapes: the B/16 and bigG/14 layouts give the presets' configs;
- missing or unknown keys give an error that names them.
"""
import pytest
import torch
import torch.nn.functional as F

from model import PRESETS, load_official
from official import config_from_official

W, WT, D, K, P, PATCH, LAYERS, VOCAB, CTX, HEADS, M = 128, 128, 32, 4, 16, 4, 2, 300, 12, 2, 8


def block_keys(prefix, width, shape):
    out = {}
    for i in range(LAYERS):
        p = f'{prefix}.{i}.'
        out.update(
            {
                p + 'ln_1.weight': shape(width),
                p + 'ln_1.bias': shape(width),
                p + 'attn.in_proj_weight': shape(3 * width, width),
                p + 'attn.in_proj_bias': shape(3 * width),
                p + 'attn.out_proj.weight': shape(width, width),
                p + 'attn.out_proj.bias': shape(width),
                p + 'ln_2.weight': shape(width),
                p + 'ln_2.bias': shape(width),
                p + 'mlp.c_fc.weight': shape(4 * width, width),
                p + 'mlp.c_fc.bias': shape(4 * width),
                p + 'mlp.c_proj.weight': shape(width, 4 * width),
                p + 'mlp.c_proj.bias': shape(width),
            }
        )
    return out


def official_state_dict(use_norm, seed=0):
    """The authors' key names and shapes (as in llip_b16_k32.pt, smaller), random values."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: 0.2 * torch.randn(*s, generator=g)
    sd = {
        'visual.conv1.weight': r(W, 3, PATCH, PATCH),
        'visual.class_embedding': r(K, W),
        'visual.positional_embedding': r(P + K, W),
        'visual.ln_pre.weight': 1 + r(W),
        'visual.ln_pre.bias': r(W),
        'visual.ln_post.weight': 1 + r(W),
        'visual.ln_post.bias': r(W),
        'token_embedding.weight': r(VOCAB, WT),
        'positional_embedding': r(CTX, WT),
        'ln_final.weight': 1 + r(WT),
        'ln_final.bias': r(WT),
        'text_projection': r(WT, D),
        'logit_scale': torch.tensor(2.3),
        'logit_bias': torch.tensor(-9.0),
        'k_proj': r(K, W, D),
        'v_proj': r(K, W, D),
        'q_proj': r(WT, D),
        'pred.out_proj': r(D, D),
    }
    sd.update(block_keys('visual.transformer.resblocks', W, r))
    sd.update(block_keys('transformer.resblocks', WT, r))
    if use_norm:
        for n in 'KQV':
            sd.update({f'{n}_norm.weight': 1 + r(D), f'{n}_norm.bias': r(D)})
    return sd


def authors_forward(sd, images, text, tau):
    """Their computation, seq-first as in their code, written independently of model.py."""
    def blocks(x, prefix, width, mask):                              # x (L, N, width)
        for i in range(LAYERS):
            p = f'{prefix}.{i}.'
            y = F.layer_norm(x, (width,), sd[p + 'ln_1.weight'], sd[p + 'ln_1.bias'])
            y, _ = F.multi_head_attention_forward(
                y,
                y,
                y,
                width,
                HEADS,
                sd[p + 'attn.in_proj_weight'],
                sd[p + 'attn.in_proj_bias'],
                None,
                None,
                False,
                0.0,
                sd[p + 'attn.out_proj.weight'],
                sd[p + 'attn.out_proj.bias'],
                training=False,
                need_weights=False,
                attn_mask=mask,
            )
            x = x + y
            y = F.layer_norm(x, (width,), sd[p + 'ln_2.weight'], sd[p + 'ln_2.bias'])
            y = F.linear(y, sd[p + 'mlp.c_fc.weight'], sd[p + 'mlp.c_fc.bias'])
            y = y * torch.sigmoid(1.702 * y)
            x = x + F.linear(y, sd[p + 'mlp.c_proj.weight'], sd[p + 'mlp.c_proj.bias'])
        return x

    norm = lambda x, n: F.layer_norm(x, (D,), sd[f'{n}_norm.weight'], sd[f'{n}_norm.bias']) \
        if f'{n}_norm.weight' in sd else x
    n = images.shape[0]
    x = F.conv2d(images, sd['visual.conv1.weight'], stride=PATCH).reshape(n, W, -1).permute(0, 2, 1)
    x = torch.cat([sd['visual.class_embedding'][None].expand(n, -1, -1), x], dim=1)
    x = F.layer_norm(
        x + sd['visual.positional_embedding'],
        (W,),
        sd['visual.ln_pre.weight'],
        sd['visual.ln_pre.bias'],
    )
    x = blocks(x.permute(1, 0, 2), 'visual.transformer.resblocks', W, None).permute(1, 0, 2)
    h = F.layer_norm(x[:, :K], (W,), sd['visual.ln_post.weight'], sd['visual.ln_post.bias'])
    keys = norm(h.transpose(0, 1) @ sd['k_proj'], 'K').reshape(K, n, M, D // M).permute(1, 2, 0, 3)
    values = (
        norm(h.transpose(0, 1) @ sd['v_proj'], 'V').reshape(K, n, M, D // M).permute(1, 2, 0, 3)
    )

    t = text.shape[0]
    mask = torch.full((CTX, CTX), float('-inf'), dtype=torch.float64).triu(1)
    x = (sd['token_embedding.weight'][text] + sd['positional_embedding']).permute(1, 0, 2)
    x = blocks(x, 'transformer.resblocks', WT, mask).permute(1, 0, 2)
    x = F.layer_norm(x, (WT,), sd['ln_final.weight'], sd['ln_final.bias'])
    g = x[torch.arange(t), text.argmax(dim=-1)]
    queries = norm(g @ sd['q_proj'], 'Q').reshape(t, M, D // M)
    zt = F.normalize(g @ sd['text_projection'], dim=-1)

    attn = (torch.einsum('vhnd,thd->vthn', keys, queries) / tau).softmax(-1)
    z = torch.einsum('vthn,vhnd->vthd', attn, values).reshape(n, t, D) @ sd['pred.out_proj']
    return (F.normalize(z, dim=-1) * zt[None]).sum(-1)                # (N_img, N_txt)


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, 16, 16, generator=g, dtype=torch.float64)
    text = torch.randint(1, 49000 % VOCAB, (5, CTX), generator=g)
    text[:, 0] = VOCAB - 2                         # SOT
    eot = torch.tensor([3, 11, 5, 7, 9])
    text[torch.arange(5), eot] = VOCAB - 1         # EOT, the largest id
    text[torch.arange(CTX)[None] > eot[:, None]] = 0
    return images, text


@pytest.mark.parametrize('use_norm', [False, True])
def test_similarities_equal_the_authors_forward(use_norm):
    sd = official_state_dict(use_norm)
    m = load_official(sd).double()
    c = m.config
    assert (c.num_mixture, c.vision_width, c.patch_size, c.image_size, c.embed_dim) == (
        K,
        W,
        PATCH,
        16,
        D,
    )
    assert (c.vision_layers, c.text_layers, c.context_length, c.vocab_size) == (
        LAYERS,
        LAYERS,
        CTX,
        VOCAB,
    )
    assert c.qkv_norm == use_norm and c.quick_gelu and c.tokenizer == 'clip'
    images, text = inputs()
    with torch.no_grad():
        ours = m.similarity(m.encode_image(images), m.encode_text(text), chunk_size=2)
        theirs = authors_forward({k: v.double() for k, v in sd.items()}, images, text, tau=c.tau)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-10)
    assert m.logit_scale.item() == pytest.approx(2.3) and m.logit_bias.item() == pytest.approx(-9.0)


def test_file_with_wrapper_and_module_prefix(tmp_path):
    sd = official_state_dict(use_norm=False)
    path = tmp_path / 'llip_tiny.pt'
    torch.save({'state_dict': {'module.' + k: v for k, v in sd.items()}}, path)
    m = load_official(str(path))
    torch.testing.assert_close(m.out_proj.detach(), sd['pred.out_proj'])
    torch.testing.assert_close(m.visual.mixture_tokens.detach(), sd['visual.class_embedding'])


@pytest.mark.parametrize('prefix', ['_orig_mod.module.', '_orig_mod.', 'module._orig_mod.'])
def test_compiled_ddp_prefix_and_top_level_out_proj(prefix):
    """Their B/16 training config compiles the DDP model, so its checkpoints hold
    '_orig_mod.module.' keys, and older checkpoints keep W_O as 'out_proj'; both load."""
    sd = official_state_dict(use_norm=True)
    expected = load_official(sd).state_dict()
    wrapped = {prefix + ('out_proj' if k == 'pred.out_proj' else k): v for k, v in sd.items()}
    loaded = load_official({'epoch': 3, 'state_dict': wrapped}).state_dict()
    assert loaded.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(loaded[k], expected[k], msg=k)


def test_a_single_mixture_token_saved_as_a_vector():
    sd = official_state_dict(use_norm=False)
    sd['visual.class_embedding'] = sd['visual.class_embedding'][0]                  # (W,)
    sd['visual.positional_embedding'] = sd['visual.positional_embedding'][K - 1:]   # 1 + P rows
    sd['k_proj'], sd['v_proj'] = sd['k_proj'][:1], sd['v_proj'][:1]
    m = load_official(sd)
    assert m.config.num_mixture == 1
    torch.testing.assert_close(m.visual.mixture_tokens.detach(), sd['visual.class_embedding'][None])


def test_missing_and_unknown_keys_are_named():
    sd = official_state_dict(use_norm=False)
    del sd['visual.transformer.resblocks.1.mlp.c_fc.bias']
    with pytest.raises(KeyError, match=r'visual\.transformer\.blocks\.1\.mlp\.c_fc\.bias'):
        load_official(sd)
    sd = official_state_dict(use_norm=False)
    sd['visual.proj'] = torch.zeros(W, D)
    with pytest.raises(KeyError, match=r'visual\.proj'):
        load_official(sd)
    sd = official_state_dict(use_norm=False)
    del sd['k_proj']
    with pytest.raises(KeyError, match='k_proj'):
        load_official(sd)


@pytest.mark.parametrize('preset,K,norm', [('vit_b16', 32, False), ('vit_g14', 64, True)])
def test_config_read_off_the_released_shapes(preset, K, norm):
    """The released B/16 and bigG/14 layouts (shapes only, on the meta device)."""
    c = PRESETS[preset]
    e = lambda *s: torch.empty(*s, device='meta')
    grid = (224 // c.patch_size) ** 2
    mlp = int(c.vision_width * c.vision_mlp_ratio)
    sd = {
        'visual.conv1.weight': e(c.vision_width, 3, c.patch_size, c.patch_size),
        'visual.class_embedding': e(K, c.vision_width),
        'visual.positional_embedding': e(grid + K, c.vision_width),
        'ln_final.weight': e(c.text_width),
        'text_projection': e(c.text_width, c.embed_dim),
        'token_embedding.weight': e(49408, c.text_width),
        'positional_embedding': e(77, c.text_width),
        'visual.transformer.resblocks.0.mlp.c_fc.weight': e(mlp, c.vision_width),
    }
    sd.update(
        {f'visual.transformer.resblocks.{i}.ln_1.weight': e(1) for i in range(c.vision_layers)}
    )
    sd.update({f'transformer.resblocks.{i}.ln_1.weight': e(1) for i in range(c.text_layers)})
    if norm:
        sd['K_norm.weight'] = e(c.embed_dim)
    assert config_from_official(sd) == c
