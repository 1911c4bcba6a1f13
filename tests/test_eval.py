"""What this proves about eval.py (run: python -m pytest tests/test_eval.py):
- zero-shot top-1/top-5 equal a brute-force reference that contextualises one image with one
  class prototype at a time, for Llip and for the caption-independent pools, for several
  taus, with the images split into batches and each batch into chunks;
- retrieval over distinct caption strings: recall@1/5/10 and mAP both ways equal a reference
  that ranks one query at a time in a sorted Python list, on random score matrices full of
  ties (in one chunk and one query per chunk) and, for Llip and CLS pooling, on scores of one
  image-string pair at a time with shared captions and extra true strings; ties count against
  the true item (checked by hand, and the optimistic rule gives other numbers);
- on unique captions these recalls are the standard one-owner protocol (COCO / Flickr);
- binding: a hit is the true caption scoring strictly above its swapped twin on the same image,
  overall and per kind; the twins are not candidates, so the ranking metrics do not move;
- ground truth is read from KEY.json in shards and caption folders (true_captions, binding,
  other keys ignored); shards without json are plain captions; a json that does not parse is
  ignored with a warning, a malformed field is an error naming the key;
- template averaging: one template is plain evaluation of its prompts; two templates give
  the mean of the queries and the normalised mean of the normalised embeddings;
- the best-prompt protocol equals scoring each image with each prompt alone and taking each
  class's best, and differs from the averaged protocol on the same model;
- image folders: classes matched by name (ignoring case and '_'), by number (ImageNetV2), by a
  {folder: name} or {"0": name} dict (given by flag or inside --data) or by sorted order (said
  on stdout); half matches and bad layouts refused with clear messages; undecodable images,
  decompression bombs and images beyond the pixel budget skipped with a warning;
- mean per-class recall equals a per-class loop; top5 is n/a below 5 classes; clip_benchmark's
  metric names and its WebDataset zero-shot layout (same numbers as the same images in folders);
- the command line: one results file per dataset, named short (eval_zeroshot_pets.json; _2
  where another dataset has the name), progress bars with totals;
- a file that is not a checkpoint is refused, and a train.py checkpoint loads.
"""
import dataclasses
import io
import json


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
from conftest import (eval_tiny, plain_checkpoint, random_model, reference_metrics,
                      reference_one_way, write_folder, write_tar, png)
from synthetic import make_synthetic
import eval as llip_eval
import eval_data
import loss
from model import Llip, TextFeatures

NAMES = ['cat', 'dog', 'car', 'sun', 'red', 'box', 'sky', 'tree', 'fish', 'moon', 'rock', 'leaf']
TEMPLATES = ['a {}', 'the {}!', '{} pic']


pytestmark = pytest.mark.usefixtures('one_thread')   # tests/conftest.py


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
    return {
        tau: torch.tensor(
            [[m.similarity(img, proto, tau=tau).item() for proto in protos] for img in alone],
            dtype=torch.float64,
        )
        for tau in taus
    }


def rank_of(row, target):
    """How many entries beat the target: 0 means it is the best."""
    return int((row > row[target]).sum())


