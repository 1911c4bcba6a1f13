"""What this proves about several captions per image (train.py --captions_per_image=C; run:
python -m pytest tests/test_captions.py), in float64 against a loop written pair by pair:
- llip_loss in every form (plain, gram, mixed), chunked or not, with C = 2 and 3 captions of each
  image (image-major: caption j belongs to image j // C): the loss and the gradient of every
  input (keys, values, queries, text embeddings) and of the loss head (W_O, t with a = exp t,
  b) equal the loop's, whose label is +1 for each (image, own caption) pair and -1 for every
  other pair, summed and divided by the images as eq. 3; siglip_loss (the cls, avg, registers
  and learned pools) and clip_loss (1/C on each own caption) likewise;
- with C = 1 the positives are today's: the labels of the plain form and the positive view of
  the fast forms are bit for bit the diagonal they were, and Llip.loss reads C from the sizes;
- a text batch that is not C captions of each image is refused by name;
- on 2 gloo ranks (each its images and their captions; the captions all-gathered) every form,
  siglip_loss and clip_loss give the loop's loss on the global batch (the ranks' mean) and its
  gradients (a rank's slice: world size x the global gradient; the loss head: the ranks' mean);
- feature-cached --grad_accum with C = 2 (a micro-batch: B images and their 2 B captions) gives
  the loss and every parameter gradient of one step on the whole batch, on 1 process and on 2
  ranks under DDP and under --shard=fsdp;
- the loader gives each image C distinct captions of its own list, image-major, and an image with
  fewer distinct captions all of them repeated in order; it resumes exactly with C = 2;
- train.py --captions_per_image=2 with --grad_accum=2 trains; a C below 1 is a one-line error.
"""
import importlib
import json
import math
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import data
import loss_gram
import sharding
from accumulation import Towers, train_step
from conftest import (batch, free_port, log_lines, main_in_process, png, start_ranks, tiny,
                      write_tar)
from loss import clip_loss, llip_loss, siglip_loss, sigmoid_loss_sum
from model import ImageFeatures, Llip, TextFeatures

M, K, d = 2, 3, 4
D = M * d
FORMS = ['plain', 'gram', 'mixed']


