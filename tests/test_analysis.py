"""What this proves about analysis.py, the diagnostics of trained checkpoints
(run: python -m pytest tests/test_analysis.py):
- the spectrum is the covariance's singular values, descending and divided by the largest:
  exact on data built to have a known covariance; the features are the K mixture tokens of
  each image along the batch axis for the mixer pools, the first token for cls;
- the mixing weights sum to 1 over K for every caption and head, and are the weights of the
  mixer itself: averaging the values with them gives loss.mix's output, and through W_O the
  model's z_ij (Llip.contextualize) and its own contextualised similarity; a checkpoint that
  is not pool=llip is refused;
- the attention maps, recomputed from the last block's input, have rows summing to 1 and,
  applied to the values, give exactly what the block's attention produced;
- the caption pairs differ in exactly the attribute named, as the synthetic grammar reads
  them, and cover its values; their cosine is the plain dot product of the two captions
  encoded one at a time; a text tower that maps every caption to one vector gives 1.000; the
  model at init is exactly the one train.py started from (its seed, from config.json);
- every subcommand writes a PNG from a checkpoint in train.py's format and a tiny synthetic
  dataset; captions writes its table to --table;
- the linear probe finds a label that the features hold and not one they do not; its table
  has a row for the run and one for its init, equal when the weights are the init.
"""
import dataclasses
import functools
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from einops import einsum, rearrange

import analysis
import data
import loss
import synthetic
from model import PRESETS, Llip
from synthetic import make_synthetic



pytestmark = pytest.mark.usefixtures('one_thread')   # tests/conftest.py


def tiny(**overrides):
    small = dict(vision_layers=2, text_layers=1, vision_width=64, text_width=64, embed_dim=32,
                 num_mixture=4, mixer_heads=4, context_length=48, image_size=16,
                 vision_head_width=16)
    return dataclasses.replace(PRESETS['tiny'], **{**small, **overrides})


def save_checkpoint(path, pool, seed=0):
    """A random model in train.py's checkpoint format; W_Q scaled up so that Phi is far from
    uniform."""
    torch.manual_seed(seed)
    model = Llip(tiny(pool=pool))
    if pool == 'llip':
        with torch.no_grad():
            model.q_proj.mul_(20)
    torch.save({'model': model.state_dict(), 'step': 0,
                'config': {'seed': seed, 'model_config': dataclasses.asdict(model.config)}}, path)
    return path


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('analysis')
    make_synthetic(str(root / 'syn'), train=1, retrieval=12, zeroshot=1, shard_size=1)
    return {'root': root, 'data': str(root / 'syn' / 'retrieval'),
            'llip': str(save_checkpoint(root / 'llip.pt', 'llip')),
            'cls': str(save_checkpoint(root / 'cls.pt', 'cls'))}


@pytest.fixture(scope='module')
def images_and_captions(files):
    return analysis.load_images(files['data'], tiny().image_size, 12)


# ----------------------------------------------------------------------------- spectrum
def test_spectrum_of_a_known_covariance():
    torch.manual_seed(0)
    N, eigenvalues = 500, torch.tensor([8.0, 4.0, 1.0, 0.25, 0.01], dtype=torch.float64)
    z = torch.randn(N, 5, dtype=torch.float64)
    z = torch.linalg.qr(z - z.mean(0)).Q * math.sqrt(N - 1)   # centred, sample covariance exactly I
    rotation = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64)).Q
    # covariance R^T diag(eigenvalues) R, shifted
    x = z * eigenvalues.sqrt() @ rotation + 3.0
    expected = eigenvalues / eigenvalues[0]
    torch.testing.assert_close(analysis.covariance_spectrum(x), expected)
    assert analysis.covariance_spectrum(x[:3]).shape == (3,)   # min(N, D) values


