"""What this proves about eval.py (run: python -m pytest tests/test_eval.py):
- zero-shot top-1/top-5 equal a brute-force reference that contextualises one image with one
  class prototype at a time, for Llip and for the caption-independent pools, for several
  taus, with images and classes split into many chunks;
- retrieval recall@1/5/10 both ways equal a reference that scores one image-caption pair at
  a time and ranks by counting;
- template averaging: one template is plain evaluation of its prompts; two templates give
  the mean of the queries and the normalised mean of the normalised embeddings;
- image folders: classes matched by name or by sorted order, bad layouts refused with clear
  messages, undecodable images skipped with a warning;
- a file that is not a checkpoint is refused, and a train.py checkpoint loads.
"""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
from synthetic import make_synthetic
import eval as llip_eval
from model import PRESETS, Llip, TextFeatures

NAMES = ['cat', 'dog', 'car', 'sun', 'red', 'box', 'sky', 'tree', 'fish', 'moon', 'rock', 'leaf']
TEMPLATES = ['a {}', 'the {}!', '{} pic']


pytestmark = pytest.mark.usefixtures('one_thread')   # tests/conftest.py


def tiny(**overrides):
    small = dict(vision_layers=2, text_layers=2, vision_width=64, text_width=64, embed_dim=32,
                 num_mixture=4, context_length=16, image_size=16, vision_head_width=16)
    return dataclasses.replace(PRESETS['tiny'], **{**small, **overrides})


def random_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return Llip(tiny(**overrides)).double().eval()


def encode_one_text(m, text):
    return m.encode_text(data.tokenize([text], m.config.context_length, m.config.tokenizer))


def brute_force_scores(m, images, names, templates, taus):
    """{tau: (N, C)}: each image encoded alone, each class prototype built prompt by prompt,
    and each image mixed with one class prototype at a time."""
    protos = []
    for name in names:
        feats = [encode_one_text(m, t.format(name)) for t in templates]
        emb = F.normalize(sum(f.emb for f in feats) / len(feats), dim=-1)
        queries = None if feats[0].queries is None else sum(f.queries for f in feats) / len(feats)
        protos.append(TextFeatures(queries, emb))
    alone = [m.encode_image(x[None]) for x in images]
    return {tau: torch.tensor([[m.similarity(img, proto, tau=tau).item() for proto in protos] for img in alone],
                              dtype=torch.float64) for tau in taus}


def rank_of(row, target):
    """How many entries beat the target: 0 means it is the best."""
    return int((row > row[target]).sum())


