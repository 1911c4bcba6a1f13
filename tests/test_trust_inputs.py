"""What this proves about what a run and eval.py read (issue 23), CPU only
(run: python -m pytest tests/test_trust_inputs.py; the run itself: tests/test_trust.py):
- a 1 x 250,000 image is never resized to 224 x 56 million pixels in evaluation;
- eval.py refuses non-finite weights, --tau 0, negative, nan or inf, an --out folder that is
  not there and --device=cuda without a GPU before the work, and says in one line that a file
  is not the authors' weights or that a checkpoint's weights do not fit its config;
- templates '{{}}' and '{}{}' and a single class are errors (in train.py before step 1, as are
  WordNet-id folders with 1,000 class names); Unicode-normalised folder names match; a .cls
  of -1 is skipped and counted; an evaluation that fails mid-run is a warning;
- a caption bomb is skipped and counted without being read, the tokenizers make only what the
  context keeps (BPE never sees a 100 KB word whole), a FIFO among the shards is skipped, and
  a brace pattern naming 10^8 files is refused before it is expanded;
- eval.py takes --tau=1,5 and a run directory; clip_benchmark's dataset names work as
  --classnames; WordNet-id class names get a warning.
"""
import importlib
import io
import json
import os
import tarfile

import pytest
import torch
from PIL import Image

import checkpoint
import eval as llip_eval
import eval_data
import eval_plan
import images
from conftest import png, write_tar

# ---------------------------------------------------------------- 7. thin images
def test_a_thin_image_is_never_resized_whole(monkeypatch):
    resize = Image.Image.resize

    def bounded(self, size, *a, **k):
        assert size[0] * size[1] <= images.MAX_PIXELS, f'resize to {size}'
        return resize(self, size, *a, **k)
    monkeypatch.setattr(Image.Image, 'resize', bounded)
    for size in [(1, 250_000), (1_000_000, 1)]:
        x = images.eval_transform(224)(Image.new('RGB', size, (200, 10, 10)))
        assert x.shape == (3, 224, 224)
        expected = images.to_tensor(Image.new('RGB', (1, 1), (200, 10, 10)))
        torch.testing.assert_close(x[:, 100, 100], expected[:, 0, 0], atol=1e-5, rtol=0)
    normal = Image.new('RGB', (300, 200), (1, 2, 3))   # an ordinary image: the usual path
    assert images.eval_transform(32)(normal).shape == (3, 32, 32)


# ---------------------------------------------------------------- 9-11. evaluation
@pytest.mark.parametrize('tau', ['0', '-1', 'nan', 'inf'])
def test_eval_refuses_a_bad_tau(tau, capsys):
    with pytest.raises(SystemExit):
        llip_eval.main(['--ckpt=x.pt', '--task=synthetic', '--data=x', '--tau', '1', tau])
    assert 'must be a finite number > 0' in capsys.readouterr().err


def test_eval_refuses_non_finite_weights(trained, tmp_path):
    state = checkpoint.load(os.path.join(trained, 'ckpt.pt'))
    name = next(iter(state['model']))
    state['model'][name] = torch.full_like(state['model'][name], float('nan'))
    path = str(tmp_path / 'nan.pt')
    torch.save(state, path)   # no sha256: as a hand-made file
    with pytest.raises(SystemExit, match=f'non-finite weights in 1 tensors \\({name}'):
        llip_eval.main([f'--ckpt={path}', '--task=synthetic', '--data=x', '--device=cpu'])


def test_templates_must_insert_the_class_name_once(tmp_path):
    for folder in ('cat', 'dog'):
        (tmp_path / folder).mkdir()
    for templates in (['a photo of a {{}}.'], ['{}{}'], ['a {c}'], ['a {'], ['ok {}', '{0}']):
        (tmp_path / 'templates.json').write_text(json.dumps(templates))
        with pytest.raises(ValueError, match="'{}' once"):
            eval_data.class_names_and_templates(str(tmp_path))
    (tmp_path / 'templates.json').write_text(json.dumps(['a photo of a {}.', '{{literal}} {}']))
    assert eval_data.class_names_and_templates(str(tmp_path))[0] == ['cat', 'dog']


