r"""
What a trained Llip of the miniature reproduction (arXiv 2405.00740) has learned, read from its
checkpoints: PNG files.

    # Figure 5: singular values of the covariance of the visual features, several checkpoints
    python analysis.py spectrum out/llip out/cls                  # writes out/spectrum.png
    # the mixing weights Phi of one image for its own captions and for other images' captions
    python analysis.py mixing out/llip --index=0 --unrelated=4    # writes out/llip/mixing.png
    # where each mixture token looks: its attention over the patches in the last ViT block
    python analysis.py attention out/llip/ckpt.pt --out=attention.png
    python -m pytest tests/test_analysis.py   # what these numbers are checked against

A checkpoint is one train.py wrote, or a run directory (train.py's --out_dir): its newest
checkpoint, ckpt.pt. The PNG goes into the run directory unless --out says otherwise. Images
come from the synthetic retrieval split (data/synthetic/retrieval, written by train.py on first
use), whose .txt holds all of an image's captions; --data takes any shards. The plots and
tables of the runs' logs alone (curves, ablation, sweep, lr, pressure) are runs/report.py's;
what the towers know against their init (captions, probe, spread), runs/diagnose.py's.
Everything runs on CPU; `python analysis.py SUBCOMMAND --help` lists the flags.
"""
import argparse
import itertools
import math
import os
import textwrap
from pathlib import Path

import matplotlib
matplotlib.use('Agg')   # files only, no display
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from einops import einsum, rearrange

import data
import llip
from llip import checkpoint_path
from loss import mixing_weights

HERE = Path(__file__).resolve().parent
RETRIEVAL = HERE / 'data' / 'synthetic' / 'retrieval'
MIXER_POOLS = ('avg', 'learned', 'llip')   # pools whose image vector is made from all K tokens


# ----------------------------------------------------------------------------- inputs
def run_folder(path):
    """Where a checkpoint argument's run lives: a run directory itself, else the folder holding
    the checkpoint (a file, or a sharded checkpoint's directory)."""
    path = Path(path).resolve()
    return path if path.is_dir() and not (path / 'manifest.json').exists() else path.parent


def out_path(args, paths, name):
    """--out, or by default NAME in the run directory of the checkpoint(s): with several runs,
    in the folder that holds them all (not wherever the command was started)."""
    if args.out:
        return args.out
    return str(Path(os.path.commonpath([run_folder(p) for p in paths])) / name)


def load_model(path):
    """A run directory (its ckpt.pt, or newest checkpoint), a checkpoint file or a sharded
    checkpoint's directory (llip.checkpoint_path)."""
    return llip.load_checkpoint(checkpoint_path(path))


def describe(model, path):
    """'llip K=16 (run directory)', for titles and legends."""
    c = model.config
    return f"{c.pool} K={c.num_tokens} ({checkpoint_path(path).resolve().parent.name})"


def load_images(source, image_size, n):
    """The first n images with captions of shards: (images (N, 3, S, S), [captions of each])."""
    transform = data.eval_transform(image_size)
    images, captions = [], []
    for key, image, caps in data.read_shards(str(source)):
        if image is None or not caps:
            continue
        images.append(transform(image))
        captions.append(caps)
        if len(images) == n:
            break
    if not images:
        raise ValueError(f"--data={source}: no image with captions in these shards")
    return torch.stack(images), captions


def check_index(args, images):
    if not 0 <= args.index < len(images):
        raise ValueError(f"--index={args.index}: --data={args.data} has {len(images)} images "
                         f"with captions")


def show_image(ax, image):
    """Undo CLIP's normalisation of one (3, S, S) image and draw it."""
    mean, std = torch.tensor(data.MEAN)[:, None, None], torch.tensor(data.STD)[:, None, None]
    ax.imshow(rearrange((image * std + mean).clamp(0, 1), 'c h w -> h w c').numpy())
    ax.set_xticks([]), ax.set_yticks([])


# ----------------------------------------------------------------------------- spectrum (Figure 5)
def covariance_spectrum(x):
    """Singular values of the covariance of the rows of x (N, D), descending, divided by the
    largest (Jing et al. 2022, as the paper's Figure 5): (min(N, D),)."""
    x = x.double()
    x = x - x.mean(dim=0)
    cov = x.T @ x / (x.shape[0] - 1)                                     # (D, D)
    s = torch.linalg.svdvals(cov)                                        # descending
    return (s / s[0])[:min(x.shape)]


