"""What this proves about eval.py on data and result files as open_clip users have them (issue 23
item 18), CPU only (run: python -m pytest tests/test_eval_formats.py -q):
- clip_benchmark's WebDataset retrieval root (dataset_type.txt, test/nshards.txt, test/N.tar
  of KEY.webp + KEY.txt) gives the numbers of its shards named one by one, from the command
  line too; a shard nshards.txt names but the folder lacks is counted, not left out in silence;
- default result names are short (eval_zeroshot_inet_val.json, not the whole path);
- --format=clip_benchmark writes clip_benchmark's result file (dataset, model, pretrained, task,
  metrics, language) with the numbers of our own file, and refuses several taus before the work;
- --ckpt takes a sharded checkpoint's directory as it is, and a run directory of sharded
  checkpoints by its newest, as analysis.py does.
"""
import io
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import eval as llip_eval
import eval_data
import metrics
from conftest import plain_checkpoint, random_model, write_folder, write_tar

CAPTIONS = ['a cat\nthe cat sits', 'a dog\na brown dog', 'a red car\na car', 'an oak\na tree']


def webp(seed):
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format='WEBP', lossless=True)
    return buffer.getvalue()


def write_clip_benchmark_retrieval(root):
    """As clip_benchmark's webdataset_builder writes a retrieval set: two shards of two images,
    each KEY.txt holding its captions one per line."""
    (root / 'test').mkdir(parents=True)
    (root / 'dataset_type.txt').write_text('retrieval\n')
    for s in range(2):
        write_tar(root / 'test' / f'{s}.tar', [(f's{i:07d}', {'webp': webp(i), 'txt': CAPTIONS[i]})
                                               for i in (2 * s, 2 * s + 1)])
    (root / 'test' / 'nshards.txt').write_text('2\n')
    return root


@torch.no_grad()
def test_clip_benchmark_retrieval_root(tmp_path):
    m = random_model(seed=2).float()
    root = write_clip_benchmark_retrieval(tmp_path / 'flickr')
    shards = [str(root / 'test' / '0.tar'), str(root / 'test' / '1.tar')]
    expected = llip_eval.retrieval(m, shards)
    assert llip_eval.retrieval(m, root) == expected
    assert llip_eval.retrieval(m, str(root)) == expected
    assert eval_data.count_images(str(root)) == 4
    ckpt = plain_checkpoint(tmp_path / 'ckpt.pt')
    llip_eval.main([f'--ckpt={ckpt}', '--task=retrieval', f'--data={root}', '--device=cpu'])
    written = json.loads((tmp_path / 'eval_retrieval_flickr.json').read_text())
    assert written['results']['retrieval']['5']['i2t_r1'] >= 0
    # a shard that nshards.txt names and the folder lacks: counted, the rest evaluated
    (root / 'test' / 'nshards.txt').write_text('3\n')
    with pytest.warns(UserWarning, match='unreadable shard'):
        assert llip_eval.retrieval(m, root) == expected


@pytest.mark.parametrize('data, name', [
    ('/tmp/tmp/deep/inet/val', 'inet_val'),
    ('data/synthetic', 'synthetic'),
    ('data/synthetic/', 'synthetic'),
    ('/datasets/coco/{00000..00004}.tar', 'coco'),
    ('/datasets/imagenetv2/10', 'imagenetv2_10'),
    ('wds_cifar10', 'wds_cifar10'),
])
def test_short_default_names(data, name):
    assert metrics.data_name(data) == name


def test_clip_benchmark_result_file(tmp_path):
    ckpt = plain_checkpoint(tmp_path / 'ckpt.pt')
    folder = write_folder(tmp_path / 'pets' / 'val', ['cat', 'dog'], 2)
    flags = [f'--ckpt={ckpt}', '--task=zeroshot', f'--data={folder}', '--workers=0', '--tau=3']
    llip_eval.main(flags)
    llip_eval.main(flags + ['--format=clip_benchmark'])
    ours = json.loads((tmp_path / 'eval_zeroshot_pets_val.json').read_text())
    theirs = json.loads((tmp_path / 'eval_zeroshot_pets_val_clip_benchmark.json').read_text())
    assert {'dataset', 'model', 'pretrained', 'task', 'metrics', 'language'} <= theirs.keys()
    assert theirs['task'] == 'zeroshot_classification' and theirs['pretrained'] == ckpt
    numbers = ours['clip_benchmark']['zeroshot/val']['3']
    assert theirs['metrics'].keys() == numbers.keys() == {'acc1', 'acc5', 'mean_per_class_recall'}
    assert math.isnan(theirs['metrics']['acc5']) and numbers['acc5'] is None   # 2 classes
    assert theirs['metrics']['acc1'] == numbers['acc1']
    with pytest.raises(SystemExit, match='one dataset at one tau'):
        llip_eval.main(flags + ['--format=clip_benchmark', '--tau', '1', '5',
                                '--device=no such device'])   # refused before anything else


def test_ckpt_takes_sharded_checkpoints_and_their_run_directory(tmp_path, monkeypatch):
    run = tmp_path / 'run'
    for step in (1, 2):   # what train.py --shard=fsdp leaves: directories, no ckpt.pt
        (run / f'ckpt_{step:07d}').mkdir(parents=True)
        (run / f'ckpt_{step:07d}' / 'manifest.json').write_text('{}')
    seen = {}
    monkeypatch.setattr(llip_eval, 'run', lambda args: seen.update(vars(args)))
    for given in (run, run / 'ckpt_0000002'):
        llip_eval.main([f'--ckpt={given}', '--task=synthetic', '--data=x'])
        assert seen['ckpt'] == os.path.join(run, 'ckpt_0000002')
