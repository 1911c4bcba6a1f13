"""What this proves about training across ranks (run: python -m pytest tests/test_distributed.py):
two processes on the gloo backend, each with half of the batch, give
- for a DDP-wrapped Llip model: the same loss (mean over ranks) and the same averaged
  parameter gradients as one process on the whole batch;
- for llip_loss (both forms), siglip_loss and clip_loss on raw features: the same loss and, for
  every rank's slice of the inputs, the same gradient (DDP averages over ranks, so a rank's
  slice gradient divided by the world size is the single-process gradient).
"""

import os
import socket

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from loss import clip_loss, llip_loss, siglip_loss
from conftest import batch, start_ranks, tiny
from model import ImageFeatures, Llip, TextFeatures

N, WORLD = 6, 2


def feature_inputs():
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    return dict(keys=r(N, 2, 3, 4), values=r(N, 2, 3, 4), queries=r(N, 2, 4),
                text_emb=F.normalize(r(N, 8), dim=-1), image_emb=F.normalize(r(N, 8), dim=-1))


def feature_losses(x, out_proj, a, b):
    """The losses on the given slices; returns {name: loss}."""
    image, text = ImageFeatures(keys=x['keys'], values=x['values']), TextFeatures(
        x['queries'], x['text_emb']
    )
    return {'llip': llip_loss(image, text, out_proj, 2.0, a, b, chunk_size=2, form='gram'),
            'llip_plain': llip_loss(image, text, out_proj, 2.0, a, b, chunk_size=2, form='plain'),
            'siglip': siglip_loss(x['image_emb'], x['text_emb'], a, b),
            'clip': clip_loss(x['image_emb'], x['text_emb'], a)}


def run_all(rank, world):
    """Model and raw-feature losses and gradients on this rank's slice (world=1: the whole
    batch)."""
    torch.manual_seed(0)
    config = tiny(num_mixture=3)
    model = Llip(config).double()
    images, tokens = batch(N, config)
    part = slice(rank * N // world, (rank + 1) * N // world)
    wrapped = DistributedDataParallel(model) if world > 1 else model
    loss = wrapped(images[part].double(), tokens[part], chunk_size=2)
    loss.backward()
    result = {'model_loss': loss.detach(),
              'model_grads': {n: p.grad for n, p in model.named_parameters()}}

    x = {k: v[part].clone().requires_grad_() for k, v in feature_inputs().items()}
    out_proj = (torch.eye(8, dtype=torch.float64) + 0.1).requires_grad_()
    a, b = torch.tensor(3.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    for name, value in feature_losses(x, out_proj, a, b).items():
        grads = torch.autograd.grad(value, [v for v in x.values()] + [out_proj], allow_unused=True)
        result[name] = value.detach()
        result[name + '_grads'] = [torch.zeros(0) if g is None else g for g in grads]
    return result


def worker(rank, port, out):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=WORLD)
    result = run_all(rank, WORLD)
    # DDP already averaged the model's gradients; average the losses over ranks as well
    for key in ['model_loss', 'llip', 'llip_plain', 'siglip', 'clip']:
        dist.all_reduce(result[key])
        result[key] /= WORLD
    torch.save(result, f'{out}.{rank}')
    dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    start_ranks(worker, (port, str(tmp_path / 'rank')), WORLD)
    ranks = [torch.load(tmp_path / f'rank.{r}') for r in range(WORLD)]
    single = run_all(0, 1)

    torch.testing.assert_close(ranks[0]['model_loss'], single['model_loss'])
    for name, grad in single['model_grads'].items():
        for r in range(WORLD):
            torch.testing.assert_close(ranks[r]['model_grads'][name], grad, msg=name)

    for loss in ['llip', 'llip_plain', 'siglip', 'clip']:
        torch.testing.assert_close(ranks[0][loss], single[loss], msg=loss)
        for i, full in enumerate(single[loss + '_grads']):
            if full.numel() == 0:
                continue
            if i == len(single[loss + '_grads']) - 1:                 # out_proj: shared, averaged
                got = sum(r[loss + '_grads'][i] for r in ranks) / WORLD
            else:                                                     # per-sample slices
                got = torch.cat([r[loss + '_grads'][i] for r in ranks]) / WORLD
            torch.testing.assert_close(got, full, msg=f'{loss} grad {i}')
