"""The evaluator's conventions on a case small enough to rank by hand: ties count against the positive,
`sampled` drops the user's training items and duplicate candidates, `sampled_raw` keeps them, `full` ranks
against every item the user has not trained on."""
import math

import numpy as np
import pytest
import torch

from training.data import Split
from training.evaluate import TopPop, evaluate
from training.metrics import rank_metrics


class FixedScores:
    """A recommender whose scores are a fixed (n_users, n_items) matrix."""

    def __init__(self, scores):
        self.table = torch.tensor(scores, dtype=torch.float32)
        self.n_items = self.table.shape[1]

    def score(self, users, items=None):
        rows = self.table[users]
        return rows if items is None else rows.gather(1, items)


TRAIN = np.array([[0, 1], [0, 2], [1, 3]])
SCORES = [[0.0, 0.9, 0.95, 0.7, 0.1, 0.5, 0.6, 0.55],   # user 0, positive 5
          [0.4, 0.0, 0.3, 0.99, 0.5, 0.2, 0.4, 0.1],    # user 1, positive 6
          [0.9, 0.1, 0.2, 0.3, 0.4, 0.95, 0.0, 0.0]]    # user 2, positive 0
SPLIT = Split(users=np.array([0, 1, 2]), positives=np.array([5, 6, 0]),
              negatives=np.array([[1, 3, 3, 4],     # 1: user 0's training item (0.9); 3 (0.7) twice
                                  [0, 2, 4, 7],     # 0 ties with the positive at 0.4
                                  [1, 2, 3, 4]]))   # all below the positive
# 0-based ranks of the positive, worked out by hand
SAMPLED = [1, 2, 0]       # user 0: only item 3 (once) beats it; user 1: item 4 and the tie
RAW = [3, 2, 0]           # user 0: items 1, 3, 3
FULL = [3, 2, 1]          # user 0: 3, 6, 7 (1 and 2 are training items); user 1: 0 (tie), 4; user 2: 5


def metrics_by_hand(ranks, k):
    hits = [r < k for r in ranks]
    return sum(hits) / len(ranks), sum(1 / math.log2(r + 2) for r, h in zip(ranks, hits) if h) / len(ranks)


@pytest.mark.parametrize("batch_users", [1, 2, 256])
def test_ranks_by_hand(batch_users):
    out = evaluate(FixedScores(SCORES), SPLIT, TRAIN, full=True, batch_users=batch_users)
    for name, ranks in (("sampled", SAMPLED), ("sampled_raw", RAW)):
        for k in range(1, 11):
            hr, ndcg = metrics_by_hand(ranks, k)
            assert out[name][f"hr@{k}"] == pytest.approx(hr), (name, k)
            assert out[name][f"ndcg@{k}"] == pytest.approx(ndcg), (name, k)
    hr, ndcg = metrics_by_hand(FULL, 10)
    assert out["full"] == pytest.approx({"hr@10": hr, "recall@10": hr, "ndcg@10": ndcg})
    hr3, _ = metrics_by_hand(FULL, 3)
    assert hr3 == pytest.approx(2 / 3)  # (FULL is not trivially all hits below 10)


def test_rank_metrics():
    out = rank_metrics(torch.tensor([0, 4, 9, 10]), ks=(1, 5, 10))
    assert out["hr@1"] == 0.25 and out["hr@5"] == 0.5 and out["hr@10"] == 0.75
    assert out["ndcg@10"] == pytest.approx((1 + 1 / math.log2(6) + 1 / math.log2(11)) / 4)


def test_toppop_is_training_popularity():
    train = np.array([[0, 2], [1, 2], [2, 2], [0, 1], [1, 1], [2, 0]])
    pop = TopPop(train, n_items=4)
    assert pop.score(torch.tensor([0, 1])).tolist() == [[1, 2, 3, 0]] * 2
    assert pop.score(torch.tensor([0]), torch.tensor([[3, 2]])).tolist() == [[0, 3]]
