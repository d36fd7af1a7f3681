"""Neighbourhood caps (`--max-neighbours N`): each item's memory holds its N most recent users, in training,
evaluation and serving alike, and online feedback keeps the newest N. Expected neighbourhoods are computed here
from the raw rows (timestamps), not with the code under test."""
import numpy as np
import pytest
import torch

from conftest import make_cmn
from model.store.checkpoint import load_checkpoint
from model.cmn import CMNConfig, gather_neighbourhoods
from model.neighbours import keep_newest, neighbour_csr
from model.scoring import Scorer
from training import data as data_mod
from training import train as train_mod
from training.cli import main


def csr_of(lists: list[list[int]]):
    indptr = torch.tensor(np.concatenate([[0], np.cumsum([len(x) for x in lists])]), dtype=torch.long)
    return indptr, torch.tensor([u for x in lists for u in sorted(x)], dtype=torch.long)


def test_keep_newest_by_hand():
    items = np.array([0, 0, 0, 1, 1, 2])
    recency = np.array([5, 1, 3, 2, 9, 0])
    assert keep_newest(items, recency, 2).tolist() == [True, False, True, True, True, True]
    assert keep_newest(items, recency, 1).tolist() == [True, False, False, False, True, True]
    assert keep_newest(items, recency, None).all()
    assert keep_newest(np.array([4, 4, 4]), np.array([1, 1, 1]), 1).tolist() == [False, False, True]  # later row


def test_neighbour_csr_keeps_the_last_rows_of_each_item():
    pairs = np.array([[3, 0], [1, 1], [0, 0], [2, 0], [5, 1], [4, 0]])      # oldest first
    indptr, indices, recency = neighbour_csr(pairs, 3, 2)
    assert indptr.tolist() == [0, 2, 4, 4]
    assert indices.tolist() == [2, 4, 1, 5]          # item 0: users 2 and 4 (rows 3 and 5); item 1: both
    assert recency.tolist() == [3, 5, 1, 4]
    uncapped = neighbour_csr(pairs, 3, None)
    assert uncapped[0].tolist() == [0, 4, 6, 6] and uncapped[1].tolist() == [0, 2, 3, 4, 1, 5]


def timed_data():
    return data_mod.from_interactions(["a", "a", "b", "b", "c", "c", "d", "d"],
                                      ["x", "y", "x", "y", "x", "y", "x", "z"], [1, 9, 5, 2, 3, 7, 8, 4], seed=0)


def test_by_recency_orders_by_time_then_a_seeded_order_that_subsets_keep():
    data = timed_data()
    ordered = data_mod.by_recency(data, data.all_pairs(), seed=0)
    when = {("a", "x"): 1, ("a", "y"): 9, ("b", "x"): 5, ("b", "y"): 2, ("c", "x"): 3, ("c", "y"): 7, ("d", "x"): 8,
            ("d", "z"): 4}
    times = [when[(data.user_ids[u], data.item_ids[i])] for u, i in ordered]
    assert times == sorted(times)
    # without timestamps: a fixed order per seed, the same for any subset, different for another seed
    timeless = data_mod.Dataset(50, 40, np.array([(u, i) for u in range(50) for i in range(0, 40, 7)]), None,
                                [str(u) for u in range(50)], [str(i) for i in range(40)])
    full = data_mod.by_recency(timeless, timeless.train, seed=3)
    part = data_mod.by_recency(timeless, timeless.train[::3], seed=3)
    rank = {tuple(p): n for n, p in enumerate(full.tolist())}
    assert [rank[tuple(p)] for p in part.tolist()] == sorted(rank[tuple(p)] for p in part.tolist())
    assert not np.array_equal(full, data_mod.by_recency(timeless, timeless.train, seed=4))
    assert np.array_equal(full, data_mod.by_recency(timeless, timeless.train[::-1], seed=3))


