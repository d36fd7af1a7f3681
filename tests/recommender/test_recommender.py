"""The Recommender against lists worked out independently: scores from the reference forward (CMN.forward on
neighbourhoods gathered here), seen-sets and popularity counted here from the pairs, ranking by numpy argsort."""
import numpy as np
import pytest
import torch

from conftest import make_cmn, random_train
from model.cmn import gather_neighbourhoods
from model.online import Online
from model.recommender import Recommender

N_USERS, D = 30, 6
LENGTHS = [0, 1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 0, 1, 1, 2, 6, 11, 3, 8, 15]
N_ITEMS = len(LENGTHS)


@pytest.fixture
def setup():
    train = random_train(np.random.default_rng(4), N_USERS, LENGTHS)
    model = make_cmn(N_USERS, N_ITEMS, D, hops=3, seed=2)
    # seen: training pairs plus one extra interaction per user that is not in N(i) (a held-out positive, say)
    rng = np.random.default_rng(5)
    extra = np.array([[u, int(rng.integers(N_ITEMS))] for u in range(N_USERS)])
    seen = np.unique(np.concatenate([train, extra]), axis=0)
    return model, train, seen, Recommender.from_model(model, train, seen)


def reference_scores(model, train, users, n_items=N_ITEMS) -> np.ndarray:
    """CMN.forward over every (user, item), N(i) gathered from `train` by hand."""
    by_item = [sorted(set(train[train[:, 1] == j, 0].tolist())) for j in range(n_items)]
    indptr = torch.tensor(np.cumsum([0] + [len(b) for b in by_item]))
    indices = torch.tensor([u for b in by_item for u in b], dtype=torch.long)
    u = torch.tensor(users).repeat_interleave(n_items)
    i = torch.arange(n_items).repeat(len(users))
    nbr, seg = gather_neighbourhoods(indptr, indices, u, i)
    with torch.no_grad():
        return model(u, i, nbr, seg).view(len(users), n_items).numpy()


def ranked(scores: np.ndarray, items: list[int], banned: set[int], k: int) -> list[int]:
    kept = [i for i in items if i not in banned]
    return sorted(kept, key=lambda i: -scores[i])[:k]


def seen_of(seen: np.ndarray, user: int) -> set[int]:
    return set(seen[seen[:, 0] == user, 1].tolist())


@pytest.mark.parametrize("users", [[3], [0, 7, 29, 7, 12, 5, 1, 2, 8, 9, 11]])   # packed and bucketed routes
def test_whole_catalogue_top_k_without_seen_and_excluded(setup, users):
    model, train, seen, rec = setup
    ks = [(n % 4) * 3 + 1 for n in range(len(users))]
    exclude = [[(u * 7) % N_ITEMS, (u * 3 + 1) % N_ITEMS] for u in users]
    drop_seen = [n % 3 != 2 for n in range(len(users))]
    items, scores = rec.recommend(users, ks, drop_seen, exclude)
    ref = reference_scores(model, train, users)
    assert items.shape == scores.shape == (len(users), max(ks))
    for n, u in enumerate(users):
        banned = set(exclude[n]) | (seen_of(seen, u) if drop_seen[n] else set())
        expected = ranked(ref[n], list(range(N_ITEMS)), banned, ks[n])
        assert items[n, :ks[n]].tolist() == expected
        np.testing.assert_allclose(scores[n, :ks[n]].numpy(), ref[n, expected], rtol=0, atol=1e-5)
        assert (items[n, ks[n]:] == -1).all() and (scores[n, ks[n]:] == -torch.inf).all()


def test_candidate_lists_rank_their_own_items(setup):
    model, train, seen, rec = setup
    users = [4, 9, 4]
    candidates = [[1, 5, 9, 19, 0], [2], [17, 3, 8, 12, 6, 14, 15]]
    exclude = [[9], [], [3]]
    items, scores = rec.recommend(users, k=4, exclude=exclude, candidates=candidates)
    ref = reference_scores(model, train, users)
    for n, u in enumerate(users):
        expected = ranked(ref[n], candidates[n], set(exclude[n]) | seen_of(seen, u), 4)
        got = [i for i in items[n].tolist() if i >= 0]
        assert got == expected
        np.testing.assert_allclose(scores[n, :len(got)].numpy(), ref[n, expected], rtol=0, atol=1e-5)


