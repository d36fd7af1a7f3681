"""Fold-in (cold start): the fitted rows' scores and gradients against CMN.forward and autograd on the whole model
with the user (item) added, determinism, what growth may and may not change, anonymous histories leaving no trace.
What fold-in is for (ranking cold users' held-out items far above popularity) is training/test_coldstart.py."""
import numpy as np
import pytest
import torch

from conftest import make_cmn, random_train
from model.cmn import CMN, CMNConfig, bpr_loss, gather_neighbourhoods
from model.foldin import FoldInConfig, Frozen, ItemNeighbours, UserPairs
from model.online import Online
from model.recommender import Recommender
from model.retrieval import ItemRetrieval, TwoStage

N_USERS, D = 30, 6
LENGTHS = [0, 1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 0, 1, 1, 2, 6, 11, 3, 8, 15]
N_ITEMS = len(LENGTHS)


def setup(exclude_self: bool = False, hops: int = 3):
    train = random_train(np.random.default_rng(4), N_USERS, LENGTHS)
    model = make_cmn(N_USERS, N_ITEMS, D, hops=hops, seed=2)
    model.cfg.exclude_self = exclude_self
    return model, train, Recommender.from_model(model, train)


def grown(model: CMN, users: torch.Tensor | None = None, items: torch.Tensor | None = None) -> CMN:
    """The whole model with rows appended: M and C rows `users` (2, d) or an E row `items` (d,)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n_users, n_items = model.cfg.n_users, model.cfg.n_items
    if users is not None:
        state["user_memory"] = torch.cat([state["user_memory"], users[:1]])
        state["user_output"] = torch.cat([state["user_output"], users[1:]])
        n_users += 1
    if items is not None:
        state["item_memory"] = torch.cat([state["item_memory"], items[None]])
        n_items += 1
    big = CMN(CMNConfig(n_users, n_items, D, model.cfg.hops, exclude_self=model.cfg.exclude_self), sparse_grad=False)
    big.load_state_dict(state)
    return big


def csr(pairs: np.ndarray, n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    by_item = [sorted(set(pairs[pairs[:, 1] == j, 0].tolist())) for j in range(n_items)]
    return (torch.tensor(np.cumsum([0] + [len(b) for b in by_item])),
            torch.tensor([u for b in by_item for u in b], dtype=torch.long))


def forward(model: CMN, pairs: np.ndarray, users, items) -> torch.Tensor:
    """CMN.forward on (users[b], items[b]) with N(i) from `pairs`, gathered here."""
    indptr, indices = csr(pairs, model.cfg.n_items)
    users, items = torch.as_tensor(users), torch.as_tensor(items)
    nbr, seg = gather_neighbourhoods(indptr, indices, users, items, model.cfg.exclude_self)
    return model(users, items, nbr, seg)


# --------------------------------------------------------------------------- the fitted computation

@pytest.mark.parametrize("exclude_self", [False, True])
def test_user_scores_and_gradient_are_the_whole_models(exclude_self):
    """A new user u in N(i) of its history: its scores are CMN.forward's on the model with u's rows appended, and
    the BPR gradient on its two rows is autograd's over that whole model (items 0 and 11 have no users: N = [u])."""
    model, train, rec = setup(exclude_self)
    history, negatives = [1, 3, 11, 7], [2, 4, 0, 9, 12, 5, 19, 6]
    fz = Frozen(rec.scorer)
    rows = torch.randn(2, D, generator=torch.Generator().manual_seed(1), requires_grad=True)
    items = torch.tensor(history + negatives)
    pairs = UserPairs(fz, items, torch.arange(len(items)) < len(history))
    scores = pairs.scores(fz, rows[0], rows[1])
    bpr_loss(scores[:4], scores[4:].view(4, 2)).backward()

    big = grown(model, users=rows.detach())
    u = N_USERS
    joined = np.concatenate([train, [[u, i] for i in history]])
    expected = forward(big, joined, [u] * len(items), items)
    assert torch.allclose(scores.detach(), expected.detach(), atol=1e-5)
    bpr_loss(expected[:4], expected[4:].view(4, 2)).backward()
    assert torch.allclose(rows.grad[0], big.user_memory.grad[u], atol=1e-5)
    assert torch.allclose(rows.grad[1], big.user_output.grad[u], atol=1e-5)
    assert rows.grad[1].abs().max() > 0        # C[u] is reached: u's own slots (or N = [u])


