r"""
What the towers of a trained run know, each measured against the same model at init (the
weights train.py started from, rebuilt from the run's --seed): markdown tables, one plot.

    # how alike the text tower makes two captions that differ in one attribute (colour, shape,
    # size, place): 1.000 means it does not tell that attribute's values apart
    python -m runs.diagnose captions runs/study/ladder/*,seed=0/ --out=runs/captions.png \
        --table=runs/captions.md
    # what the image tower alone knows: a linear probe of its frozen output on one-object
    # scenes, per attribute (zero-shot needs the text tower too)
    python -m runs.diagnose probe runs/study/ladder/*,seed=0/ --table=runs/probe.md
    # how alike the image vectors of different images are: the mean cosine between two
    # images' z_i (1: every image gets one vector, nothing to learn from)
    python -m runs.diagnose spread runs/study/ladder/pool=cls,seed=0/ runs/study/tokens/*/ \
        --table=runs/spread.md

    python -m pytest tests/test_diagnose.py      # what these numbers are checked against

A run is a train.py --out_dir (its newest checkpoint, ckpt.pt, and config.json for the seed) or
a checkpoint file. Images come from the synthetic data (data/synthetic, written by train.py on
first use). The plots of the features themselves (spectrum, mixing, attention) are
analysis.py's; the tables and plots of the runs' logs are report.py's.
"""
import json
import os
import random

import matplotlib
matplotlib.use('Agg')   # files only, no display
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

import data
import eval as llip_eval
import synthetic
from analysis import (add_command, add_data_flag, checkpoint_path, load_images, load_model,
                      run, save, subcommands)
from model import Llip
from runs.report import write_table


def run_name(path):
    """The run directory's name, for table rows."""
    return checkpoint_path(path).resolve().parent.name


# ----------------------------------------------------------------------------- captions
# the attributes of a synthetic object: which of synthetic._say's captions names each, and its
# values
ATTRIBUTES = {'color': ('color', sorted(synthetic.COLORS)),
              'shape': ('shape', list(synthetic.SHAPES)),
              'size': ('size', sorted(synthetic.SIZES)),
              'place': ('place', sorted(synthetic.PLACES))}


def caption_pairs(attribute, n=200, seed=0):
    """n captions of random objects, each paired with the caption of the same object with only
    attribute changed, to another random value: [('a small circle', 'a large circle'), ...];
    the same seed, the same pairs."""
    kind, values = ATTRIBUTES[attribute]
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        o = {a: rng.choice(vs) for a, (_, vs) in ATTRIBUTES.items()}
        other = {**o, attribute: rng.choice([v for v in values if v != o[attribute]])}
        pairs.append((synthetic._say(kind, o), synthetic._say(kind, other)))
    return pairs


@torch.no_grad()
def pair_cosine(model, pairs):
    """The mean over the pairs of the cosine of their two text embeddings z'_j; 1 where the
    text tower maps the two captions of every pair to one vector."""
    first = llip_eval.encode_texts(model, [a for a, _ in pairs]).emb      # (N, D), normalised
    second = llip_eval.encode_texts(model, [b for _, b in pairs]).emb
    return (first * second).sum(dim=-1).mean().item()


def attribute_cosines(model, n=200, seed=0):
    """{attribute: pair_cosine of n caption pairs that differ only in it}."""
    return {a: pair_cosine(model, caption_pairs(a, n, seed)) for a in ATTRIBUTES}


def run_seed(path):
    """The seed in config.json beside the checkpoint (train.py's --seed), or 0 without one."""
    config = checkpoint_path(path).parent / 'config.json'
    return json.loads(config.read_text()).get('seed', 0) if config.is_file() else 0


def initial_model(config, seed):
    """The weights train.py started from: Llip(config, seed=its --seed), the same draws
    (model.init_weights); the caller's random state is left as it was."""
    return Llip(config, seed=seed).eval()


def captions_table(rows, n, seed):
    """[(run, {attribute: cosine} trained, at init)] -> markdown, a row each for both."""
    examples = '; '.join(f"{a}: '{p}' / '{q}'"
                         for a in ATTRIBUTES for p, q in caption_pairs(a, 1, seed))
    lines = [f"Mean cosine of the text embeddings z'_j of {n} pairs of captions that differ only "
             f"in the attribute (e.g. {examples}). 1.000: the text tower does not tell the "
             f"attribute's values apart; at init: the run's model before its first step.\n",
             '| run | weights | ' + ' | '.join(ATTRIBUTES) + ' |',
             '|---' * (len(ATTRIBUTES) + 2) + '|']
    for name, trained, init in rows:
        for weights, cos in (('trained', trained), ('at init', init)):
            cells = ' | '.join(f'{cos[a]:.3f}' for a in ATTRIBUTES)
            lines.append(f'| {name} | {weights} | {cells} |')
    return '\n'.join(lines) + '\n'


