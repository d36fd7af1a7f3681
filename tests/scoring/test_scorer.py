"""The scorer's routes (candidate pairs, packed and bucketed full catalogue) agree with CMN.forward; the
scorer builds its buckets only when needed, leaves the caller's model alone, and gives the same numbers with
the private torch calls of model/kernels.py as with their public fallbacks."""
import numpy as np
import pytest
import torch

from conftest import (item_user_csr, make_cmn, neighbourhood, numpy_params, random_train, reference_forward,
                      small_checkpoint)
from model import kernels
from model.store.checkpoint import load_checkpoint
from model.cmn import gather_neighbourhoods
from model.ranking import top_k
from model.scoring import Scorer
from model.scoring.bucketed import bucket_cap

N_USERS, D = 40, 6
# lengths spread over many bucket caps (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48) with several empty items
LENGTHS = [0, 1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 40, 0, 1, 1, 2, 6, 11, 0, 3, 8, 15, 21, 2, 1]
N_ITEMS = len(LENGTHS)
EMPTY = [i for i, n in enumerate(LENGTHS) if n == 0]


@pytest.fixture(scope="module")
def train():
    return random_train(np.random.default_rng(1), N_USERS, LENGTHS)


def forward_all(model, train, users):
    """(U, n_items) straight from CMN.forward on packed neighbourhoods."""
    indptr, indices = item_user_csr(train, N_ITEMS)
    u = torch.as_tensor(users).repeat_interleave(N_ITEMS)
    i = torch.arange(N_ITEMS).repeat(len(users))
    nbr, seg = gather_neighbourhoods(indptr, indices, u, i)
    with torch.no_grad():
        return model(u, i, nbr, seg).view(len(users), N_ITEMS)


@pytest.mark.parametrize("hops", [1, 2, 3])
@pytest.mark.parametrize("chunk_items", [2048, 3])  # 3: buckets split into several chunks
def test_full_catalogue_equals_pairs_equals_forward(train, hops, chunk_items):
    model = make_cmn(N_USERS, N_ITEMS, D, hops, seed=hops)
    scorer = Scorer(model, *item_user_csr(train, N_ITEMS, rng=np.random.default_rng(0)), chunk_items=chunk_items)
    users = torch.tensor([0, 5, 17, 39, 5])
    full = scorer.score(users)
    assert full.shape == (len(users), N_ITEMS)
    pairs = scorer.score(users, torch.arange(N_ITEMS).expand(len(users), -1))
    expected = forward_all(model, train, users)
    assert expected.std() > 0.1                               # a case where scores actually differ
    torch.testing.assert_close(full, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(pairs, expected, rtol=0, atol=1e-4)
    # and both against the numpy reference, empty items included (N(i) = [u])
    nbrs = [neighbourhood(train, u, i) for u in users.tolist() for i in range(N_ITEMS)]
    ref, *_ = reference_forward(numpy_params(model), users.repeat_interleave(N_ITEMS).numpy(),
                                np.tile(np.arange(N_ITEMS), len(users)), nbrs)
    np.testing.assert_allclose(full.numpy().ravel(), ref, rtol=0, atol=1e-4)
    assert np.abs(ref.reshape(len(users), N_ITEMS)[:, EMPTY]).max() > 0   # empty items are really scored


def test_candidate_lists_and_exclude_self(train):
    model = make_cmn(N_USERS, N_ITEMS, D, hops=3, seed=4)
    csr = item_user_csr(train, N_ITEMS)
    users = torch.tensor([2, 9, 30])
    candidates = torch.tensor([[12, 0, 3, 3], [25, 11, 1, 19], [7, 7, 13, 4]])
    scores = Scorer(model, *csr).score(users, candidates)
    full = forward_all(model, train, users)
    torch.testing.assert_close(scores, full.gather(1, candidates), rtol=0, atol=1e-5)

    model.cfg.exclude_self = True
    excl = Scorer(model, *csr)
    nbrs = [neighbourhood(train, u, i, exclude_self=True) for u in users.tolist() for i in range(N_ITEMS)]
    ref, *_ = reference_forward(numpy_params(model), users.repeat_interleave(N_ITEMS).numpy(),
                                np.tile(np.arange(N_ITEMS), len(users)), nbrs)
    np.testing.assert_allclose(excl.score(users).numpy().ravel(), ref, rtol=0, atol=1e-4)
    assert not np.allclose(ref, full.numpy().ravel(), atol=1e-3)  # exclusion changes some scores


def test_refresh_after_weight_change(train):
    model = make_cmn(N_USERS, N_ITEMS, D, hops=2, seed=8)
    scorer = Scorer(model, *item_user_csr(train, N_ITEMS))
    users = torch.tensor([1, 2])
    with torch.no_grad():
        model.item_memory.mul_(1.5)
    scorer.refresh()
    torch.testing.assert_close(scorer.score(users), forward_all(model, train, users), rtol=0, atol=1e-4)


def test_csr_size_mismatch_is_rejected(train):
    model = make_cmn(N_USERS, N_ITEMS, D, hops=1)
    indptr, indices = item_user_csr(train, N_ITEMS)
    with pytest.raises(ValueError, match="items"):
        Scorer(model, indptr[:-1], indices)


def test_bucket_caps():
    assert [bucket_cap(n) for n in (1, 2, 5, 7, 1024, 1025, 3000)] == [1, 2, 6, 8, 1024, 2048, 4096]


def test_top_k_with_banned():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.3],
                           [1.0, 2.0, 3.0, 4.0, 5.0]])
    banned = torch.tensor([[False, True, False, False, False],
                           [True, True, True, False, True]])
    values, idx = top_k(scores, 3, banned)
    assert idx[0].tolist() == [3, 2, 4]
    assert values[0].tolist() == pytest.approx([0.7, 0.5, 0.3])
    assert idx[1, 0].item() == 3 and values[1, 0].item() == 4.0   # the one allowed entry first
    assert torch.isinf(values[1, 1:]).all()                        # then -inf padding that callers drop
    values, idx = top_k(scores, 10)                                 # k beyond the catalogue: everything
    assert idx.shape == (2, 5) and idx[1].tolist() == [4, 3, 2, 1, 0]


