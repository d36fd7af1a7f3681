"""CMN fine-tuned on hard negatives (training/finetune.py): the hard-negative sampler by construction, the
fine-tune's validation figures against the two-stage selection's, and `python -m training finetune` end to end
on tiny data (a random CMN: what is checked is the run's bookkeeping, not what it learns)."""
from dataclasses import asdict

import numpy as np
import pytest
import torch

from conftest import make_cmn, random_train, run_cli
from model.recommender import Recommender
from model.retrieval import TwoStage
from model.store.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from training.cli import main
from training.data import holdout_validation, load
from training.finetune import rerank_figures, retrieve_all
from training.sampler import TripleSampler
from training.train import TrainConfig
from training.two_stage import fit_retrieval, select_two_stage


# --------------------------------------------------------------------------- the sampler

@pytest.fixture
def hard_setting():
    """12 users over 10 items; each user's candidates hold padding (-1), the user's own training items (which must
    never be drawn) and other items; two users with training pairs have no candidate left once their training
    items are removed."""
    rng = np.random.default_rng(2)
    train = random_train(rng, 12, [5, 0, 3, 7, 1, 4, 0, 2, 6, 3])
    owned = [set(train[train[:, 0] == u, 1].tolist()) for u in range(12)]
    empty = [u for u in range(12) if owned[u]][:2]
    rows = []
    for u in range(12):
        if u in empty:
            row = sorted(owned[u])[:3]
        else:
            row = rng.choice(10, size=4, replace=False).tolist() + sorted(owned[u])[:1]
        rows.append(row + [-1] * (6 - len(row)))
    items = np.array(rows)
    pools = [set(items[u][items[u] >= 0].tolist()) - owned[u] for u in range(12)]
    assert all(not pools[u] for u in empty) and all(pools[u] for u in range(12) if u not in empty)
    return train, 10, items, owned, pools, empty


def test_hard_negatives_come_from_the_candidates_less_the_training_items(hard_setting):
    train, n_items, items, owned, pools, _ = hard_setting
    sampler = TripleSampler(train, n_items, neg=3, seed=1, hard_items=items, hard=1.0)
    uniform_pool = set(np.flatnonzero(np.bincount(train[:, 1], minlength=n_items)).tolist())
    drawn = [set() for _ in range(12)]
    for epoch in range(6):
        users, pos, neg = sampler.epoch(epoch)
        assert len(users) == 3 * len(train)
        for u, n in zip(users.tolist(), neg.tolist()):
            assert n not in owned[u]
            if pools[u]:
                assert n in pools[u], (u, n, pools[u])
            else:                                   # nothing to draw from: the uniform rule
                assert n in uniform_pool
            drawn[u].add(n)
    for u in set(train[:, 0].tolist()):
        assert drawn[u] == pools[u] if pools[u] else len(drawn[u]) > 1   # every candidate does get drawn


def test_hard_fraction_is_respected():
    """Candidates are 3 items of 2,000, so a uniform draw lands among them 0.15% of the time: the share of
    negatives from the candidates is the hard fraction (30,000 triples: ±0.003 standard deviation)."""
    rng = np.random.default_rng(0)
    n_users, n_items = 300, 2000
    train = np.unique(np.stack([rng.integers(0, n_users, 10_000), rng.integers(0, n_items, 10_000)], 1), axis=0)
    items = np.stack([rng.choice(n_items, 3, replace=False) for _ in range(n_users)])
    owned = {tuple(p) for p in train.tolist()}
    hard_pairs = {(u, int(i)) for u in range(n_users) for i in items[u] if (u, int(i)) not in owned}
    for hard in (0.25, 0.5, 0.8):
        users, _, neg = TripleSampler(train, n_items, neg=3, seed=0, hard_items=items, hard=hard).epoch(0)
        share = np.mean([(u, n) in hard_pairs for u, n in zip(users.tolist(), neg.tolist())])
        assert abs(share - hard) < 0.02, (hard, share)


