"""The reproduction path (`benchmarks/reproduce_citeulike.py`), end to end on a slice of citeulike-a.

The full run is a benchmark (an hour on 2 cores, figures in docs/results.md); here `--quick` runs every kind of
part it has (main run, baselines, one ablation, one tuning run, the validation-fit baselines, the two-stage part
with the paper-setting tuning run it trains) for a couple of epochs on 300 users, and the test checks what a reader
of the report relies on: the paper's hyperparameters are the ones used, the table's figures are the checkpoint's,
the tuning run reports the epoch it selected on validation, not the last one, and the two-stage settings are the
validation grid's best while its test table is what `evaluate` measures on the served checkpoint.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import CITEULIKE, REPO, run_cli
from model.store.checkpoint import csr, load_checkpoint
from model.scoring import Scorer
from training.baselines import ITEM_METHODS
from training.data import holdout_validation, load
from training.evaluate import evaluate

pytestmark = pytest.mark.skipif(not CITEULIKE.exists(), reason=f"citeulike-a not available at {CITEULIKE}")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "benchmarks/reproduce_citeulike.py", "--quick", "--data", str(CITEULIKE),
         "--out-dir", str(out), "--ablations", "--only", "hops1", "--tune", "--only-tune", "tune_l2_0.01",
         "--tune-epochs", "3"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    return out, runs, (out / "results.md").read_text()


def test_every_part_writes_its_result_and_the_report(quick_run):
    out, runs, report = quick_run
    assert set(runs) == {"main", "baselines", "ablation_hops1", "tune_l2_0.01", "baselines_validation_fit",
                         "tune_paper", "two_stage"}
    for name in ("main", "ablation_hops1", "tune_l2_0.01", "tune_paper"):
        assert (out / f"{name}.curves.png").stat().st_size > 0
    assert "| **CMN (ours), final epoch 2** |" in report
    for label in ("TopPop (ours)", "ItemKNN CF (ours)", "RP3beta (ours)", "| hops 1 |", "l2 0.01 **(selected)**",
                  "RP3beta fit on the same pairs (ours)", "## Two-stage recommendation", "(served default)** |",
                  "| RP3beta baseline (main table) |", "## Wall times", "## Commands", "## Machine"):
        assert label in report, label
    assert "benchmarks/reproduce_citeulike.py --quick" in report


def test_main_run_uses_the_paper_hyperparameters(quick_run):
    _, runs, _ = quick_run
    cfg = runs["main"]["config"]
    assert {k: cfg[k] for k in ("hops", "embed_size", "batch_size", "neg", "l2", "gmf_l2", "lr", "optimizer")} == \
        dict(hops=3, embed_size=50, batch_size=128, neg=4, l2=0.1, gmf_l2=1e-4, lr=1e-3, optimizer="rmsprop")
    assert cfg["validation"] is False and cfg["exclude_self"] is False
    assert runs["ablation_hops1"]["config"]["hops"] == 1
    assert runs["tune_l2_0.01"]["config"]["l2"] == 0.01 and runs["tune_l2_0.01"]["config"]["validation"] is True


def test_reported_figures_are_the_checkpoints(quick_run):
    """The main table's CMN row is what `python -m training evaluate` measures on the saved checkpoint."""
    out, runs, report = quick_run
    final = runs["main"]["metrics"]["final"]
    done = run_cli("evaluate", "--checkpoint", str(out / "ckpt" / "main.ckpt"), "--json")
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout)
    for conv in ("sampled", "full"):
        for key in ("hr@10", "ndcg@10"):
            assert measured[conv][key] == pytest.approx(final[conv][key], abs=1e-9), (conv, key)
    s = final["sampled"]
    assert f"| {s['hr@5']:.4f} | {s['ndcg@5']:.4f} | {s['hr@10']:.4f} | {s['ndcg@10']:.4f} |" in report
    # the main run selects nothing: its final figures are its last epoch's
    assert runs["main"]["metrics"]["epochs"][-1]["test"] == final["sampled"]


