"""What this proves about train.py and checkpoint.py under faults (run: python -m pytest
tests/test_faults.py), on a very small model and the built-in synthetic data, CPU only:
- SIGTERM to the whole process group (as SLURM and torchrun send it), with 2 DataLoader
  workers per rank, saves a checkpoint and exits 0, for 1 and 2 ranks;
- a rank blocked on a stopped peer exits within --stop_grace of SIGTERM instead of hanging, and
  takes its DataLoader workers with it;
- torchrun --max-restarts after kill -9 of one rank restarts both ranks, which resume from the
  newest checkpoint and finish;
- a rank that cannot read the checkpoint rank 0 resumes from (a separate --out_dir per node)
  stops the run with a message naming the path, on every rank;
- a non-finite gradient with a finite loss stops the run before the update: nothing
  non-finite is ever saved, and checkpoint.save refuses non-finite weights;
- a flipped bit in a checkpoint fails its checksum: the previous checkpoint is used, with a
  warning;
- a full disk (ENOSPC) says "no space left on <dir>", leaves no partial .tmp file and the
  previous checkpoints as they were.
"""
import errno
import os
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch

import checkpoint
from conftest import (FAST, ROOT, SMALL, alive, copy_of, descendants, free_port, main_in_process,
                      torchrun, weights)



def launch_ranks(out_dirs, synthetic, *flags):
    """One process per rank, as srun starts them (RANK, WORLD_SIZE, MASTER_ADDR in the
    environment, no torchrun), all in one new process group; [Popen], rank 0 first."""
    port, procs = free_port(), []
    for rank, out in enumerate(out_dirs):
        env = {**os.environ, 'RANK': str(rank), 'LOCAL_RANK': str(rank), 'OMP_NUM_THREADS': '1',
               'WORLD_SIZE': str(len(out_dirs)), 'MASTER_ADDR': '127.0.0.1',
               'MASTER_PORT': str(port)}
        group = procs[0].pid if procs else 0   # 0: a new group, led by rank 0
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(ROOT, 'train.py'), f'--out_dir={out}',
             f'--synthetic_dir={synthetic}', *FAST, *flags], cwd=ROOT, env=env, text=True,
            process_group=group, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    return procs


def wait_for(path, procs, timeout=60):
    end = time.time() + timeout
    while not os.path.exists(path):
        assert all(p.poll() is None for p in procs), 'a rank ended early'
        assert time.time() < end, f'{path} never appeared'
        time.sleep(0.05)


def test_sigterm_to_the_process_group_with_workers_saves_and_exits_0(tmp_path, synthetic):
    """1 rank and 2 ranks, each run its own process group, the two runs side by side."""
    runs = {}
    try:
        for ranks in (1, 2):
            out = str(tmp_path / f'{ranks}')
            runs[ranks] = out, launch_ranks([out] * ranks, synthetic, '--steps=500',
                                            '--save_every=2')
        for out, procs in runs.values():
            wait_for(os.path.join(out, 'ckpt_0000002.pt'), procs)
            os.killpg(procs[0].pid, signal.SIGTERM)   # the trainers and their DataLoader workers
        for ranks, (out, procs) in runs.items():
            outputs = [p.communicate(timeout=60)[0] for p in procs]
            assert [p.returncode for p in procs] == [0] * ranks, \
                '\n'.join(o[-2000:] for o in outputs)
            assert 'SIGTERM: saved a checkpoint' in outputs[0]
            ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
            assert 2 <= ckpt['step'] < 500 and len(ckpt['loader']) == ranks
    finally:
        for _, procs in runs.values():   # a run left going by a failed check
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.communicate()


def test_sigterm_on_a_rank_blocked_by_a_stopped_peer_exits_promptly(tmp_path, synthetic):
    out = str(tmp_path)
    procs = launch_ranks([out, out], synthetic, '--steps=500', '--save_every=2', '--stop_grace=2')
    wait_for(os.path.join(out, 'ckpt_0000002.pt'), procs)
    procs[1].send_signal(signal.SIGSTOP)   # rank 0 now waits in a collective that never ends
    workers = descendants(procs[0].pid)
    try:
        time.sleep(0.5)
        procs[0].send_signal(signal.SIGTERM)
        procs[0].wait(timeout=30)   # before the fix: gloo's 30 minutes
        # its workers are killed on its way out (orphans would check for their parent only every
        # 5 s): gone within a second
        end = time.time() + 1
        while any(alive(w) for w in workers) and time.time() < end:
            time.sleep(0.05)
        left = [w for w in workers if alive(w)]
        output = procs[0].communicate(timeout=30)[0]
    finally:   # rank 1, stopped, and its workers: the rest of the group
        os.killpg(procs[0].pid, signal.SIGKILL)
        procs[1].communicate(timeout=30)
    assert procs[0].returncode == 1 and 'stop_grace' in output, output[-2000:]
    assert len(workers) == 2 and not left, (workers, left)


# train.py whose rank 1, in torchrun's first attempt, dies by SIGKILL as it begins step 5 (index
# 4): a kill -9 at a known step, with no race against the run's end
KILLED_AT_STEP_5 = '''
import os, signal, sys
sys.path.insert(0, {root!r})
import train
step_of = train.train_step
def train_step(run, batches, step):
    if step == 4 and os.environ['RANK'] == '1' and os.environ['TORCHELASTIC_RESTART_COUNT'] == '0':
        os.kill(os.getpid(), signal.SIGKILL)
    return step_of(run, batches, step)
train.train_step = train_step
train.main()
'''


