"""CMN.forward against the reference equations, its gradients, its initialisation and its L2 penalty.

The reference (`conftest.reference_forward`) is plain numpy in float64 on padded (B, L) neighbourhood arrays
with a mask; the module works on packed segments built by `gather_neighbourhoods` from a CSR. Agreement of
the two layouts on batches that mix neighbourhood lengths (so padding is present), an item with one user and
an item with no training users is what these tests establish.
"""
import math

import numpy as np
import pytest
import torch
from torch.func import functional_call

from conftest import item_user_csr, make_cmn, neighbourhood, numpy_params, random_train, reference_forward
from model.cmn import CMN, CMNConfig, gather_neighbourhoods
from model.scoring import Scorer

N_USERS, N_ITEMS, D = 10, 8, 6
# item 0 has one user, item 1 none, item 6 every user: one batch holds lengths 0 (→ [u]), 1, 2, ... 10
LENGTHS = [1, 0, 3, 7, 2, 5, 10, 4]
FLOAT32_EXP_UNDERFLOW = -87.0   # exp of less is a float32 denormal, or 0


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(7)
    train = random_train(rng, N_USERS, LENGTHS)
    indptr, indices = item_user_csr(train, N_ITEMS, rng=rng)
    users, items = (torch.as_tensor(a.ravel()) for a in np.meshgrid(np.arange(N_USERS), np.arange(N_ITEMS)))
    return train, indptr, indices, users, items


def module_scores(model, case, exclude_self=False, return_attention=False):
    _, indptr, indices, users, items = case
    nbr, seg = gather_neighbourhoods(indptr, indices, users, items, exclude_self)
    with torch.no_grad():
        return model(users, items, nbr, seg, return_attention=return_attention), nbr, seg


def reference_scores(model, case, exclude_self=False):
    train, _, _, users, items = case
    nbrs = [neighbourhood(train, u, i, exclude_self) for u, i in zip(users.tolist(), items.tolist())]
    return reference_forward(numpy_params(model), users.numpy(), items.numpy(), nbrs)