def test_spectrum_features_are_mixture_tokens_along_the_batch(files, images_and_captions):
    images = images_and_captions[0][:5]
    llip, cls = analysis.load_model(files['llip']), analysis.load_model(files['cls'])
    c = llip.config
    h = llip.visual(images)                                                       # (5, K, W_v)
    tokens = analysis.visual_features(llip, images, 'tokens', batch_size=2)
    assert tokens.shape == (5 * c.num_mixture, c.vision_width)
    torch.testing.assert_close(tokens[2 * c.num_mixture + 3], h[2, 3])      # row n*K + k = h[n, k]
    values = analysis.visual_features(llip, images, 'values')
    assert values.shape == (5 * c.num_mixture, c.embed_dim)
    torch.testing.assert_close(values[c.num_mixture + 1], h[1, 1] @ llip.v_proj[1])
    torch.testing.assert_close(analysis.visual_features(cls, images, 'tokens'),
                               cls.visual(images)[:, 0])


# ----------------------------------------------------------------------------- mixing weights
def test_mixing_weights_are_the_mixers(files, images_and_captions):
    images, captions = images_and_captions
    model = analysis.load_model(files['llip'])
    c = model.config
    texts = captions[0] + [caps[0] for caps in captions[1:4]]
    phi = analysis.caption_mixing(model, images[0], texts)                      # (T, M, K)
    assert phi.shape == (len(texts), c.mixer_heads, c.num_mixture)
    torch.testing.assert_close(phi.sum(dim=-1), torch.ones(len(texts), c.mixer_heads))
    assert phi.max() > 2 / c.num_mixture                       # not uniform: a real check
    # averaging the values with Phi is what loss.mix does ...
    img = model.encode_image(images[:1])
    txt = model.encode_text(data.tokenize(texts, c.context_length, c.tokenizer))
    mixed = rearrange(einsum(phi, img.values[0], 't m k, m k d -> t m d'), 't m d -> t (m d)')
    torch.testing.assert_close(mixed, loss.mix(txt.queries, img.keys, img.values, c.tau)[0])
    # ... and through W_O it gives the model's z_ij and contextualised similarity
    torch.testing.assert_close(mixed @ model.out_proj, model.contextualize(img, txt)[0])
    cos = (F.normalize(mixed @ model.out_proj, dim=-1) * txt.emb).sum(-1)
    torch.testing.assert_close(cos, model.similarity(img, txt)[0])
    # another tau: other weights, still the mixer's
    phi_1 = analysis.caption_mixing(model, images[0], texts, tau=1.0)
    mixed_1 = rearrange(einsum(phi_1, img.values[0], 't m k, m k d -> t m d'), 't m d -> t (m d)')
    torch.testing.assert_close(mixed_1, loss.mix(txt.queries, img.keys, img.values, 1.0)[0])


def test_mixing_refuses_caption_independent_pools(files, images_and_captions):
    model = analysis.load_model(files['cls'])
    with pytest.raises(ValueError, match='pool=llip'):
        analysis.caption_mixing(model, images_and_captions[0][0], ['a red circle'])
    with pytest.raises(SystemExit, match='pool=llip'):
        analysis.main(['mixing', files['cls'], f"--data={files['data']}",
                       f"--out={files['root'] / 'x.png'}"])