def clip_benchmark_root(root, names, labels):
    """ROOT/classnames.txt and ROOT/test/0.tar with one 8 x 8 PNG per label."""
    os.makedirs(root / 'test')
    (root / 'classnames.txt').write_text('\n'.join(names) + '\n')
    with tarfile.open(root / 'test' / '0.tar', 'w') as tar:
        for i, label in enumerate(labels):
            png = io.BytesIO()
            Image.new('RGB', (8, 8), (i * 40 % 256, 0, 0)).save(png, 'PNG')
            for ext, payload in (('png', png.getvalue()), ('cls', str(label).encode())):
                info = tarfile.TarInfo(f'{i:04d}.{ext}')
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_one_class_is_an_error_in_train_and_eval(tmp_path):
    clip_benchmark_root(tmp_path / 'one', ['cat'], [0, 0])
    with pytest.raises(ValueError, match='at least 2'):
        eval_data.class_names_and_templates(str(tmp_path / 'one'))
    train_py = importlib.import_module('train')
    args = train_py.parser.parse_args([f'--zeroshot_data={tmp_path / "one"}', '--data=x.tar'])
    with pytest.raises(SystemExit, match='^error: --zeroshot_data=.*at least 2'):
        eval_plan.training_plan(args)
    two = tmp_path / 'two'
    clip_benchmark_root(two, ['cat', 'dog', 'bird', 'fish'], [0, 1, 2, 3])
    args = train_py.parser.parse_args([f'--zeroshot_data={two}', '--data=x.tar'])
    assert '4 classes' in eval_plan.training_plan(args).summary


def test_a_cls_of_minus_one_is_skipped_and_counted(tmp_path):
    root = tmp_path / 'bench'
    clip_benchmark_root(root, ['cat', 'dog'], [0, -1, 1])
    shards = eval_data.clip_benchmark_layout(root)[0]
    items = list(eval_data.LabelledShards(shards, images.eval_transform(8), 2))
    skipped = [x for x in items if isinstance(x, str)]
    assert len(items) == 3 and len(skipped) == 1 and 'class -1' in skipped[0]


def test_class_folders_match_names_across_unicode_normalisation(tmp_path):
    nfd, nfc = 'cafe\u0301', 'caf\u00e9'
    labels = eval_data.folder_labels(tmp_path, [nfd, 'tea'], [nfc, 'tea'])
    assert labels == {nfd: 0, 'tea': 1}


def test_wnid_folders_with_too_many_class_names_fail_before_step_1(tmp_path):
    for wnid in ('n01440764', 'n01443537'):
        (tmp_path / wnid).mkdir()
        Image.new('RGB', (8, 8)).save(tmp_path / wnid / 'a.png')
    train_py = importlib.import_module('train')
    args = train_py.parser.parse_args([f'--zeroshot_data={tmp_path}', '--data=x.tar',
                                       '--zeroshot_classnames=imagenet'])
    with pytest.raises(SystemExit, match='^error: --zeroshot_data: .*2 class folders but 1000'):
        eval_plan.training_plan(args)


# ---------------------------------------------------------------- 12, 15, 16
def test_an_evaluation_that_fails_mid_run_is_a_warning_and_training_goes_on(tmp_path, capsys):
    from model import PRESETS, Llip
    model = Llip(PRESETS['tiny']).train()
    plan = eval_plan.EvalPlan((str(tmp_path / 'gone'), ['cat', 'dog'], ['a {}']), None, None, '')
    assert eval_plan.evaluate_plan(model, plan, 'cpu', torch.autocast('cpu', enabled=False)) == {}
    assert 'warning: the evaluation failed, training goes on' in capsys.readouterr().err
    assert model.training


