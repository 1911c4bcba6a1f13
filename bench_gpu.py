"""
The GPU check: the first thing to run on a GPU (about 8 minutes on one H100), one JSON report and
a table. On CPU, `--device=cpu --small` runs the same code at small shapes, so that it cannot rot
(tests/test_bench_gpu.py); it says what it skipped.

    python bench.py gpu                                   # CUDA; writes gpu_report.json
    python bench.py gpu --device=cpu --small --out=/tmp/gpu_report.json

  (a) correct   tiny model's loss, the three loss forms (value, gradients) and `similarity` on the
                device against float64 on CPU, in fp32 and under bf16 autocast
  (b) learns    tiny steps on one fixed batch: the loss must fall
  (c) speed     a vit_b16 training step, bf16 (+ --compile on CUDA): images/s and MFU (FLOPs from
                the planner), with and without grad_ckpt
  (d) loss      the loss at 128 local images x 32,768 captions (one of 256 GPUs at the paper's
                batch, B/16 shapes): time against the towers' step, peak memory against the
                planner, plain / Gram / mixed forms, and the Gram chunk that is fastest
  (e) accum     one feature-cached accumulation step (accumulation.py) == one step on the batch

Written for torch 2.11 (the GPU machine's) as well as 2.13: no newer API on these paths.
"""
import argparse
import json
import time
from dataclasses import replace

import torch

import bench_plan
from loss import llip_loss, pairwise_cosine
from model import PRESETS, ImageFeatures, Llip, TextFeatures

# dense bf16 peak FLOP/s by the name CUDA reports (MFU is not computed for other GPUs)
PEAK_FLOPS = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12}