@pytest.fixture
def capped_run(tmp_path, monkeypatch):
    """A small CSV with timestamps, trained with --max-neighbours 3; the neighbourhoods training used are recorded."""
    rng = np.random.default_rng(5)
    rows = []
    for u in range(40):
        for i in rng.choice(12, 6, replace=False):
            rows.append((f"u{u}", f"i{i}", int(rng.integers(0, 10**6))))
    (tmp_path / "d.csv").write_text("user,item,timestamp\n" + "\n".join(f"{u},{i},{t}" for u, i, t in rows) + "\n")
    seen = []
    real = train_mod.cmn_pair_scores
    monkeypatch.setattr(train_mod, "cmn_pair_scores",
                        lambda model, indptr, indices, ex: seen.append((indptr, indices)) or real(model, indptr,
                                                                                                  indices, ex))
    cfg = train_mod.TrainConfig(data=str(tmp_path / "d.csv"), out=str(tmp_path / "m.ckpt"), epochs=1,
                                pretrain_epochs=1, hops=2, embed_size=8, max_neighbours=3, device="cpu",
                                full_eval=False, progress=False)
    train_mod.train(cfg, log=lambda *a: None)
    return rows, cfg, seen


def newest(rows, exclude: set, cap: int) -> dict[str, set[str]]:
    """item → its `cap` latest users among `rows` less the (user, item) pairs in `exclude`, by hand."""
    by_item: dict[str, list] = {}
    for u, i, t in rows:
        if (u, i) not in exclude:
            by_item.setdefault(i, []).append((t, u))
    return {i: {u for _, u in sorted(x)[-cap:]} for i, x in by_item.items()}


def test_training_evaluation_and_serving_read_the_newest_n(capped_run):
    rows, cfg, seen = capped_run
    ckpt = load_checkpoint(cfg.out)
    assert ckpt.config.max_neighbours == 3
    held = {(ckpt.user_ids[u], ckpt.item_ids[i]) for u, i in zip(ckpt.test_users, ckpt.test_positives)}
    expected = newest(rows, held, 3)
    indptr, indices = ckpt.item_users()
    served = {ckpt.item_ids[j]: {ckpt.user_ids[v] for v in indices[indptr[j]:indptr[j + 1]]}
              for j in range(len(ckpt.item_ids))}
    assert served == expected
    (t_indptr, t_indices), = seen                                     # what training read: the same sets
    trained = {ckpt.item_ids[j]: {ckpt.user_ids[v] for v in t_indices[t_indptr[j]:t_indptr[j + 1]].tolist()}
               for j in range(len(ckpt.item_ids))}
    assert trained == expected
    # the served scorer scores with exactly these neighbourhoods
    model = ckpt.build_model("cpu")
    users = torch.arange(len(ckpt.user_ids)).repeat_interleave(len(ckpt.item_ids))
    items = torch.arange(len(ckpt.item_ids)).repeat(len(ckpt.user_ids))
    lists = [sorted(ckpt.user_ids.index(u) for u in expected.get(i, ())) for i in ckpt.item_ids]
    with torch.no_grad():
        want = model(users, items, *gather_neighbourhoods(*csr_of(lists), users, items)).view(len(ckpt.user_ids), -1)
    got = Scorer.from_checkpoint(ckpt).score(torch.arange(len(ckpt.user_ids)))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("route", [dict(packed_max_users=8), dict(packed_max_users=0, chunk_items=2)])
def test_feedback_keeps_the_newest_n(route):
    model = make_cmn(8, 4, d=6, hops=2)
    model.cfg = CMNConfig(8, 4, 6, 2, max_neighbours=3)
    lists = [[0, 1, 2], [3], [], [4, 5, 6]]
    recency = [[2, 0, 1], [5], [], [3, 4, 6]]              # item 0: user 1 is the oldest, then 2, then 0
    indptr, indices = csr_of(lists)
    scorer = Scorer(model, indptr, indices, recency=[r for x in recency for r in x], **route)
    users = torch.arange(8)
    scorer.score(users)                                    # caches built: the update must patch them
    assert scorer.add_interactions([7, 6, 7, 0], [0, 1, 2, 0]) == 3    # (0, 0) is known already
    assert scorer.add_interactions([5], [0]) == 1          # later still: item 0 drops its next oldest
    expected = [[0, 5, 7], [3, 6], [7], [4, 5, 6]]         # item 0 lost 1, then 2
    assert [sorted(scorer.indices[scorer.indptr[j]:scorer.indptr[j + 1]].tolist()) for j in range(4)] == expected
    fresh = Scorer(model, *csr_of(expected), **route)
    torch.testing.assert_close(scorer.score(users), fresh.score(users), rtol=0, atol=1e-5)