def cmd_captions(args):
    rows = []
    for path in args.runs:
        model = load_model(path)
        init = initial_model(model.config, run_seed(path))
        rows.append((run_name(path),
                     attribute_cosines(model, args.pairs, args.seed),
                     attribute_cosines(init, args.pairs, args.seed)))
    write_table(captions_table(rows, args.pairs, args.seed), args.table)

    # one group per attribute: for each run its trained bar, then a paler hatched one at init
    fig, ax = plt.subplots(layout='constrained',
                           figsize=(2 + len(ATTRIBUTES) * max(1.5, 0.5 * len(rows)), 4))
    width = 0.8 / (2 * len(rows))
    for n, (name, trained, init) in enumerate(rows):
        for j, (cos, style) in enumerate(((trained, dict(label=name)),
                                          (init, dict(label=f'{name} at init', alpha=0.4,
                                                      hatch='//')))):
            x = [i + (2 * n + j + 0.5 - len(rows)) * width for i in range(len(ATTRIBUTES))]
            ax.bar(x, [cos[a] for a in ATTRIBUTES], width, color=f'C{n % 10}', **style)
    # cosines near 1 are what matters: the axis starts a little below the smallest, not at 0
    low = min(cos[a] for _, *both in rows for cos in both for a in ATTRIBUTES)
    bottom = max(-1.0, low - 0.25 * (1 - low) - 0.005)
    ax.set_ylim(bottom, 1 + 0.03 * (1 - bottom))
    ax.axhline(1.0, color='gray', linestyle='--', linewidth=0.8)
    ax.set_xticks(range(len(ATTRIBUTES)), list(ATTRIBUTES))
    ax.set_ylabel('mean cosine of captions differing in this attribute', fontsize=8)
    ax.set_title(f"Text embeddings z'_j of {args.pairs} caption pairs per attribute "
                 f'(1: the values are not told apart)', fontsize=9)
    ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1, 1))   # beside the bars
    save(fig, args.out)


# ----------------------------------------------------------------------------- linear probe
def probe_scenes(n, image_size, seed=0):
    """n one-object synthetic scenes and their images (n, 3, S, S), drawn as the zero-shot
    splits draw theirs: every attribute at random."""
    rng = random.Random(f'probe/{seed}')
    scenes = [synthetic._scene(rng, n_objects=1) for _ in range(n)]
    images = [data.to_tensor(Image.fromarray(synthetic._draw(s, rng, image_size))) for s in scenes]
    return scenes, torch.stack(images)


@torch.no_grad()
def image_tower_features(model, images, batch_size=256):
    """The ViT's output before any pooling: its learned tokens side by side, (N, T * W_v)."""
    rows = [model.visual(images[s:s + batch_size]) for s in range(0, len(images), batch_size)]
    return rearrange(torch.cat(rows), 'n t w -> n (t w)')


def probe_accuracy(features, labels, n_train, steps=300, weight_decay=1e-3):
    """Held-out accuracy of a linear classifier (softmax regression, full-batch Adam) trained on
    the first n_train rows of standardised features, tested on the rest."""
    mean, std = features[:n_train].mean(dim=0), features[:n_train].std(dim=0) + 1e-6
    x = (features - mean) / std
    classes = int(labels.max()) + 1
    with torch.enable_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        w = torch.zeros(x.shape[1], classes, requires_grad=True)
        b = torch.zeros(classes, requires_grad=True)
        optimizer = torch.optim.Adam([w, b], lr=1e-2)
        for _ in range(steps):
            loss = F.cross_entropy(x[:n_train] @ w + b, labels[:n_train])
            optimizer.zero_grad()
            (loss + weight_decay * w.pow(2).sum()).backward()
            optimizer.step()
    return ((x[n_train:] @ w + b).argmax(dim=1) == labels[n_train:]).float().mean().item()


def attribute_probes(model, scenes, images, n_train):
    """{attribute: probe accuracy} for colour, shape, size and place of the one object."""
    features = image_tower_features(model, images)
    values = {'color': sorted(synthetic.COLORS), 'shape': list(synthetic.SHAPES),
              'size': sorted(synthetic.SIZES), 'place': sorted(synthetic.PLACES)}
    labels = {a: torch.tensor([vs.index(s['objects'][0][a]) for s in scenes])
              for a, vs in values.items()}
    return {a: probe_accuracy(features, labels[a], n_train) for a in values}