def test_rows_with_fewer_items_than_k_are_padded(setup):
    _, _, seen, rec = setup
    user = 0
    unseen = sorted(set(range(N_ITEMS)) - seen_of(seen, user))
    items, scores = rec.recommend([user], k=N_ITEMS)
    assert sorted(items[0, :len(unseen)].tolist()) == unseen
    assert (items[0, len(unseen):] == -1).all() and (scores[0, len(unseen):] == -torch.inf).all()
    # every candidate seen or excluded: nothing left
    items, _ = rec.recommend([user], k=3, candidates=[sorted(seen_of(seen, user))])
    assert (items == -1).all()


def test_popular_is_training_popularity_without_exclusions(setup):
    _, train, _, rec = setup
    counts = np.bincount(train[:, 1], minlength=N_ITEMS)
    items, scores = rec.popular(5, exclude=[int(np.argmax(counts))])
    expected = [i for i in np.argsort(-counts, kind="stable") if i != np.argmax(counts)][:5]
    assert [counts[i] for i in items.tolist()] == [counts[i] for i in expected]
    assert scores.tolist() == [float(counts[i]) for i in items.tolist()]
    items, _ = rec.popular(2, candidates=[0, 10, 9, 1])
    assert items.tolist() == [10, 9]


def test_add_interactions_updates_seen_popularity_and_neighbourhoods(setup):
    model, train, seen, rec = setup
    assert not {0, 10} & seen_of(seen, 3) and 10 not in seen_of(seen, 22)
    new = [(3, 0), (3, 10), (22, 10), (int(train[0, 0]), int(train[0, 1]))]   # the last one is already seen
    before = rec.popular(N_ITEMS)
    assert Online(rec).add_interactions([u for u, _ in new], [i for _, i in new]) == new[:3]
    assert {0, 10} <= rec.seen(3) and 10 in rec.seen(22)
    assert rec.interactions == len(seen) + 3
    counts = dict(zip(before[0].tolist(), before[1].tolist()))
    after = dict(zip(*(t.tolist() for t in rec.popular(N_ITEMS))))
    assert after[0] == counts[0] + 1 and after[10] == counts[10] + 2
    # the users joined N(0) and N(10): scores equal the reference on the grown training pairs
    grown = np.unique(np.concatenate([train, np.array(new)]), axis=0)
    ref = reference_scores(model, grown, [3, 5])
    items, scores = rec.recommend([3, 5], k=N_ITEMS, exclude_seen=False)
    for n in range(2):
        np.testing.assert_allclose(scores[n].numpy(), ref[n, items[n].numpy()], rtol=0, atol=1e-5)
    assert 0 not in rec.recommend([3], k=N_ITEMS)[0][0].tolist()


def test_fed_back_popularity_gains_at_most_the_bound_until_training(setup):
    """Online(max_popularity_gain=2): every user without item 0 reports it, one user reports item 10, and a live
    item gets three users; each item's popularity is its trained count plus min(its new pairs, 2), by hand."""
    _, train, _, rec = setup
    trained = np.bincount(train[:, 1], minlength=N_ITEMS).astype(float)
    online = Online(rec, max_popularity_gain=2)
    reporters = [u for u in range(N_USERS) if 0 not in rec.seen(u)]
    new_for_10 = int(10 not in rec.seen(reporters[0]))
    online.add_interactions(reporters, [0] * len(reporters))
    online.add_interactions([reporters[0]], [10])
    live = online.add_item([1, 2, 3], seed=0)
    popularity = rec.popularity.tolist()
    assert len(reporters) > 2
    assert popularity[0] == trained[0] + 2 and popularity[10] == trained[10] + new_for_10
    assert popularity[live] == 2
    assert popularity[1:10] + popularity[11:N_ITEMS] == list(trained[1:10]) + list(trained[11:])


def test_explain_names_attended_neighbours(setup):
    _, train, _, rec = setup
    rows = rec.explain(2, [9, 10, 0], top=3)
    for item, row in zip([9, 10, 0], rows):
        members = set(train[train[:, 1] == item, 0].tolist()) or {2}
        assert 1 <= len(row) <= 3 and {v for v, _ in row} <= members
        weights = [w for _, w in row]
        assert weights == sorted(weights, reverse=True) and 0 < sum(weights) <= 1 + 1e-6
    assert rec.explain(2, []) == []


def test_settings_per_user_must_match_the_batch(setup):
    *_, rec = setup
    with pytest.raises(ValueError, match="2 values for 3 users"):
        rec.recommend([1, 2, 3], k=[5, 5])