def eval_error(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        llip_eval.main(argv)
    message = stop.value.code if isinstance(stop.value.code, str) else capsys.readouterr().err
    assert 'Traceback' not in message and len(message.strip().splitlines()) == 1, message
    return message


def test_eval_checks_out_and_device_before_the_work(trained, tmp_path, monkeypatch, capsys):
    ckpt = os.path.join(trained, 'ckpt.pt')
    out = tmp_path / 'missing' / 'r.json'
    message = eval_error([f'--ckpt={ckpt}', '--task=synthetic', '--data=x', f'--out={out}'],
                         capsys)
    assert 'does not exist or is not writable' in message
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    message = eval_error([f'--ckpt={ckpt}', '--task=synthetic', '--data=x', '--device=cuda',
                          f'--out={tmp_path / "r.json"}'], capsys)
    assert '--device=cuda: no CUDA GPU' in message


@pytest.mark.parametrize('content', ['empty', 'list', 'tensor', 'truncated'])
def test_eval_official_on_a_file_that_is_not_weights_is_one_line(tmp_path, capsys, content):
    path = tmp_path / 'w.pt'
    if content == 'empty':
        path.write_bytes(b'')
    else:
        torch.save({'list': [1, 2], 'tensor': torch.ones(3),
                    'truncated': {'a': torch.ones(1000)}}[content], path)
        if content == 'truncated':
            path.write_bytes(path.read_bytes()[:500])
    message = eval_error([f'--official={path}', '--task=synthetic', '--data=x',
                          f'--out={tmp_path / "r.json"}'], capsys)
    assert "not the authors' weights" in message


def test_eval_ckpt_with_a_hand_edited_shape_is_one_line(trained, tmp_path, capsys):
    state = checkpoint.load(os.path.join(trained, 'ckpt.pt'))
    name = next(k for k, v in state['model'].items() if v.ndim == 2)
    state['model'][name] = state['model'][name][:, :1]
    path = str(tmp_path / 'edited.pt')
    torch.save(state, path)
    message = eval_error([f'--ckpt={path}', '--task=synthetic', '--data=x',
                          f'--out={tmp_path / "r.json"}'], capsys)
    assert 'do not fit its config' in message and name in message


# ---------------------------------------------------------------- 13, 14. data
def test_a_caption_bomb_is_skipped_and_counted_never_read(tmp_path):
    import shards
    bomb = 'x' * (shards.MAX_TEXT_BYTES + 1)
    path = write_tar(tmp_path / 'a.tar', [('k0', {'png': png(0), 'txt': 'a cat'}),
                                          ('k1', {'png': png(1), 'txt': bomb}),
                                          ('k2', {'png': png(2), 'json': json.dumps(
                                              {'caption': bomb})})])
    with pytest.warns(shards.DataWarning, match="'caption too long': 2"):
        samples = list(shards.read_shards(path))
    assert [key for key, _, _ in samples] == ['k0']


def test_tokenizers_make_only_what_the_context_keeps(monkeypatch):
    import tokenizer
    text = "a photo of it's 12 cafés, ² and a dog   \n" * 50
    for tok in (tokenizer.ByteTokenizer(), tokenizer.ClipTokenizer()):
        full = tok.encode(text)
        for limit in (1, 7, 75):
            assert tok.encode(text, limit)[:limit] == full[:limit]
        assert torch.equal(tok([text], 77)[0, 1:76], torch.tensor(full[:75]))
    clip, words = tokenizer.ClipTokenizer(), []
    bpe = clip.bpe
    monkeypatch.setattr(clip, 'bpe', lambda word: words.append(len(word)) or bpe(word))
    clip(['x' * 100_000 + ' and more'], 77)   # one word without spaces: BPE's time grows faster
    assert words == [75 * clip.longest]         # than its length; only the part that fits


def test_a_fifo_among_the_shards_is_skipped_not_waited_on(tmp_path):
    import threading
    import shards
    write_tar(tmp_path / 'a.tar', [('k0', {'png': png(0), 'txt': 'a cat'})])
    fifo = str(tmp_path / 'b.tar')
    os.mkfifo(fifo)
    assert shards.expand_urls(str(tmp_path)) == [str(tmp_path / 'a.tar')]
    result = []
    reader = threading.Thread(target=lambda: result.append(list(shards._shard_items(fifo))),
                              daemon=True)
    reader.start()
    reader.join(20)
    if reader.is_alive():   # before the fix: blocked in open(); a writer end lets it go
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert not reader.is_alive() and result[0][0][0] == ('unreadable shard', result[0][0][0][1])
    assert 'not a regular file' in result[0][0][0][1]


def test_a_brace_pattern_naming_too_many_files_is_refused_before_expansion():
    import shards
    with pytest.raises(ValueError, match='names 100,000,000 files'):
        shards.expand_urls('shards/{0..9999}{0..9999}.tar')


# ---------------------------------------------------------------- 18. as an open_clip user has it
def test_eval_takes_tau_both_ways_and_a_run_directory(trained, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(llip_eval, 'run', lambda args: seen.update(vars(args)))
    llip_eval.main([f'--ckpt={trained}', '--task=synthetic', '--data=x', '--tau=1,5', '--tau', '8'])
    assert seen['tau'] == [8.0] and seen['ckpt'] == os.path.join(trained, 'ckpt.pt')
    llip_eval.main([f'--ckpt={trained}', '--task=synthetic', '--data=x', '--tau', '1', '5,8'])
    assert seen['tau'] == [1.0, 5.0, 8.0]


def test_benchmark_names_as_clip_benchmark_spells_them_and_wordnet_ids_warn(tmp_path, capsys):
    for name, key in (('cifar10', 'CIFAR10'), ('imagenet1k', 'imagenet'),
                      ('vtab/eurosat', 'EuroSAT')):
        assert eval_data.load_names(name, 'classnames', tmp_path) == \
            eval_data.load_names(key, 'classnames', tmp_path)
    for wnid in ('n01440764', 'n01443537'):
        (tmp_path / wnid).mkdir()
    eval_data.class_names_and_templates(str(tmp_path))
    assert 'look like WordNet ids' in capsys.readouterr().err