# ----------------------------------------------------------------------------- the loop reference
def inputs(n_img, captions, seed=0):
    """Random float64 features of n_img images and their n_img C captions, and the loss head."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    n_txt = n_img * captions
    return dict(keys=r(n_img, M, K, d), values=r(n_img, M, K, d), queries=r(n_txt, M, d),
                text_emb=F.normalize(r(n_txt, D), dim=-1),
                image_emb=F.normalize(r(n_img, D), dim=-1), out_proj=r(D, D) / math.sqrt(D),
                t=torch.tensor(1.1, dtype=torch.float64), b=torch.tensor(-2.0, dtype=torch.float64))


def owner(j, captions):
    """The image caption j was drawn for: captions come C of an image at a time."""
    return j // captions


def loop_cosine_llip(x, i, j, tau):
    """cos(z_ij, z'_j), eq. 1-2 head by head for one pair."""
    heads = []
    for m in range(M):
        phi = torch.softmax(x['keys'][i, m] @ x['queries'][j, m] / tau, dim=0)   # (K,)
        heads.append(phi @ x['values'][i, m])                                     # (d,)
    z = torch.cat(heads) @ x['out_proj']
    return torch.dot(z / z.norm(), x['text_emb'][j])


def loop_sigmoid_loss(x, captions, cosine):
    """Eq. 3 pair by pair: -log sigmoid(y (a cos + b)), y = +1 iff caption j is image i's,
    summed over every pair and divided by the images."""
    n_img, n_txt = x['keys'].shape[0], x['text_emb'].shape[0]
    a, total = x['t'].exp(), 0.0
    for i in range(n_img):
        for j in range(n_txt):
            y = 1.0 if owner(j, captions) == i else -1.0
            total = total + torch.log1p(torch.exp(-y * (a * cosine(x, i, j) + x['b'])))
    return total / n_img


def loop_llip(x, captions, tau=0.7):
    return loop_sigmoid_loss(x, captions, lambda x, i, j: loop_cosine_llip(x, i, j, tau))


def loop_siglip(x, captions):
    return loop_sigmoid_loss(x, captions,
                             lambda x, i, j: torch.dot(x['image_emb'][i], x['text_emb'][j]))


def loop_clip(x, captions):
    """Image to text: cross-entropy against 1/C on each own caption; text to image: each caption
    against its one image. The mean of the two."""
    a, n_img, n_txt = x['t'].exp(), x['keys'].shape[0], x['text_emb'].shape[0]
    logits = [[a * torch.dot(x['image_emb'][i], x['text_emb'][j]) for j in range(n_txt)]
              for i in range(n_img)]
    to_text = sum(-sum(logits[i][j] - torch.logsumexp(torch.stack(logits[i]), 0)
                       for j in range(n_txt) if owner(j, captions) == i) / captions
                  for i in range(n_img)) / n_img
    to_image = sum(-(logits[owner(j, captions)][j]
                     - torch.logsumexp(torch.stack([logits[i][j] for i in range(n_img)]), 0))
                   for j in range(n_txt)) / n_txt
    return (to_text + to_image) / 2


def ours(name, x, captions, form='plain', chunk=None, tau=0.7):
    """The library's loss `name` on the features x (this rank's slice, if under a process group)."""
    a = x['t'].exp()
    if name == 'siglip':
        return siglip_loss(x['image_emb'], x['text_emb'], a, x['b'], captions)
    if name == 'clip':
        return clip_loss(x['image_emb'], x['text_emb'], a, captions)
    image = ImageFeatures(keys=x['keys'], values=x['values'])
    text = TextFeatures(x['queries'], x['text_emb'])
    return llip_loss(image, text, x['out_proj'], tau, a, x['b'], chunk_size=chunk, form=form,
                     captions_per_image=captions)


def value_and_grads(fn, x):
    leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
    value = fn(leaves)
    grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
    return value.detach(), dict(zip(leaves, grads))


def assert_same(got, want):
    (loss, grads), (ref_loss, ref_grads) = got, want
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    for name, ref in ref_grads.items():
        if ref is not None:
            torch.testing.assert_close(grads[name], ref, rtol=1e-10, atol=1e-12, msg=name)


# ----------------------------------------------------------------------------- one process
@pytest.mark.parametrize('captions', [2, 3])
@pytest.mark.parametrize('chunk', [2, None])
@pytest.mark.parametrize('form', FORMS)
def test_llip_loss_with_several_captions_equals_the_loop(form, chunk, captions):
    x = inputs(5, captions)
    want = value_and_grads(lambda x: loop_llip(x, captions), x)
    assert_same(value_and_grads(lambda x: ours('llip', x, captions, form, chunk), x), want)


@pytest.mark.parametrize('captions', [2, 3])
@pytest.mark.parametrize('name', ['siglip', 'clip'])
def test_siglip_and_clip_with_several_captions_equal_the_loop(name, captions):
    x = inputs(5, captions)
    reference = loop_siglip if name == 'siglip' else loop_clip
    want = value_and_grads(lambda x: reference(x, captions), x)
    assert_same(value_and_grads(lambda x: ours(name, x, captions), x), want)


def test_with_one_caption_the_positives_are_the_diagonal_bit_for_bit():
    g = torch.Generator().manual_seed(3)
    cos = torch.randn(6, 15, generator=g).tanh()
    a, b = torch.tensor(7.0), torch.tensor(-3.0)
    for offset in (0, 4, 9):
        # today's labels: +1 where caption j = image i + offset
        i = torch.arange(6)[:, None] + offset
        labels = torch.where(i == torch.arange(15)[None, :], 1.0, -1.0)
        today = -F.logsigmoid(labels * (a * cos + b)).sum()
        assert torch.equal(sigmoid_loss_sum(cos, a, b, offset, 1), today)
        # the fast forms' positives: today's x.diagonal(offset), the same elements in order
        x = a * cos + b
        assert torch.equal(loss_gram.positives(x, (offset, 1)), x.diagonal(offset)[None])
        assert torch.equal(loss_gram.positives(x, (offset, 1)).sum(), x.diagonal(offset).sum())


@pytest.mark.parametrize('pool', ['llip', 'cls'])
def test_the_model_reads_captions_per_image_from_the_sizes(pool):
    torch.manual_seed(0)
    model = Llip(tiny(pool=pool, num_mixture=3)).double()
    images, tokens = batch(6, model.config)
    img = model.encode_image(images[:3].double())
    a = model.logit_scale.exp()
    for captions in (1, 2):
        txt = model.encode_text(tokens[:3 * captions])
        got = model.loss(img, txt, chunk_size=2, form='plain')
        if pool == 'llip':
            want = llip_loss(img, txt, model.out_proj, model.config.tau, a, model.logit_bias,
                             chunk_size=2, form='plain', captions_per_image=captions)
        else:
            want = siglip_loss(img.emb, txt.emb, a, model.logit_bias, captions)
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match='4 captions for 3 images'):
        model.loss(img, model.encode_text(tokens[:4]))


@pytest.mark.parametrize('name', ['llip', 'siglip', 'clip'])
def test_a_text_batch_that_is_not_c_captions_of_each_image_is_refused(name):
    x = inputs(4, 2)
    x['image_emb'], x['keys'], x['values'] = x['image_emb'][:3], x['keys'][:3], x['values'][:3]
    with pytest.raises(ValueError, match='captions_per_image=2: 8 captions for 3 images'):
        ours(name, x, 2)


