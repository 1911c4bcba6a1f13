"""What this proves about metrics.py, the retrieval metrics (run: python -m pytest
tests/test_metrics.py):
- recall@1/5/10 and mAP both ways equal a reference that ranks one query at a time in a sorted
  Python list, on random score matrices full of ties (in one chunk and one query per chunk);
- ties count against the true item (checked by hand; the optimistic rule gives other numbers);
- clip_benchmark's metric names map to ours.
"""
import pytest
import torch

import metrics as llip_metrics
from conftest import reference_metrics


@pytest.mark.parametrize('seed,per_chunk', [(0, 2 ** 22), (1, 2 ** 22), (2, 20), (3, 1)])
def test_ranking_metrics_match_a_loop_on_random_scores_with_ties(seed, per_chunk, monkeypatch):
    monkeypatch.setattr(llip_metrics, 'RANKED_PER_CHUNK', per_chunk)   # 20: one query per chunk
    g = torch.Generator().manual_seed(seed)
    n_img, n_str = 13, 17
    scores = torch.randint(0, 4, (n_img, n_str), generator=g).float()   # 4 values: ties everywhere
    truth = torch.rand(n_img, n_str, generator=g) < 0.2                        # (N_img, N_str)
    truth[torch.arange(n_img), torch.randint(0, n_str, (n_img,), generator=g)] = True
    truth[torch.randint(0, n_img, (n_str,), generator=g), torch.arange(n_str)] = True
    got = llip_metrics.ranking_metrics(scores, truth)
    assert got == pytest.approx(reference_metrics(scores.tolist(), truth.tolist()))
    assert 0 < got['i2t_map'] < 1 and 0 < got['t2i_map'] < 1
    optimistic = reference_metrics(scores.tolist(), truth.tolist(), true_first=True)
    assert optimistic['i2t_map'] > got['i2t_map'] and optimistic['t2i_map'] > got['t2i_map']
    # the rule decides ties, not the candidates' order
    perm = torch.randperm(n_str, generator=g)
    assert llip_metrics.ranking_metrics(scores[:, perm], truth[:, perm]) == pytest.approx(got)


def test_ties_count_against_the_true_item():
    scores = torch.tensor([[1., 1., 0.],
                           [0., 1., 1.]])
    truth = torch.tensor([[False, True, False],
                          [True, False, True]])
    got = llip_metrics.ranking_metrics(scores, truth)
    # image 0: its true string ties with a false one for the best score, so it is second: AP 1/2;
    # image 1: true strings third and second: AP (1/2 + 2/3) / 2. A tie at the top is no R@1.
    assert got['i2t_r1'] == 0 and got['i2t_r5'] == 1
    assert got['i2t_map'] == pytest.approx((1 / 2 + 7 / 12) / 2)
    # string 0: its image is second; string 1: tied with a false image, second; string 2: first
    assert got['t2i_r1'] == pytest.approx(1 / 3) and got['t2i_map'] == pytest.approx(2 / 3)
    # constant scores: every true item comes after every false one
    flat = llip_metrics.ranking_metrics(torch.zeros(2, 3), truth)
    assert flat['i2t_r1'] == 0 and flat['t2i_r1'] == 0 and flat['t2i_map'] == pytest.approx(1 / 2)
    # binding: a tie is a miss
    assert llip_metrics.binding_metrics(torch.tensor([1., 2., 3.]), torch.tensor([1., 1., 4.]),
                                     ['color', 'size', 'color']) == pytest.approx(
        {'binding': 1 / 3, 'binding_color': 0, 'binding_size': 1})
    with pytest.raises(ValueError, match='no true match'):
        llip_metrics.ranking_metrics(scores, torch.tensor([[True, True, False]] * 2))


PHRASES = ['a red box', 'a blue box', 'a red cat', 'one shape', 'two shapes', 'a big cat',
           'a small box', 'a cat on the left', 'a box at the top', 'a blue cat']


def test_clip_benchmark_names():
    ours = {'top1': 0.5, 'top5': None, 'mean_per_class_recall': 0.4, 'top1_best': 0.6,
            'i2t_r1': 0.1, 'i2t_r5': 0.2, 't2i_r1': 0.3, 't2i_r10': 0.4, 'i2t_map': 0.9}
    assert llip_metrics.clip_benchmark_names(ours) == {
        'acc1': 0.5,
        'acc5': None,
        'mean_per_class_recall': 0.4,
        'text_retrieval_recall@1': 0.1,
        'text_retrieval_recall@5': 0.2,  # an image finds a caption
        'image_retrieval_recall@1': 0.3,
        'image_retrieval_recall@10': 0.4,
    }  # a caption finds its image
