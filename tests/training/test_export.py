"""`python -m training export`: every user's list, once, as the recommender ranks it; the three formats hold the
same rows; an export interrupted between parts and run again gives the same file, byte for byte, and redoes only
the missing parts; arguments that cannot be honoured are clear CLI errors."""
import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import run_cli, staged_checkpoint, synthetic_checkpoint
from model.recommender import Recommender
from model.store.checkpoint import load_checkpoint
from training.cli import main
from training.export import ExportError, export


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> str:
    return staged_checkpoint(tmp_path_factory.mktemp("export") / "staged.ckpt", n_users=90, n_items=200, seed=3)


def read_rows(path: str, fmt: str) -> list[dict]:
    """The exported file as API-shaped rows, whatever its format."""
    if fmt == "jsonl":
        return [json.loads(line) for line in open(path)]
    if fmt == "parquet":
        return [{k: v for k, v in row.items() if v is not None} for row in pq.read_table(path).to_pylist()]
    rows: dict[str, list] = {}
    for r in csv.DictReader(open(path)):
        rows.setdefault(r["user_id"], []).append((int(r["rank"]), r["item_id"], float(r["score"])))
    return [{"user_id": u, "items": [{"item_id": i, "score": s} for _, i, s in sorted(ranked)]}
            for u, ranked in rows.items()]


@pytest.mark.parametrize("strategy", ["full", "two_stage", "retrieval"])
def test_every_user_once_with_the_recommenders_list(staged, tmp_path, strategy):
    out = tmp_path / "all.jsonl"
    result = export(staged, str(out), k=7, strategy=strategy, fmt="jsonl", chunk_users=16, device="cpu")
    ckpt = load_checkpoint(staged)
    rows = read_rows(str(out), "jsonl")
    assert [r["user_id"] for r in rows] == list(ckpt.user_ids) and result.users == len(rows) == 90
    assert result.chunks == 6 and result.resumed_chunks == 0
    rec = Recommender.from_checkpoint(ckpt)
    # one user at a time, as /recommend asks: chunking must not change a list
    for u in (0, 17, 89):
        items, scores = rec.recommend([u], k=7, strategy=strategy)
        want = [(ckpt.item_ids[i], s) for i, s in zip(items[0].tolist(), scores[0].tolist()) if i >= 0]
        got = [(e["item_id"], e["score"]) for e in rows[u]["items"]]
        assert [i for i, _ in got] == [i for i, _ in want]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-5, atol=1e-6)
    seen = {}
    for u, i in ckpt.seen:
        seen.setdefault(ckpt.user_ids[u], set()).add(ckpt.item_ids[i])
    for r in rows:
        assert r["strategy"] == strategy and r["model_version"] == ckpt.model_version
        assert not {e["item_id"] for e in r["items"]} & seen[r["user_id"]]
        scores = [e["score"] for e in r["items"]]
        assert scores == sorted(scores, reverse=True) and len(scores) == 7


def test_formats_hold_the_same_rows(staged, tmp_path):
    by_format = {}
    for fmt in ("parquet", "jsonl", "csv"):
        export(staged, str(tmp_path / f"x.{fmt}"), k=5, fmt=fmt, chunk_users=32, device="cpu")
        by_format[fmt] = read_rows(str(tmp_path / f"x.{fmt}"), fmt)
    assert by_format["parquet"] == by_format["jsonl"]
    assert pq.ParquetFile(tmp_path / "x.parquet").metadata.num_row_groups == 3   # one per part: streamed
    strip = [{"user_id": r["user_id"], "items": r["items"]} for r in by_format["jsonl"]]
    assert by_format["csv"] == strip


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_an_interrupted_export_resumes_to_the_same_bytes(staged, tmp_path, fmt):
    whole = tmp_path / f"whole.{fmt}"
    export(staged, str(whole), k=6, fmt=fmt, chunk_users=10, device="cpu")

    out = tmp_path / f"resumed.{fmt}"

    def fail_after_four(n):
        if n == 3:
            raise Interrupted
    with pytest.raises(Interrupted):
        export(staged, str(out), k=6, fmt=fmt, chunk_users=10, device="cpu", after_chunk=fail_after_four)
    assert not out.exists() and len(list((tmp_path / f"resumed.{fmt}.parts").glob("part-*"))) == 4
    redone = []
    result = export(staged, str(out), k=6, fmt=fmt, chunk_users=10, device="cpu", after_chunk=redone.append)
    assert redone == [4, 5, 6, 7, 8] and result.resumed_chunks == 4
    assert out.read_bytes() == whole.read_bytes()
    assert not (tmp_path / f"resumed.{fmt}.parts").exists()


def test_a_resume_with_other_arguments_is_refused(staged, tmp_path):
    out = tmp_path / "x.jsonl"

    def stop(n):
        raise Interrupted
    with pytest.raises(Interrupted):
        export(staged, str(out), k=6, fmt="jsonl", chunk_users=10, device="cpu", after_chunk=stop)
    with pytest.raises(ExportError, match="other arguments"):
        export(staged, str(out), k=8, fmt="jsonl", chunk_users=10, device="cpu")


def test_listed_users_unknown_ones_get_the_popularity_list(staged, tmp_path):
    ckpt = load_checkpoint(staged)
    users = tmp_path / "users.txt"
    users.write_text(f"{ckpt.user_ids[5]}\nnobody\n\n{ckpt.user_ids[5]}\n{ckpt.user_ids[2]}\n")
    out = tmp_path / "x.jsonl"
    proc = run_cli("export", "--checkpoint", staged, "--out", str(out), "--users", str(users), "--format", "jsonl",
                   "--k", "4", "--device", "cpu")   # the real command line, once
    assert proc.returncode == 0, proc.stderr
    assert "exported 3 users (1 unknown to the checkpoint: popularity)" in proc.stdout
    rows = read_rows(str(out), "jsonl")
    assert [r["user_id"] for r in rows] == [ckpt.user_ids[5], "nobody", ckpt.user_ids[2]]
    popularity = np.bincount(ckpt.train[:, 1], minlength=len(ckpt.item_ids))
    counts = [popularity[ckpt.item_ids.index(e["item_id"])] for e in rows[1]["items"]]
    assert rows[1]["fallback"] == "unknown_user" and "strategy" not in rows[1]
    assert counts == sorted(popularity, reverse=True)[:4]


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    full_only = synthetic_checkpoint(tmp_path / "full.ckpt", n_users=20, n_items=60)
    (tmp_path / "a-file").write_text("")
    cases = [(["--strategy", "two_stage"], "this checkpoint offers full"),
             (["--users", str(tmp_path / "missing.txt")], "cannot read it"),
             (["--k", "0"], "at least 1"),
             (["--out", str(tmp_path / "a-file" / "x.parquet")], "cannot write")]
    for extra, message in cases:
        rc = main(["export", "--checkpoint", full_only, "--out", str(tmp_path / "x.parquet"), "--device", "cpu",
                   *extra])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and err.startswith("error: "), err
