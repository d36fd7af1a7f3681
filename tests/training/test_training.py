"""Training: parameters registered and trained, checkpoints, the sampler, --resume, and the end-to-end run."""
import json
import os
import struct
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import ACCEPTANCE_EPOCHS, item_user_csr, make_cmn, random_train
from model.store.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from model.cmn import CMN, CMNConfig, gather_neighbourhoods
from training import train as train_mod
from training.optim import make_optimizer
from training.sampler import TripleSampler
from training.train import TrainConfig, cmn_pair_scores, fit_epoch

EXPECTED_PARAMETERS = {"user_memory", "user_output", "item_memory", "hop_maps.0.weight", "hop_maps.0.bias",
                       "hop_maps.1.weight", "hop_maps.1.bias", "output.weight", "output.bias", "v.weight"}


def test_every_parameter_is_registered():
    model = CMN(CMNConfig(n_users=5, n_items=4, embed_size=3, hops=3))
    assert {n for n, _ in model.named_parameters()} == EXPECTED_PARAMETERS
    assert set(model.state_dict()) == EXPECTED_PARAMETERS


def test_one_training_step_changes_every_parameter():
    n_users, n_items = 20, 15
    lengths = [4, 6, 2, 8, 5, 3, 7, 1, 9, 4, 2, 6, 3, 5, 0]      # item 14: nobody, never sampled
    train = random_train(np.random.default_rng(0), n_users - 1, lengths)  # user 19: no interactions
    model = make_cmn(n_users, n_items, d=8, hops=3, seed=0, embed_std=0.3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = make_optimizer("rmsprop", model.parameters(), lr=1e-3)
    cfg = TrainConfig(batch_size=10_000, progress=False)          # the whole epoch is one optimiser step
    indptr, indices = item_user_csr(train, n_items)
    stats = fit_epoch(model, cmn_pair_scores(model, indptr, indices, False), optimizer,
                      TripleSampler(train, n_items, neg=2, seed=0), 0, cfg, torch.device("cpu"), desc="step")
    assert np.isfinite(stats["loss"])
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} did not change after a training step"
    # sparse updates: rows nobody looked up keep their values
    for name, row in (("user_memory", 19), ("user_output", 19), ("item_memory", 14)):
        assert torch.equal(dict(model.named_parameters())[name][row], before[name][row])


def test_checkpoint_round_trip(tmp_path):
    model = make_cmn(9, 7, d=5, hops=3, seed=3)
    train = random_train(np.random.default_rng(2), 9, [2, 3, 1, 0, 4, 2, 5])
    ckpt = Checkpoint(model.cfg, model.state_dict(), [f"user-{i}" for i in range(9)], [f"ité {i}" for i in range(7)],
                      train=train, seen=train[:-2], test_users=np.array([1, 4]), test_positives=np.array([3, 0]),
                      test_negatives=np.array([[1, 2, 5], [6, 5, 2]]), metrics={"hr@10": 0.5},
                      meta={"note": "round trip"})
    version = save_checkpoint(ckpt, str(tmp_path / "m.ckpt"))
    loaded = load_checkpoint(str(tmp_path / "m.ckpt"))
    assert set(loaded.state) == EXPECTED_PARAMETERS
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state[name], value), name
    assert loaded.config == model.cfg and loaded.model_version == version
    assert loaded.user_ids == ckpt.user_ids and loaded.item_ids == ckpt.item_ids
    np.testing.assert_array_equal(loaded.train, train)
    np.testing.assert_array_equal(loaded.seen, train[:-2])
    np.testing.assert_array_equal(loaded.test_negatives, ckpt.test_negatives)
    assert loaded.metrics == {"hr@10": 0.5} and loaded.meta == {"note": "round trip"}

    rebuilt = loaded.build_model()
    users, items = torch.arange(9).repeat(7), torch.arange(7).repeat_interleave(9)
    nbr, seg = gather_neighbourhoods(*item_user_csr(train, 7), users, items)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(users, items, nbr, seg), model(users, items, nbr, seg), rtol=0, atol=0)


def test_parameters_move_with_the_model():
    model = make_cmn(6, 5, d=4, hops=3)
    as_double = model.double()
    assert all(p.dtype == torch.float64 for p in as_double.parameters())
    assert as_double.hop_maps[1].weight.dtype == torch.float64
    device = torch.device("cuda" if torch.cuda.is_available() else "meta")
    moved = model.to(device)
    assert {n for n, _ in moved.named_parameters()} == EXPECTED_PARAMETERS
    for name, p in moved.named_parameters():
        assert p.device.type == device.type, name