@pytest.mark.parametrize('pool', ['llip', 'avg', 'cls'])
@torch.no_grad()
def test_zeroshot_matches_one_pair_at_a_time(pool, monkeypatch):
    m = random_model(pool=pool)
    images = torch.randn(
        14, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    taus = (None, 1.0) if pool == 'llip' else (None,)
    # labels chosen from the reference ranking: image i's label is its rank-RANKS[i] class, so
    # the expected top-1 is 4/14 and top-5 8/14 (no other rank is as frequent as 0), and any
    # wrong score moves them
    reference = brute_force_scores(m, images, NAMES, TEMPLATES, taus)
    ranks = torch.tensor([0, 0, 0, 1, 2, 4, 5, 6, 9, 11, 3, 0, 7, 8])
    labels = reference[None].argsort(dim=1, descending=True)[torch.arange(14), ranks]
    monkeypatch.setattr(loss, 'default_chunk', lambda *_: 2)   # 3 images a batch: chunks of 2 and 1
    got = llip_eval.zeroshot(m, (images, labels), NAMES, TEMPLATES, taus=taus, batch_size=3)
    for tau in taus:
        ranks = [rank_of(reference[tau][i], labels[i]) for i in range(14)]
        recall = {
            c: np.mean([r < 1 for r, y in zip(ranks, labels) if y == c])
            for c in set(labels.tolist())
        }
        expected = {
            'top1': np.mean([r < 1 for r in ranks]),
            'top5': np.mean([r < 5 for r in ranks]),
            'mean_per_class_recall': np.mean(list(recall.values())),
        }  # over the classes with images
        key = float(m.config.tau if tau is None else tau)
        assert got[key] == pytest.approx(expected), (tau, got[key], expected)
    assert {k: got[m.config.tau][k] for k in ('top1', 'top5')} == pytest.approx(
        {'top1': 4 / 14, 'top5': 8 / 14}
    )
    if (
        pool == 'llip'
    ):  # tau matters for Llip, so the second tau was really evaluated with its own value
        assert not torch.equal(reference[None].argsort(dim=1), reference[1.0].argsort(dim=1))


@pytest.mark.parametrize('pool', ['llip', 'cls'])
@torch.no_grad()
def test_best_prompt_matches_one_prompt_at_a_time(pool, monkeypatch):
    m = random_model(seed=1, pool=pool)   # a seed where the two protocols disagree on 3+ images
    images = 3 * torch.randn(10, 3, 16, 16, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(2))
    names, taus = NAMES[:5], (None, 1.0)
    prompts = [[encode_one_text(m, t.format(name)) for t in TEMPLATES] for name in names]
    best = {}
    for tau in taus:   # class c's score: its best prompt's, each image and prompt alone
        best[tau] = torch.tensor([[max(m.similarity(m.encode_image(x[None]), p, tau=tau).item()
                                       for p in per_class) for per_class in prompts]
                                  for x in images]).argmax(dim=1)
    labels = best[None].clone()
    labels[:4] = (labels[:4] + 1) % len(names)   # 4 of 10 wrong: the expected top-1 is 0.6
    monkeypatch.setattr(loss, 'default_chunk', lambda *_: 2)
    got = llip_eval.zeroshot_best_prompt(m, images, labels, names, TEMPLATES, taus, batch_size=3)
    for tau in taus:
        key = float(m.config.tau if tau is None else tau)
        assert got[key]['top1_best'] == pytest.approx((best[tau] == labels).double().mean().item())
    assert got[m.config.tau]['top1_best'] == pytest.approx(0.6)
    averaged = brute_force_scores(m, images, names, TEMPLATES, (None,))[None].argmax(dim=1)
    assert not torch.equal(averaged, best[None])   # a different protocol, not a renamed one


# ----------------------------------------------------------------------------- retrieval
PHRASES = ['a red box', 'a blue box', 'a red cat', 'one shape', 'two shapes', 'a big cat',
           'a small box', 'a cat on the left', 'a box at the top', 'a blue cat']


def shared_captions(n, seed):
    """Captions drawn from a few phrases, so most strings belong to several images; extra true
    strings per image (some no image says, which can be neither a candidate nor a hit); binding
    triples whose false caption is sometimes a candidate and sometimes no one's caption."""
    rng = np.random.default_rng(seed)
    captions = [list(rng.choice(PHRASES, size=rng.integers(1, 4), replace=False)) for _ in range(n)]
    extra = [set(rng.choice(PHRASES + ['never said'], size=rng.integers(0, 4))) for _ in range(n)]
    kinds = ['color', 'size']

    def false(caption):   # another image's caption half the time, else no one's
        return str(rng.choice(PHRASES)) if rng.random() < 0.5 else f'{caption} swapped'
    binding = [[(c, false(c), kinds[j % 2]) for j, c in enumerate(caps)] for caps in captions]
    return captions, extra, binding


def one_pair_at_a_time(m, images, strings):
    """scores[i][s]: image i encoded alone, string s encoded alone, then mixed with each other."""
    texts = [encode_one_text(m, s) for s in strings]
    return [[m.similarity(m.encode_image(x[None]), t).item() for t in texts] for x in images]


@pytest.mark.parametrize('pool', ['llip', 'cls'])
@torch.no_grad()
def test_retrieval_with_shared_captions_matches_a_loop(pool, monkeypatch):
    m = random_model(seed=2, pool=pool, vision_layers=1, text_layers=1)
    n = 14
    images = torch.randn(n, 3, 16, 16, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(3))
    captions, extra, binding = shared_captions(n, seed=4)
    candidates = sorted({c for caps in captions for c in caps})   # another order than eval.py's
    false_only = sorted({f for triples in binding for _, f, _ in triples} - set(candidates))
    scores = one_pair_at_a_time(m, images, candidates + false_only)
    column = {s: j for j, s in enumerate(candidates + false_only)}
    truth = [[s in set(captions[i]) | extra[i] for s in candidates] for i in range(n)]
    expected = reference_metrics([row[:len(candidates)] for row in scores], truth)
    hits = {}
    for i, triples in enumerate(binding):
        for true, false, kind in triples:
            hits.setdefault(kind, []).append(scores[i][column[true]] > scores[i][column[false]])
    expected['binding'] = np.mean(sum(hits.values(), []))
    expected |= {f'binding_{kind}': np.mean(h) for kind, h in hits.items()}

    monkeypatch.setattr(loss, 'default_chunk', lambda *_: 3)   # 4 images a batch: chunks of 3 and 1
    got = llip_eval.retrieval(m, (images, captions, extra, binding), batch_size=4)[m.config.tau]
    assert got == pytest.approx(expected)
    assert all(0 < got[k] < 1 for k in ('i2t_r1', 't2i_r1', 'i2t_map', 't2i_map', 'binding'))
    # the false captions are scored, not ranked: without them the ranking is the same, and
    # as candidates they would have changed it
    without = llip_eval.retrieval(m, (images, captions, extra), batch_size=4)[m.config.tau]
    assert without == {k: v for k, v in got.items() if not k.startswith('binding')}
    as_candidates = reference_one_way(scores, [row + [False] * len(false_only) for row in truth])
    assert as_candidates['map'] != pytest.approx(expected['i2t_map'])


@pytest.mark.parametrize('pool', ['llip', 'cls'])
@torch.no_grad()
def test_unique_captions_give_the_standard_protocol(pool, monkeypatch):
    """COCO's protocol, one caption instance at a time: text->image finds the caption's own
    image, image->text any of the image's captions."""
    m = random_model(seed=2, pool=pool)
    n = 13
    images = torch.randn(n, 3, 16, 16, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(3))
    words = ['red', 'big', 'two', 'cat', 'sun', 'old', 'wet', 'hot', 'sky', 'box']
    captions = [[f'{words[i % 10]} {words[(i * 7 + c) % 10]} {i}' for c in range(1 + i % 3)]
                for i in range(n)]
    owner = [i for i, caps in enumerate(captions) for _ in caps]
    flat = [c for caps in captions for c in caps]
    scores = torch.tensor(one_pair_at_a_time(m, images, flat), dtype=torch.float64)
    best_own = [
        min(rank_of(scores[i], j) for j in range(len(flat)) if owner[j] == i) for i in range(n)
    ]  # image i's best caption: how many beat it
    own_image = [rank_of(scores[:, j], owner[j]) for j in range(len(flat))]   # caption j's image
    expected = {}
    for k in (1, 5, 10):
        expected[f'i2t_r{k}'] = np.mean([rank < k for rank in best_own])
        expected[f't2i_r{k}'] = np.mean([rank < k for rank in own_image])
    expected['t2i_map'] = np.mean([1 / (1 + rank) for rank in own_image])  # AP of 1 true: 1 / place
    monkeypatch.setattr(loss, 'default_chunk', lambda *_: 3)   # 4 images a batch: chunks of 3 and 1
    got = llip_eval.retrieval(m, (images, captions), batch_size=4)[m.config.tau]
    assert {k: got[k] for k in expected} == pytest.approx(expected)
    assert 0 < got['i2t_r1'] < 1 and 0 < got['t2i_r5'] < 1   # not a degenerate case



def test_truth_and_binding_are_read_from_shards_and_folders(tmp_path):
    m = random_model(seed=10, vision_layers=1, text_layers=1)
    truth_a = {'scene': {'objects': []}, 'true_captions': ['one shape', 'a box left of a cat'],
               'binding': [['a red box', 'a blue box', 'color'],
                           ['a big cat', 'a small cat', 'size']]}
    samples = [('a', {'png': png(0, 16), 'txt': 'a red box\na big cat',
                      'json': json.dumps(truth_a)}),
               ('b', {'png': png(1, 16), 'txt': 'a big cat\none shape'}),   # real data: no json
               ('c', {'png': png(2, 16), 'txt': 'one shape', 'json': '{"true_captions": ['}),
               ('d', {'png': png(3, 16), 'txt': 'a blue box', 'json': '[1, 2]'})]   # not a dict
    shard = write_tar(tmp_path / 'shard.tar', samples)
    with pytest.warns(data.DataWarning, match=r"ignored 1 KEY.json that do not parse.*\['c'\]"):
        read = list(data.read_shards(shard, with_json=True))
    assert [(key, meta) for key, _, _, meta in read] == [('a', truth_a), ('b', None), ('c', None),
                                                         ('d', [1, 2])]
    assert [len(sample) for sample in data.read_shards(shard)] == [3] * 4   # as before by default

    # the same images and truth given in memory
    transform = data.eval_transform(m.config.image_size)
    images = torch.stack([transform(image) for _, image, _, _ in read]).double()
    captions = [caps for _, _, caps, _ in read]
    extra = [truth_a['true_captions'], None, None, None]
    binding = [truth_a['binding'], [], [], []]
    expected = llip_eval.retrieval(m, (images, captions, extra, binding))
    assert set(expected[m.config.tau]) >= {'binding', 'binding_color', 'binding_size'}
    with pytest.warns(data.DataWarning, match='do not parse'):
        assert llip_eval.retrieval(m, shard) == expected
    # json ignored: other numbers, so the truth was really read
    assert llip_eval.retrieval(m, (images, captions))[m.config.tau] != {
        k: v for k, v in expected[m.config.tau].items() if not k.startswith('binding')}

    folder = tmp_path / 'folder'
    folder.mkdir()
    for key, files in samples:
        for ext, payload in files.items():
            payload = payload.encode() if isinstance(payload, str) else payload
            (folder / f'{key}.{ext}').write_bytes(payload)
    with pytest.warns(UserWarning, match=r"ignored 1 KEY.json that do not parse.*\['c'\]"):
        assert llip_eval.retrieval(m, folder) == expected

    bad = {**truth_a, 'binding': [['a red box', 'a blue box']]}
    write_tar(tmp_path / 'bad.tar', [('e', {'png': png(4, 16), 'txt': 'x',
                                            'json': json.dumps(bad)})])
    with pytest.raises(ValueError, match=r"e\.json: 'binding' is not a list of \[true, false"):
        llip_eval.retrieval(m, str(tmp_path / 'bad.tar'))


@torch.no_grad()
def test_one_template_is_plain_evaluation():
    m = random_model(seed=4)
    protos = llip_eval.class_prototypes(m, NAMES, ['a {}'], batch_size=5)
    plain = m.encode_text(
        data.tokenize([f'a {n}' for n in NAMES], m.config.context_length, m.config.tokenizer)
    )
    torch.testing.assert_close(protos.queries, plain.queries)
    torch.testing.assert_close(protos.emb, plain.emb)


@torch.no_grad()
def test_two_templates_average_queries_and_normalised_embeddings():
    m = random_model(seed=5)
    protos = llip_eval.class_prototypes(m, NAMES[:4], ['a {}', 'the {}!'], batch_size=3)
    for c, name in enumerate(NAMES[:4]):
        a, b = encode_one_text(m, f'a {name}'), encode_one_text(m, f'the {name}!')
        torch.testing.assert_close(
            protos.queries[c], (a.queries[0] + b.queries[0]) / 2
        )  # not normalised
        torch.testing.assert_close(protos.emb[c], F.normalize(a.emb[0] + b.emb[0], dim=0))
    with pytest.raises(ValueError, match="'{}'"):
        llip_eval.class_prototypes(m, NAMES, ['a photo of a {c}'])


# ----------------------------------------------------------------------------- checkpoints
@torch.no_grad()
def test_checkpoints(tmp_path):
    torch.manual_seed(7)
    c = eval_tiny()
    m = Llip(c).eval()
    images = torch.randn(2, 3, 16, 16)
    tokens = data.tokenize(['a cat', 'a dog'], c.context_length, c.tokenizer)
    expected = m.similarity(m.encode_image(images), m.encode_text(tokens))
    # train.py's layout, a bare config dict, and a compiled model's prefixed keys all load
    compiled = {f'_orig_mod.{k}': v for k, v in m.state_dict().items()}
    for i, ckpt in enumerate(
        [
            {
                'model': m.state_dict(),
                'config': {'lr': 1e-3, 'model_config': dataclasses.asdict(c)},
            },
            {'model': compiled, 'config': {**dataclasses.asdict(c), 'steps': 10}},
        ]
    ):
        torch.save(ckpt, tmp_path / f'{i}.pt')
        loaded = llip_eval.load_checkpoint(tmp_path / f'{i}.pt')
        assert loaded.config == c
        torch.testing.assert_close(
            loaded.similarity(loaded.encode_image(images), loaded.encode_text(tokens)), expected
        )
    (tmp_path / 'junk.pt').write_bytes(b'hello')
    with pytest.raises(ValueError, match='not a checkpoint'):
        llip_eval.load_checkpoint(tmp_path / 'junk.pt')
    torch.save({'visual.class_embedding': torch.zeros(1)}, tmp_path / 'theirs.pt')
    with pytest.raises(ValueError, match='use --official'):
        llip_eval.load_checkpoint(tmp_path / 'theirs.pt')


# ----------------------------------------------------------------------------- synthetic data
@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
    return make_synthetic(
        tmp_path_factory.mktemp('synthetic'), train=1, retrieval=12, zeroshot=2, shard_size=1
    )


@torch.no_grad()
def test_retrieval_reads_shards_and_caption_folders_alike(synthetic, tmp_path):
    m = random_model(seed=8, image_size=32)
    shard = f'{synthetic}/retrieval/00000.tar'
    for key, image, captions, truth in data.read_shards(shard, with_json=True):   # .png .txt .json
        image.save(tmp_path / f'{key}.png')
        (tmp_path / f'{key}.txt').write_text('\n'.join(captions))
        (tmp_path / f'{key}.json').write_text(json.dumps(truth))
    from_shards = llip_eval.retrieval(m, shard, taus=(1.0, 5.0), batch_size=5)
    assert 'binding' in from_shards[5.0]   # the synthetic split has ground truth
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
    splits = [p.name for p in (synthetic / 'zeroshot').iterdir()]
    expected = {
        f'zeroshot/{split}/{k}'
        for split in splits
        for k in ('top1', 'top1_best', 'mean_per_class_recall')
    }
    expected |= {
        f'zeroshot/{split}/top5'
        for split in splits  # not applicable below 5 classes
        if len(json.loads((synthetic / 'zeroshot' / split / 'classnames.json').read_text())) >= 5
    }
    expected |= {f'retrieval/{way}_{k}' for way in ('i2t', 't2i')
                 for k in ('r1', 'r5', 'r10', 'map')}
    expected.add('retrieval/binding')
    assert {'shape', 'color'} <= set(splits) and expected <= set(metrics)
    assert all(k.startswith('retrieval/binding_') for k in set(metrics) - expected)
    assert all(0 <= v <= 1 for v in metrics.values())
    several = llip_eval.evaluate_synthetic(m, synthetic, taus=(1.0, 5.0))
    assert several['zeroshot/shape/tau5/top1'] == metrics['zeroshot/shape/top1']
    assert len(several) == 2 * len(metrics)
    with pytest.raises(FileNotFoundError, match='synthetic.py'):
        llip_eval.evaluate_synthetic(m, synthetic / 'zeroshot' / 'shape')


# ----------------------------------------------------------------------------- the command line
def test_results_of_a_second_dataset_do_not_replace_the_first(tmp_path, capsys):
    ckpt = plain_checkpoint(tmp_path / 'ckpt.pt')
    for name in ('pets', 'cars'):
        folder = write_folder(
            tmp_path / name, ['cat', 'dog'] if name == 'pets' else ['car', 'bus'], 1
        )
        llip_eval.main([f'--ckpt={ckpt}', '--task=zeroshot', f'--data={folder}', '--workers=0'])
    written = sorted(p.name for p in tmp_path.glob('eval_*.json'))
    assert written == ['eval_zeroshot_cars.json', 'eval_zeroshot_pets.json']   # short names
    assert {json.loads((tmp_path / n).read_text())['data'] for n in written} == {
        str(tmp_path / 'pets'), str(tmp_path / 'cars')}
    # the same data again replaces its own file; another whose name collides takes _2
    llip_eval.main(
        [f'--ckpt={ckpt}', '--task=zeroshot', f'--data={tmp_path / "pets"}', '--workers=0']
    )
    assert sorted(p.name for p in tmp_path.glob('eval_*.json')) == written
    (tmp_path / 'other' / 'pets').mkdir(parents=True)
    for item in (tmp_path / 'pets').iterdir():
        item.rename(tmp_path / 'other' / 'pets' / item.name)
    for _ in range(2):   # the second time it finds its own file again
        llip_eval.main([f'--ckpt={ckpt}', '--task=zeroshot',
                        f'--data={tmp_path / "other" / "pets"}', '--workers=0'])
    assert json.loads((tmp_path / 'eval_zeroshot_pets.json').read_text())['data'] == \
        str(tmp_path / 'pets')
    assert json.loads((tmp_path / 'eval_zeroshot_pets_2.json').read_text())['data'] == \
        str(tmp_path / 'other' / 'pets')
    assert len(list(tmp_path.glob('eval_*.json'))) == 3
    out = tmp_path / 'mine.json'
    llip_eval.main([f'--ckpt={ckpt}', '--task=zeroshot', f'--data={tmp_path / "other" / "pets"}',
                    f'--out={out}', '--workers=0'])
    assert json.loads(out.read_text())['data'] == str(tmp_path / 'other' / 'pets')


# ------------------------------------------------------------------------- clip_benchmark, progress
@torch.no_grad()
def test_top5_is_not_applicable_below_5_classes_and_per_class_recall(capsys):
    m = random_model(seed=3)
    images = torch.randn(
        7, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4)
    )
    scores = brute_force_scores(m, images, NAMES[:3], TEMPLATES, (None,))[None]
    best = scores.argmax(dim=1)
    labels = best.clone()
    labels[0] = (best[0] + 1) % 3                               # one miss
    got = llip_eval.zeroshot(m, (images, labels), NAMES[:3], TEMPLATES)[m.config.tau]
    assert got['top5'] is None and got['top1'] == pytest.approx(6 / 7)
    recall = [np.mean([b == y for b, y in zip(best.tolist(), labels.tolist()) if y == c])
              for c in sorted(set(labels.tolist()))]
    assert got['mean_per_class_recall'] == pytest.approx(np.mean(recall)) != pytest.approx(6 / 7)
    llip_eval.print_table({'zeroshot/x': {5.0: got}})
    assert 'top5 n/a' in capsys.readouterr().out
    assert 'zeroshot/x/top5' not in llip_eval.flatten(
        {'zeroshot/x': {5.0: got}}
    )  # train.py logs numbers


