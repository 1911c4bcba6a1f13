"""What this proves about data.py (run: python -m pytest tests/test_data.py -q), CPU only, on
small tar files each test writes itself:
- both transforms give (3, S, S) float32 within CLIP's normalised range for every PIL mode,
  the train crop replays from its RNG, the eval transform resizes the short side and crops
  the centre;
- shard patterns expand (braces, lists, directories) and a pattern naming nothing is an error;
- the loader resumes exactly: batches 0..9 in one go == batches 0..k, state_dict, a new
  loader, batches k+1..9 (also across an epoch boundary, and with workers=0 == 1);
- across (rank, worker) every sample appears exactly once per epoch, with more shards than
  workers and with fewer; epochs are reshuffled; resample=True goes on past an epoch;
- every kind of bad input is skipped, counted and warned about once, and a shard list with
  no valid sample is an error naming the pattern rather than a hang;
- one unreadable shard among as many shards as workers is skipped (and the run resumes
  exactly); a rank whose share never holds a valid sample stops instead of spinning;
- images beyond the pixel budget (and PIL's bombs) are refused from their header, a larger
  JPEG decodes at reduced size; a caption that is not UTF-8 and a tar cut inside a header are
  counted as such; empty and non-tar shards say so;
- captions: KEY.json's when there is no KEY.txt, the whole text as one caption by default, one
  per line with caption_lines (the synthetic data); a missing --data path is an error naming it.
"""
import collections
import io
import json
import os
import pickle
import random
import re
import signal
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import data
import images
from shards import _braces
from conftest import big_png, png, write_tar

BYTE = data.ByteTokenizer()


# ----------------------------------------------------------------------------- helpers
def make_shards(folder, n_shards, per_shard):
    """Shards whose every sample's caption is its key, so a batch's tokens say which samples it
    holds."""
    paths = []
    for s in range(n_shards):
        samples = [
            (f's{s}_{i:03d}', {'png': png(100 * s + i), 'txt': f's{s}_{i:03d}'})
            for i in range(per_shard)
        ]
        paths.append(write_tar(folder / f'{s:03d}.tar', samples))
    return paths


def keys_of(tokens):
    return [BYTE.decode(row) for row in tokens]


def loader(urls, **kw):
    kw = {
        'batch_size': 4,
        'image_size': 8,
        'context_length': 16,
        'workers': 2,
        'shuffle_buffer': 5,
        **kw,
    }
    return data.ShardLoader(urls, **kw)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ta), (xb, tb) in zip(a, b):
        assert keys_of(ta) == keys_of(tb)
        assert torch.equal(xa, xb) and torch.equal(ta, tb)


# ----------------------------------------------------------------------------- transforms
LOW = (0 - torch.tensor(data.MEAN)) / torch.tensor(data.STD)
HIGH = (1 - torch.tensor(data.MEAN)) / torch.tensor(data.STD)


def image_in_mode(mode, size=(40, 24)):
    rgb = Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    )
    if mode == 'I;16':
        return Image.fromarray(np.full(size[::-1], 40000, np.uint16))   # mode I;16
    if mode == 'P':
        return rgb.convert('P', palette=Image.Palette.ADAPTIVE)
    return rgb.convert(mode)


@pytest.mark.parametrize(
    'mode', ['RGB', 'L', '1', 'P', 'RGBA', 'LA', 'CMYK', 'YCbCr', 'I;16', 'I', 'F']
)
def test_transforms_every_mode(mode):
    image = image_in_mode(mode)
    for transform in (data.train_transform(16), data.eval_transform(16)):
        x = transform(image, random.Random(0))
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and torch.isfinite(x).all()
        assert (x >= LOW.view(3, 1, 1) - 1e-4).all() and (x <= HIGH.view(3, 1, 1) + 1e-4).all()
        if mode == 'I;16':   # 40000 / 65535 of white: scaled to 8 bits, not clipped to white
            assert abs(x[0, 0, 0] * data.STD[0] + data.MEAN[0] - 40000 / 65535) < 0.01


