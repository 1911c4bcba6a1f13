"""
Speed and memory, side by side with a reference in the same run (these machines are shared
and noisy: read the ratios).

    python bench.py loss            # llip_loss fwd+bwd: naive, plain, gram, mixed; N = 256 .. 1024
    python bench.py loss --dim=1280 --k=64        # bigG's mixer; naive skipped where it won't fit
    python bench.py step            # tiny preset training step, batch 256: pool=llip vs avg,
                                    # time and matmul FLOPs (--forms plain gram: those forms too;
                                    # --captions 1 2 4: C captions per image, each C beside avg's)
    python bench.py zeroshot --n 256              # zero-shot img/s, 1000 classes: Llip vs CLIP
    python bench.py accum --threads 1             # peak memory of a step against --grad_accum,
                                                  # feature-cached vs the whole batch at once
    python bench.py plan --model=vit_g14 --gpus=8,64,256   # what fits, FLOPs, days (bench_plan.py)
    python bench.py gpu                           # the GPU check (bench_gpu.py; --device=cpu in CI)

Each loss measurement runs in a fresh subprocess, so its peak resident memory (VmHWM) minus the
memory it held before the call is the extra memory of that call alone.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def rss_kib(field):
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ':'))


def one_loss_run(impl, n, dim, k, heads, chunk, repeats, threads):
    """Time and extra peak memory of one llip_loss forward+backward. bench_loss runs it in a
    process of its own, so that the process's peak memory is this call's."""
    from loss import default_chunk, llip_loss, llip_loss_reference
    from model import ImageFeatures, TextFeatures
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    d = dim // heads
    leaf = lambda *s: torch.randn(*s).requires_grad_()
    image = ImageFeatures(keys=leaf(n, heads, k, d), values=leaf(n, heads, k, d))
    text_emb = torch.nn.functional.normalize(torch.randn(n, dim), dim=-1).requires_grad_()
    text = TextFeatures(queries=leaf(n, heads, d), emb=text_emb)
    out_proj = leaf(dim, dim)
    a, b = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    args = (image, text, out_proj, 5.0, a, b)
    before = rss_kib('VmRSS')
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        if impl == 'naive':
            loss = llip_loss_reference(*args)
        else:
            loss = llip_loss(*args, chunk_size=chunk, form=impl)
        loss.backward()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    used = n if impl == 'naive' else chunk or default_chunk(impl, n, image.keys)
    return {'seconds': min(times), 'cpu_seconds': min(cpu), 'chunk': used,
            'peak_mib': (rss_kib('VmHWM') - before) / 1024}


def macs_per_pair(impl, n, D, K, M):
    """Multiply-adds per image-caption pair, from the shapes: (forward, forward + backward).
    naive/plain: logits K D, mixing K D, W_O D^2; backward twice the forward, and plain
    recomputes the forward once more. gram: logits and A 2 K D, G_i Phi (MK)^2; backward
    4 K D + (MK)^2 (gradients by hand, no recompute); plus, per image, G_i from H = W_O W_O^T,
    K D^2 + (MK)^2 D/M forward and twice that backward, spread over the n captions. mixed:
    logits and mixing 2 K D, H x D^2; backward 4 K D + D^2 (dl/dH), by hand."""
    if impl in ('naive', 'plain'):
        fwd = 2 * K * D + D * D
        return fwd, fwd * (3 if impl == 'naive' else 4)
    if impl == 'mixed':
        return 2 * K * D + D * D, 6 * K * D + 2 * D * D
    per_image = K * D * D + (M * K) ** 2 * D // M
    return (2 * K * D + (M * K) ** 2 + per_image / n,
            6 * K * D + 2 * (M * K) ** 2 + 3 * per_image / n)


def naive_bytes(n, D):
    """What llip_loss_reference needs, roughly: about eight (N, N, D) fp32 tensors (measured:
    16.3 GiB at N = 1024, D = 512)."""
    return 8 * n * n * D * 4


def available_bytes():
    with open('/proc/meminfo') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('MemAvailable:')) * 1024


def bench_loss(args):
    D, K, M = args.dim, args.k, args.heads
    print(f"$ python bench.py {' '.join(sys.argv[1:])}")
    print(f"llip_loss forward+backward, fp32, CPU, {torch.get_num_threads()} threads, D={D}, "
          f"K={K}, M={M}, best of {args.repeats} (wall and CPU time)")
    print("naive: materialise all z_ij (llip_loss_reference); plain: chunks of images,\n"
          "autograd, each chunk recomputed in backward (torch.utils.checkpoint); gram, mixed: W_O\n"
          "off the pair axis, gradients by hand in the same pass (loss_gram.py);\n"
          "MAC/pair from the shapes (fwd, fwd+bwd)")
    print(f"{'N':>6} {'impl':>6} {'chunk':>6} {'seconds':>9} {'CPU s':>7} {'peak MiB':>10} "
          f"{'kMAC fwd':>9} {'kMAC f+b':>9} {'time/naive':>11} {'mem/naive':>10}")
    for n in args.n:
        rows = {}
        for impl in args.impls:
            if impl == 'naive' and naive_bytes(n, D) > 0.8 * available_bytes():
                print(f"{n:>6} {impl:>6}  skipped: needs ~{naive_bytes(n, D) / 2 ** 30:.0f} GiB, "
                      f"{available_bytes() / 2 ** 30:.0f} GiB available")
                continue
            call = (f"bench.one_loss_run({impl!r}, {n}, {D}, {K}, {M}, {args.chunk or None}, "
                    f"{args.repeats}, {args.threads})")
            cmd = [sys.executable, '-c', f"import json, bench; print(json.dumps({call}))"]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
            if out.returncode:
                why = (out.stderr.strip().splitlines() or ['killed'])[-1]
                print(f"{n:>6} {impl:>6}  failed: {why}")
                continue
            rows[impl] = r = json.loads(out.stdout.strip().splitlines()[-1])
            fwd, both = macs_per_pair(impl, n, D, K, M)
            ratios = ''
            if 'naive' in rows and impl != 'naive':
                ratios = (f" {r['seconds'] / rows['naive']['seconds']:>11.2f}"
                          f" {r['peak_mib'] / rows['naive']['peak_mib']:>10.3f}")
            print(f"{n:>6} {impl:>6} {r['chunk']:>6} {r['seconds']:>9.2f} {r['cpu_seconds']:>7.2f}"
                  f" {r['peak_mib']:>10.0f} {fwd / 1e3:>9.0f} {both / 1e3:>9.0f}{ratios}",
                  flush=True)


def one_step_setup(pool, batch, seed=0, preset='tiny', image_size=None, form='auto', captions=1):
    """A preset with this pool, AdamW, and a random batch of `batch` images with `captions`
    captions each: returns a function doing one step. For pool=llip, form other than 'auto' runs
    llip_loss in that form (the model's forward with the form forced); 'auto' is the model's
    own forward."""
    from dataclasses import replace
    from loss import llip_loss
    from model import PRESETS, Llip
    torch.manual_seed(seed)
    c = replace(PRESETS[preset], pool=pool, image_size=image_size or PRESETS[preset].image_size)
    m = Llip(c)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.2)
    images = torch.randn(batch, 3, c.image_size, c.image_size)
    tokens = torch.randint(1, c.vocab_size, (batch * captions, c.context_length))

    def loss_of(images, tokens):
        if form == 'auto':
            return m(images, tokens)
        img, txt = m.encode_image(images), m.encode_text(tokens)
        return llip_loss(img, txt, m.out_proj, c.tau, m.logit_scale.exp(), m.logit_bias, form=form,
                         captions_per_image=captions)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_of(images, tokens)
        loss.backward()
        opt.step()
        return loss.item()
    return step


def bench_step(args):
    """One training step (forward, backward, AdamW) of a preset, pool=llip against pool=avg at
    the same K (same towers, same number of mixture tokens), interleaved, median of the repeats.
    Wall time and CPU time (process_time) are both taken: on a shared machine with --threads 1
    CPU time leaves out the time other jobs held the core, though not their use of the caches.
    --forms adds llip steps with loss.llip_loss's form forced ('auto' is what training runs)."""
    import statistics
    from dataclasses import replace
    from loss import pick_form
    from model import PRESETS
    c = replace(PRESETS[args.preset], image_size=args.image_size or PRESETS[args.preset].image_size)
    d = c.embed_dim // c.mixer_heads
    auto = pick_form('auto', torch.zeros(1, c.mixer_heads, c.num_mixture, d), args.batch)
    print(f"$ python bench.py {' '.join(sys.argv[1:])}")
    print(f"training step of the {args.preset} preset (image {c.image_size}, D={c.embed_dim}, "
          f"K={c.num_mixture}, M={c.mixer_heads}), batch {args.batch}, random images and tokens, "
          f"fp32, CPU, {torch.get_num_threads()} threads; llip's default form here: {auto}")
    runs, reference = {}, {}          # name: (pool, form, C); name: avg's run at the same C
    for captions in args.captions:
        tag = '' if captions == 1 else f' C={captions}'
        runs['avg' + tag] = ('avg', 'auto', captions)
        runs.update({('llip' if f == 'auto' else f'llip/{f}') + tag: ('llip', f, captions)
                     for f in args.forms})
        reference.update({name: 'avg' + tag for name in runs if name not in reference})
    steps = {name: one_step_setup(pool, args.batch, 0, args.preset, args.image_size, form, c)
             for name, (pool, form, c) in runs.items()}
    for step in steps.values():
        step()                                          # warm-up (allocations, AdamW state)
    wall = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    for r in range(args.repeats):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):   # alternate the order
            start, start_cpu = time.perf_counter(), time.process_time()
            steps[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    med = {name: statistics.median(t) for name, t in wall.items()}
    med_cpu = {name: statistics.median(t) for name, t in cpu.items()}
    flops = {name: step_flops(step) for name, step in steps.items()}
    print(f"{'pool':>11} {'median s':>9} {'min s':>7} {'max s':>7} {'CPU s':>7} {'GFLOP':>7} "
          f"{'GFLOP/s':>8} {'time/avg':>9} {'CPU/avg':>8} {'FLOP/avg':>9} {'time:FLOP':>10}"
          f" {'CPU:FLOP':>9}"
          f"  (of {args.repeats})")
    for name in steps:
        ref = reference[name]
        time_r, cpu_r = med[name] / med[ref], med_cpu[name] / med_cpu[ref]
        flop_r, gflop = flops[name] / flops[ref], flops[name] / 1e9
        print(f"{name:>11} {med[name]:>9.3f} {min(wall[name]):>7.3f} {max(wall[name]):>7.3f}"
              f" {med_cpu[name]:>7.3f} {gflop:>7.1f} {gflop / med[name]:>8.1f}"
              f" {time_r:>9.3f} {cpu_r:>8.3f} {flop_r:>9.3f} {time_r / flop_r:>10.3f}"
              f" {cpu_r / flop_r:>9.3f}")
    if 'llip' in steps:
        print(f"llip/avg median step time: {med['llip'] / med['avg']:.3f} (CPU time "
              f"{med_cpu['llip'] / med_cpu['avg']:.3f})")
        print(f"llip/avg matmul FLOPs:     {flops['llip'] / flops['avg']:.3f}  (the time ratio if "
              f"every FLOP ran at the same speed and nothing else cost time)")


def step_flops(step):
    """Matmul FLOPs of one step as torch counts them: its FlopCounterMode sees every mm and bmm,
    also those inside llip_loss's hand-written pass; elementwise work and AdamW count nothing.
    It has no formula for the CPU kernel of scaled_dot_product_attention: give it the GPU one's."""
    from torch.utils import flop_counter
    aten = torch.ops.aten
    attention = {aten._scaled_dot_product_flash_attention_for_cpu:
                 lambda q, k, v, *_, **__: flop_counter.sdpa_flop_count(q, k, v),
                 aten._scaled_dot_product_flash_attention_for_cpu_backward:
                 lambda grad, q, k, v, *_, **__:
                 flop_counter.sdpa_backward_flop_count(grad, q, k, v)}
    with flop_counter.FlopCounterMode(display=False, custom_mapping=attention) as counter:
        step()
    return counter.get_total_flops()


ZEROSHOT_CLASSES = 1000   # ImageNet


def bench_zeroshot(args):
    """Zero-shot images per second, the mixer and the scores only (model.similarity on
    precomputed image and class features), for Llip and for a CLIP-style single-vector model,
    1000 classes."""
    from dataclasses import replace
    from model import PRESETS, ImageFeatures, Llip, TextFeatures
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    D, K, M, C = args.dim, args.k, args.heads, ZEROSHOT_CLASSES
    torch.manual_seed(0)
    # only W_O matters here; the towers are the tiny preset's and are never run
    models = {
        pool: Llip(
            replace(PRESETS['tiny'], embed_dim=D, num_mixture=K, mixer_heads=M, pool=pool)
        ).to(device)
        for pool in ('llip', 'cls')
    }
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, device=device), dim=-1)
    classes = {'llip': TextFeatures(torch.randn(C, M, D // M, device=device), unit(C, D)),
               'cls': TextFeatures(None, unit(C, D))}

    def images_per_second(pool, n):
        img = (ImageFeatures(keys=torch.randn(n, M, K, D // M, device=device),
                             values=torch.randn(n, M, K, D // M, device=device)) if pool == 'llip'
               else ImageFeatures(emb=unit(n, D)))
        m = models[pool]
        run = ((lambda: m.similarity(img, classes[pool])) if not args.chunk
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


# ----------------------------------------------------------------------------- accum
def one_accum_run(mode, micro, accum, preset, pool, chunk, repeats, threads):
    """Time and extra peak memory of one training step's forward and backward on micro x accum
    images: 'cached' through accumulation.train_step in `accum` micro-batches, 'whole' as one
    batch through Llip.forward (the reference). bench_accum runs it in a process of its own."""
    from dataclasses import replace
    from accumulation import Towers, train_step
    from model import PRESETS, Llip
    torch.set_num_threads(threads or torch.get_num_threads())
    torch.manual_seed(0)
    model = Llip(replace(PRESETS[preset], pool=pool))
    c = model.config
    images = torch.randn(micro * accum, 3, c.image_size, c.image_size)
    tokens = torch.randint(1, c.vocab_size, (micro * accum, c.context_length))
    micro_batches = list(zip(images.split(micro), tokens.split(micro)))
    before, times = rss_kib('VmRSS'), []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        if mode == 'cached':
            train_step(Towers(model), model, micro_batches, chunk_size=chunk)
        else:
            model(images, tokens, chunk_size=chunk).backward()
        times.append(time.perf_counter() - start)
    return {'seconds': min(times), 'peak_mib': (rss_kib('VmHWM') - before) / 1024}


def bench_accum(args):
    """Peak memory of a step against --grad_accum at a fixed micro-batch: feature-cached
    accumulation (accumulation.py) beside one step on the same whole batch."""
    print(f"$ python bench.py {' '.join(sys.argv[1:])}")
    print(f"forward+backward of one step, {args.preset} preset, pool={args.pool}, micro-batch "
          f"{args.micro}, loss chunk {args.chunk or 'default'}, fp32, CPU, "
          f"{args.threads or torch.get_num_threads()} threads, best of {args.repeats}\n"
          f"peak MiB: the step's peak resident memory above the model and data (gradients "
          f"included); whole: the same images as one batch, no accumulation")
    print(f"{'accum':>6} {'images':>7} {'cached MiB':>11} {'whole MiB':>10} {'cached s':>9} "
          f"{'whole s':>8} {'s cached/whole':>15}")
    for accum in args.accum:
        row = {}
        for mode in ('cached', 'whole'):
            call = (f"bench.one_accum_run({mode!r}, {args.micro}, {accum}, {args.preset!r}, "
                    f"{args.pool!r}, {args.chunk or None}, {args.repeats}, {args.threads})")
            cmd = [sys.executable, '-c', f"import json, bench; print(json.dumps({call}))"]
            # glibc keeps freed blocks below its mmap threshold in the heap, and resident memory
            # then counts memory the step no longer holds; mmap every block of 64 KiB or more
            env = {**os.environ, 'MALLOC_MMAP_THRESHOLD_': '65536'}
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, env=env)
            if out.returncode:
                sys.exit(f"accum={accum} {mode}: failed: "
                         f"{(out.stderr.strip().splitlines() or ['killed'])[-1]}")
            row[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        c, w = row['cached'], row['whole']
        print(f"{accum:>6} {args.micro * accum:>7} {c['peak_mib']:>11.0f} {w['peak_mib']:>10.0f} "
              f"{c['seconds']:>9.2f} {w['seconds']:>8.2f} {c['seconds'] / w['seconds']:>15.2f}",
              flush=True)


if __name__ == '__main__':
    # the planner and the GPU check have flags of their own: bench_plan.py, bench_gpu.py
    if sys.argv[1:2] in (['plan'], ['gpu']):
        tool = __import__('bench_' + sys.argv[1])
        sys.exit(tool.main(sys.argv[2:]))
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument('what', choices=['loss', 'step', 'zeroshot', 'accum'],
                   help='which benchmark to run')
    p.add_argument(
        '--n',
        type=int,
        nargs='+',
        default=[256, 512, 1024],
        help='batch sizes N (images = captions)',
    )
    p.add_argument('--dim', type=int, default=512, help='embed dim D')
    p.add_argument('--k', type=int, default=32, help='mixture tokens K')
    p.add_argument('--heads', type=int, default=8, help='mixer heads M')
    p.add_argument('--chunk', type=int, default=0,
                   help='chunk_size of llip_loss and similarity: images per chunk (0: the default)')
    p.add_argument('--impls', nargs='+', default=['naive', 'plain', 'gram', 'mixed'],
                   help='loss: which forms to run')
    p.add_argument('--batch', type=int, default=256, help='step: batch size')
    p.add_argument('--preset', default='tiny', help='step, accum: the model preset (model.PRESETS)')
    p.add_argument('--image_size', type=int, default=0,
                   help="step: image size (0: the preset's; smaller keeps a big preset's mixer "
                        "with cheaper towers)")
    p.add_argument('--forms', nargs='+', default=['auto'],
                   help="step: llip_loss forms to run for pool=llip ('auto': training's default; "
                        "plain, gram, mixed: forced)")
    p.add_argument('--captions', type=int, nargs='+', default=[1],
                   help='step: captions per image (--captions_per_image); each C is a run of '
                        'avg and llip, its ratios against avg at the same C')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
    p.add_argument(
        '--repeats',
        type=int,
        default=None,
        help='timed repeats (default 2; step: 10, and the median is reported; others: the fastest)',
    )
    p.add_argument('--accum', type=int, nargs='+', default=[1, 2, 4, 8],
                   help='accum: micro-batches per step (--grad_accum)')
    p.add_argument('--micro', type=int, default=32, help='accum: images per micro-batch')
    p.add_argument('--pool', default='llip', help='accum: pool')
    args = p.parse_args()
    args.repeats = args.repeats or (10 if args.what == 'step' else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == 'loss':
        bench_loss(args)
    elif args.what == 'step':
        bench_step(args)
    elif args.what == 'accum':
        bench_accum(args)
    else:
        bench_zeroshot(args)
