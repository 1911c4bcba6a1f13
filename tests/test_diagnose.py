"""What this proves about diagnose.py, the measures of a trained run against its init
(run: python -m pytest tests/test_diagnose.py):
- the model at init is exactly the one train.py started from (its seed, from config.json),
  and the caller's random state is left as it was;
- the caption pairs differ in exactly the attribute named, as the synthetic grammar reads
  them, and cover its values; their cosine is the plain dot product of the two captions
  encoded one at a time; a text tower that maps every caption to one vector gives 1.000;
  the captions table and plot are written, trained equal to init for an untrained run;
- the linear probe finds a label that the features hold and not one they do not; its table
  has a row for the run and one for its init, equal when the weights are the init;
- the spread (mean cosine between two images' vectors) equals the mean over every pair of
  different images, one pair at a time in float64; it is 1 for one vector repeated; its image
  vectors are the model's own z_i; its table is trained equal to init for an untrained run,
  and a llip run, whose z_ij depends on the caption, is refused with a message.
"""
import functools
import itertools
import json

import pytest
import torch
import torch.nn.functional as F

import data
from runs import diagnose
import synthetic
from synthetic import make_synthetic
from conftest import save_checkpoint

pytestmark = pytest.mark.usefixtures('one_thread')   # tests/conftest.py


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
    pairs = diagnose.caption_pairs(attribute, 200, seed=0)
    assert len(pairs) == 200
    for a, b in pairs:
        x, y = said(a), said(b)
        assert attribute in x and x.keys() == y.keys(), (a, b)
        assert {k for k in x if x[k] != y[k]} == {attribute}, (a, b)
    # every value turns up on both sides; the seed fixes the pairs
    assert {said(a)[attribute] for a, _ in pairs} == set(values)
    assert {said(b)[attribute] for _, b in pairs} == set(values)
    assert diagnose.caption_pairs(attribute, 200, seed=0) == pairs
    assert diagnose.caption_pairs(attribute, 200, seed=1) != pairs


@pytest.mark.parametrize('pool', ['llip', 'cls'])
def test_caption_cosine_is_the_dot_product_of_each_pair(tmp_path, pool):
    model = diagnose.load_model(run_dir(tmp_path, pool, pool, seed=0))
    c = model.config
    cosines = diagnose.attribute_cosines(model, n=6, seed=2)
    for attribute, pairs in ((a, diagnose.caption_pairs(a, 6, seed=2)) for a in cosines):
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
    model = diagnose.load_model(run)
    assert diagnose.attribute_cosines(model, n=10) == pytest.approx(
        dict.fromkeys(diagnose.ATTRIBUTES, 1.0), abs=1e-6)
    table = tmp_path / 'captions.md'
    diagnose.main(['captions', run, '--pairs=10', f'--table={table}',
                   f"--out={tmp_path / 'captions.png'}"])
    assert is_png(tmp_path / 'captions.png')
    text = table.read_text()
    assert table_row(text, 'collapsed', 'trained') == [1.0] * 4
    assert max(table_row(text, 'collapsed', 'at init')) < 0.999   # before the weights were zeroed


def test_the_model_at_init_is_the_one_train_py_started_from(tmp_path):
    run = run_dir(tmp_path, 'cls3', 'cls', seed=3)                 # saved right after its init
    assert diagnose.run_seed(run) == 3
    assert diagnose.run_seed(tmp_path) == 0                        # no config.json: seed 0
    saved = diagnose.load_model(run)
    rng = torch.get_rng_state()
    init = diagnose.initial_model(saved.config, diagnose.run_seed(run))
    assert torch.equal(torch.get_rng_state(), rng)                 # the caller's draws go on
    for name, value in saved.state_dict().items():
        assert torch.equal(init.state_dict()[name], value), name
    other = diagnose.initial_model(saved.config, 0)
    assert not torch.equal(other.text_proj, saved.text_proj)       # so the seed did matter



def test_captions_writes_its_table_and_plot(tmp_path, is_png):
    runs = [run_dir(tmp_path, name, name, seed) for seed, name in enumerate(('cls', 'llip'))]
    table = tmp_path / 'captions.md'
    diagnose.main(['captions', *runs, '--pairs=8', f'--table={table}',
                   f"--out={tmp_path / 'captions.png'}"])
    assert is_png(tmp_path / 'captions.png')
    text = table.read_text()
    # at init and trained alike: these checkpoints are their runs' initial weights (W_Q of llip
    # aside, which the text embedding does not use)
    for run in ('cls', 'llip'):
        assert table_row(text, run, 'trained') == table_row(text, run, 'at init')


# ----------------------------------------------------------------------------- linear probe
def test_probe_finds_what_the_features_hold_and_nothing_else():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (300,), generator=g)
    noise = torch.randn(300, 10, generator=g)
    one_hot = F.one_hot(labels, 6).float() + 0.1 * torch.randn(300, 6, generator=g)
    holding = torch.cat([one_hot, noise], dim=1)
    assert diagnose.probe_accuracy(holding, labels, n_train=200) > 0.95
    assert diagnose.probe_accuracy(noise, labels, n_train=200) < 0.35   # chance: 1/6


def test_probe_table_has_the_run_trained_and_at_init(tmp_path):
    run = run_dir(tmp_path, 'untrained', 'cls', seed=3)   # its weights are its seed's init
    table = tmp_path / 'probe.md'
    diagnose.main(['probe', str(run), '--images=90', '--train=60', f'--table={table}'])
    text = table.read_text()
    trained, init = table_row(text, 'untrained', 'trained'), table_row(text, 'untrained', 'at init')
    assert len(trained) == 4 and all(0 <= a <= 1 for a in trained)
    assert trained == init


# ----------------------------------------------------------------------------- spread
def test_mean_cosine_is_the_mean_over_pairs_of_different_images():
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(9, 5, generator=g, dtype=torch.float64) + 0.5, dim=-1)
    pairs = [float(z[i] @ z[j]) for i in range(9) for j in range(9) if i != j]
    assert diagnose.mean_cosine(z) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
    assert diagnose.mean_cosine(z[:1].expand(4, -1)) == pytest.approx(1.0, abs=1e-12)
    assert diagnose.mean_cosine(z.float()) == pytest.approx(sum(pairs) / len(pairs), abs=1e-6)


def test_spread_table_and_its_image_vectors(tmp_path):
    make_synthetic(str(tmp_path / 'syn'), train=1, retrieval=10, zeroshot=1, shard_size=1)
    shards = str(tmp_path / 'syn' / 'retrieval')
    run = run_dir(tmp_path, 'untrained', 'avg', seed=3)   # its weights are its seed's init
    model = diagnose.load_model(run)
    images, _ = diagnose.load_images(shards, model.config.image_size, 10)
    z = diagnose.image_vectors(model, images, batch_size=3)
    torch.testing.assert_close(z, model.encode_image(images).emb)
    table = tmp_path / 'spread.md'
    diagnose.main(['spread', run, f'--data={shards}', f'--table={table}'])
    row = next(line for line in table.read_text().splitlines() if line.startswith('| untrained |'))
    pool, k, init, trained = [cell.strip() for cell in row.split('|')[2:-1]]
    assert (pool, k) == ('avg', str(model.config.num_tokens))
    assert init == trained == f'{diagnose.mean_cosine(z):.3f}'
    llip = run_dir(tmp_path, 'llip', 'llip', seed=0)
    with pytest.raises(SystemExit, match='pool=llip'):
        diagnose.main(['spread', llip, f'--data={shards}'])