def test_transparent_pixels_are_white():
    x = data.eval_transform(8)(Image.new('RGBA', (8, 8), (0, 0, 0, 0)))
    assert torch.allclose(x, HIGH.view(3, 1, 1).expand(3, 8, 8), atol=1e-5)


def test_train_transform_replays_from_its_rng():
    image = image_in_mode('RGB', (64, 48))
    t = data.train_transform(16)
    assert torch.equal(t(image, random.Random(3)), t(image, random.Random(3)))
    assert not torch.equal(t(image, random.Random(3)), t(image, random.Random(4)))
    for seed in range(50):   # the crop keeps 90-100 % of the area, aspect ratio within 3/4..4/3
        left, top, right, bottom = data.random_resized_crop(64, 48, random.Random(seed))
        assert 0 <= left < right <= 64 and 0 <= top < bottom <= 48
        assert 0.9 * 64 * 48 * 0.97 <= (right - left) * (bottom - top) <= 64 * 48


def test_train_transform_of_a_large_jpeg_decodes_small_and_still_matches():
    y, x = np.mgrid[0:300, 0:400] / 300
    pixels = (np.stack([x, y, (x + y) / 2], -1) * 180).astype(np.uint8)  # smooth: survives JPEG
    jpeg, lossless = io.BytesIO(), io.BytesIO()
    Image.fromarray(pixels).save(jpeg, format='JPEG', quality=95)
    Image.fromarray(pixels).save(lossless, format='PNG')
    t = data.train_transform(64)
    drafted = t(Image.open(jpeg), random.Random(5))                           # decoded at 1/4 size
    full = t(Image.open(lossless), random.Random(5))  # the same crop, full size
    assert drafted.shape == full.shape == (3, 64, 64)
    assert (drafted - full).abs().mean() < 0.012                              # a box 2 % off: 0.03


def test_eval_transform_resizes_short_side_and_crops_centre():
    square = image_in_mode('RGB', (16, 16))
    expected = (
        torch.from_numpy(np.array(square)).permute(2, 0, 1) / 255
        - torch.tensor(data.MEAN).view(3, 1, 1)
    ) / torch.tensor(data.STD).view(3, 1, 1)
    torch.testing.assert_close(data.eval_transform(16)(square), expected)
    wide = np.zeros((16, 48, 3), np.uint8)
    wide[:, :, 0] = 255           # red sides ...
    wide[:, 16:32] = (0, 0, 255)  # ... and a blue centre, exactly the crop
    x = data.eval_transform(16)(Image.fromarray(wide))
    torch.testing.assert_close(x[2], torch.full((16, 16), HIGH[2].item()))
    torch.testing.assert_close(x[0], torch.full((16, 16), LOW[0].item()))
    assert data.eval_transform(10)(Image.fromarray(wide)).shape == (3, 10, 10)


# ----------------------------------------------------------------------------- shard lists
def test_expand_urls(tmp_path):
    paths = make_shards(tmp_path, 3, 1)
    assert data.expand_urls(str(tmp_path / '{000..002}.tar')) == paths
    assert data.expand_urls(str(tmp_path)) == paths
    assert data.expand_urls(paths[::-1]) == paths[::-1]
    assert data.expand_urls(str(tmp_path / '{000,002}.tar')) == [paths[0], paths[2]]
    assert data.expand_urls(str(tmp_path / '00{0..1}.tar') + '::' + paths[2]) == paths
    assert _braces('x{8..11}{a,b}') == ['x8a', 'x8b', 'x9a', 'x9b', 'x10a', 'x10b', 'x11a', 'x11b']
    assert _braces('{00098..00100}') == ['00098', '00099', '00100']
    missing = str(tmp_path / 'nothing' / '{00000..00009}.tar')
    with pytest.raises(ValueError, match='nothing'):
        data.expand_urls(missing)
    with pytest.raises(ValueError, match='nothing'):
        loader(missing)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='empty'):
        data.expand_urls(str(tmp_path / 'empty'))