@pytest.mark.parametrize('pool, form', [('cls', 'plain'), ('llip', 'plain'), ('llip', 'mixed')])
def test_grad_accum_with_two_captions_equals_the_whole_batch(pool, form, one_thread):
    torch.manual_seed(0)
    model = Llip(tiny(pool=pool, num_mixture=3)).double()
    images, tokens = batch(18, model.config, seed=1)
    images = images[:9].double()                         # 9 images, 18 captions: 2 each
    loss = model(images, tokens, chunk_size=2)
    loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    micro = list(zip(images.split(3), tokens.split(6)))  # 3 images and their 6 captions
    got = train_step(Towers(model), model, micro, chunk_size=2, form=form)
    torch.testing.assert_close(got, loss.detach(), rtol=1e-12, atol=1e-12)
    for name, grad in want.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-9,
                                   atol=1e-12, msg=name)


# ----------------------------------------------------------------------------- two ranks
WORLD, PER_RANK = 2, 2                          # 2 gloo ranks of 2 images each
SHARED = ('out_proj', 't', 'b')                 # the loss head: whole on every rank
LOSS_CASES = [('llip', form, c) for form in FORMS for c in (2, 3)] + \
    [(name, None, 2) for name in ('siglip', 'clip')]


def rank_slice(x, rank, captions):
    """Rank `rank`'s part of the global features: its images and their captions."""
    images = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    texts = slice(images.start * captions, images.stop * captions)
    return {k: v if k in SHARED else v[texts if k in ('queries', 'text_emb') else images]
            for k, v in x.items()}


def accumulated(pool, rank, world, shard=None):
    """This rank's 2 micro-batches of 3 images with 2 captions each, through train_step under DDP
    or, shard='fsdp', on the sharded model (world 1: the whole batch in one step, Llip.forward):
    (loss, every parameter's whole gradient)."""
    torch.manual_seed(0)
    model = Llip(tiny(pool=pool, num_mixture=3)).double()
    model = sharding.shard(model) if shard == 'fsdp' else model
    images, tokens = batch(2 * 6 * WORLD, model.config, seed=1)
    images = images[:6 * WORLD].double()                 # 6 images a rank, 12 captions
    if world == 1:
        loss = model(images, tokens, chunk_size=2)
        loss.backward()
    else:
        mine, theirs = slice(rank * 6, rank * 6 + 6), slice(rank * 12, rank * 12 + 12)
        micro = list(zip(images[mine].split(3), tokens[theirs].split(6)))
        towers = Towers(model) if shard == 'fsdp' else DistributedDataParallel(Towers(model))
        loss = train_step(towers, model, micro, chunk_size=2, form='mixed')
        sharding.reduce_head_grads(model)              # fsdp: W_O, t, b averaged; else no-op
        dist.all_reduce(loss)
        loss = loss / world                             # the global loss: the ranks' mean
    return loss.detach(), {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                           for n, p in model.named_parameters()}


def rank_worker(rank, port, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=WORLD)
    result = {}
    for name, form, captions in LOSS_CASES:
        x = rank_slice(inputs(WORLD * PER_RANK, captions, seed=4), rank, captions)
        result[name, form, captions] = value_and_grads(
            lambda x: ours(name, x, captions, form, chunk=1), x)
    result['ddp'] = accumulated('llip', rank, WORLD)
    result['fsdp'] = accumulated('llip', rank, WORLD, 'fsdp')
    torch.save(result, f'{out}.{rank}')
    dist.destroy_process_group()


def test_two_ranks_equal_the_loop_on_the_global_batch(tmp_path, one_thread):
    start_ranks(rank_worker, (free_port(), str(tmp_path / 'rank')), WORLD)
    ranks = [torch.load(tmp_path / f'rank.{r}', weights_only=False) for r in range(WORLD)]
    loops = {'llip': loop_llip, 'siglip': loop_siglip, 'clip': loop_clip}
    for case in LOSS_CASES:
        name, _, captions = case
        x = inputs(WORLD * PER_RANK, captions, seed=4)
        want_loss, want = value_and_grads(lambda x: loops[name](x, captions), x)
        # the global loss is the ranks' mean; DDP averages the shared gradients over ranks, and
        # a rank's gradient of its own slice is the world size times the global loss's
        torch.testing.assert_close(sum(r[case][0] for r in ranks) / WORLD, want_loss,
                                   rtol=1e-12, atol=1e-12, msg=str(case))
        for key, ref in want.items():
            if ref is None:
                continue
            parts = [r[case][1][key] for r in ranks]
            got = sum(parts) / WORLD if key in SHARED else torch.cat(parts) / WORLD
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12, msg=f'{case} {key}')
    loss, grads = accumulated('llip', 0, 1)
    for r, wrapper in ((r, w) for r in ranks for w in ('ddp', 'fsdp')):
        torch.testing.assert_close(r[wrapper][0], loss, rtol=1e-12, atol=1e-12)
        for name, grad in grads.items():
            torch.testing.assert_close(r[wrapper][1][name], grad, rtol=1e-9, atol=1e-12,
                                       msg=f'{wrapper} {name}')


