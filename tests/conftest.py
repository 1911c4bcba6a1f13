"""Make the flat top-level modules (model, loss, data, ...) importable from the tests; the
fixtures and helpers that several test files share (`from conftest import train, SMALL`)."""
import gc
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRESH_THREADS = torch.get_num_threads()   # what a new python (a train.py run) starts with
sys.path.insert(0, ROOT)

import dataclasses  # noqa: E402

import run_dir  # noqa: E402
from model import PRESETS, Llip  # noqa: E402
from synthetic import make_synthetic  # noqa: E402


@pytest.fixture(autouse=True)
def collectable():
    """train.main() run in a test's process freezes what the process holds (gc.freeze, to spare
    its own exit): the next test finds it collectable again."""
    yield
    gc.unfreeze()


@pytest.fixture
def one_thread():
    """Tiny models: threads only add overhead, and much of it on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def is_png():
    """A check that a file is a PNG, by its 8-byte signature: what the plotting commands write."""
    def check(path):
        with open(path, 'rb') as f:
            return f.read(8) == b'\x89PNG\r\n\x1a\n'
    return check


# ----------------------------------------------------------------------------- train.py runs
SMALL = ['--vision_layers=1', '--text_layers=1', '--vision_width=32', '--text_width=32',
         '--embed_dim=16', '--num_mixture=4', '--vision_head_width=16', '--text_heads=2',
         '--batch_size=8', '--workers=1', '--warmup=2', '--log_every=1', '--lr=1e-3', '--no-eval']


@pytest.fixture(scope='session')
def synthetic(tmp_path_factory):
    """The built-in dataset, written once for the whole session (train.py's default data)."""
    path = str(tmp_path_factory.mktemp('synthetic'))
    make_synthetic(path, seed=0)
    return path


# SMALL with two DataLoader workers per rank, as a real run has
FAST = [a for a in SMALL if not a.startswith('--workers')] + ['--workers=2']


def train(out_dir, synthetic, *flags, check=True, **popen):
    cmd = [sys.executable, os.path.join(ROOT, 'train.py'), f'--out_dir={out_dir}',
           f'--synthetic_dir={synthetic}', *SMALL, *flags]
    if popen:
        return subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def weights(out_dir):
    return torch.load(os.path.join(out_dir, 'ckpt.pt'), weights_only=True)['model']


def log_lines(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def torchrun(*flags):
    return [sys.executable, '-m', 'torch.distributed.run', *flags]


def descendants(pid):
    """Every process below pid, from /proc (children first found, then theirs)."""
    parents = {}
    for entry in os.listdir('/proc'):
        try:
            with open(f'/proc/{entry}/stat') as f:
                parents[int(entry)] = int(f.read().rsplit(')', 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [c for c, p in parents.items() if p in frontier]
        found += children
        frontier = children
    return found


def alive(pid):
    """pid is a process that has not ended (a zombie has)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


@pytest.fixture(scope='session')
def trained_run(tmp_path_factory, synthetic):
    """(--out_dir, what train.py printed) after a 2-step run that saved at steps 1 and 2: one run
    for every test that needs a few checkpoints to resume from, damage or refuse."""
    out, printed = str(tmp_path_factory.mktemp('trained')), io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch, redirect_stdout(printed), \
            redirect_stderr(io.StringIO()):   # stderr: the progress bar
        main_in_process(monkeypatch, out, synthetic, '--steps=2', '--save_every=1',
                        '--workers=0')
    run_dir._release(out)   # as the run's exit would: its lock file emptied
    return out, printed.getvalue()


@pytest.fixture(scope='session')
def trained(trained_run):
    """The --out_dir of trained_run (tests change a copy_of it, never it)."""
    return trained_run[0]


def copy_of(trained, tmp_path):
    out = str(tmp_path / 'run')
    shutil.copytree(trained, out)
    return out


def main_in_process(monkeypatch, out_dir, synthetic, *flags):
    """train.main() in this process, with SMALL and `flags`: for a run whose process is not what
    a test proves (no new python and its imports, a few seconds each). It returns, or raises
    SystemExit as the process would exit."""
    import train as train_py
    monkeypatch.setattr(sys, 'argv', ['train.py', f'--out_dir={out_dir}',
                                      f'--synthetic_dir={synthetic}', *SMALL, *flags])
    # with the threads of a new python: a run resumed here must give the weights, to 1e-6, of
    # the same run in a separate process, and a matmul's sums depend on the thread count
    before = torch.get_num_threads()
    torch.set_num_threads(FRESH_THREADS)
    try:
        return train_py.main()
    finally:
        torch.set_num_threads(before)


def start_ranks(fn, args, nprocs):
    """mp.spawn(fn, args, nprocs) with the ranks forked from this process instead of started
    afresh: they begin with its imports (torch and the modules under test) rather than paying
    for them again, seconds a rank. Each rank runs on one thread, as a DataLoader worker does
    after its fork.
    What the ranks import on their first DTensor (torch._dynamo, ~2.5 s: DTensor's entry
    points are wrapped to keep dynamo out) and on fully_shard is imported here first, once a
    session: else each rank imports it again after every fork, 2 or 3 ranks a launch contending
    for 2 cores."""
    import torch._dynamo  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    mp.start_processes(_one_thread, args=(fn, args), nprocs=nprocs, join=True,
                       start_method='fork')


def _one_thread(rank, fn, args):
    torch.set_num_threads(1)
    fn(rank, *args)


def assert_same_weights(a, b):
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- small models
def tiny(**overrides):
    """A small Llip for `batch`, whose token ids are bytes' (1..258): the byte vocabulary, not
    the tiny preset's 49408 BPE ids, whose embedding (3.2 M parameters at width 64) would be
    most of the model: of every float64 gradient, DDP all-reduce and FSDP shard here."""
    small = dict(vision_layers=2, text_layers=2, vision_width=64, text_width=64, embed_dim=32,
                 num_mixture=4, context_length=16, image_size=16, vision_head_width=16,
                 tokenizer='byte', vocab_size=259)
    return replace(PRESETS['tiny'], **{**small, **overrides})


def batch(n, config, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, config.image_size, config.image_size, generator=g)
    tokens = torch.randint(1, 257, (n, config.context_length), generator=g)
    eot = torch.randint(3, config.context_length, (n,), generator=g)
    tokens[torch.arange(n), eot] = 258                       # EOT: the largest id
    tokens[torch.arange(config.context_length)[None] > eot[:, None]] = 0
    return images, tokens


def plotted_tiny(**overrides):
    """The small config of the plotting and diagnosis tests (mixer_heads=4: Phi per head)."""
    small = dict(vision_layers=2, text_layers=1, vision_width=64, text_width=64, embed_dim=32,
                 num_mixture=4, mixer_heads=4, context_length=48, image_size=16,
                 vision_head_width=16)
    return replace(PRESETS['tiny'], **{**small, **overrides})


def save_checkpoint(path, pool, seed=0):
    """A random model in train.py's checkpoint format, train.py's initial weights for `seed`;
    W_Q scaled up so that Phi is far from uniform."""
    model = Llip(plotted_tiny(pool=pool), seed=seed)
    if pool == 'llip':
        with torch.no_grad():
            model.q_proj.mul_(20)
    torch.save({'model': model.state_dict(), 'step': 0,
                'config': {'seed': seed, 'model_config': dataclasses.asdict(model.config)}}, path)
    return path


# ----------------------------------------------------------------------------- shards and images
def png(seed, size=8, fmt='PNG'):
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write_tar(path, samples):
    """samples: [(key, {ext: bytes or str})]"""
    with tarfile.open(path, 'w') as tar:
        for key, files in samples:
            for ext, payload in files.items():
                payload = payload.encode() if isinstance(payload, str) else payload
                member = tarfile.TarInfo(f'{key}.{ext}')
                member.size = len(payload)
                tar.addfile(member, io.BytesIO(payload))
    return str(path)


def big_png(width, height):
    """A greyscale PNG of width x height black pixels whose bytes are few: what a decompression
    bomb looks like. Written by hand, row by row, so the test never holds the pixels."""
    import struct
    import zlib

    def chunk(kind, payload):
        return (
            struct.pack('>I', len(payload))
            + kind
            + payload
            + struct.pack('>I', zlib.crc32(kind + payload))
        )
    # run-length matches only (Z_RLE): on rows of zeros the bytes of level 9's default, in a
    # third of the time (0.4 s, not 1.3 s, for 14000 x 14000)
    packer = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    row = b'\0' * (width + 1)                                   # filter byte 0, then the pixels
    pixels = b''.join(packer.compress(row) for _ in range(height)) + packer.flush()
    return (
        b'\x89PNG\r\n\x1a\n'
        + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0))
        + chunk(b'IDAT', pixels)
        + chunk(b'IEND', b'')
    )


# ----------------------------------------------------------------------------- evaluation
def eval_tiny(**overrides):
    """The small config of the evaluation tests."""
    small = dict(
        vision_layers=2,
        text_layers=2,
        vision_width=64,
        text_width=64,
        embed_dim=32,
        num_mixture=4,
        context_length=16,
        image_size=16,
        vision_head_width=16,
        text_heads=4,
    )
    return replace(PRESETS['tiny'], **{**small, **overrides})


def random_model(seed=0, **overrides):
    """A random evaluation model in float64 (references compare to 1e-9)."""
    torch.manual_seed(seed)
    return Llip(eval_tiny(**overrides)).double().eval()


def plain_checkpoint(path, **overrides):
    """A random evaluation model as a train.py-style checkpoint file (no checksum)."""
    torch.manual_seed(0)
    c = eval_tiny(**overrides)
    torch.save(
        {'model': Llip(c).state_dict(), 'config': {'model_config': dataclasses.asdict(c)}}, path
    )
    return str(path)


def write_folder(root, classes, per_class=3, seed=0):
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f'{i}.png')
    return root


def reference_one_way(scores, truth, ks=(1, 5, 10), true_first=False):
    """Recall@k and mAP of each row as a query over its columns, one query at a time: scores
    and truth are lists of rows of Python floats and bools. Each query's candidates are sorted
    in a list, best first and, among equal scores, the false ones first (true_first: the other
    way round)."""
    recall, ap = {k: [] for k in ks}, []
    for row, true in zip(scores, truth):
        order = sorted(range(len(row)), key=lambda c: (-row[c], true[c] != true_first))
        places = [place for place, c in enumerate(order, 1) if true[c]]   # 1 = the best
        for k in ks:
            recall[k].append(places[0] <= k)
        ap.append(np.mean([found / place for found, place in enumerate(places, 1)]))
    return {f'r{k}': np.mean(v) for k, v in recall.items()} | {'map': np.mean(ap)}


def reference_metrics(scores, truth, true_first=False):
    """Both ways: rows are images, columns strings."""
    columns = lambda rows: [list(col) for col in zip(*rows)]   # noqa: E731
    i2t = reference_one_way(scores, truth, true_first=true_first)
    t2i = reference_one_way(columns(scores), columns(truth), true_first=true_first)
    return {f'i2t_{k}': v for k, v in i2t.items()} | {f't2i_{k}': v for k, v in t2i.items()}