def cmd_probe(args):
    lines = [f"Held-out accuracy of a linear probe of the image tower's output (its learned tokens "
             f"side by side) on {args.images} one-object scenes, {args.train} to fit, the rest to "
             f"test; chance: colour 0.125, shape 0.167, size 0.5, place 0.2. At init: the run's "
             f"model before its first step.\n", '| run | weights | color | shape | size | place |',
             '|---|---|---|---|---|---|']
    for path in args.runs:
        model = load_model(path)
        scenes, images = probe_scenes(args.images, model.config.image_size, args.seed)
        init = initial_model(model.config, run_seed(path))
        for weights, m in (('trained', model), ('at init', init)):
            acc = attribute_probes(m, scenes, images, args.train)
            cells = ' | '.join(f'{acc[a]:.3f}' for a in ('color', 'shape', 'size', 'place'))
            lines.append(f'| {run_name(path)} | {weights} | {cells} |')
    write_table('\n'.join(lines) + '\n', args.table)


# ----------------------------------------------------------------------------- spread
@torch.no_grad()
def image_vectors(model, images, batch_size=256):
    """z_i (N, D), normalised: the image vector the loss compares with every caption, for the
    pools where it does not depend on the caption (not llip)."""
    if model.config.pool == 'llip':
        raise ValueError("pool=llip: its image vector depends on the caption; spread is for "
                         "cls, registers, avg and learned")
    return torch.cat([model.encode_image(images[s:s + batch_size]).emb
                      for s in range(0, len(images), batch_size)])


def mean_cosine(z):
    """The mean over pairs of different rows of z (N, D), each of norm 1, of their cosine:
    |sum_i z_i|^2 = N + sum over i != j of z_i . z_j."""
    n, total = len(z), z.double().sum(dim=0)
    return ((total @ total - n) / (n * (n - 1))).item()


def cmd_spread(args):
    where = os.path.relpath(args.data)   # the table is written for the repository, not one machine
    lines = [f"Mean cosine between the image vectors z_i of two different images, over "
             f"{args.images} images of {where}; 1: every image gets the same vector. At "
             f"init: the run's model before its first step.\n",
             '| run | pool | K | at init | trained |', '|---|---|---|---|---|']
    images = None
    for path in args.runs:
        model = load_model(path)
        if images is None:
            images, _ = load_images(args.data, model.config.image_size, args.images)
        init = initial_model(model.config, run_seed(path))
        cos = [mean_cosine(image_vectors(m, images)) for m in (init, model)]
        lines.append(f'| {run_name(path)} | {model.config.pool} | {model.config.num_tokens} | '
                     f'{cos[0]:.3f} | {cos[1]:.3f} |')
    write_table('\n'.join(lines) + '\n', args.table)


# ----------------------------------------------------------------------------- command line
def parser():
    p, sub = subcommands(__doc__)
    s = add_command(sub, 'captions', cmd_captions,
                    'mean cosine of the text embeddings of captions that differ in one '
                    'attribute (colour, shape, size, place), trained and at init', 'captions.png')
    s.add_argument('runs', nargs='+', help='run directories or train.py checkpoints')
    s.add_argument('--table', help='also write the markdown table to this file')
    s.add_argument('--pairs', type=int, default=200, help='caption pairs per attribute')
    s.add_argument('--seed', type=int, default=0,
                   help='seed of the random objects the captions describe')

    s = sub.add_parser('probe', help="a linear probe of the image tower's output per attribute, "
                                     "trained and at init (a markdown table)")
    s.set_defaults(func=cmd_probe)
    s.add_argument('runs', nargs='+', help='run directories or train.py checkpoints')
    s.add_argument('--table', help='write the markdown table to this file (default: stdout)')
    s.add_argument('--images', type=int, default=3000, help='one-object scenes drawn')
    s.add_argument('--train', type=int, default=2000, help='of them, how many fit the probe')
    s.add_argument('--seed', type=int, default=0, help='seed of the scenes')

    s = sub.add_parser('spread', help='the mean cosine between the image vectors of two '
                                      'different images, trained and at init (a markdown table)')
    s.set_defaults(func=cmd_spread)
    s.add_argument('runs', nargs='+', help='run directories or train.py checkpoints (not llip)')
    s.add_argument('--table', help='write the markdown table to this file (default: stdout)')
    add_data_flag(s)
    s.add_argument('--images', type=int, default=1000, help='how many images')
    return p


def main(argv=None):
    run(parser(), argv)


if __name__ == '__main__':
    main()