@torch.no_grad()
def visual_features(model, images, features='tokens', batch_size=256):
    """The rows whose covariance the spectrum is taken of.
    tokens: the visual encoder's output, as the paper: the K mixture tokens concatenated along
            the batch axis (N*K, W_v) for avg / learned / llip, the first token (N, W_v) for cls
            and registers (their image vector reads only that one);
    values: after the projections: the values V (N*K, D) for avg / learned / llip, the
            projected first token (N, D), before normalisation, for cls and registers."""
    rows = []
    for s in range(0, len(images), batch_size):
        h = model.visual(images[s:s + batch_size])                       # (B, T, W_v)
        if model.config.pool not in MIXER_POOLS:
            rows.append(h[:, 0] if features == 'tokens' else h[:, 0] @ model.proj)
        elif features == 'tokens':
            rows.append(rearrange(h, 'b k w -> (b k) w'))
        else:
            values = model.project_mixture_tokens(h, model.v_proj, model.v_norm)   # (B, M, K, d)
            rows.append(rearrange(values, 'b m k d -> (b k) (m d)'))
    return torch.cat(rows)


def cmd_spectrum(args):
    images = None
    fig, ax = plt.subplots(layout='constrained', figsize=(6, 4.5))
    labels = args.labels.split(',') if args.labels else []
    for n, path in enumerate(args.ckpts):
        model = load_model(path)
        if images is None or images.shape[-1] != model.config.image_size:
            images, _ = load_images(args.data, model.config.image_size, args.images)
        rows = visual_features(model, images, args.features)
        s = covariance_spectrum(rows)
        label = labels[n] if n < len(labels) else describe(model, path)
        # numerically zero directions are left out: ln_post's output, for one, spans D - 1 of D
        s = s[s > 1e-12]
        ax.plot(torch.arange(1, len(s) + 1), s, label=f'{label}: {rows.shape[0]} x {rows.shape[1]}')
        print(f'{label}: {tuple(rows.shape)} rows, rank {len(s)}, '
              f'singular values above 1e-3 of the largest: {(s > 1e-3).sum().item()}')
    ax.set_yscale('log')
    ax.set_xlabel('singular value rank')
    ax.set_ylabel('singular value / largest')
    ax.set_title(f'Spectrum of the covariance of the visual features ({args.features}, '
                 f'{len(images)} images)', fontsize=9)
    ax.legend(fontsize=8)
    save(fig, out_path(args, args.ckpts, 'spectrum.png'))


# ------------------------------------------------------------------------- mixing weights (eq. 1)
@torch.no_grad()
def caption_mixing(model, image, captions, tau=None):
    """Phi of one image (3, S, S) for each caption: (T, M, K)."""
    if model.config.pool != 'llip':
        raise ValueError(f"mixing weights depend on the caption only for pool=llip; this "
                         f"checkpoint has pool={model.config.pool} (avg: uniform weights, "
                         f"learned: one shared query)")
    c = model.config
    keys = model.encode_image(image[None]).keys                                      # (1, M, K, d)
    tokens = data.tokenize(captions, c.context_length, c.tokenizer)
    queries = model.encode_text(tokens).queries                                       # (T, M, d)
    return mixing_weights(queries, keys, c.tau if tau is None else tau)[0]          # eq. 1


def unrelated_captions(source, index, own, n):
    """n captions of the images after image `index` of the shards, each from another image,
    none of them `own` (the image's own captions: all that is true of it in the synthetic data)
    and no two alike; each image's first such caption (a synthetic image's first captions, 'a
    square', are often shared, so first captions alone can give fewer than n)."""
    found, images = [], (caps for _, image, caps in data.read_shards(str(source))
                         if image is not None and caps)   # as load_images counts them
    for caps in itertools.islice(images, index + 1, None):
        if len(found) == n:
            break
        new = [c for c in caps if c not in own and c not in found]
        found += new[:1]
    return found