def test_max_restarts_after_kill_9_of_a_rank_resumes_from_the_newest_checkpoint(tmp_path,
                                                                                 synthetic):
    out, port, wrapper = str(tmp_path / 'run'), free_port(), tmp_path / 'killed_at_step_5.py'
    wrapper.write_text(KILLED_AT_STEP_5.format(root=ROOT))
    cmd = torchrun('--nnodes=1', '--nproc_per_node=2', '--max-restarts=1', '--rdzv_backend=c10d',
                   f'--rdzv_endpoint=127.0.0.1:{port}', '--rdzv_id=llip-restart', str(wrapper),
                   f'--out_dir={out}', f'--synthetic_dir={synthetic}', *FAST, '--steps=8',
                   '--save_every=2', '--stop_grace=1')   # rank 0, blocked on the dead rank: 1 s
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert 'exitcode: -9' in output and 'local_rank: 1' in output, output[-3000:]   # torchrun's
    assert 'resuming from' in output
    assert torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['step'] == 8


def test_a_rank_that_cannot_read_rank_0s_checkpoint_stops_the_run_clearly(trained, tmp_path,
                                                                          synthetic):
    shared, separate = copy_of(trained, tmp_path), str(tmp_path / 'node1')   # node 0's: step 2
    procs = launch_ranks([shared, separate], synthetic, '--steps=4', '--save_every=2')
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode not in (0, None, -signal.SIGABRT) for p in procs), outputs
    last = outputs[0].strip().splitlines()[-1]
    assert 'rank 1' in last and 'ckpt_0000002.pt' in last and 'shared' in last, outputs[0][-2000:]
    assert not os.path.exists(os.path.join(shared, 'ckpt_0000004.pt'))


def nan_gradient_at_call(n):
    """A Llip.loss (the loss of every training step, on the towers' features) whose n-th call
    has a finite loss but NaN gradients (d sqrt(x)/dx at 0)."""
    from model import Llip
    loss_of, calls = Llip.loss, [0]

    def patched(self, *a, **k):
        calls[0] += 1
        loss = loss_of(self, *a, **k)
        return loss + torch.sqrt(self.logit_bias * 0) if calls[0] == n else loss
    return patched


def test_nonfinite_gradient_stops_before_anything_nonfinite_is_saved(tmp_path, synthetic,
                                                                     monkeypatch, capsys):
    import train as train_py
    monkeypatch.setattr(train_py.Llip, 'loss', nan_gradient_at_call(2))
    monkeypatch.setattr(sys, 'argv', ['train.py', f'--out_dir={tmp_path}',
                                      f'--synthetic_dir={synthetic}', *SMALL, '--workers=0',
                                      '--steps=3', '--save_every=1'])
    with pytest.raises(SystemExit) as stop:
        train_py.main()
    message = capsys.readouterr().out
    assert stop.value.code == 1, message
    assert 'gradient norm is nan' in message and 'at step 2' in message, message
    assert 'last good' not in message and 'ckpt_0000001.pt' in message
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith('ckpt_')) == ['ckpt_0000001.pt']
    assert all(torch.isfinite(w).all() for w in weights(tmp_path).values())


def test_nonfinite_weights_are_never_saved(tmp_path):
    state = {'model': {'w': torch.tensor([1.0, float('nan')])}, 'step': 3}
    with pytest.raises(checkpoint.CheckpointError, match='non-finite weights at step 3'):
        checkpoint.save(state, str(tmp_path), keep=1)
    assert os.listdir(tmp_path) == []


def flip_bytes(path, tensor_bytes=64):
    """Overwrite 64 bytes in the middle of the largest tensor of a torch.save zip file."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    with open(path, 'r+b') as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), 'little') for _ in range(2))
        start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(start)
        old = f.read(tensor_bytes)
        f.seek(start)
        f.write(bytes(b ^ 0x40 for b in old))


def test_a_flipped_bit_fails_the_checksum_and_the_previous_checkpoint_is_used(
        trained, tmp_path, synthetic, monkeypatch, capsys):
    out = copy_of(trained, tmp_path)   # a run's checkpoints at steps 1 and 2 (conftest)
    flip_bytes(os.path.join(out, 'ckpt_0000002.pt'))
    with pytest.raises(checkpoint.CheckpointError, match='checksum'):
        checkpoint.load(os.path.join(out, 'ckpt_0000002.pt'))
    main_in_process(monkeypatch, out, synthetic, '--steps=3', '--save_every=1', '--workers=0')
    text = capsys.readouterr().err
    assert 'skipping checkpoint' in text and 'checksum mismatch' in text, text[-2000:]
    assert 'ckpt_0000001.pt at step 1' in text


def test_disk_full_says_no_space_and_leaves_no_partial_file(tmp_path, monkeypatch):
    out = str(tmp_path)
    state = {'model': {'w': torch.ones(3)}, 'step': 2}
    checkpoint.save(state, out, keep=3)
    before = open(os.path.join(out, 'ckpt_0000002.pt'), 'rb').read()

    def full_disk(obj, f):
        f.write(b'\0' * 1000)   # part of the file, then the disk is full
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(checkpoint.CheckpointError, match=f'no space left on {out}'):
        checkpoint.save({**state, 'step': 4}, out, keep=3)
    assert sorted(os.listdir(out)) == ['ckpt.pt', 'ckpt_0000002.pt']   # no .tmp
    assert open(os.path.join(out, 'ckpt_0000002.pt'), 'rb').read() == before