# --------------------------------------------------------------------------- sampler

@pytest.fixture(scope="module")
def sampler_data():
    lengths = [5, 0, 3, 7, 1, 4, 0, 2, 6, 3]          # items 1 and 6 have no training users
    return random_train(np.random.default_rng(4), 12, lengths), len(lengths)


def test_sampler_triples(sampler_data):
    train, n_items = sampler_data
    sampler = TripleSampler(train, n_items, neg=3, seed=5)
    train_set = set(map(tuple, train.tolist()))
    candidates = set(np.flatnonzero(np.bincount(train[:, 1], minlength=n_items)).tolist())
    assert candidates == set(range(n_items)) - {1, 6}
    drawn = set()
    for epoch in range(4):
        users, pos, neg = sampler.epoch(epoch)
        assert len(users) == len(sampler) == 3 * len(train)
        assert Counter(zip(users.tolist(), pos.tolist())) == {p: 3 for p in train_set}   # each pair neg times
        assert not any((u, n) in train_set for u, n in zip(users.tolist(), neg.tolist()))
        assert set(neg.tolist()) <= candidates
        drawn |= set(neg.tolist())
    assert drawn == candidates          # every eligible item does get drawn


def test_sampler_is_a_function_of_seed_and_epoch(sampler_data):
    train, n_items = sampler_data
    a, b = TripleSampler(train, n_items, seed=5), TripleSampler(train, n_items, seed=5)
    for x, y in zip(a.epoch(3), b.epoch(3)):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(a.epoch(3), a.epoch(3)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.epoch(0)[0], a.epoch(1)[0])                      # reshuffled every epoch
    assert not np.array_equal(a.epoch(0)[2], TripleSampler(train, n_items, seed=6).epoch(0)[2])


def test_sampler_rejects_impossible_settings(sampler_data):
    train, n_items = sampler_data
    with pytest.raises(ValueError):
        TripleSampler(train, n_items, neg=0)
    everything = np.array([[0, 0], [0, 1], [1, 1]])
    with pytest.raises(ValueError, match="every item"):
        TripleSampler(everything, 2)


# --------------------------------------------------------------------------- resume

@pytest.fixture
def small_run(tmp_path):
    rng = np.random.default_rng(8)
    rows = [f"u{u},i{i},{t}" for u in range(40) for t, i in enumerate(rng.choice(30, 6, replace=False))]
    (tmp_path / "small.csv").write_text("user,item,timestamp\n" + "\n".join(rows) + "\n")
    return TrainConfig(data=str(tmp_path / "small.csv"), out=str(tmp_path / "a.ckpt"), epochs=2, pretrain_epochs=1,
                       hops=2, embed_size=8, seed=3, device="cpu", full_eval=False, progress=False)


def test_resume_continues_an_interrupted_run(small_run, monkeypatch):
    quiet = lambda *a: None
    reference = train_mod.train(small_run, log=quiet)                    # uninterrupted, 2 epochs

    real_fit = train_mod.fit_epoch
    calls = []

    def fit(*args, desc, **kw):
        calls.append(desc)
        if desc.startswith("CMN 2/"):
            raise KeyboardInterrupt                                      # Ctrl-C during epoch 2
        return real_fit(*args, desc=desc, **kw)

    monkeypatch.setattr(train_mod, "fit_epoch", fit)
    cfg = replace(small_run, out=small_run.out.replace("a.ckpt", "b.ckpt"))
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(cfg, log=quiet)
    assert calls == ["GMF 1/1", "CMN 1/2", "CMN 2/2"]
    resume_file = cfg.out + ".resume"
    assert not os.path.exists(cfg.out)                                 # no checkpoint from an interrupted run
    assert os.path.exists(resume_file)

    with pytest.raises(ValueError, match="different settings"):       # resuming with other settings is refused
        train_mod.train(replace(cfg, resume=True, lr=0.5), log=quiet)

    def no_gmf(*a, **kw):
        raise AssertionError("GMF pretraining ran again on --resume")

    reported = []
    hooks = train_mod.TrainHooks(pretrain=no_gmf, on_epoch=lambda state, row: reported.append((state.epoch, row)))
    calls.clear()
    monkeypatch.setattr(train_mod, "fit_epoch", lambda *a, desc, **kw: calls.append(desc) or real_fit(*a, desc=desc, **kw))
    resumed = train_mod.train(replace(cfg, resume=True), log=quiet, hooks=hooks)
    assert calls == ["CMN 2/2"]                                        # only the missing epoch ran
    assert reported == [(2, resumed["epochs"][1])]
    assert [r["epoch"] for r in resumed["epochs"]] == [1, 2]
    assert len(resumed["gmf_epochs"]) == 1
    assert not os.path.exists(resume_file)                             # cleaned up once finished
    # and the result is the uninterrupted run's, bit for bit
    assert [r["loss"] for r in resumed["epochs"]] == [r["loss"] for r in reference["epochs"]]
    assert [r["test"] for r in resumed["epochs"]] == [r["test"] for r in reference["epochs"]]
    a, b = load_checkpoint(small_run.out), load_checkpoint(cfg.out)
    assert set(a.state) == set(b.state) and "hop_maps.0.weight" in a.state
    for name in a.state:
        assert torch.equal(a.state[name], b.state[name]), name