@pytest.mark.parametrize("exclude_self", [False, True])
def test_item_scores_and_gradient_are_the_whole_models(exclude_self):
    """A new item x with N(x) = its users: scores of (q, x) and the gradient on E[x] are the whole model's, for
    queries in N(x) (under exclude_self one is N(x)'s only user: it attends to itself) and outside it."""
    model, train, rec = setup(exclude_self)
    users = [4] if exclude_self else [4, 9, 17, 23]
    queries = torch.tensor([4, 9, 0, 1, 17, 29, 23])
    fz = Frozen(rec.scorer)
    e = torch.randn(D, generator=torch.Generator().manual_seed(3), requires_grad=True)
    scores = ItemNeighbours(fz, torch.tensor(users)).scores(fz, e, queries)
    (scores * torch.arange(1.0, 8.0)).sum().backward()

    big = grown(model, items=e.detach())
    x = N_ITEMS
    joined = np.concatenate([train, [[u, x] for u in users]])
    expected = forward(big, joined, queries, [x] * len(queries))
    assert torch.allclose(scores.detach(), expected.detach(), atol=1e-5)
    (expected * torch.arange(1.0, 8.0)).sum().backward()
    assert torch.allclose(e.grad, big.item_memory.grad[x], atol=1e-5)


def test_fold_in_is_deterministic_for_a_seed_and_fits():
    _, _, rec = setup()
    a, b, other = rec.fold_in([1, 3, 7, 9], seed=5), rec.fold_in([1, 3, 7, 9], seed=5), rec.fold_in([1, 3, 7, 9], 6)
    assert torch.equal(a.memory, b.memory) and torch.equal(a.output, b.output)
    assert not torch.equal(a.memory, other.memory)      # other negatives
    assert a.items == [1, 3, 7, 9]
    rec.foldin = FoldInConfig(steps=1)
    first = rec.fold_in([1, 3, 7, 9], seed=5)
    rec.foldin = FoldInConfig(steps=30, lr=0.05)
    fitted = rec.fold_in([1, 3, 7, 9], seed=5)
    assert fitted.loss < first.loss and not torch.equal(first.memory, fitted.memory)


@pytest.mark.parametrize("bad, message", [([], "empty history"), ([3, N_ITEMS], "not in the catalogue"),
                                          ([-1], "not in the catalogue")])
def test_bad_histories_are_refused(bad, message):
    _, _, rec = setup()
    with pytest.raises(ValueError, match=message):
        rec.fold_in(bad)
    with pytest.raises(ValueError, match=message):
        rec.recommend(histories=[[1, 2], bad])


# --------------------------------------------------------------------------- anonymous histories

def state_of(rec: Recommender) -> dict:
    return {"scores": rec.score(list(range(rec.n_users))), "indptr": rec.scorer.indptr.clone(),
            "indices": rec.scorer.indices.clone(), "seen": [rec.seen(u) for u in range(rec.n_users)],
            "users": rec.n_users, "items": rec.n_items, "popular": rec.popular(N_ITEMS)[0],
            "M": rec.scorer.model.user_memory[:rec.n_users].clone()}


def test_anonymous_histories_leave_no_trace_and_rank_as_a_live_user_would():
    model, train, rec = setup()
    before = state_of(rec)
    histories = [[1, 3, 7], [9, 10, 15, 2], [0, 11]]
    items, scores = rec.recommend(histories=histories, k=5, seed=3)
    after = state_of(rec)
    for key, value in before.items():
        assert (torch.equal(value, after[key]) if isinstance(value, torch.Tensor) else value == after[key]), key
    assert all(not set(row) & set(h) for row, h in zip(items.tolist(), histories))
    # a history's list does not depend on its batch, and is the list of a live user folded from it
    assert torch.equal(rec.recommend(histories=[histories[1]], k=5, seed=3)[0][0], items[1])
    live = Online(rec).add_user(histories[1], seed=3)
    assert torch.equal(rec.recommend([live], k=5)[0][0], items[1])