def test_hard_epochs_are_a_function_of_seed_and_epoch(hard_setting):
    train, n_items, items = hard_setting[:3]
    a = TripleSampler(train, n_items, seed=5, hard_items=items, hard=0.5)
    b = TripleSampler(train, n_items, seed=5, hard_items=items, hard=0.5)
    for x, y in zip(a.epoch(3), b.epoch(3)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.epoch(3)[2], a.epoch(4)[2])
    assert not np.array_equal(a.epoch(3)[2], TripleSampler(train, n_items, seed=6, hard_items=items,
                                                           hard=0.5).epoch(3)[2])
    # hard 0 is the uniform sampler, bit for bit (what a plain training run and its resume rely on)
    for x, y in zip(TripleSampler(train, n_items, seed=5, hard_items=items, hard=0.0).epoch(2),
                    TripleSampler(train, n_items, seed=5).epoch(2)):
        np.testing.assert_array_equal(x, y)


def test_hard_sampler_refuses_bad_settings(hard_setting):
    train, n_items, items = hard_setting[:3]
    for hard in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            TripleSampler(train, n_items, hard_items=items, hard=hard)
    with pytest.raises(ValueError, match="candidates"):
        TripleSampler(train, n_items, hard=0.5)
    with pytest.raises(ValueError, match="users"):
        TripleSampler(train, n_items, hard_items=items[:5], hard=0.5)


# --------------------------------------------------------------------------- validation figures

SPEC = "synthetic:n_users=60,n_items=40,per_user=8"


def test_epoch_figures_are_the_selections():
    """The fine-tune's re-ranking figures of a model are the two-stage selection's rows for the same method,
    R, blend and weight (one metric, one protocol)."""
    data = load(SPEC, seed=0)
    fit = holdout_validation(data, 0)
    model = make_cmn(data.n_users, data.n_items, d=6, hops=2, seed=3)
    _, table = select_two_stage(model, fit, methods=("rp3beta",), candidates=(20,), log=lambda *_: None)
    retrieval, params = fit_retrieval("rp3beta", fit.train, fit.n_users, fit.n_items)
    rec = Recommender.from_model(model, fit.train, retrieval=retrieval, two_stage=TwoStage("rp3beta", 20, 1.0, params))
    items, valid, found = retrieve_all(rec, fit.n_users)
    rows = torch.as_tensor(fit.test.users)
    figures = rerank_figures(model, fit.train, [int(u) for u in fit.test.users], items[rows], valid[rows],
                             found[rows], torch.as_tensor(fit.test.positives))
    at = {(r["blend"], r["weight"]): r["ndcg@10"] for r in table}
    assert figures["cmn"] == pytest.approx(at[("zscore", 1.0)])
    assert figures["retrieval"] == pytest.approx(at[("zscore", 0.0)])
    assert figures["best"]["ndcg@10"] == pytest.approx(max(at.values()))


# --------------------------------------------------------------------------- the CLI

def tiny_checkpoint(path, validation: bool = True) -> str:
    """A random CMN over SPEC, written as `train --no-two-stage` would (with or without --validation)."""
    data = load(SPEC, seed=0)
    model = make_cmn(data.n_users, data.n_items, d=6, hops=2, seed=1)
    cfg = TrainConfig(data=SPEC, validation=validation, two_stage=False, batch_size=64, progress=False)
    save_checkpoint(Checkpoint(model.cfg, model.state_dict(), data.user_ids, data.item_ids, train=data.train,
                               seen=data.all_pairs(), meta={"train_config": asdict(cfg), "data": data.name},
                               test_users=data.test.users, test_positives=data.test.positives,
                               test_negatives=data.test.negatives), str(path))
    return str(path)


def test_finetune_refuses_a_checkpoint_without_validation(tmp_path):
    """Through a real process: one error line, exit code 2, no traceback, nothing written."""
    out = tmp_path / "out.ckpt"
    proc = run_cli("finetune", "--checkpoint", tiny_checkpoint(tmp_path / "in.ckpt", validation=False),
                   "--data", SPEC, "--out", str(out), "--method", "ease")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("error: ") and "--validation" in lines[-1], proc.stderr
    assert not out.exists()