def cmd_mixing(args):
    if args.unrelated < 0:
        raise ValueError(f'--unrelated={args.unrelated}: expected a number >= 0')
    model = load_model(args.ckpt)
    images, captions = load_images(args.data, model.config.image_size, args.index + 1)
    check_index(args, images)
    own = captions[args.index]
    others = unrelated_captions(args.data, args.index, own, args.unrelated)
    if len(others) < args.unrelated:
        print(f'--unrelated={args.unrelated}: --data has only {len(others)} other captions')
    texts = own + others
    phi = caption_mixing(model, images[args.index], texts, args.tau)                # (T, M, K)
    T, M, K = phi.shape
    entropy = -(phi * phi.clamp_min(1e-12).log()).sum(-1).mean().item()
    print(f'mean entropy of Phi over the K tokens: {entropy:.3f} '
          f'(uniform weights: log K = {math.log(K):.3f})')

    # top row: the image and the heads' average (with the captions); below: one panel per head
    cols = min(M, 4)
    rows = 1 + math.ceil(M / cols)
    fig = plt.figure(layout='constrained', figsize=(3 * cols + 3, 0.28 * T * rows + 1.5))
    grid = fig.add_gridspec(rows, cols + 1, width_ratios=[1.2] + [1] * cols)
    vmax = phi.max().item()
    show_image(fig.add_subplot(grid[0, 0]), images[args.index])
    ax = fig.add_subplot(grid[0, 1:])
    im = ax.imshow(phi.mean(dim=1).numpy(), aspect='auto', cmap='viridis', vmin=0, vmax=vmax)
    ax.set_yticks(range(T), texts, fontsize=7)
    for n, tick in enumerate(ax.get_yticklabels()):
        tick.set_color('tab:green' if n < len(own) else 'tab:red')
    ax.set_xticks(range(K))
    ax.set_xlabel('mixture token k')
    ax.set_title(f'Phi averaged over the {M} heads (uniform: 1/K = {1 / K:.3f}); '
                 f'green: this image\'s captions, red: other images\'', fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.02)
    for m in range(M):
        ax = fig.add_subplot(grid[1 + m // cols, 1 + m % cols])
        ax.imshow(phi[:, m].numpy(), aspect='auto', cmap='viridis', vmin=0, vmax=vmax)
        ax.set_title(f'head {m}', fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
    tau = model.config.tau if args.tau is None else args.tau
    fig.suptitle(f'Mixing weights of image {args.index} '
                 f'({describe(model, args.ckpt)}, tau={tau:g})')
    save(fig, out_path(args, [args.ckpt], 'mixing.png'))


# ----------------------------------------------------------------------------- attention maps
@torch.no_grad()
def mixture_attention(model, images):
    """Attention of the T learned tokens over all T + P tokens in the last vision block,
    recomputed from the block's input (captured by a hook) with its ln_1 and in_proj:
    (N, heads, T, T + P); each row sums to 1, the patches are the last P columns."""
    block = model.visual.transformer.blocks[-1]
    captured = []
    hook = block.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0]))
    try:
        model.visual(images)
    finally:
        hook.remove()
    x = block.ln_1(captured[0])                                          # (N, T + P, W)
    qkv = F.linear(x, block.attn.in_proj_weight, block.attn.in_proj_bias)
    q, k, _ = rearrange(qkv, 'n l (three h d) -> three n h l d', three=3, h=block.attn.heads)
    T = model.config.num_tokens
    logits = einsum(q[:, :, :T], k, 'n h t d, n h l d -> n h t l') / math.sqrt(q.shape[-1])
    return logits.softmax(dim=-1)


