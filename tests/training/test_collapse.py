"""No silent collapse (issue 13).

- too little GMF pretraining: the memories are scaled up until the output layer has signal, and CMN learns;
- no pretraining at all: the run stops in epoch 1 with one `error:` line (exit 3) and writes nothing;
- `evaluate` and the server's /health warn about a checkpoint whose CMN ranks below popularity.
"""
import asyncio
import json
import math

import httpx
import numpy as np
import pytest
import torch

from conftest import make_cmn, synthetic_checkpoint
from model.store.checkpoint import load_checkpoint, save_checkpoint
from model.quality import below_toppop, checkpoint_warnings
from training import train as train_mod
from training.cli import main
from training.train import TrainingCollapsed, check_collapse, init_memories

SMALL = "synthetic:n_users=300,n_items=400"       # ~27k triples an epoch: seconds, on one core
FAST = ("--hops", "2", "--embed-size", "16", "--no-full-eval", "--no-validation", "--quiet")  # nothing chosen


@pytest.fixture
def cli(capsys):
    def run(*argv):
        rc = main(list(argv))
        captured = capsys.readouterr()
        return rc, captured.out, captured.err
    return run


# --------------------------------------------------------------------------- both paths, end to end

@pytest.mark.slow   # a real training run through the CLI
@pytest.mark.parametrize("pretrain, cause", [("0", "without GMF pretraining"),
                                             ("1", "after GMF pretraining (output-layer signal")])
def test_a_collapsing_run_stops_in_epoch_1_and_writes_nothing(cli, tmp_path, pretrain, cause):
    """No pretraining: nothing to scale. One GMF epoch on this small set: too little to scale up (s ≤ 2)."""
    out = tmp_path / "m.ckpt"
    rc, stdout, err = cli("train", "--data", SMALL, "--out", str(out), "--epochs", "3", "--pretrain-epochs", pretrain,
                          *FAST)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 3 and "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: CMN collapsed in epoch 1"), err
    assert "ln 2" in lines[0] and cause in lines[0] and "--pretrain-epochs" in lines[0]   # the cause and the remedy
    assert not [line for line in stdout.splitlines() if line.startswith("epoch")]   # no CMN epoch reported
    assert list(tmp_path.iterdir()) == []                                     # no checkpoint, resume file or report


@pytest.mark.slow   # a real training run through the CLI
def test_short_pretraining_is_scaled_up_and_cmn_learns(cli, tmp_path):
    out = tmp_path / "m.ckpt"
    rc, stdout, err = cli("train", "--data", SMALL, "--out", str(out), "--epochs", "2", "--pretrain-epochs", "2",
                          *FAST)
    assert rc == 0, err
    metrics = json.loads((tmp_path / "m.ckpt.metrics.json").read_text())
    init = metrics["memory_init"]
    assert init["signal"] < init["target"] and init["scale"] > 0.5           # the paper's 0.5 would have collapsed
    assert "instead" in stdout                                                # and the log says what it did
    cmn, toppop = metrics["final"]["sampled"]["hr@10"], metrics["toppop"]["sampled"]["hr@10"]
    assert cmn >= toppop + 0.2, (cmn, toppop)


# --------------------------------------------------------------------------- the pieces

def signal_of(M: np.ndarray, E: np.ndarray, probe) -> float:
    users, pos, neg = (p.numpy() for p in probe)
    return float(np.linalg.norm((M[users] * (E[pos] - E[neg])).mean(0)))


def probe_for(n_users, n_items, seed=0, n=500):
    rng = np.random.default_rng(seed)
    return tuple(torch.from_numpy(rng.integers(0, m, n)) for m in (n_users, n_items, n_items))