def test_tuning_keeps_the_epoch_selected_on_validation(quick_run):
    """The tuning run's checkpoint holds the weights of its best-validation epoch: scored with the neighbourhoods it
    was trained on, it gives exactly that epoch's logged test figures (that the best, not the last, epoch is kept
    when they differ: tests/training/test_training.py::test_validation_keeps_the_best_epochs_weights_not_the_last)."""
    out, runs, _ = quick_run
    m = runs["tune_l2_0.01"]["metrics"]
    epochs = m["epochs"]
    best = max(epochs, key=lambda r: r["validation"]["ndcg@10"])
    assert m["best_validation_epoch"] == best["epoch"]
    data = load(str(out / "quick_slice.npz"), seed=0)
    fit = holdout_validation(data, 0)
    ckpt = load_checkpoint(str(out / "ckpt" / "tune_l2_0.01.ckpt"))
    scorer = Scorer(ckpt.build_model("cpu"), *(torch.from_numpy(a) for a in csr(fit.train[:, 1], fit.train[:, 0],
                                                                                data.n_items)))
    assert evaluate(scorer, data.test, data.train, full=False)["sampled"] == pytest.approx(best["test"], abs=1e-9)


def test_baselines_beat_popularity_on_the_slice(quick_run):
    _, runs, _ = quick_run
    for name in ("baselines", "baselines_validation_fit"):
        r = runs[name]["results"]
        pop = r["toppop"]["metrics"]["sampled"]["hr@10"]
        for model in ("itemknn", "rp3beta"):
            assert r[model]["metrics"]["sampled"]["hr@10"] > pop + 0.1, (name, model)


def test_two_stage_settings_are_the_validation_grids_best(quick_run):
    """The part chooses on validation alone: its choice is the grid's best cell (the first of equals in the grid's
    order), marked in the report, stored in the served checkpoint, and the test table is what `python -m training
    evaluate` measures on that checkpoint."""
    out, runs, report = quick_run
    part = runs["two_stage"]
    table, chosen = part["validation"], part["chosen"]
    assert {row["blend"] for row in table} == {"zscore", "rrf"} and {row["method"] for row in table} == \
        set(ITEM_METHODS)
    best = max(table, key=lambda row: row["ndcg@10"])
    assert {k: chosen[k] for k in ("method", "candidates", "blend", "weight")} == \
        {k: best[k] for k in ("method", "candidates", "blend", "weight")}
    assert f"**{best['ndcg@10']:.4f}**" in report
    assert part["checkpoint"] == str(out / "ckpt" / "tune_paper.ckpt")
    assert runs["tune_paper"]["config"]["validation"] is True
    served = load_checkpoint(part["served_checkpoint"])
    assert served.two_stage.to_dict() == chosen
    done = run_cli("evaluate", "--checkpoint", part["served_checkpoint"], "--json")
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout)
    assert measured["strategy"] == part["default_strategy"] == chosen["strategy"]
    for strategy, figures in part["test"].items():
        for protocol in ("sampled", "full"):
            assert measured["strategies"][strategy][protocol] == pytest.approx(figures[protocol], abs=1e-9)
    s = part["test"][chosen["strategy"]]["sampled"]
    assert f"| **{s['hr@10']:.4f}** | **{s['ndcg@10']:.4f}** |" in report


def test_two_stage_refuses_a_checkpoint_without_a_validation_split(quick_run, tmp_path):
    out, _, _ = quick_run
    done = subprocess.run(
        [sys.executable, "benchmarks/reproduce_citeulike.py", "--quick", "--data", str(CITEULIKE), "--out-dir",
         str(tmp_path), "--skip-main", "--skip-baselines", "--two-stage-checkpoint", str(out / "ckpt" / "main.ckpt")],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.startswith("error: --two-stage-checkpoint") and "--validation" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "two_stage.json").exists()


def test_the_report_keeps_hand_written_sections(quick_run):
    """Regenerating the report rewrites what it generates and keeps what follows the hand-written marker: the
    marker docs/results.md carries, so that regenerating the real report keeps its hand-written sections."""
    markers = [line for line in (REPO / "docs" / "results.md").read_text().splitlines()
               if line.startswith("<!-- Hand-written sections below")]
    (marker,) = markers
    out, _, report = quick_run
    tail = f"{marker}\n\n## Notes written by hand\n\nA figure measured elsewhere: 0.1234.\n"
    (out / "results.md").write_text("# an outdated generated part\n\n" + tail)
    done = subprocess.run([sys.executable, "benchmarks/reproduce_citeulike.py", "--report-only", "--out-dir", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "results.md").read_text() == report + "\n" + tail
