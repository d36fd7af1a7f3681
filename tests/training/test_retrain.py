"""`python -m training retrain` and `rollback`: the schedule's arguments, the gate's figures (checked against
rankings computed here), rollouts, rollback and the versions kept; rounds on a tiny simulated world (seconds of
training). The whole loop, served over HTTP, is tests/training/test_loop_simulation.py."""
import math
import os
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import small_checkpoint
from model.recommender import Recommender
from model.store.checkpoint import load_checkpoint
from model.store.events import Event, open_store
from training.cli import main
from training.data import Dataset
from training.feedback import fold_feedback
from training.retrain import Verdict, duration, list_metrics, prune, rollback


@pytest.fixture
def cli(capsys):
    def run(*argv):
        rc = main(list(argv))
        out = capsys.readouterr()
        return rc, out.out, out.err
    return run


def one_line_error(rc, err, *fragments):
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_durations():
    assert [duration(t) for t in ("90", "90s", "15m", "1.5h", "1d")] == [90, 90, 900, 5400, 86400]


@pytest.mark.parametrize("argv, fragment", [
    (["--every", "soon"], "--every must be a positive duration"),
    (["--every", "0m"], "--every must be a positive duration"),
    (["--once", "--holdout-fraction", "1.5"], "--holdout-fraction must be between 0 and 1"),
    (["--once", "--tolerance", "-0.1"], "--tolerance must be >= 0"),
    (["--once", "--keep", "0"], "--keep must be >= 1"),
    (["--once", "--min-events", "1"], "--min-events must be >= 2"),
    (["--once", "--epochs", "-1"], "--epochs must be >= 0"),
])
def test_bad_retrain_arguments_are_one_line_errors(cli, tmp_path, argv, fragment):
    rc, _, err = cli("retrain", "--feedback", str(tmp_path / "f.sqlite3"), "--out-dir", str(tmp_path / "m"), *argv)
    one_line_error(rc, err, fragment)


def test_an_unreachable_store_is_a_one_line_error(cli, tmp_path):
    rc, _, err = cli("retrain", "--once", "--feedback", "postgresql://nobody@127.0.0.1:1/none",
                     "--out-dir", str(tmp_path / "m"))
    one_line_error(rc, err, "cannot open the feedback store")
    rc, _, err = cli("rollback", "--feedback", str(tmp_path / "missing" / "f.sqlite3"))
    one_line_error(rc, err, "feedback store not found")
    assert not (tmp_path / "missing").exists()   # a mistyped store is not created


def test_a_round_waits_for_enough_new_events(cli, tmp_path):
    model = small_checkpoint(tmp_path / "model.ckpt")
    store = open_store(str(tmp_path / "f.sqlite3"))
    store.append([Event("u0", f"i{i}", None) for i in range(3)])
    store.close()
    rc, out, _ = cli("retrain", "--once", "--feedback", str(tmp_path / "f.sqlite3"), "--checkpoint", model,
                     "--out-dir", str(tmp_path / "models"), "--min-events", "4")
    assert rc == 0
    assert "waiting: 3 events since the serving model's (seq > 0), 4 needed" in out
    assert os.listdir(tmp_path / "models") == []


def test_training_folds_the_events_up_to_a_seq(tmp_path):
    store = open_store(str(tmp_path / "f.sqlite3"))
    store.append([Event("a", "x", 1.0), Event("b", "y", 2.0), Event("a", "y", 3.0)])
    store.close()
    base = Dataset(2, 2, np.array([[0, 0], [1, 1]]), None, ["a", "b"], ["x", "z"])
    data = fold_feedback(base, str(tmp_path / "f.sqlite3"), log=lambda line: None, progress=False, through=2)
    assert data.feedback_seq == 2
    assert data.item_ids == ["x", "z", "y"]
    assert sorted(map(tuple, data.train.tolist())) == [(0, 0), (1, 1), (1, 2)]   # b→y in, a→y (seq 3) not


def test_the_in_list_figures_are_the_ranks_of_the_clicked_items(tmp_path):
    """NDCG and HR@5 of each clicked item's rank among its list, the rank computed here from the model's scores."""
    ckpt = load_checkpoint(small_checkpoint(tmp_path / "m.ckpt", n_users=7, n_items=6))
    rows = [("u0", "i1", ["i0", "i2", "i3"]), ("u3", "i5", ["i1", "i4", "i0"]), ("u6", "i2", ["i3", "i5", "i4"])]
    rec = Recommender.from_checkpoint(ckpt)
    ranks = []
    for user, clicked, others in rows:
        items = [int(i[1:]) for i in [clicked, *others]]
        scores = rec.score(torch.tensor([int(user[1:])]), torch.tensor([items]))[0].tolist()
        ranks.append(sum(s >= scores[0] for s in scores[1:]))   # ties count against the clicked item
    got = list_metrics(rec, ckpt, rows)
    assert got["hr@5"] == pytest.approx(1.0)   # four items: every rank is below 5
    assert got["ndcg@10"] == pytest.approx(np.mean([1 / math.log2(r + 2) for r in ranks]))