def test_the_worker_side_pickles_for_spawned_workers(shards):
    stream = pickle.loads(pickle.dumps(loader(shards).stream))   # macOS and Windows spawn workers
    images, tokens, info = next(iter(stream))
    assert images.shape == (4, 3, 8, 8) and info['role'] == 0


def test_bad_flags_are_named(tmp_path):
    paths = make_shards(tmp_path, 1, 2)
    for kw, name in (({'batch_size': 0}, 'batch_size'), ({'workers': -1}, 'workers'),
                     ({'rank': 2, 'world_size': 2}, 'rank'), ({'tokenizer': 'bpe'}, 'bpe')):
        with pytest.raises(ValueError, match=name):
            loader(paths, **kw)


# -------------------------------------------------------------------- the loader: order and resume
@pytest.fixture(scope='module')
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp('shards'), 5, 12)   # 60 samples


def test_resume_gives_the_uninterrupted_batches(shards):
    full = take(iter(loader(shards)), 10)
    for k in (5, 4):   # an odd k also moves the round robin to the second worker
        first = loader(shards)
        it = iter(first)
        assert_same_batches(take(it, k), full[:k])
        state = json.loads(json.dumps(first.state_dict()))   # plain values
        assert state['batches'] == k
        resumed = loader(shards)
        resumed.load_state_dict(state)
        assert_same_batches(take(iter(resumed), 10 - k), full[k:])


def test_resume_across_an_epoch_boundary(shards):
    # 60 samples over 2 workers, 4 per batch: the first epoch is about 15 batches
    full = take(iter(loader(shards, shuffle_buffer=100)), 22)
    first = loader(shards, shuffle_buffer=100)
    take(iter(first), 17)
    assert max(p[0] for p in first.state_dict()['positions']) == 1   # some worker is in epoch 1
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    resumed = loader(shards, shuffle_buffer=100)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))
    assert_same_batches(take(iter(resumed), 5), full[17:])


@pytest.mark.parametrize('world_size, workers', [(1, 1), (3, 2)])
@pytest.mark.parametrize('taken', [6, 8])   # 8: some workers are into the second epoch
def test_resume_on_other_ranks_delivers_each_sample_once(shards, world_size, workers, taken):
    # saved by 2 ranks x 2 workers with batches of 4, resumed with batches of 3: what the new
    # ranks deliver of the epochs begun (resample=False: one pass, the carried epoch), with what
    # the old ones had, is every sample once per epoch begun
    before, states = [], []
    for rank in range(2):
        old = loader(shards, rank=rank, world_size=2)
        before += [k for _, t in take(iter(old), taken) for k in keys_of(t)]
        states.append(json.loads(json.dumps(old.state_dict())))
    epochs = 1 + max(p[0] for s in states for p in s['positions'])
    assert epochs == (2 if taken == 8 else 1)
    after = []
    for rank in range(world_size):
        new = loader(shards, rank=rank, world_size=world_size, workers=workers, batch_size=3,
                     resample=False)
        new.load_state_dict(states)
        after += [k for _, t in new for k in keys_of(t)]
    everything = [f's{s}_{i:03d}' for s in range(5) for i in range(12)]
    assert collections.Counter(before + after) == {key: epochs for key in everything}


def test_workers_zero_equals_one_and_same_seed_same_order(shards):
    a = take(iter(loader(shards, workers=0)), 8)
    assert_same_batches(a, take(iter(loader(shards, workers=1)), 8))
    other = take(iter(loader(shards, workers=0, seed=1)), 8)
    assert [keys_of(t) for _, t in a] != [keys_of(t) for _, t in other]


def epoch_keys(paths, rank, world_size, workers, **kw):
    return [
        k
        for _, t in loader(
            paths, rank=rank, world_size=world_size, workers=workers, resample=False, **kw
        )
        for k in keys_of(t)
    ]