def test_anonymous_scores_are_the_folded_rows_scores():
    """Whole-catalogue scores of a folded history equal CMN.forward for a user with those rows, in no N(i)."""
    model, train, rec = setup()
    folded = rec.fold_in([2, 5, 8, 13], seed=1)
    scores = rec.score(histories=[folded])[0]
    big = grown(model, users=torch.stack([folded.memory, folded.output]))
    expected = forward(big, train, [N_USERS] * N_ITEMS, torch.arange(N_ITEMS))
    assert torch.allclose(scores, expected.detach(), atol=1e-5)


# --------------------------------------------------------------------------- live users and items

def test_a_live_user_changes_scores_only_through_its_neighbourhoods():
    """Existing users' scores of items outside the new user's history are what they were (bit for bit on the pair
    route; the whole-catalogue routes' GEMMs change shape with the tables, which may move a score by an ulp); those
    of its items now read it in N(i), as CMN.forward on the grown model does."""
    model, train, rec = setup()
    online = Online(rec)
    users = list(range(N_USERS))
    catalogue = torch.arange(N_ITEMS).expand(N_USERS, -1)
    before, pairs_before = rec.score(users), rec.score(users, catalogue)
    history = [3, 8, 10, 14]
    u = online.add_user(history, seed=0)
    assert (u, rec.n_users, online.live_users, online.is_live_user(u), online.is_live_user(0)) == (N_USERS, N_USERS + 1, 1,
                                                                                         True, False)
    assert rec.seen(u) == frozenset(history)
    after = rec.score(users)
    untouched = [i for i in range(N_ITEMS) if i not in history]
    assert torch.equal(rec.score(users, catalogue)[:, untouched], pairs_before[:, untouched])
    assert torch.allclose(after[:, untouched], before[:, untouched], rtol=0, atol=1e-6)
    rows = torch.stack([rec.scorer.model.user_memory[u], rec.scorer.model.user_output[u]])
    joined = np.concatenate([train, [[u, i] for i in history]])
    expected = forward(grown(model, users=rows), joined, np.repeat(users, len(history)), history * N_USERS)
    assert torch.allclose(after[:, history].reshape(-1), expected.detach(), atol=1e-5)
    assert torch.equal(model.user_memory, make_cmn(N_USERS, N_ITEMS, D, hops=3, seed=2).user_memory)  # caller's


def test_many_live_users_grow_the_tables_in_chunks_and_every_route_agrees():
    model, train, rec = setup()
    online = Online(rec)
    rec.foldin = FoldInConfig(steps=1)              # the fit is not what this is about
    before = rec.score([0, 5])
    capacities = set()
    for n in range(70):
        online.add_user([(n * 7) % 10, 10 + n % 3], seed=n)
        capacities.add(rec.scorer.capacity)
    assert rec.n_users == N_USERS + 70 and rec.scorer.capacity >= rec.n_users
    assert len(capacities) == 2                     # two reallocations for 70 users, not one per user
    assert model.cfg.n_users == N_USERS and model.user_memory.shape[0] == N_USERS   # the caller's model as it was
    users = [0, 5, N_USERS + 3, N_USERS + 69]
    packed = rec.score(users)                                     # up to 8 users: the packed route
    bucketed = rec.score(users + list(range(10, 20)))[:4]         # more: the bucketed route
    pairs = rec.score(users, torch.arange(N_ITEMS).expand(4, -1))
    assert torch.allclose(packed, pairs, atol=1e-5) and torch.allclose(bucketed, pairs, atol=1e-5)
    assert torch.allclose(packed[:2, 13:], before[:, 13:], rtol=0, atol=1e-6)   # items no live user touched