def test_attention(train):
    model = make_cmn(N_USERS, N_ITEMS, D, hops=3, seed=6)
    scorer = Scorer(model, *item_user_csr(train, N_ITEMS))
    user, items = 3, torch.arange(N_ITEMS)
    top = scorer.attention(user, items, top=4)
    everything = scorer.attention(user, items, top=N_USERS)
    nbrs = [neighbourhood(train, user, i) for i in range(N_ITEMS)]
    _, p_ref, nbr_ref, mask = reference_forward(numpy_params(model), np.full(N_ITEMS, user), np.arange(N_ITEMS),
                                                nbrs)
    assert len(top) == N_ITEMS
    for i in range(N_ITEMS):
        weights = [w for _, w in top[i]]
        assert len(top[i]) == min(4, len(nbrs[i]))
        assert all(v in nbrs[i] for v, _ in top[i])
        assert weights == sorted(weights, reverse=True) and all(0 <= w <= 1 for w in weights)
        assert sum(weights) <= 1 + 1e-6
        assert sum(w for _, w in everything[i]) == pytest.approx(1.0, abs=1e-5)
        want = dict(zip(nbr_ref[i][mask[i]].tolist(), p_ref[i][mask[i]].tolist()))
        for v, w in everything[i]:
            assert w == pytest.approx(want[v], abs=1e-5)
    for i in EMPTY:
        assert top[i] == [(user, pytest.approx(1.0))]


def test_attention_order_is_exact_for_peaked_weights(train):
    """Large memories make attention weights span many orders of magnitude (1 down to 1e-20, many underflow
    to exactly 0): each item's list must still be its `top` largest non-zero weights in descending order, for
    every item position in the call."""
    model = make_cmn(N_USERS, N_ITEMS, D, hops=3, seed=6, embed_std=2.0)
    zeros = 0
    scorer = Scorer(model, *item_user_csr(train, N_ITEMS))
    indptr, indices = item_user_csr(train, N_ITEMS)
    for user in range(N_USERS):
        items = torch.arange(N_ITEMS)
        nbr, seg = gather_neighbourhoods(indptr, indices, torch.full_like(items, user), items)
        with torch.no_grad():
            _, p = model(torch.full_like(items, user), items, nbr, seg, return_attention=True)
        for i, listed in enumerate(scorer.attention(user, items, top=5)):
            weights = [w for _, w in listed]
            assert weights == sorted(weights, reverse=True), (user, i, weights)
            everything = sorted(p[seg == i].tolist(), reverse=True)
            assert weights == [w for w in everything if w > 0][:5], (user, i)
            zeros += everything[:5].count(0.0)
    assert zeros > 0  # the case does reach exact zeros among the top 5, which are left out



def test_fallback_kernels_give_the_private_calls_numbers(train, monkeypatch):
    """Every route, with attention peaked enough to underflow exp, bit for bit with and without the private calls."""
    if not (kernels.PRIVATE_SOFTMAX and kernels.PRIVATE_SEGMENT_MAX):
        pytest.skip(f"torch {torch.__version__}: a private call is unavailable, only the fallback runs")
    model = make_cmn(N_USERS, N_ITEMS, D, hops=3, seed=6, embed_std=2.0)
    csr = item_user_csr(train, N_ITEMS, rng=np.random.default_rng(0))
    users = torch.tensor([0, 5, 17, 39, 5])
    candidates = torch.arange(N_ITEMS).expand(len(users), -1)

    def every_route():
        packed = Scorer(model, *csr)
        bucketed = Scorer(model, *csr, packed_max_users=0, block_pairs=7, chunk_items=3)
        return packed.score(users, candidates), packed.score(users[:3]), bucketed.score(users)

    fast = every_route()
    monkeypatch.setattr(kernels, "PRIVATE_SOFTMAX", False)
    monkeypatch.setattr(kernels, "PRIVATE_SEGMENT_MAX", False)
    for got, want in zip(every_route(), fast):
        assert torch.equal(got, want)