@pytest.mark.parametrize('n_shards', [6, 3])   # more shards than ranks x workers (4), and fewer
def test_every_sample_once_per_epoch_across_ranks_and_workers(tmp_path, n_shards):
    paths = make_shards(tmp_path, n_shards, 7)
    everything = sorted(f's{s}_{i:03d}' for s in range(n_shards) for i in range(7))
    seen = [epoch_keys(paths, rank, 2, 2) for rank in range(2)]
    assert sorted(seen[0] + seen[1]) == everything
    assert seen[0] and seen[1]


def test_epochs_are_reshuffled_and_resample_goes_on(tmp_path):
    paths = make_shards(tmp_path, 4, 8)   # 2 workers: 16 samples each per epoch, 4 batches of 4
    one = loader(paths, resample=False, shuffle_buffer=100)
    epoch0 = [k for _, t in one for k in keys_of(t)]
    epoch1 = [k for _, t in one for k in keys_of(t)]        # the next `for` is the next epoch
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
    forever = [k for _, t in take(iter(loader(paths, shuffle_buffer=100)), 16) for k in keys_of(t)]
    assert sorted(forever) == sorted(epoch0 * 2)               # two whole epochs, nothing dropped
    # without a sample buffer, the order of the shards alone changes from epoch to epoch
    (tmp_path / 'many').mkdir()
    unbuffered = loader(
        make_shards(tmp_path / 'many', 8, 2), workers=0, resample=False, shuffle_buffer=0
    )
    assert [keys_of(t) for _, t in unbuffered] != [keys_of(t) for _, t in unbuffered]


def test_eval_mode_reads_in_order_with_first_caption(tmp_path):
    path = write_tar(
        tmp_path / 'a.tar',
        [(f'k{i}', {'jpg': png(i, 12, 'JPEG'), 'txt': f'k{i}\nother'}) for i in range(6)],
    )
    batches = list(loader([path], workers=0, train=False, resample=False, image_size=8,
                          caption_lines=True))
    assert [k for _, t in batches for k in keys_of(t)] == [f'k{i}' for i in range(6)]
    assert batches[-1][0].shape == (2, 3, 8, 8)                # the epoch's last batch is short