@pytest.mark.parametrize('pool', ['llip', 'avg', 'cls'])
@torch.no_grad()
def test_zeroshot_matches_one_pair_at_a_time(pool, monkeypatch):
    m = random_model(pool=pool)
    images = torch.randn(14, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    taus = (None, 1.0) if pool == 'llip' else (None,)
    # labels chosen from the reference ranking: image i's label is its rank-RANKS[i] class, so
    # the expected top-1 is 4/14 and top-5 8/14 (no other rank is as frequent as 0), and any
    # wrong score moves them
    reference = brute_force_scores(m, images, NAMES, TEMPLATES, taus)
    ranks = torch.tensor([0, 0, 0, 1, 2, 4, 5, 6, 9, 11, 3, 0, 7, 8])
    labels = reference[None].argsort(dim=1, descending=True)[torch.arange(14), ranks]
    monkeypatch.setattr(llip_eval, 'PAIRS_PER_CHUNK', 8)   # 3 images per batch -> 2 classes per chunk
    got = llip_eval.zeroshot(m, (images, labels), NAMES, TEMPLATES, taus=taus, batch_size=3)
    for tau in taus:
        ranks = [rank_of(reference[tau][i], labels[i]) for i in range(14)]
        expected = {'top1': np.mean([r < 1 for r in ranks]), 'top5': np.mean([r < 5 for r in ranks])}
        key = float(m.config.tau if tau is None else tau)
        assert got[key] == pytest.approx(expected), (tau, got[key], expected)
    assert got[m.config.tau] == pytest.approx({'top1': 4 / 14, 'top5': 8 / 14})
    if pool == 'llip':   # tau matters for Llip, so the second tau was really evaluated with its own value
        assert not torch.equal(reference[None].argsort(dim=1), reference[1.0].argsort(dim=1))


@pytest.mark.parametrize('pool', ['llip', 'cls'])
@torch.no_grad()
def test_retrieval_matches_one_pair_at_a_time(pool, monkeypatch):
    m = random_model(seed=2, pool=pool)
    n = 13
    images = torch.randn(n, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    words = ['red', 'big', 'two', 'cat', 'sun', 'old', 'wet', 'hot', 'sky', 'box']
    captions = [[f'{words[i % 10]} {words[(i * 7 + c) % 10]} {i}' for c in range(1 + i % 3)] for i in range(n)]
    owner = [i for i, caps in enumerate(captions) for _ in caps]
    flat = [c for caps in captions for c in caps]
    alone_images = [m.encode_image(images[i:i + 1]) for i in range(n)]
    alone_texts = [encode_one_text(m, t) for t in flat]
    scores = torch.tensor([[m.similarity(img, txt).item() for txt in alone_texts] for img in alone_images],
                          dtype=torch.float64)
    expected = {}
    for k in (1, 5, 10):
        expected[f'i2t_r{k}'] = np.mean([min(rank_of(scores[i], j) for j in range(len(flat)) if owner[j] == i) < k
                                         for i in range(n)])
        expected[f't2i_r{k}'] = np.mean([rank_of(scores[:, j], owner[j]) < k for j in range(len(flat))])
    monkeypatch.setattr(llip_eval, 'PAIRS_PER_CHUNK', 12)   # 4 images per batch -> 3 captions per chunk
    got = llip_eval.retrieval(m, (images, captions), batch_size=4)[m.config.tau]
    assert got == pytest.approx(expected)
    assert 0 < got['i2t_r1'] < 1 and 0 < got['t2i_r5'] < 1   # not a degenerate case


@torch.no_grad()
def test_one_template_is_plain_evaluation():
    m = random_model(seed=4)
    protos = llip_eval.class_prototypes(m, NAMES, ['a {}'], batch_size=5)
    plain = m.encode_text(data.tokenize([f'a {n}' for n in NAMES], m.config.context_length, m.config.tokenizer))
    torch.testing.assert_close(protos.queries, plain.queries)
    torch.testing.assert_close(protos.emb, plain.emb)


@torch.no_grad()
def test_two_templates_average_queries_and_normalised_embeddings():
    m = random_model(seed=5)
    protos = llip_eval.class_prototypes(m, NAMES[:4], ['a {}', 'the {}!'], batch_size=3)
    for c, name in enumerate(NAMES[:4]):
        a, b = encode_one_text(m, f'a {name}'), encode_one_text(m, f'the {name}!')
        torch.testing.assert_close(protos.queries[c], (a.queries[0] + b.queries[0]) / 2)   # not normalised
        torch.testing.assert_close(protos.emb[c], F.normalize(a.emb[0] + b.emb[0], dim=0))
    with pytest.raises(ValueError, match="'{}'"):
        llip_eval.class_prototypes(m, NAMES, ['a photo of a {c}'])


# ----------------------------------------------------------------------------- image folders
def write_folder(root, classes, per_class=3, seed=0):
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f'{i}.png')
    return root


@torch.no_grad()
def test_folder_by_name_by_order_and_undecodable_images(tmp_path):
    m = random_model(seed=6)
    names = ['cat', 'dog', 'car']
    by_name = llip_eval.zeroshot(m, write_folder(tmp_path / 'a', names), names, TEMPLATES, batch_size=4)
    # ImageNet-style ids: sorted folder i is class i, so the same images give the same result
    ids = write_folder(tmp_path / 'b', ['n01', 'n02', 'n03'])
    assert [label for _, label in llip_eval.image_folder(ids, names)] == [0] * 3 + [1] * 3 + [2] * 3
    assert llip_eval.zeroshot(m, ids, names, TEMPLATES, batch_size=4) == by_name
    # a shuffled name order changes which folder is which class, and so the labels
    samples = llip_eval.image_folder(tmp_path / 'a', ['dog', 'car', 'cat'])
    assert [label for _, label in samples] == [1] * 3 + [2] * 3 + [0] * 3   # folders car, cat, dog
    # an undecodable image is skipped, counted and reported; the others are still evaluated
    (tmp_path / 'a' / 'dog' / 'broken.png').write_bytes(b'not a png')
    with pytest.warns(UserWarning, match='skipped 1 images'):
        assert llip_eval.zeroshot(m, tmp_path / 'a', names, TEMPLATES, batch_size=4) == by_name


def test_bad_folders_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match='no such folder'):
        llip_eval.image_folder(tmp_path / 'missing', ['cat'])
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='no class subfolders'):
        llip_eval.image_folder(tmp_path / 'empty', ['cat'])
    write_folder(tmp_path / 'noimages', ['cat', 'dog'], per_class=0)
    with pytest.raises(ValueError, match='hold no images'):
        llip_eval.image_folder(tmp_path / 'noimages', ['cat', 'dog'])
    write_folder(tmp_path / 'pets', ['cat', 'dog', 'emu'], per_class=1)
    with pytest.raises(ValueError, match=r"Folders not in the names: \['emu'\]"):
        llip_eval.image_folder(tmp_path / 'pets', ['cat', 'dog'])
    with pytest.raises(ValueError, match=r"names without a folder: \['owl'\]"):
        llip_eval.image_folder(tmp_path / 'pets', ['cat', 'dog', 'emu', 'owl'])
    with pytest.raises(ValueError, match='3 class folders but 2 class names'):
        llip_eval.image_folder(tmp_path / 'pets', ['n01', 'n02'])
    with pytest.warns(UserWarning, match='no images in this class folder'):
        (tmp_path / 'pets' / 'owl').mkdir()
        llip_eval.image_folder(tmp_path / 'pets', ['cat', 'dog', 'emu', 'owl'])


