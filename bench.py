"""
Speed and memory, side by side with a reference in the same run (these machines are shared
and noisy: read the ratios).

    python bench.py loss                          # llip_loss fwd+bwd: naive vs chunked, N = 256, 512, 1024
    python bench.py loss --n=1024 --dim=1280 --k=64
    python bench.py zeroshot --n 256                 # zero-shot img/s, 1000 classes: Llip vs CLIP

Each measurement runs in a fresh subprocess, so its peak resident memory (VmHWM) minus the
memory it held before the call is the extra memory of that call alone.
"""
import argparse
import json
import subprocess
import sys
import time

import torch


def rss_kib(field):
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ':'))


def one_loss_run(impl, n, dim, k, heads, chunk, repeats):
    """Time and extra peak memory of one llip_loss forward+backward (run in its own process)."""
    from loss import llip_loss, llip_loss_reference
    torch.manual_seed(0)
    d = dim // heads
    leaf = lambda *s: torch.randn(*s).requires_grad_()
    keys, values, queries = leaf(n, heads, k, d), leaf(n, heads, k, d), leaf(n, heads, d)
    text = torch.nn.functional.normalize(torch.randn(n, dim), dim=-1).requires_grad_()
    out_proj = leaf(dim, dim)
    a, b = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    args = (keys, values, queries, text, out_proj, a, b, 5.0)
    before = rss_kib('VmRSS')
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = llip_loss_reference(*args) if impl == 'naive' else llip_loss(*args, chunk_size=chunk, form=impl)
        loss.backward()
        times.append(time.perf_counter() - start)
    return {'seconds': min(times), 'peak_mib': (rss_kib('VmHWM') - before) / 1024}


def bench_loss(args):
    print(f"llip_loss forward+backward, fp32, CPU, {torch.get_num_threads()} threads, "
          f"D={args.dim}, K={args.k}, M={args.heads}")
    D, K, M = args.dim, args.k, args.heads
    # multiply-adds per image-caption pair in the forward pass (logits, mixing, then W_O or the Gram form)
    flops = {'naive': 2 * K * D + D * D, 'plain': 2 * K * D + D * D, 'gram': 2 * K * D + (M * K) ** 2}
    print("naive: materialise all z_ij; plain: chunked, recomputed in backward; gram: chunked, W_O off the pair axis")
    print(f"{'N':>6} {'impl':>8} {'chunk':>6} {'seconds':>9} {'peak MiB':>10} {'kMAC/pair':>12}")
    for n in args.n:
        rows = {}
        for impl in ('naive', 'plain', 'gram'):
            cmd = [sys.executable, __file__, '_loss_run', f'--impl={impl}', f'--n={n}', f'--dim={args.dim}',
                   f'--k={args.k}', f'--heads={args.heads}', f'--chunk={args.chunk}', f'--repeats={args.repeats}']
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(f"{n:>6} {impl:>8}  failed: {out.stderr.strip().splitlines()[-1]}")
                continue
            rows[impl] = r = json.loads(out.stdout.strip().splitlines()[-1])
            chunk = args.chunk or max(1, 2 ** 16 // n)
            print(f"{n:>6} {impl:>8} {chunk if impl != 'naive' else n:>6} {r['seconds']:>9.2f} {r['peak_mib']:>10.0f}"
                  f" {flops[impl] / 1e3:>12.0f}")
        for impl in ('plain', 'gram'):
            if impl in rows and 'naive' in rows:
                print(f"{n:>6} {impl + '/naive':>14} {rows[impl]['seconds'] / rows['naive']['seconds']:>9.2f} "
                      f"{rows[impl]['peak_mib'] / rows['naive']['peak_mib']:>10.3f}")


ZEROSHOT_CLASSES = 1000   # ImageNet


def bench_zeroshot(args):
    """Zero-shot images per second, the mixer and the scores only (eval.score on precomputed image
    and class features), for Llip and for a CLIP-style single-vector model, 1000 classes."""
    from dataclasses import replace
    import eval as llip_eval
    from model import PRESETS, ImageFeatures, Llip, TextFeatures
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    D, K, M, C = args.dim, args.k, args.heads, ZEROSHOT_CLASSES
    torch.manual_seed(0)
    # only W_O matters here; the towers are the tiny preset's and are never run
    models = {pool: Llip(replace(PRESETS['tiny'], embed_dim=D, num_mixture=K, mixer_heads=M, pool=pool)).to(device)
              for pool in ('llip', 'cls')}
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, device=device), dim=-1)
    classes = {'llip': TextFeatures(torch.randn(C, M, D // M, device=device), unit(C, D)),
               'cls': TextFeatures(None, unit(C, D))}

    def images_per_second(pool, n):
        img = (ImageFeatures(keys=torch.randn(n, M, K, D // M, device=device),
                             values=torch.randn(n, M, K, D // M, device=device)) if pool == 'llip'
               else ImageFeatures(emb=unit(n, D)))
        m = models[pool]
        run = ((lambda: llip_eval.score(m, img, classes[pool])) if not args.chunk
               else (lambda: m.similarity(img, classes[pool], chunk_size=args.chunk)))
        best = float('inf')
        with torch.no_grad():
            run()                                   # warm-up
            for _ in range(args.repeats):
                calls, start = 0, time.perf_counter()
                while calls == 0 or time.perf_counter() - start < 0.2:   # fast calls: time several
                    run()
                    if device == 'cuda':
                        torch.cuda.synchronize()
                    calls += 1
                best = min(best, (time.perf_counter() - start) / calls)
        return n / best

    print(f"zero-shot scoring, {C} classes, features precomputed, fp32, {device}, "
          f"{torch.get_num_threads()} threads, D={D}, K={K}, M={M}")
    print(f"{'images':>7} {'Llip img/s':>12} {'CLIP img/s':>12} {'CLIP/Llip':>10}")
    for n in args.n:
        llip, clip = images_per_second('llip', n), images_per_second('cls', n)
        print(f"{n:>7} {llip:>12.1f} {clip:>12.0f} {clip / llip:>10.0f}")


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('what', choices=['loss', 'zeroshot', '_loss_run'], help='which benchmark to run')
    p.add_argument('--n', type=int, nargs='+', default=[256, 512, 1024], help='batch sizes N (images = captions)')
    p.add_argument('--dim', type=int, default=512, help='embed dim D')
    p.add_argument('--k', type=int, default=32, help='mixture tokens K')
    p.add_argument('--heads', type=int, default=8, help='mixer heads M')
    p.add_argument('--chunk', type=int, default=0, help='captions per chunk (0: the default of llip_loss)')
    p.add_argument('--repeats', type=int, default=2, help='timed repeats; the fastest is reported')
    p.add_argument('--impl', default='chunked', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.what == 'loss':
        bench_loss(args)
    elif args.what == 'zeroshot':
        bench_zeroshot(args)
    else:
        print(json.dumps(one_loss_run(args.impl, args.n[0], args.dim, args.k, args.heads,
                                      args.chunk or None, args.repeats)))