def cmd_attention(args):
    model = load_model(args.ckpt)
    c = model.config
    images, captions = load_images(args.data, c.image_size, args.index + 1)
    check_index(args, images)
    image = images[args.index]
    attn = mixture_attention(model, image[None])[0]                     # (H, T, T + P)
    if not -1 <= args.head < attn.shape[0]:
        raise ValueError(f"--head={args.head}: the last vision block has {attn.shape[0]} heads "
                         f"(or -1: their average)")
    attn = attn.mean(dim=0) if args.head < 0 else attn[args.head]        # (T, T + P)
    T, g = c.num_tokens, c.image_size // c.patch_size
    patches = attn[:, T:]                                                # (T, P)
    share = patches.sum(dim=-1)                                          # attention on patches
    maps = rearrange(patches / share[:, None], 't (gh gw) -> t 1 gh gw', gh=g)
    # (T, S, S), one patch = p x p pixels
    maps = F.interpolate(maps, size=c.image_size, mode='nearest')[:, 0]

    cols = min(T + 1, 6)
    rows = math.ceil((T + 1) / cols)
    fig, axes = plt.subplots(rows, cols, layout='constrained', figsize=(2 * cols, 2.1 * rows + 0.6),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis('off')
    show_image(axes[0, 0], image)
    axes[0, 0].axis('on')
    axes[0, 0].set_title('image', fontsize=8)
    for t in range(T):
        ax = axes.flat[t + 1]
        show_image(ax, image)
        ax.imshow(maps[t].numpy(), cmap='inferno', alpha=args.alpha)
        ax.set_title(f'token {t}: {100 * share[t]:.0f}% on patches', fontsize=7)
    heads = 'heads averaged' if args.head < 0 else f'head {args.head}'
    fig.suptitle(f'Attention of each mixture token over the patches, last vision block, {heads}\n'
                 f'({describe(model, args.ckpt)}; each map normalised over the patches)',
                 fontsize=9)
    # a label of the figure, not free text: the layout makes room for it below the panels
    caption = ' | '.join(captions[args.index][:4])
    fig.supxlabel('\n'.join(textwrap.wrap(caption, 18 * cols)), fontsize=7)
    save(fig, out_path(args, [args.ckpt], 'attention.png'))


# ----------------------------------------------------------------------------- output
def save(fig, path):
    """Write a figure (its format from the file name: PNG for .png) and close it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f'wrote {path}')


# ----------------------------------------------------------------------------- command line
# runs/report.py and runs/diagnose.py build their command lines with these as well
def subcommands(doc):
    """A parser that shows doc (the module docstring) as its help, and its subparsers."""
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    return p, p.add_subparsers(dest='command', required=True)


def add_command(sub, name, func, help, out, out_help='the PNG file to write'):
    """A subcommand that runs func(args) and writes --out (out=None: the command picks it)."""
    s = sub.add_parser(name, help=help, description=help)
    s.set_defaults(func=func)
    s.add_argument('--out', default=out,
                   help=out_help if out is None else f'{out_help} (default: {out})')
    return s


def run(parser, argv=None):
    """Parse argv and run the subcommand, without autograd (nothing here trains)."""
    args = parser.parse_args(argv)
    with torch.no_grad():
        run_command(args)


def run_command(args):
    try:
        args.func(args)
    # bad input: the message, not a traceback
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise SystemExit(f'error: {e}')


def add_data_flag(s):
    """--data: the captioned images a subcommand reads (runs/diagnose.py's too)."""
    s.add_argument('--data', default=str(RETRIEVAL), help='shards with captioned images (brace '
                   'pattern, directory or list); default: the synthetic retrieval split')


def one_image_command(sub, name, func, help, which=''):
    """A subcommand that plots one image of --data (--index) for one checkpoint: NAME.png."""
    s = add_command(sub, name, func, help, None, f'the PNG file to write (default: {name}.png '
                    'in the run directory)')
    s.add_argument('ckpt', help=f'a train.py checkpoint or run directory{which}')
    add_data_flag(s)
    s.add_argument('--index', type=int, default=0, help='which image of --data')
    return s


def parser():
    p, sub = subcommands(__doc__)

    s = add_command(sub, 'spectrum', cmd_spectrum,
                    'singular values of the covariance of the visual features (Figure 5)', None,
                    'the PNG file to write (default: spectrum.png in the run directory; with '
                    'several, in the folder that holds them)')
    s.add_argument('ckpts', nargs='+',
                   help='train.py checkpoints or run directories, one line each')
    add_data_flag(s)
    s.add_argument('--images', type=int, default=1000, help='how many images (the paper: 5000)')
    s.add_argument('--features', choices=['tokens', 'values'], default='tokens',
                   help="tokens: the ViT's output (K mixture tokens along the batch axis, or the "
                        "first token for cls/registers); values: after the value projection "
                        "(or proj)")
    s.add_argument('--labels', help='comma-separated legend labels, one per checkpoint '
                                    '(default: pool, K, directory)')

    s = one_image_command(sub, 'mixing', cmd_mixing, "mixing weights Phi of one image for its "
                          "captions and others' (pool=llip)", ' with pool=llip')
    s.add_argument('--unrelated', type=int, default=4,
                   help="how many other images' captions to add")
    s.add_argument('--tau', type=float, default=None,
                   help="mixing temperature (default: the model's)")

    s = one_image_command(sub, 'attention', cmd_attention,
                          "each mixture token's attention over the patches, last vision block")
    s.add_argument('--head', type=int, default=-1,
                   help='one attention head, or -1 for the average over heads')
    s.add_argument('--alpha', type=float, default=0.6,
                   help='opacity of the heat map over the image')
    return p


def main(argv=None):
    run(parser(), argv)


if __name__ == '__main__':
    main()