# ----------------------------------------------------------------------------- bad input
def bad_shards(tmp_path):
    good = lambda k: (k, {'png': png(len(k), 16), 'txt': k})
    mixed = write_tar(tmp_path / 'mixed.tar', [
        good('good1'),
        ('noise', {'jpg': os.urandom(300), 'txt': 'noise'}),                 # corrupt image
        ('half', {'png': png(1, 32)[:400], 'txt': 'half'}),                  # truncated image
        ('nocap', {'png': png(2)}),                                           # no caption
        ('blank', {'png': png(3), 'txt': '\n  \n'}),                          # empty caption
        ('gif', {'gif': png(4, fmt='GIF'), 'txt': 'gif'}),                    # unknown extension
        ('textonly', {'txt': 'text only', 'json': '{}'}),                     # no image
        good('good2'), good('good3'),
    ])
    whole = write_tar(tmp_path / 'cut.tar', [good(f'cut{i}') for i in range(4)])
    with tarfile.open(whole) as tar:
        cut = next(m for m in tar.getmembers() if m.name == 'cut2.png')
    with open(whole, 'r+b') as f:
        f.truncate(cut.offset_data + cut.size // 2)  # truncated tar, inside cut2.png
    empty = tmp_path / 'zero.tar'
    empty.write_bytes(b'')                                                    # unreadable shard
    return [mixed, whole, str(empty), str(tmp_path / 'missing.tar')]  # ... and a missing one


EXPECTED_SKIPS = {'corrupt image': 2, 'no caption': 1, 'empty caption': 1, 'unknown extension': 1,
                  'no image': 1, 'truncated tar': 1, 'unreadable shard': 2}


@pytest.mark.parametrize('workers', [0, 2])
def test_bad_input_is_skipped_counted_and_warned_once(tmp_path, workers):
    paths = bad_shards(tmp_path)
    ld = loader(paths, workers=workers, batch_size=2, resample=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        keys = [k for _, t in ld for k in keys_of(t)]
    assert sorted(keys) == [
        'cut0',
        'cut1',
        'good1',
        'good2',
        'good3',
    ]  # cut2 was damaged, cut3 lost
    assert ld.skipped == EXPECTED_SKIPS
    messages = [str(w.message) for w in caught if issubclass(w.category, data.DataWarning)]
    for kind in EXPECTED_SKIPS:
        assert sum(f'skipping a sample: {kind}:' in m for m in messages) == 1, kind
    assert any('epoch 0 done' in m for m in messages)
    assert ld.state_dict()['skipped'] == EXPECTED_SKIPS


def test_bad_input_with_resample_goes_on(tmp_path):
    it = iter(loader(bad_shards(tmp_path), workers=0, batch_size=2))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        keys = [
            k for _, t in take(it, 10) for k in keys_of(t)
        ]  # 20 samples: 4 epochs of 5 good ones
    assert sorted(set(keys)) == ['cut0', 'cut1', 'good1', 'good2', 'good3']


def on_timeout(signum, frame):
    raise TimeoutError('the loader hangs')


@pytest.mark.parametrize('workers,resample', [(0, False), (0, True), (1, True)])
def test_no_valid_sample_is_an_error_naming_the_pattern(tmp_path, workers, resample):
    write_tar(tmp_path / 'only_bad_0.tar', [('a', {'png': png(0)}), ('b', {'txt': 'b'})])
    write_tar(tmp_path / 'only_bad_1.tar', [('c', {'jpg': b'not an image', 'txt': 'c'})])
    pattern = str(tmp_path / 'only_bad_{0..1}.tar')
    previous = signal.signal(
        signal.SIGALRM, on_timeout
    )  # a hang fails the test instead of stalling it
    signal.alarm(20)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            with pytest.raises(Exception, match='only_bad_') as error:
                next(iter(loader(pattern, workers=workers, resample=resample)))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert not isinstance(error.value, TimeoutError)


def test_read_shards(tmp_path):
    paths = bad_shards(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        samples = list(data.read_shards(paths))
    assert [k for k, _, _ in samples] == [
        'good1',
        'noise',
        'half',
        'good2',
        'good3',
        'cut0',
        'cut1',
    ]
    image, captions = samples[0][1:]
    assert captions == ['good1'] and image.mode == 'RGB' and image.size == (16, 16)
    assert samples[1][1] is None and samples[2][1] is None              # did not decode
    assert len(caught) == 1 and "'truncated tar': 1" in str(caught[0].message)


# ---------------------------------------------------------------- bad shards, big images, captions
def quietly(make, *args):
    """list(make(*args)) without the DataWarnings a test of bad input expects."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return list(make(*args))


@pytest.mark.parametrize('workers', [2, 0])
def test_one_unreadable_shard_among_few_does_not_stop_training(tmp_path, workers):
    """Two shards for two workers, one of them zero bytes: in each epoch one worker's share is
    empty. It is skipped and counted; the run goes on and resumes exactly."""
    good = make_shards(tmp_path, 1, 6)
    (tmp_path / 'zero.tar').write_bytes(b'')
    paths = good + [str(tmp_path / 'zero.tar')]
    ld = loader(paths, workers=workers, batch_size=2)
    full = quietly(take, iter(ld), 12)                        # 4 epochs of the good shard
    assert sorted(k for _, t in full for k in keys_of(t)) == sorted(
        [f's0_{i:03d}' for i in range(6)] * 4
    )
    assert ld.skipped['unreadable shard'] >= 3
    first = loader(paths, workers=workers, batch_size=2)
    it = iter(first)
    quietly(take, it, 5)
    resumed = loader(paths, workers=workers, batch_size=2)
    resumed.load_state_dict(first.state_dict())
    assert_same_batches(quietly(take, iter(resumed), 7), full[5:])


def test_a_rank_whose_share_stays_empty_stops_after_some_epochs(tmp_path, monkeypatch):
    """One shard with one good sample, two ranks: rank 1 keeps the samples j % 2 == 1 of it,
    never a valid one. It stops with the pattern named instead of spinning forever; rank 0 runs."""
    monkeypatch.setattr(data, 'EMPTY_EPOCHS', 3)
    path = write_tar(
        tmp_path / 'one.tar', [('a', {'png': png(0), 'txt': 'a'}), ('b', {'png': png(1)})]
    )
    assert quietly(take, iter(loader([path], workers=0, batch_size=1, rank=0, world_size=2)), 3)
    with pytest.raises(ValueError, match=r'one\.tar.*rank 1 of 2'):
        quietly(take, iter(loader([path], workers=0, batch_size=1, rank=1, world_size=2)), 1)



def test_images_beyond_the_pixel_budget_are_skipped_and_counted(tmp_path, monkeypatch):
    huge = big_png(6000, 6000)                                 # 36 Mpx, 35 KB: above MAX_PIXELS
    assert len(huge) < 100_000 and 6000 * 6000 > images.MAX_PIXELS
    with pytest.raises(data.ImageTooLarge, match='6000 x 6000'):
        data.open_image(io.BytesIO(huge))
    monkeypatch.setattr(images, 'MAX_PIXELS', 24 * 24)  # small images stand in for big ones
    path = write_tar(tmp_path / 'big.tar', [
        ('small', {'png': png(0, 16), 'txt': 'small'}),
        ('bigpng', {'png': png(1, 32), 'txt': 'bigpng'}),        # refused
        ('bigjpeg', {'jpg': png(2, 64, 'JPEG'), 'txt': 'bigjpeg'}),   # decoded at 1/4 size: 16 x 16
        ('huge', {'png': huge, 'txt': 'huge'})])
    ld = loader([path], workers=0, batch_size=1, resample=False)
    with pytest.warns(data.DataWarning, match='image too large'):
        assert sorted(k for _, t in ld for k in keys_of(t)) == ['bigjpeg', 'small']
    assert ld.skipped == {'image too large': 2}
    with data.open_image(io.BytesIO(png(2, 64, 'JPEG'))) as im:
        assert im.size == (16, 16)
    sizes = {k: image and image.size for k, image, _ in data.read_shards(path)}   # eval counts None
    assert sizes == {'small': (16, 16), 'bigpng': None, 'bigjpeg': (16, 16), 'huge': None}


def test_bomb_beyond_pils_limit_is_too_large(tmp_path):
    bomb = big_png(14000, 14000)                               # PIL itself refuses > 179 Mpx
    with pytest.raises(data.ImageTooLarge):
        data.open_image(io.BytesIO(bomb))


def test_caption_not_utf8_and_header_cut_are_counted(tmp_path):
    latin = write_tar(
        tmp_path / 'latin.tar',
        [
            ('ok', {'png': png(0), 'txt': 'ok'}),
            ('latin', {'png': png(1), 'txt': 'caf\xe9'.encode('latin-1')}),
        ],
    )
    whole = write_tar(
        tmp_path / 'cut.tar', [(f'k{i}', {'png': png(i), 'txt': f'k{i}'}) for i in range(3)]
    )
    with tarfile.open(whole) as tar:
        header = next(m for m in tar.getmembers() if m.name == 'k2.txt').offset
    with open(whole, 'r+b') as f:
        f.truncate(header + 100)                                 # inside k2.txt's 512-byte header
    ld = loader([latin, whole], workers=0, batch_size=1, resample=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        assert sorted(k for _, t in ld for k in keys_of(t)) == ['k0', 'k1', 'ok']
    assert ld.skipped == {'caption not UTF-8': 1, 'truncated tar': 1}
    assert any('latin.txt' in str(w.message) for w in caught)
    assert any('cut inside the header' in str(w.message) for w in caught)


def test_empty_and_non_tar_shards_say_what_they_are(tmp_path):
    good = make_shards(tmp_path, 1, 2)
    (tmp_path / 'zero.tar').write_bytes(b'')
    (tmp_path / 'text.tar').write_text('this is not a tar file\n' * 40)
    for bad, says in (('zero.tar', 'an empty file (0 bytes)'), ('text.tar', 'not a tar file')):
        detail = f'unreadable shard: .*{bad}: {re.escape(says)}'
        with pytest.warns(data.DataWarning, match=detail):   # among good shards: skipped
            list(loader(good + [str(tmp_path / bad)], workers=0, resample=False))
        with pytest.raises(ValueError, match=f'no valid sample.*{detail}'):   # alone: an error
            quietly(lambda: loader(str(tmp_path / bad), workers=0, resample=False))


def test_captions_from_json_and_whole_text_by_default(tmp_path):
    path = write_tar(
        tmp_path / 'a.tar',
        [
            (
                'txt',
                {
                    'jpg': png(0, fmt='JPEG'),
                    'txt': 'first line\nsecond line',
                    'json': '{"caption": "no"}',
                },
            ),
            (
                'json',
                {'jpg': png(1, fmt='JPEG'), 'json': '{"caption": "from the json", "url": "x"}'},
            ),
            ('list', {'jpg': png(2, fmt='JPEG'), 'json': '{"caption": ["one", "two"]}'}),
            ('other', {'jpg': png(3, fmt='JPEG'), 'json': '{"alt": "other key"}'}),
        ],
    )
    def captions(**kw):
        ld = loader(
            [path], workers=0, batch_size=1, resample=False, train=False, context_length=32, **kw
        )
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return [keys_of(t)[0] for _, t in ld], ld.skipped
    # img2dataset's caption with a newline stays one caption; .json when there is no .txt
    assert captions() == (['first line second line', 'from the json', 'one'], {'no caption': 1})
    assert captions(caption_lines=True) == (
        ['first line', 'from the json', 'one'],
        {'no caption': 1},
    )
    assert captions(caption_key='alt')[0] == ['first line second line', 'other key']
    assert captions(caption_key=None) == (['first line second line'], {'no caption': 3})
    # the training draws among a list's captions
    train = loader([path], workers=0, batch_size=1, resample=True, shuffle_buffer=0)
    drawn = {keys_of(t)[0] for _, t in quietly(take, iter(train), 40)}
    assert {'one', 'two'} <= drawn


def test_caption_lines_reads_one_caption_per_line(tmp_path):
    """What train.py passes for the built-in data (and --caption_lines for COCO-style shards)."""
    from synthetic import make_synthetic
    root = make_synthetic(tmp_path / 'syn', train=4, retrieval=1, zeroshot=1, shard_size=4)
    ld = loader(os.path.join(root, 'train'), workers=0, batch_size=4, resample=False, train=False,
                context_length=64, caption_lines=True)
    (lines,) = [keys_of(t) for _, t in ld]
    with tarfile.open(os.path.join(root, 'train', '00000.tar')) as tar:
        first = [
            tar.extractfile(m).read().decode().splitlines()[0]
            for m in tar
            if m.name.endswith('.txt')
        ]
    assert lines == first                       # one line of each, not the whole text
    assert loader(make_shards(tmp_path, 1, 1), workers=0).caption_lines is False


def test_a_missing_data_path_is_named(tmp_path):
    for missing in (tmp_path / 'nowhere', tmp_path / 'nowhere' / '{000..003}.tar'):
        with pytest.raises(
            ValueError, match=re.escape(f"shards '{missing}' match no file (no such file")
        ):
            loader(str(missing))