@pytest.mark.parametrize("size, paper", [(0.05, False), (10.0, True)])
def test_memories_start_at_the_papers_scale_unless_that_leaves_too_little_signal(size, paper):
    torch.manual_seed(1)
    model = make_cmn(30, 40, d=8, hops=2)
    P, Q = torch.randn(30, 8) * size, torch.randn(40, 8) * size
    probe = probe_for(30, 40)
    # the positives share a direction with their users (what pretraining learns), negatives do not
    Q[probe[1]] = P[probe[0]].sign() * size
    init = init_memories(model, P, Q, train_mod.TrainConfig(progress=False), probe, log=lambda line: None)
    target = 4 * model.cfg.l2
    assert init["target"] == pytest.approx(target)
    assert init["signal"] == pytest.approx(signal_of(0.5 * P.numpy(), 0.5 * Q.numpy(), probe), rel=1e-5)
    if paper:
        assert init["signal"] >= target and init["scale"] == 0.5
        assert torch.equal(model.user_memory.data, 0.5 * P) and torch.equal(model.item_memory.data, 0.5 * Q)
    else:
        assert init["signal"] < target and init["scale"] > 0.5
        torch.testing.assert_close(model.user_memory.data, init["scale"] * P)
        torch.testing.assert_close(model.item_memory.data, init["scale"] * Q)
        assert signal_of(model.user_memory.data.numpy(), model.item_memory.data.numpy(), probe) == \
            pytest.approx(min(target, signal_of(2 * P.numpy(), 2 * Q.numpy(), probe)), rel=1e-4)


def test_collapse_is_constant_scores_over_the_probe():
    model = make_cmn(30, 40, d=8, hops=2)
    probe = probe_for(30, 40)
    random = lambda u, p, n: (model.user_memory[u].sum(1), model.item_memory[n].sum(1))  # noqa: E731
    flat = lambda u, p, n: (torch.full((len(u),), 0.3), torch.full((len(u),), 0.3))     # noqa: E731
    check_collapse({"epoch": 1}, random, probe, None, 0.1)              # loss ≈ ln 2 but scores apart: not collapsed
    with pytest.raises(TrainingCollapsed, match="epoch 1: loss 0.6931.*without GMF pretraining"):
        check_collapse({"epoch": 1}, flat, probe, None, 0.1)


# --------------------------------------------------------------------------- warnings

def test_below_toppop_warns_and_above_does_not():
    low, high = {"sampled": {"hr@10": 0.1}}, {"sampled": {"hr@10": 0.3}}
    assert "below popularity" in below_toppop(low, high) and "0.1000" in below_toppop(low, high)
    assert below_toppop(high, low) is None
    assert checkpoint_warnings({"final": low, "toppop": high}) == [below_toppop(low, high)]
    assert checkpoint_warnings({}) == [] and checkpoint_warnings({"final": low}) == []   # nothing held out to tell


def test_evaluate_warns_about_a_model_below_popularity(cli, tmp_path):
    path = synthetic_checkpoint(tmp_path / "random.ckpt")      # a random CMN: far below popularity
    rc, stdout, err = cli("evaluate", "--checkpoint", path, "--json")
    result = json.loads(stdout)
    assert rc == 0
    assert result["sampled"]["hr@10"] < result["toppop"]["sampled"]["hr@10"]
    assert len(result["warnings"]) == 1 and "below popularity" in result["warnings"][0]
    assert err.startswith("warning: CMN ranks below popularity")


@pytest.mark.anyio
async def test_health_lists_the_checkpoints_warnings(tmp_path):
    from app.main import create_app
    from app.settings import Settings
    path = synthetic_checkpoint(tmp_path / "model.ckpt")
    ckpt = load_checkpoint(path)
    ckpt.metrics = {"final": {"sampled": {"hr@10": 0.02}}, "toppop": {"sampled": {"hr@10": 0.45}}}
    save_checkpoint(ckpt, str(tmp_path / "collapsed.ckpt"))
    for name, expected in (("model.ckpt", 0), ("collapsed.ckpt", 1)):
        app = create_app(Settings(checkpoint=str(tmp_path / name), feedback_path=str(tmp_path / f"{name}.db"),
                                  device="cpu", warmup_calls=0))
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                while (r := await client.get("/health")).status_code == 503 and r.json()["status"] == "loading":
                    await asyncio.sleep(0.02)
                body = r.json()
        assert r.status_code == 200 and len(body["warnings"]) == expected, body
        if expected:
            assert "below popularity" in body["warnings"][0] and "0.0200" in body["warnings"][0]
