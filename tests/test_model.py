"""What this proves about model.py (run: python -m pytest tests/test_model.py):
- every pool of the ablation ladder gives the documented shapes and a finite loss, and every
  parameter it creates receives a non-zero gradient;
- similarity(i, j) for a batch equals contextualising image i with caption j alone, for any
  chunk size and in both forms of loss.py: nothing leaks across the batch;
- contextualize's z_ij equals eq. 1-2 written pair by pair and head by head, and its cosine
  with z'_j is similarity;
- with W_Q zeroed, Llip's mixing is the uniform average of the values (the `avg` pool);
- the attention block equals torch's nn.MultiheadAttention with the same packed weights;
- the text feature is the EOT state (tokens after it change nothing), and gradient
  checkpointing changes neither loss nor gradients;
- the presets are the authors' configurations, value by value.
"""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from conftest import batch, tiny
from model import POOLS, PRESETS, Attention, Llip, init_weights


@pytest.mark.parametrize('pool', POOLS)
def test_shapes_and_every_parameter_gets_a_gradient(pool):
    torch.manual_seed(0)
    c = tiny(pool=pool)
    m = Llip(c)
    images, tokens = batch(5, c)
    img, txt = m.encode_image(images), m.encode_text(tokens)
    D, M, K = c.embed_dim, c.mixer_heads, c.num_mixture
    assert txt.emb.shape == (5, D)
    if pool == 'llip':
        assert img.keys.shape == img.values.shape == (5, M, K, D // M)
        assert txt.queries.shape == (5, M, D // M)
    else:
        assert img.emb.shape == (5, D) and txt.queries is None
        torch.testing.assert_close(img.emb.norm(dim=-1), torch.ones(5))
    assert m.visual.mixture_tokens.shape[0] == (1 if pool == 'cls' else K)
    sim = m.similarity(img, txt, chunk_size=2)
    assert sim.shape == (5, 5) and sim.abs().max() <= 1 + 1e-5
    loss = m(images, tokens)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f'{pool}: no gradient for {name}'


def test_llip_creates_the_mixer_parameters():
    m = Llip(tiny(pool='llip'))
    c = m.config
    assert m.k_proj.shape == m.v_proj.shape == (c.num_mixture, c.vision_width, c.embed_dim)
    assert m.q_proj.shape == (c.text_width, c.embed_dim)
    assert m.out_proj.shape == (c.embed_dim, c.embed_dim)


@pytest.mark.parametrize('qkv_norm,num_mixture', [(False, 4), (True, 4), (False, 2), (False, 5)])
def test_similarity_has_no_leakage_across_the_batch(qkv_norm, num_mixture):
    """M = 8, D = 32: num_mixture 2 and 4 make M K <= D (loss_gram.py's form), 5 makes
    M K > D (loss.py's plain form)."""
    torch.manual_seed(1)
    c = tiny(qkv_norm=qkv_norm, num_mixture=num_mixture)
    m = Llip(c).double().eval()
    images, tokens = batch(4, c)
    img, txt = m.encode_image(images.double()), m.encode_text(tokens)
    full = m.similarity(img, txt, chunk_size=3)
    for i in range(4):
        for j in range(4):
            alone = m.similarity(
                m.encode_image(images[i : i + 1].double()), m.encode_text(tokens[j : j + 1])
            )
            torch.testing.assert_close(full[i, j], alone[0, 0], rtol=1e-10, atol=1e-12)
    # and the contextualisation matters: a different tau gives different similarities
    assert not torch.allclose(full, m.similarity(img, txt, tau=0.1))


def test_contextualize_is_eq_1_2_pair_by_pair():
    torch.manual_seed(6)
    c = tiny(num_mixture=3)
    m = Llip(c).double().eval()
    images, tokens = batch(3, c, seed=1)
    img, txt = m.encode_image(images.double()), m.encode_text(tokens[:2])
    z = m.contextualize(img, txt, tau=2.0)                               # (3, 2, D)
    assert z.shape == (3, 2, c.embed_dim)
    for i in range(3):
        for j in range(2):
            heads = []
            for h in range(c.mixer_heads):
                phi = torch.softmax(img.keys[i, h] @ txt.queries[j, h] / 2.0, dim=0)   # (K,)
                heads.append(phi @ img.values[i, h])                                   # (D/M,)
            torch.testing.assert_close(z[i, j], torch.cat(heads) @ m.out_proj)
    cos = (F.normalize(z, dim=-1) * txt.emb).sum(-1)
    torch.testing.assert_close(m.similarity(img, txt, tau=2.0), cos)


def test_zero_query_projection_gives_uniform_average():
    torch.manual_seed(2)
    c = tiny()
    m = Llip(c).double().eval()
    with torch.no_grad():
        m.q_proj.zero_()
    images, tokens = batch(3, c)
    img, txt = m.encode_image(images.double()), m.encode_text(tokens)
    z = img.values.mean(dim=2).reshape(3, -1) @ m.out_proj             # uniform average, then W_O
    expected = F.normalize(z, dim=-1) @ txt.emb.T
    torch.testing.assert_close(m.similarity(img, txt), expected)


@pytest.mark.parametrize('causal', [False, True])
def test_attention_matches_torch_multihead_attention(causal):
    torch.manual_seed(3)
    ours = Attention(32, 4)
    init_weights(ours, seed=3)   # a part of Llip, built alone: Llip gives it its values
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    ref.load_state_dict(ours.state_dict())          # same names: in_proj_weight, out_proj.*
    with torch.no_grad():
        ref.in_proj_bias.normal_()
        ours.in_proj_bias.copy_(ref.in_proj_bias)
    x = torch.randn(2, 6, 32)
    mask = torch.triu(torch.full((6, 6), float('-inf')), 1) if causal else None
    torch.testing.assert_close(ours(x, causal), ref(x, x, x, attn_mask=mask, need_weights=False)[0],
                               rtol=1e-5, atol=1e-5)


def test_text_feature_is_the_eot_state():
    torch.manual_seed(4)
    c = tiny()
    m = Llip(c).eval()
    _, tokens = batch(3, c)
    changed = tokens.clone()
    after_eot = torch.arange(c.context_length)[None] > tokens.argmax(dim=1)[:, None]
    changed[after_eot] = 7                          # garbage after EOT, still below its id
    torch.testing.assert_close(m.encode_text(tokens).emb, m.encode_text(changed).emb)
    before_eot = tokens.clone()
    before_eot[:, 0] = 9
    assert not torch.allclose(m.encode_text(tokens).emb, m.encode_text(before_eot).emb)


def test_gradient_checkpointing_changes_nothing():
    c = tiny()
    images, tokens = batch(4, c)
    results = []
    for ckpt in (False, True):
        torch.manual_seed(5)
        m = Llip(c).double()
        m.set_grad_checkpointing(ckpt)
        loss = m(images.double(), tokens)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in m.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


# The authors' configurations: embed D | vision width, layers, head width, patch | K | text width,
# layers, heads, context | QKV norm | tau (all: image 224, QuickGELU, M = 8)
AUTHORS = {'vit_b32': (512, 768, 12, 64, 32, 64, 512, 12, 8, 77, False, 5.0),
           'vit_b16': (512, 768, 12, 64, 16, 32, 512, 12, 8, 77, False, 5.0),
           'vit_l14': (768, 1024, 24, 64, 14, 32, 768, 12, 12, 64, False, 1.0),
           'vit_h14': (1024, 1280, 32, 80, 14, 64, 1024, 24, 16, 77, True, 5.0),
           'vit_g14': (1280, 1664, 48, 104, 14, 64, 1280, 32, 20, 77, True, 5.0)}


def test_presets_and_bad_config():
    assert set(PRESETS) >= {'tiny', *AUTHORS}
    for name, values in AUTHORS.items():
        c = PRESETS[name]
        assert (c.embed_dim, c.vision_width, c.vision_layers, c.vision_head_width, c.patch_size,
                c.num_mixture, c.text_width, c.text_layers, c.text_heads, c.context_length,
                c.qkv_norm, c.tau) == values, name
        assert (c.image_size, c.mixer_heads, c.quick_gelu, c.tokenizer) == (224, 8, True, 'clip')
        mlp = 8192 if name == 'vit_g14' else 4 * c.vision_width
        assert int(c.vision_width * c.vision_mlp_ratio) == mlp, name
    with pytest.raises(ValueError, match='pool'):
        replace(PRESETS['tiny'], pool='mean')
    with pytest.raises(ValueError, match='patch_size'):
        replace(PRESETS['tiny'], image_size=30)


@pytest.mark.parametrize('pool', ['llip', 'cls'])
def test_loss_is_eq_3_on_the_contextualised_cosines(pool):
    """Llip.loss (what forward and accumulation.py train on) against eq. 3 written out: every
    pair's cosine from contextualize (llip) or the embeddings (cls), y = +1 on the diagonal."""
    torch.manual_seed(0)
    m = Llip(tiny(pool=pool)).double()
    images, tokens = batch(5, m.config)
    img, txt = m.encode_image(images.double()), m.encode_text(tokens)
    if pool == 'llip':
        cos = F.cosine_similarity(m.contextualize(img, txt), txt.emb[None], dim=-1)   # (I, T)
    else:
        cos = img.emb @ txt.emb.T
    y = 2 * torch.eye(5, dtype=torch.float64) - 1
    expected = -F.logsigmoid(y * (m.logit_scale.exp() * cos + m.logit_bias)).sum() / 5
    torch.testing.assert_close(m.loss(img, txt), expected)
    torch.testing.assert_close(m(images.double(), tokens), expected)
