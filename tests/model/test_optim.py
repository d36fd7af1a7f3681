"""TF1 RMSProp semantics and per-tensor clipping, against numbers worked out by hand.

TF1 RMSProp:  ms ← ρ·ms + (1−ρ)·g²  (ms starts at 1);  mom ← μ·mom + lr·g/√(ms+ε);  w ← w − mom.
The constants below are chosen so the square roots come out exact: with ρ = 0.9, g = 2 and ε = 0.14,
ms = 0.9 + 0.4 = 1.3 and √(ms+ε) = √1.44 = 1.2. A large ε makes "ε inside the root" (1.2) differ from
"ε outside" (√1.3 + 0.14 ≈ 1.280).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from training.optim import TFRMSProp, clip_per_tensor_

LR, RHO, MU, EPS = 0.3, 0.9, 0.9, 0.14


def make_opt(param):
    return TFRMSProp([param], lr=LR, decay=RHO, momentum=MU, eps=EPS)


def test_dense_two_steps_by_hand():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = make_opt(w)

    w.grad = torch.tensor([2.0, 0.0], dtype=torch.float64)
    opt.step()
    # ms = [1.3, 0.9]; mom = [0.3·2/1.2, 0] = [0.5, 0]; w = [0.5, -2]
    assert opt.state[w]["ms"].tolist() == pytest.approx([1.3, 0.9])
    assert opt.state[w]["mom"].tolist() == pytest.approx([0.5, 0.0])
    assert w.tolist() == pytest.approx([0.5, -2.0])

    w.grad = torch.tensor([-1.0, 3.0], dtype=torch.float64)
    opt.step()
    # ms = [0.9·1.3 + 0.1·1, 0.9·0.9 + 0.1·9] = [1.27, 1.71]
    # mom = [0.9·0.5 + 0.3·(−1)/√1.41, 0 + 0.3·3/√1.85]
    mom = [0.45 - 0.3 / math.sqrt(1.41), 0.9 / math.sqrt(1.85)]
    assert opt.state[w]["ms"].tolist() == pytest.approx([1.27, 1.71])
    assert opt.state[w]["mom"].tolist() == pytest.approx(mom)
    assert w.tolist() == pytest.approx([0.5 - mom[0], -2.0 - mom[1]])


def test_sparse_rows_only_and_duplicates_summed():
    table = torch.nn.Parameter(torch.arange(10, dtype=torch.float64).view(5, 2))
    start = table.detach().clone()
    opt = make_opt(table)

    # batch 1 looks up rows 1, 3, 1: row 1's gradient is the SUM of its two lookups
    coeff = torch.tensor([[1.5, 0.0], [0.0, 2.0], [0.5, 0.0]], dtype=torch.float64)
    (F.embedding(torch.tensor([1, 3, 1]), table, sparse=True) * coeff).sum().backward()
    assert table.grad.is_sparse
    opt.step()
    ms, mom = opt.state[table]["ms"], opt.state[table]["mom"]
    # row 1: g = [2, 0] → ms [1.3, 0.9], mom [0.5, 0]; row 3: g = [0, 2] → ms [0.9, 1.3], mom [0, 0.5]
    # (had the duplicates been applied one by one, ms would not be 1.3: 0.9·(0.9+0.1·2.25)+0.1·0.25 ≠ 1.3)
    assert ms[1].tolist() == pytest.approx([1.3, 0.9]) and mom[1].tolist() == pytest.approx([0.5, 0.0])
    assert ms[3].tolist() == pytest.approx([0.9, 1.3]) and mom[3].tolist() == pytest.approx([0.0, 0.5])
    assert table[1].tolist() == pytest.approx([2 - 0.5, 3.0])
    assert table[3].tolist() == pytest.approx([6.0, 7 - 0.5])
    for r in (0, 2, 4):  # rows outside the batch: value, accumulator (still 1) and momentum untouched
        assert torch.equal(table[r], start[r])
        assert ms[r].tolist() == [1.0, 1.0] and mom[r].tolist() == [0.0, 0.0]

    # batch 2 touches row 1 only: row 3 keeps its momentum and does NOT keep moving (dense RMSProp would)
    table.grad = None
    after_1 = table.detach().clone()
    (F.embedding(torch.tensor([1]), table, sparse=True) * torch.tensor([[-1.0, 0.0]], dtype=torch.float64)).sum().backward()
    opt.step()
    assert ms[1].tolist() == pytest.approx([1.27, 0.81])
    m1 = 0.45 - 0.3 / math.sqrt(1.41)
    assert mom[1].tolist() == pytest.approx([m1, 0.0])
    assert table[1].tolist() == pytest.approx([1.5 - m1, 3.0])
    assert torch.equal(table[3], after_1[3])
    assert ms[3].tolist() == pytest.approx([0.9, 1.3]) and mom[3].tolist() == pytest.approx([0.0, 0.5])
    for r in (0, 2, 4):
        assert torch.equal(table[r], start[r])


def test_sparse_and_dense_agree_when_every_row_is_in_the_batch():
    torch.manual_seed(0)
    init = torch.randn(4, 3)
    dense_w, sparse_w = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    dense_opt, sparse_opt = TFRMSProp([dense_w], lr=0.01), TFRMSProp([sparse_w], lr=0.01)
    ids = torch.tensor([0, 1, 2, 3, 2])
    for step in range(3):
        target = torch.randn(5, 3)
        for w, opt, sparse in ((dense_w, dense_opt, False), (sparse_w, sparse_opt, True)):
            opt.zero_grad()
            ((F.embedding(ids, w, sparse=sparse) - target) ** 2).sum().backward()
            opt.step()
    torch.testing.assert_close(sparse_w, dense_w)


def test_clip_per_tensor_dense():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([6.0, 8.0])   # norm 10 → clipped to norm 5
    b.grad = torch.tensor([3.0, 0.0])   # norm 3 → untouched (a global-norm clip would shrink it)
    clip_per_tensor_([a, b], 5.0)
    assert a.grad.tolist() == pytest.approx([3.0, 4.0])
    assert b.grad.tolist() == [3.0, 0.0]


def test_clip_per_tensor_sparse():
    table = torch.nn.Parameter(torch.zeros(6, 2))
    small = torch.nn.Parameter(torch.zeros(6, 2))
    coeff = torch.tensor([[6.0, 0.0], [0.0, 8.0]])
    (F.embedding(torch.tensor([1, 4]), table, sparse=True) * coeff).sum().backward()
    (F.embedding(torch.tensor([2]), small, sparse=True) * torch.tensor([[1.0, 1.0]])).sum().backward()
    skip = torch.nn.Parameter(torch.zeros(3))             # no gradient at all: left alone
    clip_per_tensor_([table, small, skip], 5.0)
    assert table.grad.is_sparse and small.grad.is_sparse and skip.grad is None
    dense = table.grad.to_dense()
    assert dense[1].tolist() == pytest.approx([3.0, 0.0]) and dense[4].tolist() == pytest.approx([0.0, 4.0])
    assert dense.norm().item() == pytest.approx(5.0)
    assert small.grad.to_dense()[2].tolist() == [1.0, 1.0]