@pytest.mark.parametrize("hops", [1, 2, 3])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_forward_matches_reference(case, hops, exclude_self):
    model = make_cmn(N_USERS, N_ITEMS, D, hops, seed=hops)
    scores, _, _ = module_scores(model, case, exclude_self)
    expected, p, _, mask = reference_scores(model, case, exclude_self)
    # the case must be able to catch a wrong attention: non-uniform weights, not all-zero ReLU outputs
    spread = np.where(mask, p, np.nan)
    assert np.nanmax(np.nanmax(spread, 1) - np.nanmin(spread, 1)) > 0.2
    assert np.count_nonzero(expected) > len(expected) // 2 and expected.std() > 0.1
    np.testing.assert_allclose(scores.double().numpy(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("hops", [1, 3])
def test_peaked_attention_beyond_float32_exp_range(case, hops):
    """A trained CMN attends almost one-hot: most logits sit more than 87 below their neighbourhood's maximum,
    where float32 exp underflows (the scorer's routes floor weights higher still, see model/cmn.py EXP_FLOOR).
    Module and every scorer route must still equal the float64 reference there."""
    model = make_cmn(N_USERS, N_ITEMS, D, hops, seed=3, embed_std=6.0)
    expected, p, _, mask = reference_scores(model, case)
    _, indptr, indices, users, items = case
    nbr, seg = gather_neighbourhoods(indptr, indices, users, items)
    with torch.no_grad():
        keys, z = model.user_memory[nbr], (model.user_memory[users] + model.item_memory[items])[seg]
        gaps = (keys * z).sum(1)
        gaps = gaps - torch.full((len(users),), -torch.inf).scatter_reduce(0, seg, gaps, "amax")[seg]
    assert (gaps < FLOAT32_EXP_UNDERFLOW).float().mean() > 0.3                          # the case really is in that range
    scale = np.abs(expected).max()
    scores, _, _ = module_scores(model, case)
    np.testing.assert_allclose(scores.double().numpy(), expected, rtol=0, atol=1e-5 * scale)
    for route in (dict(packed_max_users=10**6), dict(packed_max_users=0)):
        scorer = Scorer(model, indptr, indices, **route)
        got = scorer.score(torch.arange(N_USERS)).T.reshape(-1)  # case order: item-major
        np.testing.assert_allclose(got.double().numpy(), expected, rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(scorer.score_pairs(users, items).double().numpy(), expected, rtol=0,
                                   atol=1e-5 * scale)


@pytest.mark.parametrize("hops", [1, 3])
def test_last_hop_attention_matches_reference(case, hops):
    model = make_cmn(N_USERS, N_ITEMS, D, hops, seed=11)
    (_, p), nbr, seg = module_scores(model, case, return_attention=True)
    _, p_ref, nbr_ref, mask = reference_scores(model, case)
    for b in range(len(mask)):
        got = {int(v): float(w) for v, w in zip(nbr[seg == b], p[seg == b])}
        want = {int(v): float(w) for v, w in zip(nbr_ref[b][mask[b]], p_ref[b][mask[b]])}
        assert got.keys() == want.keys()
        for v in want:
            assert got[v] == pytest.approx(want[v], abs=1e-6)


def test_padding_does_not_leak_between_pairs(case):
    """A pair's score must not depend on which other pairs share its batch (and their padding)."""
    model = make_cmn(N_USERS, N_ITEMS, D, 3, seed=5)
    _, indptr, indices, users, items = case
    together, _, _ = module_scores(model, case)
    for b in (0, 9, 17, 50):
        nbr, seg = gather_neighbourhoods(indptr, indices, users[b:b + 1], items[b:b + 1])
        with torch.no_grad():
            alone = model(users[b:b + 1], items[b:b + 1], nbr, seg)
        assert alone.item() == pytest.approx(together[b].item(), abs=1e-6)


def test_gather_neighbourhoods_rules(case):
    train, indptr, indices, _, _ = case
    lonely_item, lonely_user = 0, int(train[train[:, 1] == 0][0, 0])   # item 0's only user
    users = torch.tensor([3, 4, lonely_user, 2, 5])
    items = torch.tensor([1, 6, lonely_item, lonely_item, 3])           # item 1: no training users
    for exclude_self in (False, True):
        nbr, seg = gather_neighbourhoods(indptr, indices, users, items, exclude_self)
        for b, (u, i) in enumerate(zip(users.tolist(), items.tolist())):
            got = sorted(nbr[seg == b].tolist())
            assert got == neighbourhood(train, u, i, exclude_self), (u, i, exclude_self)
    nbr, seg = gather_neighbourhoods(indptr, indices, users, items)
    assert nbr[seg == 0].tolist() == [3]                                  # empty item → the user alone
    assert 4 in nbr[seg == 1].tolist()                                    # default keeps the user in N(i)
    nbr, seg = gather_neighbourhoods(indptr, indices, users, items, exclude_self=True)
    assert 4 not in nbr[seg == 1].tolist() and len(nbr[seg == 1]) == N_USERS - 1
    assert nbr[seg == 2].tolist() == [lonely_user]                        # nothing left → [u] again


def test_gradcheck_all_parameters():
    rng = np.random.default_rng(3)
    n_users, n_items = 5, 4
    train = random_train(rng, n_users, [1, 0, 3, 5])
    indptr, indices = item_user_csr(train, n_items)
    model = make_cmn(n_users, n_items, d=3, hops=3, seed=2, sparse_grad=False).double()
    users = torch.tensor([0, 1, 2, 3, 4, 0, 2, 4])
    items = torch.tensor([0, 1, 2, 3, 0, 3, 1, 2])
    nbr, seg = gather_neighbourhoods(indptr, indices, users, items)
    names = [n for n, _ in model.named_parameters()]
    assert {"hop_maps.0.weight", "hop_maps.1.bias", "output.weight", "v.weight", "user_output"} <= set(names)
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in model.named_parameters())

    def f(*flat):
        return functional_call(model, dict(zip(names, flat)), (users, items, nbr, seg))

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-6, rtol=1e-4)


# --------------------------------------------------------------------------- initialisation

def truncated_std(sigma: float) -> float:
    """Standard deviation of N(0, σ²) truncated to ±2σ (TF's truncated_normal(stddev=σ))."""
    phi2 = math.exp(-2.0) / math.sqrt(2 * math.pi)
    mass = math.erf(2 / math.sqrt(2))
    return sigma * math.sqrt(1 - 4 * phi2 / mass)


def assert_truncated_normal(t: torch.Tensor, sigma: float, rel: float):
    x = t.detach().double()
    assert x.abs().max().item() <= 2 * sigma * (1 + 1e-6)
    assert x.abs().max().item() > 1.5 * sigma            # really a (truncated) normal, not something narrower
    assert x.std().item() == pytest.approx(truncated_std(sigma), rel=rel)
    assert abs(x.mean().item()) < 0.05 * sigma


def test_initialisation():
    torch.manual_seed(0)
    d = 64
    model = CMN(CMNConfig(n_users=3000, n_items=2000, embed_size=d, hops=3))
    for table in (model.user_memory, model.user_output, model.item_memory):
        assert_truncated_normal(table, 0.01, rel=0.02)
    assert len(model.hop_maps) == 2
    assert not torch.equal(model.hop_maps[0].weight, model.hop_maps[1].weight)   # one map per hop, not shared
    for m in model.hop_maps:
        assert_truncated_normal(m.weight, math.sqrt(2.6 / d), rel=0.05)
        assert torch.equal(m.bias, torch.ones(d))
    assert model.output.weight.shape == (d, 2 * d)
    assert_truncated_normal(model.output.weight, math.sqrt(2.6 / (2 * d)), rel=0.05)
    assert torch.equal(model.output.bias, torch.zeros(d))
    assert model.v.bias is None and model.v.weight.shape == (1, d)
    bound = math.sqrt(6 / (d + 1))                       # Xavier uniform, fan_in d, fan_out 1
    assert model.v.weight.abs().max().item() <= bound and model.v.weight.abs().max().item() > 0.5 * bound


def test_one_hop_has_no_hop_map():
    model = CMN(CMNConfig(n_users=4, n_items=3, embed_size=5, hops=1))
    assert len(model.hop_maps) == 0
    assert not any(n.startswith("hop_maps") for n, _ in model.named_parameters())


@pytest.mark.parametrize("hops,l2", [(3, 0.1), (2, 0.37)])
def test_l2_penalty_by_hand(hops, l2):
    torch.manual_seed(1)
    model = CMN(CMNConfig(n_users=6, n_items=5, embed_size=4, hops=hops, l2=l2))
    P = numpy_params(model)
    by_hand = l2 * (sum((W ** 2).sum() for W in P["W"]) + (P["U"] ** 2).sum() + (P["v"] ** 2).sum()) / 2
    assert model.l2_penalty().item() == pytest.approx(by_hand, rel=1e-6)
    model.l2_penalty().backward()
    for table in (model.user_memory, model.user_output, model.item_memory, model.output.bias,
                  *(m.bias for m in model.hop_maps)):  # no L2 on embeddings or biases
        assert table.grad is None or not table.grad.any()
