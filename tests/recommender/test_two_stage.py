"""Two-stage recommendation (retrieval → CMN re-ranking) against lists computed here by hand: retrieval scores as
profile @ W with scipy, the blend with numpy, rankings with argsort."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from conftest import make_cmn
from model.recommender import Recommender
from model.retrieval import RRF_K, FusedRetrieval, ItemRetrieval, TwoStage, blend
from model.store.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from training.data import holdout_validation, synthetic
from training.evaluate import evaluate
from training.two_stage import (fit_retrieval, rrf_reorder_rank, select_two_stage, selection_users, stage_for,
                                validation_ndcg)


@pytest.fixture(scope="module")
def data():
    return synthetic(n_users=120, n_items=150, per_user=10)


@pytest.fixture(scope="module")
def model(data):
    return make_cmn(data.n_users, data.n_items, d=6, hops=2, seed=3)


def random_retrieval(n_items: int, seed: int = 0) -> tuple[ItemRetrieval, sp.csr_matrix]:
    rng = np.random.default_rng(seed)
    w = sp.random(n_items, n_items, density=0.08, random_state=rng, format="csr", dtype=np.float32)
    w.sort_indices()
    stage = ItemRetrieval(torch.from_numpy(w.indptr.astype(np.int64)), torch.from_numpy(w.indices.astype(np.int64)),
                          torch.from_numpy(w.data), n_items)
    return stage, w


def profile(data, users) -> sp.csr_matrix:
    rows = [set(data.train[data.train[:, 0] == u, 1].tolist()) for u in users]
    return sp.csr_matrix((np.ones(sum(map(len, rows))), ([r for r, s in enumerate(rows) for _ in s],
                                                          [i for s in rows for i in sorted(s)])),
                         shape=(len(users), data.n_items))


def zscore(x: np.ndarray) -> np.ndarray:
    std = x.std()
    return (x - x.mean()) / (std if std > 0 else 1.0)


def reciprocal_rank(x: np.ndarray) -> np.ndarray:
    """1 / (60 + r), r the 1-based rank by score descending; equal scores share the best rank."""
    return np.array([1.0 / (RRF_K + 1 + (x > v).sum()) for v in x])


BLENDS = {"zscore": zscore, "rrf": reciprocal_rank}


def test_retrieval_scores_are_the_history_times_w(data):
    stage, w = random_retrieval(data.n_items)
    users = [0, 5, 77]
    histories = [sorted(set(data.train[data.train[:, 0] == u, 1].tolist())) for u in users]
    expected = (profile(data, users) @ w).toarray()
    np.testing.assert_allclose(stage.scores(histories).numpy(), expected, rtol=1e-6, atol=1e-6)
    assert stage.scores([[], [3]]).shape == (2, data.n_items) and stage.scores([[]]).abs().sum() == 0


def test_blend_standardises_each_row_over_its_candidates():
    cmn = torch.tensor([[1.0, 3.0, 2.0, 9.0], [5.0, 5.0, 0.0, 0.0]])
    ret = torch.tensor([[0.2, 0.1, 0.4, 7.0], [1.0, 3.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    out = blend(cmn, ret, valid, 0.3)
    row0 = 0.3 * zscore(np.array([1.0, 3.0, 2.0])) + 0.7 * zscore(np.array([0.2, 0.1, 0.4]))
    row1 = 0.3 * zscore(np.array([5.0, 5.0])) + 0.7 * zscore(np.array([1.0, 3.0]))   # no CMN spread: std 1
    np.testing.assert_allclose(out[0, :3].numpy(), row0, rtol=1e-6)
    np.testing.assert_allclose(out[1, :2].numpy(), row1, rtol=1e-6)
    assert out[0, 3] == -torch.inf and (out[1, 2:] == -torch.inf).all()


def test_rrf_blend_by_rank_only():
    cmn = torch.tensor([[0.1, 0.7, 0.7, -3.0, 5.0], [2.0, 1.0, 0.0, 0.0, 0.0]])
    ret = torch.tensor([[9.0, 1.0, 2.0, 3.0, 8.0], [0.5, 0.5, 0.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True, True, False], [True, True, False, False, False]])
    out = blend(cmn, ret, valid, 0.25, "rrf")
    # row 0: CMN ranks 3, 1, 1, 4 (the tie shares rank 1), retrieval ranks 1, 4, 3, 2; the invalid 5.0 / 8.0 count not
    by_hand = [0.25 / (RRF_K + c) + 0.75 / (RRF_K + r) for c, r in zip((3, 1, 1, 4), (1, 4, 3, 2))]
    np.testing.assert_allclose(out[0, :4].numpy(), by_hand, rtol=1e-6)
    np.testing.assert_allclose(out[1, :2].numpy(), [0.25 / 61 + 0.75 / 61, 0.25 / 62 + 0.75 / 61], rtol=1e-6)
    assert out[0, 4] == -torch.inf and (out[1, 2:] == -torch.inf).all()
    # only the orders count: a monotone transform of either score changes nothing
    np.testing.assert_array_equal(blend(cmn.exp() * 40, ret ** 3, valid, 0.25, "rrf").numpy(), out.numpy())
    with pytest.raises(ValueError, match="unknown blend 'mean'"):
        blend(cmn, ret, valid, 0.5, "mean")
    with pytest.raises(ValueError, match="blend must be one of zscore, rrf"):
        TwoStage("rp3beta", 10, 0.5, {}, "mean")


def test_rrf_reorder_rank_is_where_cmn_first_moves_an_item():
    """What docs/results.md says of a small rrf weight: CMN cannot move an item past any of the retrieval's top
    `reach - 1` (distinct retrieval scores), and can move the item at `reach` past the one above it."""
    r, weight = 50, 0.02
    reach = rrf_reorder_rank(weight, r)
    assert 1 < reach < r
    retrieval = torch.arange(r, 0, -1, dtype=torch.float32)[None]          # item j at retrieval rank j + 1
    valid = torch.ones_like(retrieval, dtype=torch.bool)

    def order(cmn_ranks):
        out = blend(-torch.tensor(cmn_ranks, dtype=torch.float32)[None], retrieval, valid, weight, "rrf")
        return torch.argsort(out[0], descending=True, stable=True).tolist()

    for upper in (reach - 2, reach - 1):   # items at ranks reach - 1 and reach, each against the next one down
        others = [j for j in range(r) if j not in (upper, upper + 1)]
        ranks = [0] * r
        ranks[upper], ranks[upper + 1] = r, 1          # CMN's last place above, its first place just below
        for n, j in enumerate(others):
            ranks[j] = n + 2
        listed = order(ranks)
        assert (listed.index(upper + 1) < listed.index(upper)) == (upper == reach - 1), (upper, reach)
    rng = np.random.default_rng(0)
    for _ in range(50):
        assert order(rng.permutation(r) + 1)[:reach - 1] == list(range(reach - 1))


@pytest.mark.parametrize("weight, kind", [(0.0, "zscore"), (0.4, "zscore"), (1.0, "zscore"), (0.4, "rrf")])
def test_two_stage_list_is_retrieval_top_r_reranked_by_the_blend(data, model, weight, kind):
    stage, w = random_retrieval(data.n_items)
    r, k = 20, 7
    rec = Recommender.from_model(model, data.train, retrieval=stage,
                                 two_stage=TwoStage("random", r, weight, {}, blend=kind))
    full = Recommender.from_model(model, data.train)
    users = [3, 40, 41, 99]
    exclude = [[1, 2], [], [5], []]
    items, scores = rec.recommend(users, k=k, exclude=exclude)
    retrieval = (profile(data, users) @ w).toarray()
    cmn = full.score(users).numpy()
    for n, u in enumerate(users):
        banned = set(data.train[data.train[:, 0] == u, 1].tolist()) | set(exclude[n])
        allowed = [i for i in range(data.n_items) if i not in banned]
        retrieved = sorted(allowed, key=lambda i: -retrieval[n, i])[:r]
        assert set(rec.retrieve([u], [sorted(banned)])[0][0].tolist()) == set(retrieved)
        scale = BLENDS[kind]
        mixed = weight * scale(cmn[n, retrieved]) + (1 - weight) * scale(retrieval[n, retrieved])
        order = np.argsort(-mixed, kind="stable")[:k]
        assert items[n].tolist() == [retrieved[j] for j in order]
        np.testing.assert_allclose(scores[n].numpy(), mixed[order], rtol=1e-4, atol=1e-5)
    by_retrieval, _ = rec.recommend(users, k=k, exclude=exclude, strategy="retrieval")
    by_cmn, _ = rec.recommend(users, k=k, exclude=exclude, strategy="full")
    assert by_cmn.tolist() == full.recommend(users, k=k, exclude=exclude)[0].tolist()
    for n, u in enumerate(users):
        banned = set(data.train[data.train[:, 0] == u, 1].tolist()) | set(exclude[n])
        ranked = [i for i in np.argsort(-retrieval[n], kind="stable") if i not in banned]
        assert [retrieval[n, i] for i in by_retrieval[n].tolist()] == pytest.approx([retrieval[n, i] for i in ranked[:k]])


def test_a_model_without_retrieval_offers_full_only(data, model):
    rec = Recommender.from_model(model, data.train)
    assert rec.strategies == ("full",) and rec.default_strategy == "full"
    with pytest.raises(ValueError, match="two_stage and retrieval need a retrieval stage"):
        rec.recommend([0], strategy="two_stage")


def test_selection_figures_are_the_evaluators(data, model):
    """Every cell of the grid (R, blend, weight) equals training/evaluate.py's full protocol on the same split for
    a Recommender built with that configuration: selection ranks what evaluation ranks, and the best cell wins."""
    fit = holdout_validation(data, seed=0)
    stage, table = select_two_stage(model, fit, methods=("rp3beta",), candidates=(10, 30), weights=(0.0, 0.5, 1.0),
                                    log=lambda *_: None)
    assert len(table) == 12 and stage.method == "rp3beta"
    assert {(row["blend"], row["weight"]) for row in table} == {(b, w) for b in ("zscore", "rrf") for w in (0, .5, 1)}
    chosen = next(row for row in table
                  if (row["candidates"], row["blend"], row["weight"]) == (stage.candidates, stage.blend, stage.weight))
    assert chosen["ndcg@10"] == max(row["ndcg@10"] for row in table)
    retrieval, _ = fit_retrieval("rp3beta", fit.train, fit.n_users, fit.n_items)
    assert len({row["ndcg@10"] for row in table}) > 3, "a grid whose settings change nothing checks nothing"
    for row in table:
        settings = TwoStage("rp3beta", row["candidates"], row["weight"], {}, row["blend"])
        rec = Recommender.from_model(model, fit.train, retrieval=retrieval, two_stage=settings)
        assert evaluate(rec, fit.test, fit.train, full=True)["full"]["ndcg@10"] == pytest.approx(row["ndcg@10"]), row


def test_validation_ndcg_by_hand():
    items = torch.tensor([[4, 2, 9], [1, 3, -1], [7, 8, 6]])
    valid = items >= 0
    scores = torch.tensor([[0.5, 0.9, 0.1], [0.3, 0.3, -torch.inf], [1.0, 2.0, 3.0]])
    positives = torch.tensor([4, 3, 5])   # rank 1; tie at rank 0 → counted 1; not retrieved → miss
    expected = (1 / np.log2(3) + 1 / np.log2(3) + 0) / 3
    assert validation_ndcg(scores, items, valid, positives) == pytest.approx(expected)


def standardised_rows(m: np.ndarray) -> np.ndarray:
    std = m.std(1, keepdims=True)
    return (m - m.mean(1, keepdims=True)) / np.where(std > 0, std, 1.0)


def fused_stage(data, weights=(0.7, 0.3)) -> tuple[FusedRetrieval, sp.csr_matrix, sp.csr_matrix]:
    (a, wa), (b, wb) = random_retrieval(data.n_items, 0), random_retrieval(data.n_items, 1)
    return FusedRetrieval({"a": a, "b": b}, dict(zip("ab", weights))), wa, wb


def test_a_fused_stage_is_its_members_standardised_rows_weighted(data):
    """Each member's row over the whole catalogue standardised, then weighted and summed; a live item joins every
    member as the same mix, so the fused column is the fusion of the members' mixed columns."""
    fused, wa, wb = fused_stage(data)
    users = [0, 5, 77]
    histories = [sorted(set(data.train[data.train[:, 0] == u, 1].tolist())) for u in users]
    pa, pb = (profile(data, users) @ wa).toarray(), (profile(data, users) @ wb).toarray()
    expected = 0.7 * standardised_rows(pa) + 0.3 * standardised_rows(pb)
    np.testing.assert_allclose(fused.scores(histories).numpy(), expected, rtol=1e-4, atol=1e-5)
    live = fused.add_item([1, 2], [1.0, 3.0])
    assert live == data.n_items and all(m.n_items == data.n_items + 1 for m in fused.members.values())
    mix = lambda p: np.concatenate([p, (0.25 * p[:, 1] + 0.75 * p[:, 2])[:, None]], 1)
    expected = 0.7 * standardised_rows(mix(pa)) + 0.3 * standardised_rows(mix(pb))
    np.testing.assert_allclose(fused.scores(histories).numpy(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", ["two_stage", "retrieval"])
def test_a_candidate_list_is_ranked_as_the_whole_catalogue_list_ranks_it(data, model, strategy):
    """The R proposed items first, in the strategy's order; every other item after them, by the tail member's own
    scores (numpy here), whatever else the request lists."""
    fused, wa, wb = fused_stage(data)
    r = 20
    rec = Recommender.from_model(model, data.train, retrieval=fused,
                                 two_stage=TwoStage("a+b", r, 0.4, {}, fusion={"a": 0.7, "b": 0.3}, tail="b"))
    users = [3, 40]
    pa, pb = (profile(data, users) @ wa).toarray(), (profile(data, users) @ wb).toarray()
    fused_np = 0.7 * standardised_rows(pa) + 0.3 * standardised_rows(pb)
    whole = rec.score(users, strategy=strategy).numpy()
    rng = np.random.default_rng(4)
    for n, u in enumerate(users):
        seen = set(data.train[data.train[:, 0] == u, 1].tolist())
        unseen = [i for i in range(data.n_items) if i not in seen]
        proposed = set(sorted(unseen, key=lambda i: -fused_np[n, i])[:r])
        ask = [int(i) for i in rng.choice(unseen, 40, replace=False)]
        listed = rec.recommend([u], k=40, candidates=[ask], strategy=strategy)[0][0].tolist()
        assert sorted(listed) == sorted(ask)   # tied tail items may come in either order: compare their scores
        assert [whole[n, i] for i in listed] == sorted((whole[n, i] for i in ask), reverse=True)
        first = [i for i in listed if i in proposed]
        assert listed[:len(first)] == first and len(first) == len(proposed & set(ask)) > 0
        rest = [pb[n, i] for i in listed[len(first):]]
        assert len(rest) > 10 and rest == sorted(rest, reverse=True)


def test_a_fused_stage_with_its_tail_survives_the_checkpoint(data, model, tmp_path):
    fused, _, _ = fused_stage(data)
    settings = TwoStage("a+b", 20, 0.4, {"a": {}, "b": {}}, fusion={"a": 0.7, "b": 0.3}, tail="b")
    pairs = np.ascontiguousarray(data.train)
    ckpt = Checkpoint(model.cfg, model.state_dict(), list(data.user_ids), list(data.item_ids), train=pairs,
                      seen=pairs, retrieval=fused, two_stage=settings)
    save_checkpoint(ckpt, str(tmp_path / "m.ckpt"))
    loaded = load_checkpoint(str(tmp_path / "m.ckpt"))
    assert loaded.two_stage == settings
    histories = [[1, 2, 3], [7]]
    np.testing.assert_allclose(loaded.retrieval.scores(histories).numpy(), fused.scores(histories).numpy())
    ckpt.two_stage = TwoStage("a+c", 20, 0.4, {}, fusion={"a": 0.7, "c": 0.3})
    save_checkpoint(ckpt, str(tmp_path / "bad.ckpt"))
    with pytest.raises(CheckpointError, match="fused stage's members"):
        load_checkpoint(str(tmp_path / "bad.ckpt"))


def test_selection_chooses_the_tail_by_the_evaluators_validation_sampled_ndcg(data, model):
    """Every tail tried is logged with its validation sampled NDCG@10; the chosen one has the best, and that figure
    is training/evaluate.py's for a Recommender built from the returned settings."""
    fit = holdout_validation(data, seed=0)
    lines = []
    stage, table = select_two_stage(model, fit, methods=("rp3beta", "itemknn"), candidates=(10,), weights=(0.0, 1.0),
                                    fusions=(0.5,), log=lines.append)
    tails = {line.split()[2].rstrip(":") if "itself" not in line else None: float(line.split()[-1])
             for line in lines if line.startswith("two-stage tail ")}
    assert len(tails) == 2 and stage.tail in tails and tails[stage.tail] == max(tails.values())
    assert all(row["fusion"] is not None for row in table if "+" in row["method"])
    rec = Recommender.from_model(model, fit.train, retrieval=stage_for(stage, fit), two_stage=stage)
    assert evaluate(rec, fit.test, fit.train, full=False)["sampled"]["ndcg@10"] == pytest.approx(tails[stage.tail], abs=5e-5)   # logged to 4 places


def test_selection_scores_a_seeded_sample_of_validation_users_above_its_cell_bound(data):
    fit = holdout_validation(data, seed=0)
    assert selection_users(fit, max_cells=len(fit.test) * fit.n_items) is fit
    cut = selection_users(fit, max_cells=30 * fit.n_items)
    again = selection_users(fit, max_cells=30 * fit.n_items)
    assert len(cut.test) == 30 and np.array_equal(cut.test.users, again.test.users)
    rows = [int(np.flatnonzero(fit.test.users == u)[0]) for u in cut.test.users]
    assert rows == sorted(rows) and np.array_equal(cut.test.negatives, fit.test.negatives[rows])
    assert np.array_equal(cut.test.positives, fit.test.positives[rows]) and cut.train is fit.train