# ----------------------------------------------------------------------------- the loader
BYTE = data.ByteTokenizer()


def caption_shards(folder, lists):
    """One shard per list of samples' caption lists; sample key k{s}_{i}, captions one a line."""
    paths = []
    for s, samples in enumerate(lists):
        paths.append(write_tar(folder / f'{s:03d}.tar', [
            (f'k{s}_{i:02d}', {'png': png(10 * s + i), 'txt': '\n'.join(captions)})
            for i, captions in enumerate(samples)]))
    return paths


def own(key, n):
    """The captions of sample `key` in many_captions: they name it."""
    return [f'{key} says {c}' for c in range(n)]


def many_captions(folder):
    """Two shards of 12 samples; sample i has 1 + i % 5 distinct captions, and one of them twice
    when it has 3 (a repeated line is not a second caption)."""
    lists = []
    for s in range(2):
        samples = []
        for i in range(12):
            captions = own(f'k{s}_{i:02d}', 1 + i % 5)
            samples.append(captions + captions[:1] if len(captions) == 3 else captions)
        lists.append(samples)
    return caption_shards(folder, lists)


def loader(urls, captions, **kw):
    return data.ShardLoader(urls, batch_size=4, image_size=8, context_length=24, workers=2,
                            shuffle_buffer=5, caption_lines=True, captions_per_image=captions,
                            **kw)


@pytest.mark.parametrize('captions', [2, 4])
def test_each_image_comes_with_c_distinct_captions_of_its_own(tmp_path, captions):
    urls = many_captions(tmp_path)
    seen = set()
    for train in (True, False):
        batches = loader(urls, captions, train=train, resample=False)
        for images, tokens in batches:
            rows = [BYTE.decode(t) for t in tokens]
            assert tokens.shape[0] == captions * images.shape[0]
            for i in range(images.shape[0]):
                mine = rows[i * captions:(i + 1) * captions]        # image i's, image-major
                key = mine[0].split(' says ')[0]
                distinct = own(key, 1 + int(key[-2:]) % 5)
                assert set(mine) <= set(distinct)                # all its own
                n = len(distinct)
                if n >= captions:
                    assert len(set(mine)) == captions            # C distinct ones
                else:                                            # all, then again in order
                    assert mine == [mine[c % n] for c in range(captions)]
                    assert set(mine) == set(distinct)
                if not train and n >= captions:
                    assert mine == distinct[:captions]           # evaluation: the first C
                seen.add(tuple(mine))
    assert len(seen) > 24            # training draws other captions than evaluation's first ones


def test_resume_with_two_captions_gives_the_uninterrupted_batches(tmp_path):
    urls = many_captions(tmp_path)
    it = iter(loader(urls, 2))
    full = [next(it) for _ in range(9)]            # 9 batches of 4 from 24 samples: 2 epochs
    first = loader(urls, 2)
    it = iter(first)
    for _ in range(4):
        next(it)
    resumed = loader(urls, 2)
    resumed.load_state_dict(first.state_dict())
    again = iter(resumed)
    for images, tokens in full[4:]:
        x, t = next(again)
        assert torch.equal(x, images) and torch.equal(t, tokens)


# ----------------------------------------------------------------------------- train.py
@pytest.mark.parametrize('value', ['0', '-2'])
def test_captions_per_image_below_one_is_a_one_line_error(tmp_path, monkeypatch, value):
    train_py = importlib.import_module('train')
    monkeypatch.setattr(sys, 'argv', ['train.py', f'--out_dir={tmp_path}',
                                      f'--captions_per_image={value}'])
    with pytest.raises(SystemExit) as stop:
        train_py.check_flags(train_py.parser.parse_args())
    assert str(stop.value.code) == f'error: --captions_per_image={value}: must be an integer >= 1'


def test_train_py_with_two_captions_and_grad_accum(tmp_path, synthetic, monkeypatch, capsys):
    main_in_process(monkeypatch, tmp_path, synthetic, '--captions_per_image=2', '--grad_accum=2',
                    '--batch_size=4', '--steps=3', '--save_every=3')   # train.main() here
    out = capsys.readouterr()
    assert ('images per step: 4 per rank x 1 rank(s) x 2 micro-batches = 8, against 16 captions '
            '(2 an image)') in out.out + out.err
    with open(tmp_path / 'config.json') as f:
        assert json.load(f)['captions_per_image'] == 2
    losses = [r['loss'] for r in log_lines(str(tmp_path)) if 'loss' in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