def write_clip_benchmark(root, classes, per_class, seed=0):
    """clip_benchmark's WebDataset zero-shot layout: classnames.txt, templates, test/N.tar of
    KEY.webp + KEY.cls."""
    rng = np.random.default_rng(seed)
    (root / 'test').mkdir(parents=True)
    (root / 'classnames.txt').write_text('\n'.join(classes) + '\n')
    (root / 'zeroshot_classification_templates.txt').write_text('a {c}\nthe {c}!\n')
    samples = []
    for c in range(len(classes)):
        for i in range(per_class):
            buffer = io.BytesIO()
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(buffer, format='WEBP', lossless=True)
            samples.append((f'{c}_{i}', {'webp': buffer.getvalue(), 'cls': str(c)}))
    half = len(samples) // 2
    write_tar(root / 'test' / '0.tar', samples[:half])
    write_tar(
        root / 'test' / '1.tar', samples[half:] + [('bad', {'webp': b'not an image', 'cls': '0'})]
    )
    return root, samples


@torch.no_grad()
def test_clip_benchmark_webdataset_zeroshot(tmp_path, capfd):
    m = random_model(seed=6)
    root, samples = write_clip_benchmark(tmp_path / 'wds', ['cat', 'dog', 'car'], per_class=3)
    layout = eval_data.clip_benchmark_layout(root)
    assert layout[1:] == (['cat', 'dog', 'car'], ['a {}', 'the {}!'])
    # the same images as a class folder give the same numbers
    for key, files in samples:
        folder = tmp_path / 'folder' / ['cat', 'dog', 'car'][int(files['cls'])]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f'{key}.webp').write_bytes(files['webp'])
    expected = llip_eval.zeroshot(m, tmp_path / 'folder', layout[1], layout[2], batch_size=4)
    with pytest.warns(UserWarning, match='skipped 1 images'):
        assert llip_eval.zeroshot(m, root, layout[1], layout[2], batch_size=4) == expected
    with pytest.warns(UserWarning, match='skipped 1 images'):
        assert (
            llip_eval.zeroshot(
                m, str(root / 'test' / '{0..1}.tar'), layout[1], layout[2], batch_size=4
            )
            == expected
        )
    # from the command line, class names and templates come from the layout; progress bars
    # have totals
    ckpt = plain_checkpoint(tmp_path / 'ckpt.pt')
    capfd.readouterr()
    llip_eval.main(
        [f'--ckpt={ckpt}', '--task=zeroshot', f'--data={root}', '--workers=0', '--batch_size=4']
    )
    err = capfd.readouterr().err
    assert '10/10' in err and 'image' in err                       # 9 images and the broken one
    (out,) = tmp_path.glob('eval_zeroshot_*wds.json')
    written = json.loads(out.read_text())
    assert written['clip_benchmark']['zeroshot/wds']['5'].keys() == {
        'acc1',
        'acc5',
        'mean_per_class_recall',
    }


def test_progress_bars_have_totals(tmp_path, capfd):
    ckpt = plain_checkpoint(tmp_path / 'ckpt.pt')
    shard = write_tar(
        tmp_path / 'r.tar',
        [(f'k{i}', {'png': png(i, 16), 'txt': f'caption {i}'}) for i in range(5)],
    )
    assert data.count_samples([shard]) == 5
    llip_eval.main([f'--ckpt={ckpt}', '--task=retrieval', f'--data={shard}', '--batch_size=2',
                    f'--out={tmp_path / "r.json"}'])
    err = capfd.readouterr().err
    assert 'images: 100%' in err and '5/5' in err
