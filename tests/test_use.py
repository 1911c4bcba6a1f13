"""What this proves about llip.load, the one call that gives a trained model, its transform and
its tokenizer (issue 23 item 17), CPU only (run: python -m pytest tests/test_use.py -q):
- the README's "Use a trained model" snippet runs as written against a trained run directory,
  and its scores are those of the model, CLIP's eval transform and the model's tokenizer;
- tokenize is the model's own: CLIP's BPE for a BPE model, bytes for a byte model, at the
  model's context length (data.tokenize has no silent default any more);
- the same call loads a checkpoint file, a run directory (its ckpt.pt, or the newest
  checkpoint) and the authors' weights, and refuses NaN weights and a file that is neither.
"""
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import data
import llip
import model as llip_model
from conftest import ROOT, plain_checkpoint
from test_official import official_state_dict


def readme_snippet(title):
    """The first ```python block after the README heading `title`."""
    text = open(os.path.join(ROOT, 'README.md')).read()
    section = text[text.index(f'## {title}\n'):]
    return re.search(r'```python\n(.*?)```', section, re.S).group(1)


def write_images(folder, names, size=40):
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(
            folder / name)


def test_the_readme_snippet_runs_on_a_run_directory(trained, tmp_path, monkeypatch, capsys):
    shutil.copytree(trained, tmp_path / 'out')
    write_images(tmp_path, ['cat.jpg', 'dog.jpg'])
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(readme_snippet('Use a trained model'), scope)
    printed = capsys.readouterr().out
    assert 'best caption of each image:' in printed and 'mixing weights' in printed
    # the same scores, built by hand from the model's config: eval transform, its tokenizer
    m = scope['model']
    assert m.config.tokenizer == 'clip' and not m.training
    c = m.config
    images = torch.stack([data.eval_transform(c.image_size)(Image.open(tmp_path / p))
                          for p in ('cat.jpg', 'dog.jpg')])
    tokens = data.tokenize(scope['captions'], c.context_length, 'clip')
    with torch.no_grad():
        expected = m.similarity(m.encode_image(images), m.encode_text(tokens))
    torch.testing.assert_close(scope['scores'], expected, rtol=0, atol=0)
    torch.testing.assert_close(scope['phi'].sum(-1), torch.ones(2, 3, c.mixer_heads))


@pytest.mark.parametrize('tokenizer, ids', [('clip', data.ClipTokenizer()),
                                             ('byte', data.ByteTokenizer())])
def test_tokenize_is_the_models_own(tmp_path, tokenizer, ids):
    vocab = 49408 if tokenizer == 'clip' else 259
    path = plain_checkpoint(tmp_path / 'm.pt', tokenizer=tokenizer, vocab_size=vocab)
    m, transform, tokenize = llip.load(path)
    expected = ids(['a red cat'], m.config.context_length)
    assert torch.equal(tokenize('a red cat'), expected)
    assert torch.equal(tokenize(['a red cat', 'a dog']), ids(['a red cat', 'a dog'], 16))
    assert transform(Image.new('RGB', (30, 20))).shape == (3, 16, 16)


def test_one_call_for_a_file_a_run_directory_and_the_authors_weights(trained, tmp_path):
    # a run directory without ckpt.pt: its newest numbered checkpoint
    run = tmp_path / 'run'
    shutil.copytree(trained, run)
    os.remove(run / 'ckpt.pt')
    newest = llip.checkpoint_path(run)
    assert newest.name.startswith('ckpt_') and newest.name.endswith('2.pt')
    a, *_ = llip.load(run)
    b = llip.load_checkpoint(newest)
    torch.testing.assert_close(a.state_dict(), b.state_dict(), rtol=0, atol=0)
    # the authors' weights, told apart by their keys
    sd = official_state_dict(use_norm=False)
    torch.save(sd, tmp_path / 'llip_tiny.pt')
    theirs, transform, tokenize = llip.load(tmp_path / 'llip_tiny.pt')
    reference = llip_model.load_official(official_state_dict(use_norm=False))
    torch.testing.assert_close(theirs.state_dict(), reference.state_dict(), rtol=0, atol=0)
    assert tokenize('a cat')[0, 0] == 49406   # CLIP's start token
    assert transform(Image.new('RGB', (50, 40))).shape[-1] == theirs.config.image_size


def test_nan_weights_and_other_files_are_refused_in_one_line(tmp_path):
    path = plain_checkpoint(tmp_path / 'm.pt')
    state = torch.load(path, weights_only=True)
    name = next(iter(state['model']))
    state['model'][name] = torch.full_like(state['model'][name], float('nan'))
    torch.save(state, tmp_path / 'nan.pt')
    with pytest.raises(ValueError, match=f'non-finite weights in 1 tensors \\({name}'):
        llip.load(tmp_path / 'nan.pt')
    torch.save([1, 2], tmp_path / 'list.pt')
    with pytest.raises(ValueError, match="not the authors' weights"):
        llip.load(tmp_path / 'list.pt')
    torch.save({'a': torch.ones(2)}, tmp_path / 'dict.pt')
    with pytest.raises(ValueError, match='not an official Llip checkpoint'):
        llip.load(tmp_path / 'dict.pt')
