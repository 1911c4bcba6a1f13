"""What this proves about eval_data.py, what zero-shot evaluation reads (run: python -m pytest
tests/test_eval_data.py):
- image folders: classes matched by name (ignoring case and '_'), by number (ImageNetV2), by a
  {folder: name} or {"0": name} dict (given by flag or inside --data) or by sorted order (said
  on stdout); half matches and bad layouts refused with clear messages; undecodable images,
  decompression bombs and images beyond the pixel budget skipped with a warning;
- a caption folder (read by shards.py) skips a text that is not UTF-8, with a count.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as llip_eval
import eval_data
from conftest import big_png, plain_checkpoint, random_model, write_folder

NAMES = ['cat', 'dog', 'car', 'sun', 'red', 'box', 'sky', 'tree', 'fish', 'moon', 'rock', 'leaf']
TEMPLATES = ['a {}', 'the {}!', '{} pic']

pytestmark = pytest.mark.usefixtures('one_thread')   # tests/conftest.py


# ----------------------------------------------------------------------------- image folders
def test_folder_by_name_by_order_and_undecodable_images(tmp_path):
    m = random_model(seed=6)
    names = ['cat', 'dog', 'car']
    by_name = llip_eval.zeroshot(
        m, write_folder(tmp_path / 'a', names), names, TEMPLATES, batch_size=4
    )
    # ImageNet-style ids: sorted folder i is class i, so the same images give the same result
    ids = write_folder(tmp_path / 'b', ['n01', 'n02', 'n03'])
    assert [label for _, label in eval_data.image_folder(ids, names)] == [0] * 3 + [1] * 3 + [2] * 3
    assert llip_eval.zeroshot(m, ids, names, TEMPLATES, batch_size=4) == by_name
    # a shuffled name order changes which folder is which class, and so the labels
    samples = eval_data.image_folder(tmp_path / 'a', ['dog', 'car', 'cat'])
    assert [label for _, label in samples] == [1] * 3 + [2] * 3 + [0] * 3   # folders car, cat, dog
    # an undecodable image is skipped, counted and reported; the others are still evaluated
    (tmp_path / 'a' / 'dog' / 'broken.png').write_bytes(b'not a png')
    with pytest.warns(UserWarning, match='skipped 1 images'):
        assert llip_eval.zeroshot(m, tmp_path / 'a', names, TEMPLATES, batch_size=4) == by_name


def test_bad_folders_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match='no such folder'):
        eval_data.image_folder(tmp_path / 'missing', ['cat'])
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='no class subfolders'):
        eval_data.image_folder(tmp_path / 'empty', ['cat'])
    write_folder(tmp_path / 'noimages', ['cat', 'dog'], per_class=0)
    with pytest.raises(ValueError, match='hold no images'):
        eval_data.image_folder(tmp_path / 'noimages', ['cat', 'dog'])
    write_folder(tmp_path / 'pets', ['cat', 'dog', 'emu'], per_class=1)
    with pytest.raises(ValueError, match=r"Folders not in the names: \['emu'\]"):
        eval_data.image_folder(tmp_path / 'pets', ['cat', 'dog'])
    with pytest.raises(ValueError, match=r"names without a folder: \['owl'\]"):
        eval_data.image_folder(tmp_path / 'pets', ['cat', 'dog', 'emu', 'owl'])
    with pytest.raises(ValueError, match='3 class folders but 2 class names'):
        eval_data.image_folder(tmp_path / 'pets', ['n01', 'n02'])
    with pytest.warns(UserWarning, match='no images in this class folder'):
        (tmp_path / 'pets' / 'owl').mkdir()
        eval_data.image_folder(tmp_path / 'pets', ['cat', 'dog', 'emu', 'owl'])


# ----------------------------------------------------------------------- bad images, class mapping
@torch.no_grad()
def test_zeroshot_skips_decompression_bombs_and_duplicates(tmp_path):
    m = random_model(seed=6)
    names = ['cat', 'dog']
    expected = llip_eval.zeroshot(
        m, write_folder(tmp_path / 'a', names), names, TEMPLATES, batch_size=4
    )
    (tmp_path / 'a' / 'dog' / 'bomb.png').write_bytes(big_png(14000, 14000))  # beyond PIL's limit
    (tmp_path / 'a' / 'cat' / 'huge.png').write_bytes(big_png(5000, 5000))  # beyond data.MAX_PIXELS
    for workers in (0, 2):
        with pytest.warns(
            UserWarning, match=r"skipped 2 images.*(bomb|huge)\.png \((ImageTooLarge)\)"
        ):
            assert llip_eval.zeroshot(m, tmp_path / 'a', names, TEMPLATES, batch_size=4,
                                      workers=workers) == expected
    # the same image twice (a copy and a link) is evaluated twice, as any other image
    (tmp_path / 'a' / 'cat' / 'copy.png').write_bytes(
        (tmp_path / 'a' / 'cat' / '0.png').read_bytes()
    )
    (tmp_path / 'a' / 'cat' / 'link.png').symlink_to(tmp_path / 'a' / 'cat' / '0.png')
    with pytest.warns(UserWarning, match='skipped 2 images'):
        twice = llip_eval.zeroshot(m, tmp_path / 'a', names, TEMPLATES, batch_size=4)
    assert len(eval_data.image_folder(tmp_path / 'a', names)) == 6 + 2 + 2
    assert set(twice[m.config.tau]) == set(expected[m.config.tau])


def labels_of(root, classnames):
    by_folder = {}
    for path, label in eval_data.image_folder(root, classnames):
        by_folder.setdefault(Path(path).parent.name, set()).add(label)
    return {folder: labels.pop() for folder, labels in by_folder.items()}


def test_which_folder_is_which_class(tmp_path, capsys):
    # names match folders ignoring case and '_' / spaces: Car is car, whatever the sorted order
    write_folder(tmp_path / 'a', ['Cat', 'Dog', 'Car', 'golden_retriever'], per_class=1)
    names = ['cat', 'dog', 'car', 'Golden Retriever']
    assert labels_of(tmp_path / 'a', names) == {'Cat': 0, 'Dog': 1, 'Car': 2, 'golden_retriever': 3}
    assert 'sorted order' not in capsys.readouterr().out
    # ImageNetV2: numbered folders are class indices (folder 10 is class 10, not the third string)
    write_folder(tmp_path / 'v2', [str(i) for i in range(12)], per_class=1)
    assert labels_of(tmp_path / 'v2', NAMES) == {str(i): i for i in range(12)}
    # {folder: name} says it outright; {"0": name} is a list by another name
    mapping = {'n03': 'car', 'n01': 'cat', 'n02': 'dog'}
    write_folder(tmp_path / 'ids', ['n01', 'n02', 'n03'], per_class=1)
    assert labels_of(tmp_path / 'ids', mapping) == {'n03': 0, 'n01': 1, 'n02': 2}
    assert eval_data.class_names(mapping) == ['car', 'cat', 'dog']
    assert eval_data.class_names({'1': 'dog', '0': 'cat'}) == ['cat', 'dog']
    assert labels_of(tmp_path / 'v2', {str(i): n for i, n in enumerate(NAMES)}) == {
        str(i): i for i in range(12)
    }
    # no folder named after a class: sorted order, and a line says so
    assert labels_of(tmp_path / 'ids', ['cat', 'dog', 'car']) == {'n01': 0, 'n02': 1, 'n03': 2}
    assert 'n01 -> cat' in capsys.readouterr().out
    # some folders match names and others not: refused rather than mislabelled in silence
    write_folder(tmp_path / 'half', ['cat', 'dog', 'n03'], per_class=1)
    with pytest.raises(ValueError, match=r"Folders not in the names: \['n03'\].*\{folder: name\}"):
        eval_data.image_folder(tmp_path / 'half', ['cat', 'dog', 'bird'])
    with pytest.raises(ValueError, match=r"missing from the \{folder: name\}.*'n03'"):
        eval_data.image_folder(tmp_path / 'half', {'cat': 'cat', 'dog': 'dog'})


@torch.no_grad()
def test_classnames_json_as_a_dict_inside_data_and_by_flag(tmp_path):
    ckpt = plain_checkpoint(tmp_path / 'ckpt.pt')
    folder = write_folder(tmp_path / 'ids', ['n01', 'n02'], per_class=2)
    mapping = {'n02': 'dog', 'n01': 'cat'}
    (tmp_path / 'names.json').write_text(json.dumps(mapping))
    (tmp_path / 'by_index.json').write_text(json.dumps({'0': 'dog', '1': 'cat'}))
    (tmp_path / 'names.txt').write_text('dog\ncat\n')  # clip_benchmark's classnames.txt
    results = []
    for flag in ('names.json', 'by_index.json', 'names.txt', None):
        if flag is None:
            (folder / 'classnames.json').write_text(json.dumps(mapping))
        args = [
            f'--ckpt={ckpt}',
            '--task=zeroshot',
            f'--data={folder}',
            '--workers=0',
            f'--out={tmp_path / "out.json"}',
        ] + ([f'--classnames={tmp_path / flag}'] if flag else [])
        llip_eval.main(args)
        results.append(json.loads((tmp_path / 'out.json').read_text())['results'])
    assert results[0] == results[3]      # the dict said n01 is cat: as the flag, so inside --data
    assert results[1] == results[2]      # {"0": name} and a text file are lists: n01 is dog
    (tmp_path / 'gap.json').write_text(json.dumps({'0': 'dog', '2': 'cat'}))
    with pytest.raises(SystemExit, match='indices are not 0..1'):
        llip_eval.main([f'--ckpt={ckpt}', '--task=zeroshot', f'--data={folder}', '--workers=0',
                        f'--classnames={tmp_path / "gap.json"}'])


def test_caption_folder_with_a_text_that_is_not_utf8(tmp_path):
    for key, text in (('a', 'a cat'.encode()), ('b', 'caf\xe9'.encode('latin-1'))):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f'{key}.bmp')
        (tmp_path / f'{key}.txt').write_bytes(text)
    with pytest.warns(data.DataWarning, match=r"skipped \{'caption not UTF-8': 1\}"):
        batches = list(eval_data.captioned_batches(str(tmp_path), 8, 4, []))
    assert [t.captions for _, truths in batches for t in truths] == [['a cat']]   # .bmp read