def test_gmf_pretraining_initialises_the_memories(small_run):
    """M ← s·P and E ← s·Q from the pretrained GMF (s = the paper's 0.5 unless its signal is too small, see
    test_collapse.py); C is not pretrained (epochs=0 saves that state)."""
    captured = {}

    def pretrain(*args, **kw):
        captured["P"], captured["Q"], history = train_mod.pretrain_gmf(*args, **kw)
        return captured["P"], captured["Q"], history

    cfg = replace(small_run, epochs=0)
    metrics = train_mod.train(cfg, log=lambda *a: None, hooks=train_mod.TrainHooks(pretrain=pretrain))
    state = load_checkpoint(cfg.out).state
    assert len(metrics["gmf_epochs"]) == 1
    scale = metrics["memory_init"]["scale"]
    assert 0.5 <= scale <= 2.0
    assert torch.equal(state["user_memory"], scale * captured["P"])
    assert torch.equal(state["item_memory"], scale * captured["Q"])
    assert state["user_output"].abs().max() <= 0.02                   # still its truncated-normal init


def test_holdout_none_trains_saves_and_evaluates_only_with_data(small_run, capsys):
    """--holdout none: `seen` is the training array itself; saving it used to crash (shared memory)."""
    from training.cli import main
    cfg = replace(small_run, holdout="none", epochs=1)
    metrics = train_mod.train(cfg, log=lambda *a: None)
    assert "final" not in metrics                                        # nothing held out, nothing evaluated
    ckpt = load_checkpoint(cfg.out)
    assert ckpt.test_users is None and len(ckpt.train) == 40 * 6       # every interaction trained on
    np.testing.assert_array_equal(np.unique(ckpt.seen, axis=0), np.unique(ckpt.train, axis=0))  # train: by recency
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", cfg.out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no test split" in err and len(err.splitlines()) == 1
    assert main(["evaluate", "--checkpoint", cfg.out, "--data", cfg.data, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sampled"]["hr@10"] >= 0 and set(result["full"]) == {"hr@10", "recall@10", "ndcg@10"}


# --------------------------------------------------------------------------- end to end (the acceptance run)

def png_size(path) -> tuple[int, int]:
    blob = path.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n" and blob[12:16] == b"IHDR" and blob[-8:-4] == b"IEND"
    return struct.unpack(">II", blob[16:24])


@pytest.mark.slow
def test_train_then_evaluate_cli(trained_checkpoint, trained_evaluation):
    out = trained_checkpoint.path
    assert "wrote" in trained_checkpoint.train.stdout and "Traceback" not in trained_checkpoint.train.stderr
    result = trained_evaluation                      # `python -m training evaluate --checkpoint out --json`

    sampled_keys = {f"{m}@{k}" for m in ("hr", "ndcg") for k in range(1, 11)}
    full_keys = {"hr@10", "recall@10", "ndcg@10"}
    for block in (result, result["toppop"]):
        assert set(block["sampled"]) == sampled_keys
        assert set(block["full"]) == full_keys
        assert all(0 <= v <= 1 for v in block["sampled"].values())
        assert all(block["sampled"][f"hr@{k}"] <= block["sampled"][f"hr@{k + 1}"] for k in range(1, 10))
        assert block["full"]["hr@10"] <= block["sampled"]["hr@10"]   # the full catalogue is the harder ranking
    cmn, toppop = result["sampled"]["hr@10"], result["toppop"]["sampled"]["hr@10"]
    assert cmn >= toppop + 0.2, f"CMN HR@10 {cmn:.4f} vs TopPop {toppop:.4f}"

    metrics = json.loads(out.with_name(out.name + ".metrics.json").read_text())
    assert len(metrics["epochs"]) == ACCEPTANCE_EPOCHS and metrics["gmf_epochs"]
    for name in ("sampled", "full"):                   # the evaluate command reproduces training's final numbers
        for key, value in metrics["final"][name].items():      # (CMN's, the `full` strategy's)
            assert result["strategies"]["full"][name][key] == pytest.approx(value, abs=1e-9), (name, key)
    width, height = png_size(out.with_name(out.name + ".curves.png"))
    assert width > 100 and height > 100


@pytest.mark.slow
def test_trained_checkpoint_has_trained_hop_maps(trained_checkpoint):
    ckpt = load_checkpoint(str(trained_checkpoint.path))
    assert ckpt.config.hops == 3
    for hop in (0, 1):                                  # hop-map biases start at exactly 1.0
        assert not torch.equal(ckpt.state[f"hop_maps.{hop}.bias"], torch.ones(ckpt.config.embed_size))
    assert ckpt.state["output.bias"].abs().max() > 0   # the output bias starts at 0


def test_learning_rate_follows_the_batch_unless_given(small_run, monkeypatch):
    """--lr unset: 1e-3 at the paper's batch 128, 1e-3·√(B/128) at batch B; an explicit --lr is used as given."""
    assert train_mod.scaled_lr(None, 128) == 1e-3
    assert train_mod.scaled_lr(None, 8192) == pytest.approx(8e-3)
    assert train_mod.scaled_lr(5e-4, 8192) == 5e-4
    seen = []
    real = train_mod.make_optimizer
    monkeypatch.setattr(train_mod, "make_optimizer", lambda name, params, lr: seen.append(lr) or real(name, params, lr))
    for batch, lr in ((512, None), (512, 0.01)):
        train_mod.train(replace(small_run, epochs=1, pretrain_epochs=1, batch_size=batch, lr=lr), log=lambda *a: None)
    assert seen == [pytest.approx(2e-3), 0.01]


def test_validation_keeps_the_best_epochs_weights_not_the_last(small_run, monkeypatch):
    """Validation NDCG@10 peaks at epoch 2 of 3 (the evaluation is replaced by fixed figures): the checkpoint
    holds the weights as they were after epoch 2."""
    real_fit, real_eval = train_mod.fit_epoch, train_mod.evaluate_epoch
    after = []

    def fit(model, *args, **kw):
        stats = real_fit(model, *args, **kw)
        if kw.get("desc", "").startswith("CMN"):
            after.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return stats

    def evaluate(rec, cfg, fit_data, data):
        row = real_eval(rec, cfg, fit_data, data)
        row["validation"] = {**row["validation"], "ndcg@10": (0.5, 0.9, 0.7)[len(after) - 1]}
        return row

    monkeypatch.setattr(train_mod, "fit_epoch", fit)
    monkeypatch.setattr(train_mod, "evaluate_epoch", evaluate)
    metrics = train_mod.train(replace(small_run, epochs=3, validation=True, two_stage=False), log=lambda *a: None)
    assert metrics["best_validation_epoch"] == 2 and len(after) == 3
    saved = load_checkpoint(small_run.out).state
    for name, value in saved.items():
        assert torch.equal(value, after[1][name]), name
    assert any(not torch.equal(saved[name], after[2][name]) for name in saved)   # epoch 3 did change the weights


# --------------------------------------------------------------------------- --step

def test_graph_step_trains_as_the_eager_step(small_run):
    """`--step graph` runs the static-shape step of training/graph_step.py (uncaptured on a CPU) in `train`: the
    log names the step that ran, and the epochs' losses and the checkpoint's weights are the eager step's."""
    logs = {"eager": [], "graph": []}
    metrics = {step: train_mod.train(replace(small_run, out=small_run.out + f".{step}", step=step),
                                     log=logs[step].append) for step in logs}
    assert "CMN step: eager" in logs["eager"]
    assert any(line.startswith("CMN step: graph (uncaptured on cpu: CUDA graphs need a GPU;") for line in logs["graph"])
    assert [r["loss"] for r in metrics["graph"]["epochs"]] == \
        pytest.approx([r["loss"] for r in metrics["eager"]["epochs"]], abs=1e-6)
    assert all("fallback_steps" in r for r in metrics["graph"]["epochs"])
    eager, graph = (load_checkpoint(small_run.out + f".{step}").state for step in logs)
    for name, value in eager.items():
        torch.testing.assert_close(graph[name], value, rtol=0, atol=1e-6, msg=name)