# ----------------------------------------------------------------------------- checkpoints
@torch.no_grad()
def test_checkpoints(tmp_path):
    torch.manual_seed(7)
    c = tiny()
    m = Llip(c).eval()
    images = torch.randn(2, 3, 16, 16)
    tokens = data.tokenize(['a cat', 'a dog'], c.context_length, c.tokenizer)
    expected = m.similarity(m.encode_image(images), m.encode_text(tokens))
    # train.py's layout, a bare config dict, and a compiled model's prefixed keys all load
    compiled = {f'_orig_mod.{k}': v for k, v in m.state_dict().items()}
    for i, ckpt in enumerate([{'model': m.state_dict(), 'config': {'lr': 1e-3, 'model_config': dataclasses.asdict(c)}},
                              {'model': compiled, 'config': {**dataclasses.asdict(c), 'steps': 10}}]):
        torch.save(ckpt, tmp_path / f'{i}.pt')
        loaded = llip_eval.load_checkpoint(tmp_path / f'{i}.pt')
        assert loaded.config == c
        torch.testing.assert_close(loaded.similarity(loaded.encode_image(images), loaded.encode_text(tokens)), expected)
    (tmp_path / 'junk.pt').write_bytes(b'hello')
    with pytest.raises(ValueError, match='not a checkpoint'):
        llip_eval.load_checkpoint(tmp_path / 'junk.pt')
    torch.save({'visual.class_embedding': torch.zeros(1)}, tmp_path / 'theirs.pt')
    with pytest.raises(ValueError, match='use --official'):
        llip_eval.load_checkpoint(tmp_path / 'theirs.pt')


# ----------------------------------------------------------------------------- synthetic data
@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp('synthetic'), train=1, retrieval=12, zeroshot=2, shard_size=1)


@torch.no_grad()
def test_retrieval_reads_shards_and_caption_folders_alike(synthetic, tmp_path):
    m = random_model(seed=8, image_size=32)
    shard = f'{synthetic}/retrieval/00000.tar'
    for key, image, captions in data.read_shards(shard):   # the same samples as KEY.png + KEY.txt
        image.save(tmp_path / f'{key}.png')
        (tmp_path / f'{key}.txt').write_text('\n'.join(captions))
    from_shards = llip_eval.retrieval(m, shard, taus=(1.0, 5.0), batch_size=5)
    assert llip_eval.retrieval(m, tmp_path, taus=(1.0, 5.0), batch_size=5) == from_shards
    assert llip_eval.retrieval(m, shard, max_images=12) == {5.0: from_shards[5.0]}
    assert llip_eval.retrieval(m, shard, max_images=6) != {5.0: from_shards[5.0]}
    (tmp_path / 'broken.png').write_bytes(b'not a png')
    (tmp_path / 'broken.txt').write_text('a caption')
    with pytest.warns(UserWarning, match='skipped 1 images'):
        assert llip_eval.retrieval(m, tmp_path, taus=(1.0, 5.0), batch_size=5) == from_shards


@torch.no_grad()
def test_evaluate_synthetic(synthetic):
    m = random_model(seed=9, image_size=32)
    metrics = llip_eval.evaluate_synthetic(m, synthetic)
    expected = {f'zeroshot/{split}/{k}' for split in ('shape', 'color') for k in ('top1', 'top5')}
    expected |= {f'retrieval/{way}_r{k}' for way in ('i2t', 't2i') for k in (1, 5, 10)}
    assert set(metrics) == expected and all(0 <= v <= 1 for v in metrics.values())
    several = llip_eval.evaluate_synthetic(m, synthetic, taus=(1.0, 5.0))
    assert several['zeroshot/shape/tau5/top1'] == metrics['zeroshot/shape/top1']
    assert len(several) == 2 * len(metrics)
    with pytest.raises(FileNotFoundError, match='synthetic.py'):
        llip_eval.evaluate_synthetic(m, synthetic / 'zeroshot' / 'shape')
