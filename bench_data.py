"""
Loader throughput: data.ShardLoader against the webdataset library, reading the same shards
with the same decode + train transform + tokenizer, one epoch each, alternating, in one run.

    pip install webdataset      # for this benchmark only; data.py never imports it
    python bench_data.py        # synthetic 32x32 PNG, 256x256 and 640x480 JPEG shards, 2 workers
    python bench_data.py --workers 4 --batch_size 256 --jpeg 5000 --repeats 3

Shards are written once into --dir (synthetic: synthetic.make_synthetic; JPEG: pictures of
gradients, blobs and noise, 500 per shard; 224 x 224 crops at 90-100 % of the area).
Samples/s counts every sample of the epoch over the wall time from creating the iterator to
its end, worker start-up included; the best of --repeats runs is reported (the machine may be
shared), and the mean beside it.
"""

import argparse
import io
import os
import random
import sys
import tarfile
import time

import numpy as np
import torch
from PIL import Image

import data
import synthetic

p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
)
p.add_argument(
    '--dir', default='/tmp/llip_bench_data', help='where the benchmark shards are written'
)
p.add_argument('--workers', type=int, default=2, help='DataLoader worker processes, both loaders')
p.add_argument('--batch_size', type=int, default=128)
p.add_argument('--synthetic', type=int, default=10000, help='synthetic training images')
p.add_argument('--jpeg', type=int, default=2000, help='256x256 JPEG images')
p.add_argument('--large', type=int, default=1000, help='640x480 JPEG images (web-sized; 0: skip)')
p.add_argument(
    '--repeats', type=int, default=2, help='epochs per loader and dataset; the best is reported'
)
args = p.parse_args()


def write_jpeg_shards(folder, n, width=256, height=256, per_shard=500):
    """Pictures with some structure (a gradient, ellipses, noise), so JPEG sizes (~25 kB for
    256 x 256 at quality 90) and decode times are those of photos rather than of flat colour."""
    if os.path.exists(os.path.join(folder, 'done')):
        return folder
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width] / height
    words = 'a photo of the red blue small large dog cat car tree house on in with near'.split()
    for shard in range((n + per_shard - 1) // per_shard):
        with tarfile.open(os.path.join(folder, f'{shard:05d}.tar'), 'w') as tar:
            for i in range(shard * per_shard, min(n, (shard + 1) * per_shard)):
                image = (
                    rng.uniform(0, 255, 3) * x[..., None] + rng.uniform(0, 255, 3) * y[..., None]
                )
                for _ in range(4):
                    cx, cy, r = rng.uniform(0, 1, 3) * (width / height, 1, 1)
                    image[(x - cx) ** 2 + (y - cy) ** 2 < (r / 3) ** 2] = rng.uniform(0, 255, 3)
                image = np.clip(image / 2 + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, format='JPEG', quality=90)
                captions = '\n'.join(' '.join(rng.choice(words, 8)) for _ in range(3))
                for ext, payload in (('jpg', buffer.getvalue()), ('txt', captions.encode())):
                    member = tarfile.TarInfo(f'{i:08d}.{ext}')
                    member.size = len(payload)
                    tar.addfile(member, io.BytesIO(payload))
    open(os.path.join(folder, 'done'), 'w').close()
    return folder


def ours(urls, image_size, context_length, tokenizer):
    return data.ShardLoader(
        urls,
        batch_size=args.batch_size,
        image_size=image_size,
        context_length=context_length,
        tokenizer=tokenizer,
        workers=args.workers,
        resample=False,
        caption_lines=True,
    )


def theirs(urls, image_size, context_length, tokenizer):
    """The same work in webdataset: shard shuffle, split by worker, a 1000-sample shuffle
    buffer, PIL decode, our train transform with a per-sample RNG, a random caption, batches."""
    import webdataset as wds
    transform = data.train_transform(image_size)

    def sample(s):
        image, text = s
        rng = random.Random()
        return transform(image, rng), rng.choice([c for c in text.splitlines() if c.strip()])

    def collate(samples):
        images = torch.stack([x for x, _ in samples])  # (B, 3, S, S)
        return images, data.tokenize([c for _, c in samples], context_length, tokenizer)  # (B, L)

    dataset = (wds.WebDataset(urls, shardshuffle=len(urls), seed=0, empty_check=False)
               .shuffle(1000).decode('pil').to_tuple('jpg;jpeg;png;webp', 'txt').map(sample)
               .batched(args.batch_size, collation_fn=collate, partial=True))
    return wds.WebLoader(dataset, batch_size=None, num_workers=args.workers)


def epoch(loader):
    t0, n = time.perf_counter(), 0
    for images, tokens in loader:
        n += len(images)
    return n, time.perf_counter() - t0


try:
    import webdataset  # noqa: F401
except ImportError:
    sys.exit('bench_data.py compares with the webdataset library: pip install webdataset')
synthetic_dir = synthetic.make_synthetic(
    os.path.join(args.dir, f'synthetic_{args.synthetic}'), train=args.synthetic
)
jpeg = write_jpeg_shards(os.path.join(args.dir, f'jpeg_{args.jpeg}'), args.jpeg)
datasets = [
    ('synthetic 32x32 PNG', data.expand_urls(os.path.join(synthetic_dir, 'train')), 32, 48, 'byte'),
    ('JPEG 256x256 -> 224', data.expand_urls(jpeg), 224, 77, 'clip'),
]
if args.large:   # here ShardLoader's JPEG draft decoding (at 1/2 size when the crop allows) shows
    large = write_jpeg_shards(os.path.join(args.dir, f'large_{args.large}'), args.large, 640, 480)
    datasets.append(('JPEG 640x480 -> 224', data.expand_urls(large), 224, 77, 'clip'))
print(
    f'# python bench_data.py --workers {args.workers} --batch_size {args.batch_size} '
    f'--synthetic {args.synthetic} --jpeg {args.jpeg} --large {args.large} --repeats {args.repeats}'
)
print(f'# torch {torch.__version__}, {os.cpu_count()} CPUs, webdataset {webdataset.__version__}')
print(f"| {'shards':<20} | {'loader':<22} | samples | best samples/s | mean samples/s |")
print(f"|{'-' * 22}|{'-' * 24}|---------|----------------|----------------|")
for name, urls, image_size, context_length, tokenizer in datasets:
    results = {'data.ShardLoader': [], 'webdataset': []}
    for _ in range(args.repeats):   # alternate, so a busy moment of the machine hits both
        for label, make in (('data.ShardLoader', ours), ('webdataset', theirs)):
            n, seconds = epoch(make(urls, image_size, context_length, tokenizer))
            results[label].append((n, n / seconds))
    for label, runs in results.items():
        rates = [r for _, r in runs]
        print(f'| {name:<20} | {label:<22} | {runs[0][0]:7d} | {max(rates):14.0f} '
              f'| {np.mean(rates):14.0f} |')