# ----------------------------------------------------------------------------- attention maps
@pytest.mark.parametrize('pool', ['llip', 'cls'])
def test_attention_is_what_the_block_computed(files, images_and_captions, pool):
    model = analysis.load_model(files[pool])
    images = images_and_captions[0][:3]
    c = model.config
    T, L = c.num_tokens, c.num_tokens + (c.image_size // c.patch_size) ** 2
    attn = analysis.mixture_attention(model, images)                            # (N, H, T, L)
    block = model.visual.transformer.blocks[-1]
    assert attn.shape == (3, block.attn.heads, T, L)
    torch.testing.assert_close(attn.sum(dim=-1), torch.ones(3, block.attn.heads, T))
    # the block's own attention output at the mixture tokens, from a hook ...
    seen = {}
    hooks = [block.register_forward_pre_hook(lambda m, inputs: seen.update(x=inputs[0])),
             block.attn.register_forward_hook(lambda m, inputs, out: seen.update(out=out))]
    with torch.no_grad():
        model.visual(images)
    for hook in hooks:
        hook.remove()
    # ... equals the recomputed attention applied to the block's values
    qkv = F.linear(block.ln_1(seen['x']), block.attn.in_proj_weight, block.attn.in_proj_bias)
    v = rearrange(qkv, 'n l (three h d) -> three n h l d', three=3, h=block.attn.heads)[2]
    out = block.attn.out_proj(rearrange(attn @ v, 'n h t d -> n t (h d)'))
    torch.testing.assert_close(out, seen['out'][:, :T], atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- captions
def run_dir(root, name, pool, seed, collapse=False):
    """A run directory as train.py leaves it, ckpt.pt and config.json; collapse: the text
    tower's last LayerNorm gives its bias whatever its input, so every caption has one
    embedding."""
    run = root / name
    run.mkdir()
    save_checkpoint(run / 'ckpt.pt', pool, seed)
    if collapse:
        ckpt = torch.load(run / 'ckpt.pt', weights_only=False)
        ckpt['model']['text.ln_final.weight'].zero_()
        ckpt['model']['text.ln_final.bias'].normal_()
        torch.save(ckpt, run / 'ckpt.pt')
    (run / 'config.json').write_text(json.dumps({'seed': seed, 'model_config': {'pool': pool}}))
    return str(run)


@functools.cache
def grammar():
    """{caption: [every object it could be said of]}, over all objects of the synthetic data."""
    said_of = {}
    for shape, color, size, place in itertools.product(
            synthetic.SHAPES, synthetic.COLORS, synthetic.SIZES, synthetic.PLACES):
        o = {'shape': shape, 'color': color, 'size': size, 'place': place}
        for kind in ('shape', 'color', 'place', 'size'):
            said_of.setdefault(synthetic._say(kind, o), []).append(o)
    return said_of


def said(caption):
    """What a caption says of its object: {attribute: value} for each attribute on which all
    the objects it could be said of agree ('a red circle': colour and shape, not size, place)."""
    objects = grammar()[caption]
    return {k: v for k, v in objects[0].items() if all(o[k] == v for o in objects)}


@pytest.mark.parametrize('attribute, values', [('color', synthetic.COLORS),
                                               ('shape', synthetic.SHAPES),
                                               ('size', synthetic.SIZES),
                                               ('place', synthetic.PLACES)])
def test_caption_pairs_differ_in_exactly_that_attribute(attribute, values):
    pairs = analysis.caption_pairs(attribute, 200, seed=0)
    assert len(pairs) == 200
    for a, b in pairs:
        x, y = said(a), said(b)
        assert attribute in x and x.keys() == y.keys(), (a, b)
        assert {k for k in x if x[k] != y[k]} == {attribute}, (a, b)
    # every value turns up on both sides; the seed fixes the pairs
    assert {said(a)[attribute] for a, _ in pairs} == set(values)
    assert {said(b)[attribute] for _, b in pairs} == set(values)
    assert analysis.caption_pairs(attribute, 200, seed=0) == pairs
    assert analysis.caption_pairs(attribute, 200, seed=1) != pairs


@pytest.mark.parametrize('pool', ['llip', 'cls'])
def test_caption_cosine_is_the_dot_product_of_each_pair(files, pool):
    model = analysis.load_model(files[pool])
    c = model.config
    cosines = analysis.attribute_cosines(model, n=6, seed=2)
    for attribute, pairs in ((a, analysis.caption_pairs(a, 6, seed=2)) for a in cosines):
        with torch.no_grad():                                       # each caption alone
            one = [[model.encode_text(data.tokenize([t], c.context_length, c.tokenizer)).emb[0]
                    for t in pair] for pair in pairs]
        expected = sum(float(a @ b) for a, b in one) / len(one)
        assert cosines[attribute] == pytest.approx(expected, abs=1e-5), attribute
        assert cosines[attribute] < 0.999                          # a random model tells them apart


def table_row(text, run, weights):
    """The cosines of one row of the captions table, in ATTRIBUTES order."""
    row = next(line for line in text.splitlines() if line.startswith(f'| {run} | {weights} |'))
    return [float(cell) for cell in row.split('|')[3:-1]]


def test_captions_of_a_collapsed_text_tower_are_one(tmp_path, is_png):
    run = run_dir(tmp_path, 'collapsed', 'llip', seed=0, collapse=True)
    model = analysis.load_model(run)
    assert analysis.attribute_cosines(model, n=10) == pytest.approx(
        dict.fromkeys(analysis.ATTRIBUTES, 1.0), abs=1e-6)
    table = tmp_path / 'captions.md'
    analysis.main(['captions', run, '--pairs=10', f'--table={table}',
                   f"--out={tmp_path / 'captions.png'}"])
    assert is_png(tmp_path / 'captions.png')
    text = table.read_text()
    assert table_row(text, 'collapsed', 'trained') == [1.0] * 4
    assert max(table_row(text, 'collapsed', 'at init')) < 0.999   # before the weights were zeroed


def test_the_model_at_init_is_the_one_train_py_started_from(tmp_path):
    run = run_dir(tmp_path, 'cls3', 'cls', seed=3)                 # saved right after its init
    assert analysis.run_seed(run) == 3
    assert analysis.run_seed(tmp_path) == 0                        # no config.json: seed 0
    saved = analysis.load_model(run)
    rng = torch.get_rng_state()
    init = analysis.initial_model(saved.config, analysis.run_seed(run))
    assert torch.equal(torch.get_rng_state(), rng)                 # the caller's draws go on
    for name, value in saved.state_dict().items():
        assert torch.equal(init.state_dict()[name], value), name
    other = analysis.initial_model(saved.config, 0)
    assert not torch.equal(other.text_proj, saved.text_proj)       # so the seed did matter


# ----------------------------------------------------------------------------- every command
def test_every_subcommand_writes_a_png(files, tmp_path, is_png):
    d = f"--data={files['data']}"
    runs = [run_dir(tmp_path, name, name, seed) for seed, name in enumerate(('cls', 'llip'))]
    commands = {
        'spectrum': ['spectrum', files['llip'], files['cls'], d, '--images=6'],
        'spectrum_values': ['spectrum', files['llip'], files['cls'], d, '--features=values',
                            '--labels=a,b'],
        'mixing': ['mixing', files['llip'], d, '--index=2', '--unrelated=3'],
        'attention': ['attention', files['llip'], d, '--index=1', '--head=0'],
        'attention_cls': ['attention', files['cls'], d],
        'captions': ['captions', *runs, '--pairs=8', f"--table={tmp_path / 'captions.md'}"],
    }
    for name, argv in commands.items():
        analysis.main([*argv, f'--out={tmp_path / name}.png'])
        assert is_png(tmp_path / f'{name}.png'), name
    text = (tmp_path / 'captions.md').read_text()
    # at init and trained alike: these checkpoints are their runs' initial weights (W_Q of llip
    # aside, which the text embedding does not use)
    for run in ('cls', 'llip'):
        assert table_row(text, run, 'trained') == table_row(text, run, 'at init')
    with pytest.raises(SystemExit, match='--index=99'):
        analysis.main(['attention', files['llip'], d, '--index=99', f"--out={tmp_path / 'x.png'}"])


def test_probe_finds_what_the_features_hold_and_nothing_else():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (300,), generator=g)
    noise = torch.randn(300, 10, generator=g)
    one_hot = F.one_hot(labels, 6).float() + 0.1 * torch.randn(300, 6, generator=g)
    holding = torch.cat([one_hot, noise], dim=1)
    assert analysis.probe_accuracy(holding, labels, n_train=200) > 0.95
    assert analysis.probe_accuracy(noise, labels, n_train=200) < 0.35   # chance: 1/6


def test_probe_table_has_the_run_trained_and_at_init(tmp_path):
    run = run_dir(tmp_path, 'untrained', 'cls', seed=3)   # its weights are its seed's init
    table = tmp_path / 'probe.md'
    analysis.main(['probe', str(run), '--images=90', '--train=60', f'--table={table}'])
    text = table.read_text()
    trained, init = table_row(text, 'untrained', 'trained'), table_row(text, 'untrained', 'at init')
    assert len(trained) == 4 and all(0 <= a <= 1 for a in trained)
    assert trained == init
