"""What this proves about the GPU check, bench_gpu.py
(run: python -m pytest tests/test_bench_gpu.py):
- `bench.py gpu --device=cpu --small` runs every item of the check on CPU, the code the GPU runs,
  so it cannot rot: (a) the device's loss, every loss form and similarity agree with float64 CPU,
  (b) the loss falls, (c) step timings, (d) the loss at scale in every form with a chunk sweep
  and a measured peak next to the planner's, (e) accumulation or a stated skip; the JSON report
  says what was skipped without CUDA;
- without CUDA, `bench.py gpu` refuses in one line and names the CPU command.
"""
import json

import pytest
import torch

import bench_gpu


@pytest.fixture(scope='module')
def report(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp('gpu') / 'report.json'
    failed = bench_gpu.main(['--device=cpu', '--small', f'--out={path}'])
    torch.set_num_threads(before)
    assert not failed, failed
    return json.loads(path.read_text())


def test_correctness_and_learning_pass_on_cpu(report):
    a = report['a_correctness']
    assert len(a) == 8                                 # model, plain, gram, mixed x 2 dtypes
    # every item within its tolerance, the mixed form under bf16 autocast included (its
    # similarity once wrote a bf16 matmul into an fp32 buffer)
    assert all(v['ok'] for v in a.values()), a
    assert report['b_learning']['last'] < report['b_learning']['first']


def test_speed_and_loss_at_scale_are_measured(report):
    assert set(report['c_speed']) == {'grad_ckpt=False', 'grad_ckpt=True'}
    assert all(v['images_per_s'] > 0 and v['mfu'] is None for v in report['c_speed'].values())
    d = report['d_loss_at_scale']
    forms = [k for k in d if k.startswith(('plain', 'gram', 'mixed'))]
    assert forms == ['plain chunk=default', 'gram chunk=default', 'gram chunk=1', 'gram chunk=4',
                     'mixed chunk=default']
    assert d['fastest_gram_chunk'] in forms
    default = d[f"{d['picked_form']} chunk=default"]
    # the planner's loss workspace against the peak measured on CPU
    assert 0.5 < default['planned_bytes'] / default['peak_bytes'] < 2


def test_skips_are_stated(report):
    skipped = ' '.join(report['skipped'])
    assert 'MFU' in skipped and 'torch.compile' in skipped
    e = report['e_accumulation']
    assert ('skipped' in e and 'accumulation.py' in skipped) or e['ok']


@pytest.mark.skipif(torch.cuda.is_available(), reason='only without CUDA')
def test_without_cuda_one_line():
    error = bench_gpu.main([])
    assert error.startswith('error: no CUDA device') and '\n' not in error
    assert '--device=cpu' in error
