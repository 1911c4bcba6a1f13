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
- every subcommand writes a PNG from a checkpoint in train.py's format and a tiny synthetic
  dataset; by default into the run directory (several runs: the folder holding them), never
  where the command was started; mixing --unrelated=N shows N other captions, none of the
  image's own; attention's caption line does not overlap the panels.
"""
import dataclasses
import math
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pytest
import torch
import torch.nn.functional as F
from einops import einsum, rearrange

import analysis
import data
import loss
from conftest import plotted_tiny, save_checkpoint
from model import Llip
from synthetic import make_synthetic



pytestmark = pytest.mark.usefixtures('one_thread')   # tests/conftest.py



@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('analysis')
    make_synthetic(str(root / 'syn'), train=1, retrieval=12, zeroshot=1, shard_size=1)
    return {'root': root, 'data': str(root / 'syn' / 'retrieval'),
            'llip': str(save_checkpoint(root / 'llip.pt', 'llip')),
            'cls': str(save_checkpoint(root / 'cls.pt', 'cls'))}


@pytest.fixture(scope='module')
def images_and_captions(files):
    return analysis.load_images(files['data'], plotted_tiny().image_size, 12)


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


# ----------------------------------------------------------------------------- every command
def test_every_subcommand_writes_a_png(files, tmp_path, is_png):
    d = f"--data={files['data']}"
    commands = {
        'spectrum': ['spectrum', files['llip'], files['cls'], d, '--images=6'],
        'spectrum_values': ['spectrum', files['llip'], files['cls'], d, '--features=values',
                            '--labels=a,b'],
        'mixing': ['mixing', files['llip'], d, '--index=2', '--unrelated=3'],
        'attention': ['attention', files['llip'], d, '--index=1', '--head=0'],
        'attention_cls': ['attention', files['cls'], d],
    }
    for name, argv in commands.items():
        analysis.main([*argv, f'--out={tmp_path / name}.png'])
        assert is_png(tmp_path / f'{name}.png'), name
    with pytest.raises(SystemExit, match='--index=99'):
        analysis.main(['attention', files['llip'], d, '--index=99', f"--out={tmp_path / 'x.png'}"])


# ----------------------------------------------------------------------------- what a person sees
def unrendered(monkeypatch):
    """analysis.save without matplotlib's drawing (~0.5 s a figure), for tests of what goes into
    a figure or where it goes: an empty file at the path, the figure closed. That each command
    draws and writes a real PNG is test_every_subcommand_writes_a_png's."""
    def save(fig, path):
        Path(path).touch()
        plt.close(fig)
    monkeypatch.setattr(analysis, 'save', save)


def test_mixing_shows_as_many_other_captions_as_asked(files, images_and_captions, tmp_path,
                                                      monkeypatch):
    unrendered(monkeypatch)
    shown, real = [], analysis.caption_mixing
    monkeypatch.setattr(analysis, 'caption_mixing',
                        lambda model, image, texts, tau: shown.append(texts) or real(
                            model, image, texts, tau))
    own = images_and_captions[1][0]
    for n in (4, 0):
        analysis.main(['mixing', files['llip'], f"--data={files['data']}", f'--unrelated={n}',
                       f"--out={tmp_path / 'mixing.png'}"])
        assert shown[-1][:len(own)] == own
        others = shown[-1][len(own):]
        assert len(others) == n and len(set(others)) == n and not set(others) & set(own)


def test_plots_go_into_the_run_directory_by_default(files, tmp_path, monkeypatch):
    runs, cwd = tmp_path / 'runs', tmp_path / 'cwd'
    for name, pool in (('a', 'llip'), ('b', 'cls')):
        (runs / name).mkdir(parents=True)
        (runs / name / 'ckpt.pt').write_bytes(open(files[pool], 'rb').read())
    cwd.mkdir()
    monkeypatch.chdir(cwd)   # where the command is started: nothing must land here
    unrendered(monkeypatch)
    d = f"--data={files['data']}"
    analysis.main(['attention', str(runs / 'a'), d])
    analysis.main(['mixing', str(runs / 'a' / 'ckpt.pt'), d])
    analysis.main(['spectrum', str(runs / 'a'), str(runs / 'b'), d, '--images=6'])
    assert sorted(p.name for p in (runs / 'a').iterdir()) == ['attention.png', 'ckpt.pt',
                                                               'mixing.png']
    assert (runs / 'spectrum.png').exists() and list(cwd.iterdir()) == []


def test_the_attention_caption_does_not_overlap_the_panels(files, tmp_path, monkeypatch):
    torch.manual_seed(0)   # 16 mixture tokens: three rows of panels
    model = Llip(plotted_tiny(num_mixture=16))
    path = tmp_path / 'k16.pt'
    torch.save({'model': model.state_dict(), 'step': 0,
                'config': {'model_config': dataclasses.asdict(model.config)}}, path)
    figures = []
    monkeypatch.setattr(analysis, 'save', lambda fig, out: figures.append(fig))
    analysis.main(['attention', str(path), f"--data={files['data']}"])
    fig = figures[0]
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()   # the layout is done when drawn
    first = analysis.load_images(files['data'], 16, 1)[1][0][0]
    caption, = [t for t in fig.findobj(matplotlib.text.Text) if first in t.get_text()]
    box = caption.get_window_extent(renderer)
    panels = [ax.get_window_extent(renderer) for ax in fig.axes if ax.get_visible()
              and ax.images]
    assert len(panels) == 17 and not any(box.overlaps(p) for p in panels)