BAD_FINETUNES = {
    "no stage in the checkpoint, none named": ([], "--method"),
    "other data": (["--method", "ease", "--data", "synthetic:n_users=50,n_items=40,per_user=8"], "was not trained on"),
    "hard fraction above 1": (["--method", "ease", "--hard", "1.5"], "--hard"),
    "params not an object": (["--method", "ease", "--params", "[10]"], "JSON object"),
    "params the method does not take": (["--method", "ease", "--params", '{"alpha": 1}'], "alpha"),
    "unknown method": (["--method", "bpr"], "unknown retrieval method"),
    "params without a method": (["--params", '{"l2": 10}'], "--params goes with --method"),
    "output over the input": (["--method", "ease", "--out", "{in}"], "--out must not be --checkpoint"),
}


@pytest.mark.parametrize("extra, message", BAD_FINETUNES.values(), ids=BAD_FINETUNES.keys())
def test_finetune_refuses_bad_settings(tmp_path, capsys, extra, message):
    out, src = tmp_path / "out.ckpt", tiny_checkpoint(tmp_path / "in.ckpt")
    before = (tmp_path / "in.ckpt").read_bytes()
    argv = ["finetune", "--checkpoint", src, "--data", SPEC, "--out", str(out), "--quiet",
            *(arg.replace("{in}", src) for arg in extra)]
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and message in err[-1], err
    assert not out.exists() and (tmp_path / "in.ckpt").read_bytes() == before


def test_finetune_writes_a_checkpoint_with_reselected_two_stage_settings(tmp_path):
    src = tiny_checkpoint(tmp_path / "in.ckpt")
    out = tmp_path / "ft.ckpt"
    proc = run_cli("finetune", "--checkpoint", src, "--data", SPEC, "--out", str(out), "--epochs", "2",
                   "--candidates", "15", "--hard", "0.5", "--method", "ease", "--params", '{"l2": 10}',
                   "--methods", "ease", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = load_checkpoint(src), load_checkpoint(str(out))
    assert before.two_stage is None
    assert after.two_stage is not None and after.retrieval is not None and after.two_stage.method == "ease"
    chosen = after.metrics["two_stage"]["chosen"]
    best = max(after.metrics["two_stage"]["validation"], key=lambda row: row["ndcg@10"])
    assert (chosen["candidates"], chosen["blend"], chosen["weight"]) == \
        (best["candidates"], best["blend"], best["weight"])
    record = after.meta["finetune"]
    assert (record["candidates"], record["hard"], record["epochs"]) == (15, 0.5, 2)
    history = record["validation"]
    assert [row["epoch"] for row in history] == [0, 1, 2]
    kept = record["kept_epoch"]
    assert history[kept]["best"]["ndcg@10"] == max(row["best"]["ndcg@10"] for row in history)
    same = all(torch.equal(before.state[k], after.state[k]) for k in before.state)
    assert same == (kept == 0)                       # epoch 0 is the input's weights, written unchanged
    assert after.meta["train_config"] == before.meta["train_config"]
    assert Recommender.from_checkpoint(str(out)).default_strategy == chosen["strategy"]
    assert (tmp_path / "ft.ckpt.metrics.json").exists() and (tmp_path / "ft.ckpt.curves.png").exists()
    assert "kept epoch" in proc.stdout and "chosen on validation" in proc.stdout

    # the output holds a stage: fine-tuning it again draws from that stage, no --method needed; with 0 epochs the
    # input's weights are kept and only the selection runs
    again = tmp_path / "again.ckpt"
    proc = run_cli("finetune", "--checkpoint", str(out), "--data", SPEC, "--out", str(again), "--epochs", "0",
                   "--candidates", "15", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    twice = load_checkpoint(str(again))
    assert twice.meta["finetune"]["method"] == after.two_stage.method and twice.meta["finetune"]["kept_epoch"] == 0
    assert all(torch.equal(after.state[k], twice.state[k]) for k in after.state)
