"""
The authors' released weights (facebookresearch/Llip: llip_b16_k32.pt ... llip_G14_k64.pt, or a
training checkpoint of their code) as a Llip: the config read from the tensors' shapes (head
counts and tau from the preset of the same widths), their parameter names mapped to ours, every
key and shape checked. model.load_official is the entry point; tests/test_official.py proves it
on state dicts written in their layout.

    python -c "import model; m = model.load_official('llip_b16_k32.pt'); print(m.config)"
"""
import math
import re
from dataclasses import replace

import torch
from einops import rearrange

from checkpoint import load_weights, unwrapped
from model import PRESETS, LlipConfig, for_loading

# Their names (facebookresearch/Llip, class CMP) -> ours. Transformer blocks share the layout
# (ln_1, attn.in_proj_weight, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj) and need no renaming.
OFFICIAL_NAMES = [
    (r'^visual\.conv1\.weight$', 'visual.patch_embed.weight'),
    (r'^visual\.class_embedding$', 'visual.mixture_tokens'),
    (r'^visual\.positional_embedding$', 'visual.pos_embed'),
    (r'^visual\.transformer\.resblocks\.', 'visual.transformer.blocks.'),
    (r'^transformer\.resblocks\.', 'text.transformer.blocks.'),
    (r'^token_embedding\.weight$', 'text.token_embed.weight'),
    (r'^positional_embedding$', 'text.pos_embed'),
    (r'^ln_final\.', 'text.ln_final.'),
    (r'^text_projection$', 'text_proj'),
    (r'^pred\.out_proj$', 'out_proj'),
    (r'^([KQV])_norm\.', lambda m: f'{m.group(1).lower()}_norm.'),
]


def _count_blocks(sd, prefix):
    return len({k[len(prefix):].split('.')[0] for k in sd if k.startswith(prefix)})


def config_from_official(sd):
    """Everything but head counts and tau is in the shapes; those come from PRESETS."""
    conv, tokens = sd['visual.conv1.weight'], sd['visual.class_embedding']
    K, width, patch = tokens.shape[0], conv.shape[0], conv.shape[-1]
    num_patches = sd['visual.positional_embedding'].shape[0] - K
    text_width = sd['ln_final.weight'].shape[0]
    c = LlipConfig(
        image_size=math.isqrt(num_patches) * patch, patch_size=patch, vision_width=width,
        vision_layers=_count_blocks(sd, 'visual.transformer.resblocks.'), vision_head_width=64,
        vision_mlp_ratio=sd['visual.transformer.resblocks.0.mlp.c_fc.weight'].shape[0] / width,
        tokenizer='clip', vocab_size=sd['token_embedding.weight'].shape[0],
        context_length=sd['positional_embedding'].shape[0], text_width=text_width,
        text_layers=_count_blocks(sd, 'transformer.resblocks.'),
        text_heads=max(1, text_width // 64),
        embed_dim=sd['text_projection'].shape[1], num_mixture=K, qkv_norm='K_norm.weight' in sd)
    for preset in PRESETS.values():   # same widths as an authors' config: take its heads and tau
        widths = (preset.vision_width, preset.text_width, preset.embed_dim)
        if widths == (width, text_width, c.embed_dim):
            c = replace(c, vision_head_width=preset.vision_head_width, text_heads=preset.text_heads,
                        tau=preset.tau)
            break
    return c


def load_official(path_or_state_dict, **overrides):
    """Build a Llip from the authors' weights: a released file (llip_b16_k32.pt, llip_G14_k64.pt)
    or a training checkpoint of their code ({'state_dict': ...}, keys prefixed by its wrappers)."""
    sd = path_or_state_dict
    if not isinstance(sd, dict):
        sd = load_weights(sd)   # their files are plain tensor dicts: no allow-list needed
    sd = unwrapped(sd.get('state_dict', sd))
    # as the authors' loader does: W_O saved at the top level is pred.out_proj, and a single
    # mixture token saved as a vector is one row
    if 'out_proj' in sd:
        sd['pred.out_proj'] = sd.pop('out_proj')
    tokens = sd.get('visual.class_embedding')
    if tokens is not None and tokens.dim() == 1:
        sd['visual.class_embedding'] = tokens[None]                     # (W,) -> (1, W)
    required = ['visual.conv1.weight', 'visual.class_embedding', 'visual.positional_embedding',
                'ln_final.weight', 'text_projection', 'token_embedding.weight',
                'positional_embedding',
                'k_proj', 'v_proj', 'q_proj', 'pred.out_proj']
    missing = [k for k in required if k not in sd]
    if missing:
        raise KeyError(f"not an official Llip checkpoint: missing {', '.join(missing)}")
    config = replace(config_from_official(sd), **overrides)
    model = for_loading(config)   # every value comes from sd, checked key by key below
    ours = {}
    for name, tensor in sd.items():
        for pattern, new in OFFICIAL_NAMES:
            name = re.sub(pattern, new, name)
        ours[name] = tensor
    # their patchify is a Conv2d (W, 3, p, p); ours is a Linear on (p1 p2 c)-ordered patches
    ours['visual.patch_embed.weight'] = rearrange(ours['visual.patch_embed.weight'],
                                                  'w c p1 p2 -> w (p1 p2 c)')
    ours['logit_scale'] = ours['logit_scale'].reshape(())
    ours['logit_bias'] = ours.get('logit_bias', torch.tensor(config.init_logit_bias)).reshape(())
    expected = model.state_dict()
    unknown = sorted(set(ours) - set(expected))
    missing = sorted(set(expected) - set(ours))
    if unknown or missing:
        raise KeyError(f"official checkpoint does not match the model built from it: "
                       f"unknown keys {unknown[:10]}, missing keys {missing[:10]}")
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in ours.items()
             if v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"official checkpoint has unexpected shapes: {wrong[:10]}")
    model.load_state_dict(ours)
    return model.eval()