def sync(device):
    if device == 'cuda':
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    """Best wall time of fn over `repeats` runs, after one warm-up run."""
    fn()
    best = float('inf')
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def peak_bytes(fn, device, known=()):
    """Extra peak memory of fn: CUDA's allocator statistics, or on CPU bench_plan.LiveMemory."""
    if device == 'cuda':
        sync(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated() - before
    with bench_plan.LiveMemory(known=known) as live:
        fn()
    return live.peak


def relative_error(x, reference):
    return ((x.double().cpu() - reference).norm() / reference.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- (a) correctness
def check_correctness(device):
    """Tiny model loss and gradients, every loss form and similarity, on the device (fp32, bf16
    autocast) against float64 on CPU: the largest relative error of each."""
    torch.manual_seed(0)
    config = PRESETS['tiny']
    model64 = Llip(config).double()
    images = torch.randn(8, 3, config.image_size, config.image_size, dtype=torch.float64)
    tokens = torch.randint(1, config.vocab_size, (8, config.context_length))
    D, M, K, n = 64, 8, 16, 24
    feats = dict(keys=torch.randn(n, M, K, D // M), values=torch.randn(n, M, K, D // M),
                 queries=torch.randn(n, M, D // M),
                 text_emb=torch.nn.functional.normalize(torch.randn(n, D), dim=-1),
                 out_proj=torch.randn(D, D) / D ** 0.5)

    def run_model(model, dev, dtype):
        model.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dtype == 'bfloat16'):
            loss = model(images.to(dev, model.logit_scale.dtype), tokens.to(dev))
        loss.backward()
        return [loss.detach(), *(p.grad for p in model.parameters())]

    def run_loss(form, dev, dtype, precision):
        leaves = {k: v.to(dev, precision, copy=True).requires_grad_() for k, v in feats.items()}
        image = ImageFeatures(keys=leaves['keys'], values=leaves['values'])
        text = TextFeatures(leaves['queries'], leaves['text_emb'])
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dtype == 'bfloat16'):
            loss = llip_loss(image, text, leaves['out_proj'], 5.0, 10.0, -10.0, chunk_size=5,
                             form=form)
            with torch.no_grad():
                cos = pairwise_cosine(image, text, leaves['out_proj'], 5.0, 7, form)
        loss.backward()
        return [loss.detach(), cos, *(v.grad for v in leaves.values())]

    reference = {'model': run_model(model64, 'cpu', 'float32')}
    for form in ('plain', 'gram', 'mixed'):
        reference[form] = run_loss(form, 'cpu', 'float32', torch.float64)
    tolerance, out = {'float32': 1e-4, 'bfloat16': 5e-2}, {}

    def compare(name, run, ref, dtype):   # a crash is a failed item, not the end of the check
        try:
            error = max(relative_error(a, b) for a, b in zip(run(), ref))
            out[name] = {'relative_error': error, 'ok': error < tolerance[dtype]}
        except RuntimeError as e:
            out[name] = {'relative_error': None, 'ok': False,
                         'error': str(e).strip().splitlines()[0]}
    for dtype in ('float32', 'bfloat16'):
        model = Llip(config).to(device)
        model.load_state_dict(model64.state_dict())
        compare(f'model loss+grads {dtype}', lambda: run_model(model, device, dtype),
                reference['model'], dtype)
        for form in ('plain', 'gram', 'mixed'):
            compare(f'llip_loss {form} + grads + similarity {dtype}',
                    lambda: run_loss(form, device, dtype, torch.float32), reference[form], dtype)
    return out


# ----------------------------------------------------------------------------- (b) learning
def check_learning(device, steps):
    """`steps` AdamW steps of the tiny model on one fixed batch: the loss must fall."""
    torch.manual_seed(0)
    config = PRESETS['tiny']
    model = Llip(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(32, 3, config.image_size, config.image_size, device=device)
    tokens = torch.randint(1, config.vocab_size, (32, config.context_length), device=device)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == 'cuda'):
            loss = model(images, tokens)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {'steps': steps, 'first': losses[0], 'last': losses[-1],
            'ok': losses[-1] < 0.5 * losses[0]}


# ----------------------------------------------------------------------------- (c) speed
def training_step(config, batch, device, grad_ckpt, compile):
    """One training step (forward, backward, AdamW) as a function: bf16 autocast on CUDA, fp32
    on CPU (bf16 matmuls there are slow and say nothing of a GPU)."""
    torch.manual_seed(0)
    model = Llip(config).to(device)
    model.set_grad_checkpointing(grad_ckpt)
    run = torch.compile(model) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, config.image_size, config.image_size, device=device)
    tokens = torch.randint(1, config.vocab_size, (batch, config.context_length), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == 'cuda'):
            loss = run(images, tokens)
        loss.backward()
        opt.step()
    return step


def check_speed(config, batch, device, compile, repeats):
    """images/s and MFU of a training step, with and without grad_ckpt. MFU counts the model's
    FLOPs (no recompute) over the GPU's dense bf16 peak."""
    name = torch.cuda.get_device_name() if device == 'cuda' else 'cpu'
    peak = next((f for key, f in PEAK_FLOPS.items() if key in name), None)
    flops = bench_plan.flops_per_step(config, batch, 1)['total']
    out = {}
    for ckpt in (False, True):
        step = training_step(config, batch, device, ckpt, compile)
        seconds = timed(step, device, repeats)
        out[f'grad_ckpt={ckpt}'] = {'batch': batch, 'seconds': seconds,
                                    'images_per_s': batch / seconds,
                                    'mfu': flops / seconds / peak if peak else None}
    return out


# ----------------------------------------------------------------------------- (d) loss at scale
def check_loss_at_scale(config, local, captions, device, chunks, tower_seconds_per_image):
    """llip_loss forward + backward for `local` images against `captions` captions (bf16 on
    CUDA, fp32 on CPU): time
    (against the towers' step for as many images), peak memory (against the planner's loss
    workspace, for the form loss.pick_form takes), every form, and the Gram form's chunk sweep."""
    D, M, K = config.embed_dim, config.mixer_heads, config.num_mixture
    torch.manual_seed(0)
    leaf = lambda *s: torch.randn(*s, device=device).requires_grad_()
    image = ImageFeatures(keys=leaf(local, M, K, D // M), values=leaf(local, M, K, D // M))
    text = TextFeatures(leaf(captions, M, D // M),
                        torch.nn.functional.normalize(torch.randn(captions, D, device=device),
                                                      dim=-1).requires_grad_())
    out_proj = leaf(D, D)
    inputs = [*image[:2], *text, out_proj]

    def run(form, chunk):
        def call():
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == 'cuda'):
                loss = llip_loss(image, text, out_proj, config.tau, 10.0, -10.0, chunk, form)
            loss.backward()
            for t in inputs:
                t.grad = None
        return call
    towers = tower_seconds_per_image * local
    dtype = 'bfloat16' if device == 'cuda' else 'float32'
    planned = bench_plan.loss_workspace_bytes(config, local, captions, device, dtype)
    out = {'local_images': local, 'captions': captions, 'towers_step_seconds': towers}
    picked = bench_plan.loss_form(config, captions)
    for form, sweep in (('plain', [None]), ('gram', [None, *chunks]), ('mixed', [None])):
        for chunk in sweep:
            seconds = timed(run(form, chunk), device, 2)
            peak = peak_bytes(run(form, chunk), device, known=inputs)
            out[f'{form} chunk={chunk or "default"}'] = {
                'seconds': seconds, 'vs_towers': seconds / towers, 'peak_bytes': peak,
                'planned_bytes': planned if (form, chunk) == (picked, None) else None}
    gram = {k: v['seconds'] for k, v in out.items() if k.startswith('gram')}
    out['fastest_gram_chunk'] = min(gram, key=gram.get)
    out['picked_form'] = picked
    return out


# ----------------------------------------------------------------------------- (e) accumulation
def check_accumulation(device, micro):
    """One feature-cached step over 4 micro-batches of the tiny model against one step on the
    whole batch: the largest relative difference of the gradients (fp32)."""
    try:
        import accumulation
    except ImportError:
        return {'skipped': 'accumulation.py not present'}
    torch.manual_seed(0)
    config = PRESETS['tiny']
    model = Llip(config).to(device)
    images = torch.randn(4 * micro, 3, config.image_size, config.image_size, device=device)
    tokens = torch.randint(1, config.vocab_size, (4 * micro, config.context_length),
                           device=device)
    model(images, tokens).backward()
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    batches = list(zip(images.split(micro), tokens.split(micro)))
    seconds = timed(lambda: (model.zero_grad(set_to_none=True),
                             accumulation.train_step(accumulation.Towers(model), model, batches)),
                    device, 1)
    error = max(relative_error(p.grad, g.double().cpu()) for p, g in zip(model.parameters(),
                                                                          whole))
    return {'micro_batches': 4, 'micro_batch': micro, 'seconds': seconds,
            'gradient_relative_error': error, 'ok': error < 1e-4}


# ----------------------------------------------------------------------------- the report
def main(argv):
    p = argparse.ArgumentParser(prog='bench.py gpu', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda', choices=['cuda', 'cpu'],
                   help="'cuda' (the check), or 'cpu' to run the same code without a GPU")
    p.add_argument('--small', action='store_true',
                   help='small shapes and few steps (what CI runs on CPU)')
    p.add_argument('--compile', default=None, choices=['yes', 'no'],
                   help='torch.compile the vit_b16 step (default: yes on CUDA, no on CPU)')
    p.add_argument('--out', default='gpu_report.json', help='where the JSON report goes')
    args = p.parse_args(argv)
    device = args.device
    if device == 'cuda' and not torch.cuda.is_available():
        return ("error: no CUDA device: `bench.py gpu` checks a GPU; `--device=cpu --small` runs "
                "the same code on CPU")
    compile = (args.compile or ('yes' if device == 'cuda' else 'no')) == 'yes'
    torch.backends.cuda.matmul.allow_tf32 = False        # (a) compares fp32 with fp32
    small = args.small
    b16 = bench_plan.validation_configs()['vit_b16'] if small else PRESETS['vit_b16']
    report = {'device': torch.cuda.get_device_name() if device == 'cuda' else 'cpu',
              'torch': torch.__version__, 'small': small, 'compile': compile, 'skipped': []}
    start = time.perf_counter()
    report['a_correctness'] = check_correctness(device)
    report['b_learning'] = check_learning(device, 20 if small else 200)
    torch.backends.cuda.matmul.allow_tf32 = True
    report['c_speed'] = check_speed(b16, 4 if small else 256, device, compile, 1 if small else 5)
    per_image = 1 / report['c_speed']['grad_ckpt=False']['images_per_s']
    report['d_loss_at_scale'] = check_loss_at_scale(
        b16, 8 if small else 128, 256 if small else 32768, device,
        [1, 4] if small else [1, 2, 4, 8, 16, 32], per_image)
    report['e_accumulation'] = check_accumulation(device, 2 if small else 16)
    if device != 'cuda':
        report['skipped'] += ['MFU (no GPU peak on CPU)', 'the CUDA allocator (peak memory is '
                              "LiveMemory's on CPU)", 'TF32 and the CUDA kernels',
                              'bf16 in (b)-(d) (fp32 on CPU; (a) checks bf16 autocast)']
    if not compile:
        report['skipped'].append('torch.compile (--compile=yes to run it)')
    if 'skipped' in report['e_accumulation']:
        report['skipped'].append('(e) ' + report['e_accumulation']['skipped'])
    if small:
        report['skipped'].append('the paper shapes (--small: 2-layer B/16 at 64 px, 256 captions)')
    report['seconds'] = time.perf_counter() - start
    with open(args.out, 'w') as f:
        json.dump(report, f, indent=1)
    print_report(report, args.out)
    failed = [k for k, v in report['a_correctness'].items() if not v['ok']]
    failed += ['b_learning'] * (not report['b_learning']['ok'])
    failed += ['e_accumulation'] * (report['e_accumulation'].get('ok') is False)
    return f"error: failed: {', '.join(failed)} (see {args.out})" if failed else None


def print_report(r, path):
    print(f"GPU check on {r['device']}, torch {r['torch']}, compile={r['compile']}, "
          f"{r['seconds']:.0f} s; report in {path}")
    for name, v in r['a_correctness'].items():
        what = (f"rel. error {v['relative_error']:.1e}" if v['relative_error'] is not None
                else f"raised {v['error']}")
        print(f"(a) {name:<48} {what}  {'ok' if v['ok'] else 'FAIL'}")
    b = r['b_learning']
    print(f"(b) {b['steps']} tiny steps: loss {b['first']:.3f} -> {b['last']:.3f}  "
          f"{'ok' if b['ok'] else 'FAIL'}")
    for name, v in r['c_speed'].items():
        mfu = f"{v['mfu']:.1%}" if v['mfu'] is not None else 'n/a'
        print(f"(c) vit_b16 step {name:<15} batch {v['batch']}: {v['images_per_s']:.1f} img/s, "
              f"MFU {mfu}")
    d = r['d_loss_at_scale']
    print(f"(d) loss, {d['local_images']} images x {d['captions']} captions (towers' step "
          f"{d['towers_step_seconds']:.3f} s); fastest Gram chunk: {d['fastest_gram_chunk']}")
    for name, v in d.items():
        if isinstance(v, dict):
            planned = (f", planned {v['planned_bytes'] / 2 ** 20:.0f} MiB"
                       if v['planned_bytes'] else '')
            print(f"    {name:<18} {v['seconds']:.3f} s ({v['vs_towers']:.2f} x towers), "
                  f"peak {v['peak_bytes'] / 2 ** 20:.0f} MiB{planned}")
    e = r['e_accumulation']
    print(f"(e) accumulation: " + (f"skipped: {e['skipped']}" if 'skipped' in e else
                                   f"{e['micro_batches']} x {e['micro_batch']}, gradient rel. "
                                   f"error {e['gradient_relative_error']:.1e}, "
                                   f"{'ok' if e['ok'] else 'FAIL'}"))
    for s in r['skipped']:
        print(f"skipped: {s}")