def test_the_gate_publishes_within_the_tolerance_and_refuses_below_it_or_below_popularity():
    def verdict(candidate, serving, catalogue=0.2, toppop=0.1):
        return Verdict({"ndcg@10": candidate, "hr@5": 0.5}, {"ndcg@10": serving, "hr@5": 0.5},
                       {"ndcg@10": catalogue, "hr@10": 0.3}, {"ndcg@10": toppop, "hr@10": 0.2}, 100, 0.01)
    assert verdict(0.495, 0.5).publish and verdict(0.6, 0.5).publish
    worse = verdict(0.48, 0.5)
    assert not worse.publish
    line = worse.line("new", "old")
    assert line.startswith("gate: refused, still serving old: it ranks the clicks 0.0200 worse")
    assert "NDCG 0.4800" in line and "NDCG 0.5000" in line
    broken = verdict(0.6, 0.5, catalogue=0.05)
    assert not broken.publish and "below item popularity" in broken.line("new", "old")
    assert Verdict({}, None).publish   # nothing serving: nothing to compare with


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "f.sqlite3")
    return request.getfixturevalue("postgres_url")


def publish_versions(tmp_path, n, url=None):
    """n checkpoints of different versions in tmp/models, each published in turn; their (version, path)."""
    (tmp_path / "models").mkdir(exist_ok=True)
    store = open_store(url or str(tmp_path / "f.sqlite3"))
    published = []
    for seed in range(n):
        path = small_checkpoint(tmp_path / "models" / f"model-{seed}.ckpt", seed=seed)
        os.utime(path, (time.time() - 100 + seed, time.time() - 100 + seed))
        version = load_checkpoint(path).model_version
        store.publish_checkpoint(os.path.abspath(path), version)
        published.append((version, os.path.abspath(path)))
    store.close()
    return published


def test_rollback_publishes_the_version_before_the_active_one_or_the_one_named(cli, tmp_path, store_url):
    url = store_url
    (v0, p0), (v1, p1), (v2, p2) = publish_versions(tmp_path, 3, url)
    rc, out, _ = cli("rollback", "--feedback", url)
    assert rc == 0 and f"rolled back: version {v1}" in out
    store = open_store(url)
    assert (store.active_checkpoint().version, store.active_checkpoint().path) == (v1, p1)
    store.close()
    assert rollback(url, v2, log=lambda line: None) == v2
    rc, _, err = cli("rollback", "--feedback", url, "--version", "nope")
    one_line_error(rc, err, "version 'nope' is not one that can be restored", v0, v1, v2)
    os.remove(p0)
    rc, _, err = cli("rollback", "--feedback", url, "--version", v0)   # its file was deleted: not restorable
    one_line_error(rc, err, f"version {v0!r} is not one that can be restored")


def test_prune_keeps_the_newest_versions_and_the_active_one(tmp_path):
    published = publish_versions(tmp_path, 4)
    prune(str(tmp_path / "models"), keep=2, active=published[0][1], log=lambda line: None)
    assert sorted(os.listdir(tmp_path / "models")) == ["model-0.ckpt", "model-2.ckpt", "model-3.ckpt"]


@pytest.fixture
def tiny_loop(tmp_path):
    """A first model of a small simulated world (tests/harness/loop.py) and 120 stored clicks after it."""
    from tests.harness.loop import World, first_model, train_config
    from training.retrain import RetrainConfig
    world = World(n_users=40, n_items=60, n_clusters=3)
    checkpoint = first_model(world, tmp_path)
    store = open_store(str(tmp_path / "f.sqlite3"))
    rng = np.random.default_rng(0)
    liked = lambda u: int(rng.choice(60, p=world.click[u] / world.click[u].sum()))
    store.append([Event(world.user_id(int(u)), world.item_id(liked(u)), None) for u in rng.integers(0, 40, 120)])
    store.close()
    cfg = RetrainConfig(str(tmp_path / "f.sqlite3"), out_dir=str(tmp_path / "models"), checkpoint=str(checkpoint),
                        min_events=20, train=train_config(tmp_path / "base.csv", epochs=1, pretrain_epochs=2))
    return cfg, checkpoint


def test_a_round_publishes_through_the_store_and_the_next_one_waits(tiny_loop, tmp_path):
    from training.retrain import Retrainer
    cfg, checkpoint = tiny_loop
    retrainer = Retrainer(replace(cfg, tolerance=1.0, min_events=25), log=lambda line: None)   # the floor alone
    try:
        done = retrainer.run_once()
        assert done.status == "published", done.message
        active = retrainer.store.active_checkpoint()
        assert active.version == done.version == load_checkpoint(active.path).model_version
        assert active.path == str(tmp_path / "models" / f"model-{done.version}.ckpt")
        # trained through the events before the newest fifth (a repeated pair is stored once, without a seq)
        stored = retrainer.store.last_seq()
        trained = stored - math.ceil(0.2 * stored)
        assert load_checkpoint(active.path).meta["feedback_seq"] == trained
        # the ones it held out are new to it, fewer than --min-events: the next round waits
        waiting = retrainer.run_once()
        assert stored - trained < 25
        assert waiting.status == "waiting" and \
            f"{stored - trained} events since the serving model's (seq > {trained})" in waiting.message
    finally:
        retrainer.close()


def test_a_rollback_during_a_round_is_not_overwritten(tiny_loop, tmp_path):
    """The round's candidate passes the gate, but an operator published another model while it trained: the
    candidate is not published over it."""
    from training.retrain import Retrainer
    cfg, checkpoint = tiny_loop
    other = small_checkpoint(tmp_path / "other.ckpt")
    retrainer = Retrainer(replace(cfg, tolerance=1.0), log=lambda line: None)

    def operator_publishes(path):
        retrainer.store.publish_checkpoint(os.path.abspath(other), load_checkpoint(other).model_version)
    try:
        done = retrainer.run_once(corrupt=operator_publishes)
        assert done.status == "superseded" and done.verdict.publish, done.message
        assert retrainer.store.active_checkpoint().path == os.path.abspath(other)
        assert not (tmp_path / "models" / f"model-{done.version}.ckpt").exists()
    finally:
        retrainer.close()
