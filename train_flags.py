"""
train.py's flags: one flat argparse namespace, --key=value, help on every flag, checked in one
place (check_flags) before any work, so that a bad value is a one-line error naming the flag.
Every field of model.LlipConfig is also a flag that overrides the preset (--pool=avg
--num_mixture=64 ...).

    python train.py --help       # every flag, with its help
"""
import argparse
import dataclasses
import importlib
import math
import os
import sys

import torch

import accumulation
import data
import sharding
import synthetic
from model import PRESETS, LlipConfig

# allow_abbrev=False: a typo such as --step must not silently mean --steps
parser = argparse.ArgumentParser(prog='train.py', allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


def boolean(text):
    """A bool flag's value. Anything but these words is an error: 'on' or a typo must not
    quietly turn a feature off."""
    words = {'true': True, '1': True, 'yes': True, 'false': False, '0': False, 'no': False}
    if text.lower() not in words:
        raise argparse.ArgumentTypeError(f'{text!r}: expected one of true/false/1/0/yes/no')
    return words[text.lower()]


def bool_flag(name, default, help):
    """--name, --name=true/false (every flag takes --key=value) and --no-name."""
    parser.add_argument(f'--{name}', type=boolean, nargs='?', const=True, default=default,
                        help=f'{help} (--{name}=true/false, or --no-{name})')
    parser.add_argument(f'--no-{name}', dest=name, action='store_false',
                        help=f'same as --{name}=false')


parser.add_argument('--model', default='tiny', choices=sorted(PRESETS),
               help='model preset (model.PRESETS)')
parser.add_argument('--data', default='synthetic',
               help="training shards: a brace pattern 'dir/{00000..00099}.tar', a directory, or "
                    "'synthetic' (the built-in dataset, generated into --synthetic_dir on first "
                    "use)")
bool_flag('caption_lines', False,
          "each line of a sample's .txt is a caption of its own, one drawn each time it is read "
          '(COCO-style shards; the built-in data always is); default: the whole .txt is one')
parser.add_argument('--synthetic_dir', default='data/synthetic',
               help='where the built-in synthetic data lives')
parser.add_argument('--synthetic_objects', type=int, default=3,
               help='built-in data: 1 to this many objects per image (at most 5; another value '
                    'needs its own --synthetic_dir)')
parser.add_argument('--synthetic_captions', default=','.join(synthetic.OBJECT_CAPTIONS),
               help="built-in data: what is said of each object, of "
                    f"{','.join(synthetic.CAPTION_KINDS)} ('where': the place alone; another "
                    "value needs its own --synthetic_dir)")
parser.add_argument('--out_dir', default='out',
               help='checkpoints, log.jsonl and config.json go here (on several nodes: one shared '
                    'path)')
parser.add_argument('--steps', type=int, default=2500, help='optimizer steps in total')
parser.add_argument('--batch_size', type=int, default=None,
               help=f'images (and captions) per rank per micro-batch (default '
                    f'{accumulation.DEFAULT_BATCH_SIZE}; with --global_batch, derived from it)')
parser.add_argument('--grad_accum', type=int, default=None,
               help='micro-batches per optimizer step, all one contrastive batch: every image '
                    'meets every caption of all of them (feature-cached accumulation, '
                    'accumulation.py: activation memory of one micro-batch, one more forward of '
                    'the towers). Default 1; with --global_batch, derived from it')
parser.add_argument('--captions_per_image', type=int, default=1,
               help='C: each image comes with C of its distinct captions (drawn without '
                    'replacement; fewer than C: all of them, repeated in order until C), and the '
                    'sigmoid loss has a positive for each of them and a negative for every other '
                    'image-caption pair, every pool alike, across ranks. The loss is still '
                    'divided by the images. With --grad_accum a micro-batch holds --batch_size '
                    'images and their C captions each, and the loss still sees the whole batch. '
                    'Default 1: one caption drawn per image')
parser.add_argument('--global_batch', type=int, default=None,
               help='the contrastive batch of a step, batch_size x world size x grad_accum '
                    '(paper: 32768); --batch_size and --grad_accum are derived from it and the '
                    'world size, or checked against it when given')
parser.add_argument('--lr', type=float, default=3e-4,
               help='peak learning rate (3e-4: what runs/study.sh picks for the tiny preset, '
                    'pool=llip, on the validation split; paper: 5e-4 for B, 4e-4 for L/H/G)')
parser.add_argument('--min_lr_ratio', type=float, default=0.1,
               help='the cosine decays to lr * min_lr_ratio')
parser.add_argument('--warmup', type=int, default=50, help='linear warmup steps (paper: 2000)')
parser.add_argument('--weight_decay', type=float, default=0.2,
               help='AdamW decay on matrices; none on biases, norms, logit scale/bias')
parser.add_argument('--beta1', type=float, default=0.9, help='AdamW beta1')
parser.add_argument('--beta2', type=float, default=0.95,
               help='AdamW beta2 (0.95 as in SigLIP and the paper)')
parser.add_argument('--eps', type=float, default=1e-6, help='AdamW epsilon')
parser.add_argument('--grad_clip', type=float, default=1.0,
               help='clip the global gradient norm (0: off)')
parser.add_argument('--chunk_size', type=int, default=0,
               help='llip_loss: images per chunk, each against every caption; 0: picked from '
                    'the shapes')
parser.add_argument('--dtype', default='auto', choices=['auto', 'float32', 'bfloat16', 'float16'],
               help='autocast dtype; auto = bf16 on GPUs that support it, fp16 + GradScaler on '
                    'older GPUs, fp32 on CPU')
bool_flag('compile', False, 'torch.compile the model')
parser.add_argument('--shard', default='none', choices=sharding.SHARDS,
                    help="none: every rank holds the whole model (DDP); fsdp: each rank holds "
                         "1/ranks of the weights, gradients and AdamW state (FSDP2), for models "
                         "DDP cannot fit; checkpoints become directories written by every rank")
bool_flag('grad_ckpt', False,
          'activation checkpointing in both towers (less memory, ~30%% more compute)')
parser.add_argument('--device', default='auto',
               help="'auto' (cuda if available, else cpu), 'cpu' or 'cuda'")
parser.add_argument('--workers', type=int, default=2, help='data-loading processes per rank')
parser.add_argument('--seed', type=int, default=0, help='seed of the model init and the data order')
parser.add_argument('--log_every', type=int, default=10, help='steps between lines in log.jsonl')
parser.add_argument('--logger', default='none', choices=['none', 'tensorboard', 'wandb'],
               help="also send log.jsonl's records to TensorBoard (OUT_DIR/tensorboard) or "
                    "Weights & Biases; the package must be installed")
bool_flag('eval', True, 'evaluate every --eval_every steps and at the end (rank 0): the synthetic '
                        'splits with --data=synthetic, else --zeroshot_data and --retrieval_data')
parser.add_argument('--eval_every', type=int, default=0,
               help='steps between evaluations (0: only at the end)')
parser.add_argument('--eval_split', default='test', choices=['test', 'val'],
               help="which synthetic evaluation splits: 'val' to choose settings (e.g. the "
                    "learning rate), 'test' for the numbers that are reported")
parser.add_argument('--zeroshot_data',
               help="zero-shot during training: an image folder, one subfolder per class (as "
                    "open_clip's --imagenet-val)")
parser.add_argument('--zeroshot_classnames',
               help='its class names, as eval.py --classnames (a JSON list file or a shipped key '
                    'such as imagenet); default: ZEROSHOT_DATA/classnames.json, else the folder '
                    'names')
parser.add_argument('--zeroshot_templates',
               help='its prompt templates, as eval.py --templates; default: '
                    'ZEROSHOT_DATA/templates.json, else "a photo of a {}."')
parser.add_argument('--retrieval_data',
               help="retrieval during training: shards or a folder of KEY.jpg + KEY.txt (as "
                    "open_clip's --val-data)")
parser.add_argument('--save_every', type=int, default=250,
               help='steps between checkpoints (and one at the end)')
parser.add_argument('--keep', type=int, default=3,
               help='how many of the newest checkpoints to keep (at least 1)')
parser.add_argument('--resume', default='auto',
               help="'auto': continue from the newest valid checkpoint in --out_dir if any; "
                    "a path: from that file; 'never': start afresh")
parser.add_argument('--rendezvous_timeout', type=float, default=600,
                    help='seconds a rank waits for the others to join (ranks started by hand with '
                         'RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; under torchrun, for its '
                         'store) before it stops with a message')
parser.add_argument('--stop_grace', type=float, default=10,
               help='seconds after SIGTERM within which the step must end before the rank exits '
                    'without saving (a rank blocked on a dead peer must not delay the restart)')

config_fields = dataclasses.fields(LlipConfig)
# every model field can override the preset, e.g. --pool=avg --num_mixture=64
for f in config_fields:
    if f.type in (bool, 'bool'):
        bool_flag(f.name, None, f'model: override the preset\'s {f.name}')
        continue
    kind = {int: int, 'int': int, float: float, 'float': float}.get(f.type, str)
    parser.add_argument(f'--{f.name}', type=kind, default=None,
                        help=f"model: override the preset's {f.name}")

# at least 1: 0 or less would loop zero times, divide by zero or (for --keep) delete every
# checkpoint right after writing it. The model's own fields (num_mixture, tau, ...) are checked
# by LlipConfig.
AT_LEAST_ONE = ('steps', 'grad_accum', 'log_every', 'save_every', 'keep', 'batch_size',
                'global_batch', 'captions_per_image')
AT_LEAST_ZERO = ('eval_every', 'workers', 'warmup', 'chunk_size')
TRACKERS = {'tensorboard': 'torch.utils.tensorboard', 'wandb': 'wandb'}


# (flag, test, what it must be): a value outside these would train in silence on something else
# (--grad_clip=-1 negates the gradients, --min_lr_ratio=-3 makes the learning rate negative)
NUMBERS = (('lr', lambda v: v > 0, 'a number > 0'), ('eps', lambda v: v > 0, 'a number > 0'),
           ('beta1', lambda v: 0 <= v < 1, 'in [0, 1)'),
           ('beta2', lambda v: 0 <= v < 1, 'in [0, 1)'),
           ('min_lr_ratio', lambda v: 0 <= v <= 1, 'in [0, 1]'),
           ('grad_clip', lambda v: v >= 0, 'a number >= 0 (0: off)'),
           ('weight_decay', lambda v: v >= 0, 'a number >= 0'),
           ('stop_grace', lambda v: v > 0, 'a number of seconds > 0'),
           ('rendezvous_timeout', lambda v: v > 0, 'a number of seconds > 0'))


def check_flags(args):
    """The model config, or a one-line error naming the first flag with a bad value, before
    any work."""
    for name, ok, what in NUMBERS:   # nan and inf fail every test
        value = getattr(args, name)
        if not (math.isfinite(value) and ok(value)):
            sys.exit(f'error: --{name}={value}: must be {what}')
    for names, low in ((AT_LEAST_ONE, 1), (AT_LEAST_ZERO, 0)):
        for name in names:
            if getattr(args, name) is not None and getattr(args, name) < low:
                sys.exit(f'error: --{name}={getattr(args, name)}: must be an integer >= {low}')
    world = int(os.environ['WORLD_SIZE']) if 'RANK' in os.environ else 1   # as set_up decides
    try:
        args.batch_size, args.grad_accum = accumulation.split_batch(
            args.global_batch, world, args.batch_size, args.grad_accum)
    except ValueError as e:
        sys.exit(f'error: {e}')
    if args.device not in ('auto', 'cpu') and not args.device.startswith('cuda'):
        sys.exit(f'error: --device={args.device}: expected auto, cpu or cuda')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        sys.exit(f'error: --device={args.device}: no CUDA GPU is available here; use --device=cpu')
    if args.logger in TRACKERS:
        try:
            importlib.import_module(TRACKERS[args.logger])
        except ImportError:
            sys.exit(f'error: --logger={args.logger}: the package is not installed '
                     f'(pip install {args.logger}); allowed: none, tensorboard, wandb')
    if args.data != 'synthetic':
        try:   # a path that names no file: one line now, not a traceback later
            data.expand_urls(args.data)
        except ValueError as e:
            sys.exit(f'error: --data={args.data}: {e}')
    for name in ('zeroshot_data', 'retrieval_data'):
        path = getattr(args, name)
        if path and not (os.path.exists(path) or any(c in path for c in '{*?')):
            sys.exit(f'error: --{name}={path}: no such file or folder')
    overrides = {f.name: getattr(args, f.name) for f in config_fields
                 if getattr(args, f.name) is not None}
    try:
        config = dataclasses.replace(PRESETS[args.model], **overrides)
    except ValueError as e:   # LlipConfig's messages start with the field's name: the flag's
        sys.exit(f'error: --{e}')
    needed = data.get_tokenizer(config.tokenizer).vocab_size
    if config.vocab_size < needed:
        sys.exit(f'error: --vocab_size={config.vocab_size}: the {config.tokenizer} tokenizer '
                 f'needs at least {needed}')
    return config