def test_a_cap_changes_nothing_for_items_within_it():
    rng = np.random.default_rng(0)
    pairs = np.unique(np.stack([rng.integers(0, 30, 200), rng.integers(0, 10, 200)], 1), axis=0)
    longest = np.bincount(pairs[:, 1]).max()
    for a, b in zip(neighbour_csr(pairs, 10, longest)[:2], neighbour_csr(pairs, 10, None)[:2]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("argv, fragment", [
    (["--max-neighbours", "0"], "--max-neighbours must be >= 1"),
    (["--max-neighbours", "many"], "--max-neighbours must be a number of users, none or auto"),
    (["--data", "synthetic:huge"], "unknown synthetic preset 'huge'"),
    (["--data", "synthetic:n_users=ten"], "n_users must be a int"),
    (["--data", "synthetic:zipf=-1"], "zipf >= 0"),
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "0"], "--lr must be > 0"),
])
def test_bad_settings_are_one_line_errors(tmp_path, capsys, argv, fragment):
    rc = main(["train", "--out", str(tmp_path / "m.ckpt"), *argv])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_synthetic_zipf_sets_how_concentrated_popularity_is():
    flat, steep = (np.bincount(data_mod.synthetic(n_users=400, n_items=600, zipf=z).train[:, 1]) for z in (0.6, 1.4))
    top = lambda pop: np.sort(pop)[-10:].sum() / pop.sum()  # noqa: E731
    assert top(steep) > 2 * top(flat)


@pytest.mark.parametrize("route", [dict(packed_max_users=8), dict(packed_max_users=0, chunk_items=2)])
def test_feedback_grows_an_uncapped_models_neighbourhoods_only_to_the_feedback_cap(route):
    """Issue 23, finding 5: a model trained without a cap let feedback grow N(i) without bound (and with it the
    cost of scoring and folding in). Feedback now fills an item to `feedback_cap` users, or to its trained length
    where that is longer (no trained neighbourhood is cut), then its oldest drop; a new item is capped likewise."""
    model = make_cmn(10, 3, d=6, hops=2)
    lists = [[0, 1, 2, 3], [4], []]                        # item 0 trained longer than the cap, item 1 shorter
    recency = [[3, 0, 1, 2], [4], []]                      # item 0: user 1 is its oldest
    scorer = Scorer(model, *csr_of(lists), recency=[r for x in recency for r in x], feedback_cap=2, **route)
    users = torch.arange(10)
    scorer.score(users)                                    # caches built: the update must patch them
    assert scorer.add_interactions([5, 6, 7, 8, 9], [0, 1, 1, 2, 2]) == 5
    # item 0 keeps 4 (its trained length): 5 in, user 1 out; item 1 keeps 2: user 4 out; item 2 fills to 2
    expected = [[0, 2, 3, 5], [6, 7], [8, 9]]
    assert [sorted(scorer.indices[scorer.indptr[j]:scorer.indptr[j + 1]].tolist()) for j in range(3)] == expected
    fresh = Scorer(model, *csr_of(expected), **route)
    torch.testing.assert_close(scorer.score(users), fresh.score(users), rtol=0, atol=1e-5)
    scorer.add_items(torch.zeros(1, 6))
    assert scorer.add_interactions([1, 2, 3], [3, 3, 3]) == 3
    assert sorted(scorer.indices[scorer.indptr[3]:scorer.indptr[4]].tolist()) == [2, 3]
    uncapped = Scorer(model, *csr_of(lists), **route)      # no feedback_cap: as before, no bound
    uncapped.add_interactions([5, 6, 7], [1, 1, 1])
    assert int(uncapped.neighbours.lengths()[1]) == 4
