"""What this proves (run: python -m pytest tests/test_unsafe_checkpoints.py): a .pt file is a
pickle, and unpickling can run code. A crafted file whose unpickling would create a marker
directory is refused by every place that loads a .pt file — eval.load_checkpoint,
model.load_official, train.py --resume=<that file> and train.py --resume=auto (where it is
skipped with a warning, like a truncated file, and the previous checkpoint is resumed) — the
marker never appears, and the message says why (weights_only).
"""
import os

import pytest
import torch

import eval as llip_eval
from model import load_official
from conftest import copy_of, main_in_process


class Payload:
    """Unpickling this calls os.mkdir(marker): a stand-in for any command an attacker picks."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def crafted(path, marker, layout):
    """A file shaped like a checkpoint (so that only the payload can make loading fail)."""
    torch.save(layout(Payload(marker)), path)
    return str(path)


def our_layout(payload):
    return {'model': {}, 'step': 20, 'config': payload}


@pytest.mark.parametrize('entry', ['eval.load_checkpoint', 'model.load_official'])
def test_library_loaders_refuse_a_crafted_pickle(tmp_path, entry):
    marker = tmp_path / 'MARKER'
    if entry == 'eval.load_checkpoint':
        path = crafted(tmp_path / 'evil.pt', marker, our_layout)
        load = llip_eval.load_checkpoint
    else:   # the authors' layout: {'state_dict': {name: tensor}}
        layout = lambda payload: {'state_dict': {'logit_scale': torch.zeros(()), 'x': payload}}
        path = crafted(tmp_path / 'evil.pt', marker, layout)
        load = load_official
    with pytest.raises(ValueError, match=r'refusing to unpickle .*weights_only'):
        load(path)
    assert not marker.exists(), 'the payload ran'


def test_train_resume_refuses_a_crafted_pickle(trained, tmp_path, synthetic, monkeypatch,
                                               capsys):
    # train.main() in this process (conftest.main_in_process): the payload would run here too
    out, marker = copy_of(trained, tmp_path), tmp_path / 'MARKER'   # checkpoints at steps 1, 2
    # an explicit --resume=<file>: an error that says why
    path = crafted(tmp_path / 'evil.pt', marker, our_layout)
    with pytest.raises(SystemExit) as stop:
        main_in_process(monkeypatch, out, synthetic, '--steps=4', f'--resume={path}',
                        '--workers=0')
    message = str(stop.value.code)   # a string: printed on exit, status 1
    assert not marker.exists()
    assert 'refusing to unpickle' in message and 'weights_only' in message, message
    # --resume=auto: the crafted file, named as the newest checkpoint, is skipped with a warning
    crafted(os.path.join(out, 'ckpt_0000020.pt'), marker, our_layout)
    main_in_process(monkeypatch, out, synthetic, '--steps=4', '--save_every=2', '--workers=0')
    text = capsys.readouterr().err
    assert not marker.exists(), 'the payload ran'
    assert 'skipping checkpoint' in text and 'refusing to unpickle' in text
    assert 'ckpt_0000002.pt at step 2' in text
