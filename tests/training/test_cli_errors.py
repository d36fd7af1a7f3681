"""Bad input: one `error: ...` line on stderr, exit code 2, no traceback, and nothing written at --out.

Most cases call `training.cli.main` in-process (an uncaught exception would fail the test just as a traceback
would); a few go through a real `python -m training` subprocess to pin the process-level behaviour.
"""
import json
import random

import pytest
import torch

from conftest import rewrite_metadata, run_cli, small_checkpoint
from model.store.checkpoint import load_checkpoint
from training.cli import main


def assert_one_line_error(rc, err, *fragments):
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def cli(capsys):
    def run(*argv):
        rc = main(list(argv))
        return rc, capsys.readouterr().err
    return run


def csv_file(tmp_path, text, name="data.csv"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


TRAIN_CASES = {
    "missing data file": (lambda tmp: ["--data", str(tmp / "nope.csv")], "not found"),
    "data is a directory": (lambda tmp: ["--data", str(tmp)], "directory"),
    "empty CSV": (lambda tmp: ["--data", csv_file(tmp, "  \n")], "empty"),
    "header only": (lambda tmp: ["--data", csv_file(tmp, "user,item\n")], "no interactions"),
    "no user/item column": (lambda tmp: ["--data", csv_file(tmp, "foo,bar\n1,2\n")], "user column"),
    "non-numeric rating": (lambda tmp: ["--data", csv_file(tmp, "user,item,rating\na,x,5\nb,x,good\n"),
                                        "--min-rating", "3"], "non-numeric"),
    "min-rating removes everything": (lambda tmp: ["--data", csv_file(tmp, "user,item,rating\na,x,1\nb,y,2\n"),
                                                   "--min-rating", "4"], "no interactions left"),
    "min-rating without ratings": (lambda tmp: ["--data", csv_file(tmp, "user,item\na,x\nb,y\n"),
                                                "--min-rating", "4"], "no rating column"),
    "bad npz": (lambda tmp: ["--data", csv_file(tmp, "not a zip", name="x.npz")], "npz"),
    "negative epochs": (lambda tmp: ["--epochs", "-1"], "--epochs"),
    "zero hops": (lambda tmp: ["--hops", "0"], "--hops"),
    "early stop without validation": (lambda tmp: ["--no-validation", "--early-stop", "3"], "--validation"),
    "graph step with adam": (lambda tmp: ["--step", "graph", "--optimizer", "adam"], "--step graph"),
}


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_errors(cli, tmp_path, case):
    args, fragment = TRAIN_CASES[case]
    out = tmp_path / "out" / "model.ckpt"
    rc, err = cli("train", "--out", str(out), "--quiet", *args(tmp_path))
    assert_one_line_error(rc, err, fragment)
    assert not out.exists()
    assert not list(tmp_path.rglob(".ckpt-*")) and not list(tmp_path.rglob("*.resume"))


def test_out_is_a_directory(cli, tmp_path):
    rc, err = cli("train", "--out", str(tmp_path), "--quiet", "--epochs", "0")
    assert_one_line_error(rc, err, "directory")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_gpu(cli, tmp_path):
    out = tmp_path / "m.ckpt"
    rc, err = cli("train", "--out", str(out), "--device", "cuda", "--quiet")
    assert_one_line_error(rc, err, "cuda")
    assert not out.exists()
    rc, err = cli("evaluate", "--checkpoint", small_checkpoint(tmp_path / "ok.ckpt"), "--device", "cuda")
    assert_one_line_error(rc, err, "cuda")


# --------------------------------------------------------------------------- broken checkpoints

def test_rewrite_metadata_keeps_a_valid_file(tmp_path):
    """The helper itself: a no-op rewrite still loads, so the failures below come from the changed fields."""
    good = small_checkpoint(tmp_path / "good.ckpt")
    copy = rewrite_metadata(good, tmp_path / "copy.ckpt", note="x")
    assert load_checkpoint(copy).user_ids == load_checkpoint(good).user_ids


def broken_checkpoint(tmp_path, kind):
    good = small_checkpoint(tmp_path / "good.ckpt")
    path = tmp_path / f"{kind}.ckpt"
    if kind == "missing":
        return str(path), "not found"
    if kind == "truncated":
        blob = open(good, "rb").read()
        path.write_bytes(blob[:len(blob) // 2])
        return str(path), "truncated or corrupt"
    if kind == "random-bytes":
        path.write_bytes(random.Random(0).randbytes(4096))
        return str(path), "truncated or corrupt"
    if kind == "empty":
        path.write_bytes(b"")
        return str(path), "truncated or corrupt"
    if kind == "wrong-version":
        return rewrite_metadata(good, path, format_version="999"), "version 999"
    if kind == "foreign":
        return rewrite_metadata(good, path, format="something-else"), "not a CMN checkpoint"
    if kind == "wrong-shapes":
        cfg = json.dumps({"n_users": 7, "n_items": 6, "embed_size": 5, "hops": 2, "l2": 0.1})
        return rewrite_metadata(good, path, config=cfg), "inconsistent"
    raise AssertionError(kind)


CHECKPOINT_KINDS = ["missing", "truncated", "random-bytes", "empty", "wrong-version", "foreign", "wrong-shapes"]


@pytest.mark.parametrize("kind", CHECKPOINT_KINDS)
def test_evaluate_broken_checkpoint(cli, tmp_path, kind):
    path, fragment = broken_checkpoint(tmp_path, kind)
    rc, err = cli("evaluate", "--checkpoint", path)
    assert_one_line_error(rc, err, fragment)


def test_evaluate_good_small_checkpoint(tmp_path, capsys):
    """The control for the cases above: the undamaged file evaluates."""
    rc = main(["evaluate", "--checkpoint", small_checkpoint(tmp_path / "good.ckpt"), "--json"])
    out = capsys.readouterr().out
    assert rc == 0 and "sampled" in json.loads(out)


# --------------------------------------------------------------------------- as real processes

@pytest.mark.parametrize("args,fragment", [
    (["train", "--data", "does-not-exist.csv"], "data file not found"),
    (["evaluate", "--checkpoint", "RANDOM"], "truncated or corrupt"),
    (["evaluate", "--checkpoint", "WRONG_VERSION"], "not supported"),
])
def test_errors_as_subprocess(tmp_path, args, fragment):
    paths = {"RANDOM": broken_checkpoint(tmp_path, "random-bytes")[0],
             "WRONG_VERSION": broken_checkpoint(tmp_path, "wrong-version")[0]}
    args = [paths.get(a, a) for a in args]
    out = tmp_path / "out.ckpt"
    if args[0] == "train":
        args += ["--out", str(out), "--quiet"]
    proc = run_cli(*args, timeout=120)
    assert_one_line_error(proc.returncode, proc.stderr, fragment)
    assert proc.stdout == "" and not out.exists()