def test_kernel_checks_refuse_a_missing_broken_or_unchecked_private_call(monkeypatch):
    segment_reduce = torch.segment_reduce

    def without_unsafe(data, reduce, *, lengths=None, axis=0):  # as a torch that dropped the argument
        return segment_reduce(data, reduce, lengths=lengths, axis=axis)

    with monkeypatch.context() as patch:
        patch.delattr(torch, "_softmax")
        assert not kernels._private_softmax_works()
    with monkeypatch.context() as patch:
        patch.setattr(torch, "segment_reduce", without_unsafe)
        assert not kernels._private_segment_max_works()
    with monkeypatch.context() as patch:
        patch.setattr(torch, "__version__", torch.torch_version.TorchVersion("3.0.0"))
        assert not kernels._private_softmax_works() and not kernels._private_segment_max_works()


def test_buckets_are_built_by_the_first_bucketed_call_only(train):
    model = make_cmn(N_USERS, N_ITEMS, D, hops=3, seed=2)
    scorer = Scorer(model, *item_user_csr(train, N_ITEMS), packed_max_users=1)
    users = torch.tensor([2, 9, 30])
    scorer.score(users, torch.tensor([[12, 0, 3], [25, 11, 1], [7, 13, 4]]))   # per-epoch evaluation
    scorer.score(users[:1])                                                     # full catalogue, packed route
    assert scorer.bucketed is None
    new = np.array([[3, 0], [2, 19], [4, 11], [5, 8]])   # into empty items (one the scored user's), longer ones
    fresh = len({(int(u), int(i)) for u, i in new} - {(int(u), int(i)) for u, i in train})
    assert fresh >= 2
    assert scorer.add_interactions(torch.as_tensor(new[:, 0]), torch.as_tensor(new[:, 1])) == fresh
    assert scorer.bucketed is None
    expected = forward_all(model, np.concatenate([train, new]), users)
    torch.testing.assert_close(scorer.score(users[:1]), expected[:1], rtol=0, atol=1e-4)
    assert scorer.bucketed is None
    torch.testing.assert_close(scorer.score(users), expected, rtol=0, atol=1e-4)  # 3 users: the bucketed route
    assert scorer.bucketed is not None
    scorer.refresh()
    assert scorer.bucketed is None


def test_scorer_leaves_the_callers_model_alone(train):
    model = make_cmn(N_USERS, N_ITEMS, D, hops=2, seed=3).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scorer = Scorer(model, *item_user_csr(train, N_ITEMS), device="cpu")
    users = torch.tensor([1, 2])
    scorer.score(users)
    scorer.score(users, torch.tensor([[0, 1], [2, 3]]))
    scorer.attention(1, torch.arange(N_ITEMS))
    assert scorer.model is model  # already on the scoring device: used as it is, not copied
    assert model.training and all(p.device.type == "cpu" for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scorer_on_another_device_scores_a_copy(train):
    model = make_cmn(N_USERS, N_ITEMS, D, hops=3, seed=3).train()
    csr = item_user_csr(train, N_ITEMS)
    scorer = Scorer(model, *csr, device="cuda")
    assert scorer.model is not model
    assert model.training and all(p.device.type == "cpu" for p in model.parameters())
    users = torch.tensor([1, 2, 30])
    expected = forward_all(model, train, users)
    for route in (dict(packed_max_users=10**6, graph_catalogue=False), dict(packed_max_users=0, graph_catalogue=False),
                  dict()):   # the last: CUDA's default, the graph-captured route
        got = Scorer(model, *csr, device="cuda", **route).score(users).cpu()
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(scorer.score(users, torch.arange(N_ITEMS).expand(3, -1)).cpu(), expected,
                               rtol=0, atol=1e-4)


def test_from_checkpoint(tmp_path):
    ckpt = load_checkpoint(small_checkpoint(tmp_path / "model.ckpt"))
    scorer = Scorer.from_checkpoint(ckpt, packed_max_users=0)
    assert scorer.device == torch.device("cpu") and scorer.packed_max_users == 0
    indptr, indices = (torch.as_tensor(a) for a in ckpt.item_users())
    n_items = ckpt.config.n_items
    users, items = torch.tensor([0, 4, 6]).repeat_interleave(n_items), torch.arange(n_items).repeat(3)
    with torch.no_grad():
        expected = scorer.model(users, items, *gather_neighbourhoods(indptr, indices, users, items)).view(3, -1)
    torch.testing.assert_close(scorer.score(torch.tensor([0, 4, 6])), expected, rtol=0, atol=1e-5)