def test_a_refit_live_user_is_scored_from_its_new_rows_everywhere():
    model, train, rec = setup()
    online = Online(rec)
    rec.score(list(range(12)))                       # build the bucketed route's caches first
    u = online.add_user([1, 2], seed=0)
    online.add_interactions([u, u, u], [5, 9, 13])
    old = rec.scorer.model.user_memory[u].clone()
    online.refit_user(u, seed=1)
    assert not torch.equal(old, rec.scorer.model.user_memory[u])
    users = [u, 0, 3]                                 # 0 and 3 read u in N(5), N(9)...
    pairs = rec.score(users, torch.arange(N_ITEMS).expand(3, -1))
    assert torch.allclose(rec.score(users), pairs, atol=1e-5)
    assert torch.allclose(rec.score(users + list(range(10, 20)))[:3], pairs, atol=1e-5)
    with pytest.raises(ValueError, match="not a live user"):
        online.refit_user(0)


def test_a_live_item_is_a_candidate_with_its_users_as_neighbourhood():
    model, train, rec = setup()
    online = Online(rec)
    users = list(range(N_USERS))
    catalogue = torch.arange(N_ITEMS).expand(N_USERS, -1)
    before, pairs_before = rec.score(users), rec.score(users, catalogue)
    fans = [2, 6, 11]
    x = online.add_item(fans, seed=0)
    assert (x, rec.n_items, online.live_items, online.is_live_item(x)) == (N_ITEMS, N_ITEMS + 1, 1, True)
    s = rec.scorer
    assert s.indices[s.indptr[x]:s.indptr[x + 1]].tolist() == fans          # N(x): its users
    assert all(x in rec.seen(u) for u in fans)
    popular = dict(zip(*(t.tolist() for t in rec.popular(N_ITEMS + 1))))
    assert popular[x] == len(fans)                                           # counted in popularity
    after = rec.score(users)
    assert torch.equal(rec.score(users, catalogue), pairs_before)           # no item's N(i) changed
    assert torch.allclose(after[:, :N_ITEMS], before, rtol=0, atol=1e-6)
    joined = np.concatenate([train, [[u, x] for u in fans]])
    expected = forward(grown(model, items=s.model.item_memory[x]), joined, users, [x] * N_USERS)
    assert torch.allclose(after[:, x], expected.detach(), atol=1e-5)
    others = [u for u in users if u not in fans]
    items, _ = rec.recommend(others, k=N_ITEMS + 1)
    assert all(x in row for row in items.tolist())                          # everyone else may get it
    assert all(x not in row for row in rec.recommend(fans, k=N_ITEMS + 1)[0].tolist())
    assert {v for v, _ in rec.explain(0, [x], top=5)[0]} <= set(fans)
    online.add_interactions([7], [x])
    online.refit_item(x, seed=1)
    pairs = rec.score([0, 7], torch.arange(N_ITEMS + 1).expand(2, -1))
    assert torch.allclose(rec.score([0, 7]), pairs, atol=1e-5)


def test_retrieval_proposes_a_live_item_as_the_mix_of_its_users_items():
    """Two-stage: a live item's retrieval score is the mix (by how many of its users had them) of the scores of
    the trained items its users interacted with."""
    model, train, _ = setup()
    rng = np.random.default_rng(0)
    dense = torch.tensor(rng.random((N_ITEMS, N_ITEMS)) * (rng.random((N_ITEMS, N_ITEMS)) < 0.3), dtype=torch.float32)
    w = dense.to_sparse_csr()
    retrieval = ItemRetrieval(w.crow_indices(), w.col_indices(), w.values(), N_ITEMS)
    rec = Recommender.from_model(model, train, retrieval=retrieval, two_stage=TwoStage("rp3beta", 8, 0.5, {}))
    fans = [2, 6]
    x = Online(rec).add_item(fans, seed=0)
    mix = np.zeros(N_ITEMS)
    for u in fans:
        for i in rec.seen(u) - {x}:
            mix[i] += 1
    mix /= mix.sum()
    history = [1, 4, 9]
    scores = retrieval.scores([history])[0]
    expected = dense[history].sum(0)
    assert torch.allclose(scores[:N_ITEMS], expected, atol=1e-6)
    assert torch.allclose(scores[x], (expected.double() @ torch.tensor(mix)).float(), atol=1e-6)
    # in a history, x retrieves its mix of rows
    assert torch.allclose(retrieval.scores([[x]])[0, :N_ITEMS], (torch.tensor(mix).float() @ dense), atol=1e-6)
