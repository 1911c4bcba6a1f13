"""
Use a trained Llip from Python: one call gives the model, the image transform it was trained
with and its tokenizer, for a train.py checkpoint (a file, a run directory, a sharded
checkpoint's directory) or the authors' released weights, told apart by what the file holds.

    import torch, llip
    from PIL import Image
    model, transform, tokenize = llip.load('out')       # or out/ckpt.pt, llip_b16_k32.pt
    images = torch.stack([transform(Image.open('cat.jpg'))])   # (N, 3, S, S)
    scores = model.similarity(model.encode_image(images),
                              model.encode_text(tokenize(['a cat', 'a dog'])))   # (N, 2)

The README's "Use a trained model" section is a longer example, run by tests/test_use.py:
    python -m pytest tests/test_use.py -q
eval.py --ckpt / --official and analysis.py load their models here too.
"""
import dataclasses
import itertools
import os
from pathlib import Path

import torch

import checkpoint
import data
from model import LlipConfig, for_loading, load_official


def load(path, device='cpu'):
    """(model, transform, tokenize) from a checkpoint or the authors' weights (load_model):
    model: a Llip in eval mode on `device`;
    transform: PIL image -> FloatTensor (3, S, S), CLIP's evaluation preprocessing at the
      model's image size (data.eval_transform);
    tokenize: a caption or a list of captions -> LongTensor (N, context_length), with the
      model's own tokenizer and context length (tokenizer_of)."""
    model = load_model(path).to(device)
    return model, data.eval_transform(model.config.image_size), tokenizer_of(model.config)


def tokenizer_of(config):
    """captions -> tokens (N, L) as the model with this config reads them: CLIP's BPE for every
    preset, bytes only for a model trained with tokenizer='byte'. (Tokens of the other
    tokenizer are valid ids of another vocabulary: they would give wrong scores in silence.)"""
    tokenizer = data.get_tokenizer(config.tokenizer)

    def tokenize(texts):
        texts = [texts] if isinstance(texts, str) else list(texts)
        return tokenizer(texts, config.context_length)   # (N, L)
    return tokenize


# ----------------------------------------------------------------------------- which file
def checkpoint_path(path):
    """A train.py checkpoint (a file, or a sharded checkpoint's directory with manifest.json),
    or a run directory: its ckpt.pt, or with none its newest checkpoint of either kind."""
    path = Path(path)
    if not path.is_dir() or (path / 'manifest.json').exists():
        return path
    newest = checkpoint.paths(str(path))
    return path / 'ckpt.pt' if (path / 'ckpt.pt').exists() or not newest else Path(newest[0])


def load_model(path):
    """A Llip in eval mode from a train.py checkpoint (a run directory, a file, a sharded
    checkpoint) or the authors' weights: a file holding {'model', 'config'} is ours, any other
    dict of weights is read as theirs. ValueError (one line) for anything else, and for weights
    that hold a NaN or an infinity (every score would be chance level, and look like one)."""
    path = checkpoint_path(path)
    if path.is_dir():
        model = load_checkpoint(path)
    else:
        weights = read(path)
        model = (from_checkpoint(weights, path) if is_ours(weights) else
                 official(weights, path))
    return finite(model, path)


# ----------------------------------------------------------------------------- ours
def read(path, what='a checkpoint'):
    """torch.load of weights only (checkpoint.load_weights); ValueError in one line."""
    try:
        return checkpoint.load_weights(path)   # train.py writes only tensors and plain containers
    except checkpoint.UnsafeCheckpointError as e:
        raise ValueError(f"{path}: {e}") from None
    except Exception as e:   # truncated, empty, not a pickle
        first = f'{type(e).__name__}: {e}'.strip().splitlines()[0]
        raise ValueError(f"{path}: not {what} torch.load can read ({first})") from None


def is_ours(weights):
    return isinstance(weights, dict) and 'model' in weights and \
        isinstance(weights.get('config'), dict)


def load_checkpoint(path):
    """A Llip from a train.py checkpoint: {'model': state dict, 'config': {'model_config': {...}}},
    its checksum verified as train.py verifies it when resuming; or a sharded checkpoint's
    directory (train.py --shard=fsdp), gathered into this one process."""
    if os.path.isdir(path):
        try:
            import checkpoint_dcp   # here: torch's DCP adds a second to every start
            return checkpoint_dcp.load_model(path)[0]
        except checkpoint.CheckpointError as e:
            raise ValueError(f"{path}: {e}") from None
    weights = read(path)
    if not is_ours(weights):
        hint = (" It looks like the authors' weights: use --official (llip.load tells them "
                "apart)." if isinstance(weights, dict) and
                any('class_embedding' in k for k in weights.get('state_dict', weights)) else '')
        raise ValueError(f"{path}: not a train.py checkpoint (expected a dict with 'model' "
                         f"and 'config').{hint}")
    return from_checkpoint(weights, path)


def from_checkpoint(ckpt, path):
    """The Llip of a train.py checkpoint already read, after checking its checksum."""
    try:
        ckpt = checkpoint.verified(ckpt)
    except checkpoint.CheckpointError as e:
        raise ValueError(f"{path}: {e}") from None
    config = ckpt['config'].get('model_config', ckpt['config'])
    fields = {f.name for f in dataclasses.fields(LlipConfig)}
    model = for_loading(LlipConfig(**{k: v for k, v in config.items() if k in fields}))
    try:
        model.load_state_dict(checkpoint.unwrapped(ckpt['model']))
    except RuntimeError as e:   # a hand-edited shape or a missing key: torch's first lines
        what = ' '.join(line.strip() for line in str(e).splitlines()[1:3])
        raise ValueError(f"{path}: its weights do not fit its config ({what})") from None
    return model.eval()


# ----------------------------------------------------------------------------- theirs
def load_official_file(path):
    """The authors' released weights from a file (model.load_official), ValueError in one line
    for a file that is not a dict of their tensors."""
    return official(read(path, "the authors' weights, a dict of tensors"), path)


def official(weights, path):
    if not isinstance(weights, dict):   # a list or a tensor
        raise ValueError(f"{path}: not the authors' weights, a dict of tensors "
                         f"(it holds a {type(weights).__name__})")
    try:
        return load_official(weights)
    except (KeyError, ValueError) as e:   # load_official's own messages
        raise ValueError(f"{path}: {e.args[0] if e.args else e}") from None
    except Exception as e:
        first = f'{type(e).__name__}: {e}'.strip().splitlines()[0]
        raise ValueError(f"{path}: not the authors' weights ({first})") from None


def finite(model, path):
    """The model, or ValueError naming its tensors that hold a NaN or an infinity: every score
    would be chance level, and look like a result."""
    bad = nonfinite_weights(model)
    if bad:
        raise ValueError(f'{path}: non-finite weights in {len(bad)} tensors '
                         f'({", ".join(bad[:3])}{", ..." if len(bad) > 3 else ""})')
    return model


def nonfinite_weights(model):
    """The names of the model's parameters and buffers that hold a NaN or an infinity."""
    return [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
            if t.is_floating_point() and not torch.isfinite(t).all()]
