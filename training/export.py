"""`python -m training export`: every user's (or the listed users') top-k from a checkpoint, in one file, as the
server would answer `/recommend` for each of them: ranked by `Recommender.recommend` (the call the server's engine
makes, seen items excluded), external ids, one row per user shaped like the API's answer
(`{"user_id", "items": [{"item_id", "score"}], "model_version", "strategy"}`, and `fallback` for a user the
checkpoint does not know, who gets the popularity list as from the server).

Users are ranked a chunk at a time and each chunk is written to its own part file under `OUT.parts/` (written to a
temporary name, then renamed: a part that exists is complete), so memory stays bounded by one chunk and an
interrupted export, run again with the same arguments, continues with the first missing part. When every part is
there they are joined into OUT (again through a temporary file and a rename: OUT is never half-written) and the
parts are removed. The parts directory's manifest records what the parts were made from (checkpoint version,
users, k, strategy, format, chunk size): a resume with other arguments is refused rather than mixing lists.

Formats: `parquet` (pyarrow; `items` a list of {item_id, score} structs), `jsonl` (one JSON object a line, as the
API's body), `csv` (one line per user and rank: user_id, rank, item_id, score; CSV cannot nest).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

FORMATS = ("parquet", "jsonl", "csv")
MANIFEST = "manifest.json"


class ExportError(ValueError):
    """Arguments or files the export cannot use (a clear CLI error, never a traceback)."""


@dataclass(frozen=True)
class Plan:
    """What the parts are made from: a resume must match it exactly."""
    model_version: str
    users_sha256: str
    users: int
    k: int
    strategy: str
    format: str
    chunk_users: int


@dataclass
class ExportResult:
    path: str
    users: int
    fallback_users: int
    chunks: int
    resumed_chunks: int
    ranked: int                 # users ranked by this run (not in parts an earlier run left)
    seconds: float

    @property
    def users_per_s(self) -> float:
        return self.ranked / self.seconds if self.seconds else float("inf")


def read_users(path: str) -> list[str]:
    """External user ids, one a line (blank lines skipped, repeats kept once, in first-seen order)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f"--users {path}: cannot read it ({e})") from None
    users = list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))
    if not users:
        raise ExportError(f"--users {path} lists no user")
    return users


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Rows:
    """One chunk's answers: per user its external id, items and scores (a row's items end at the first -1)."""

    def __init__(self, user_ids: list[str], items: np.ndarray, scores: np.ndarray, item_ids: np.ndarray,
                 fallback: list[bool]):
        keep = items >= 0
        self.user_ids, self.fallback = user_ids, fallback
        self.counts = keep.sum(1)
        self.item_ids = item_ids[items[keep]]
        self.scores = scores[keep].astype(np.float32)

    def dicts(self, plan: Plan) -> list[dict]:
        out, start = [], 0
        for user, n, fell in zip(self.user_ids, self.counts.tolist(), self.fallback):
            row = {"user_id": user, "items": [{"item_id": i, "score": s} for i, s in zip(
                self.item_ids[start:start + n].tolist(), self.scores[start:start + n].tolist())],
                   "model_version": plan.model_version}
            row.update({"fallback": "unknown_user"} if fell else {"strategy": plan.strategy})
            out.append(row)
            start += n
        return out

    def table(self, plan: Plan):
        import pyarrow as pa
        offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int32)
        items = pa.ListArray.from_arrays(pa.array(offsets), pa.StructArray.from_arrays(
            [pa.array(self.item_ids.tolist(), pa.string()), pa.array(self.scores, pa.float32())],
            names=["item_id", "score"]))
        n = len(self.user_ids)
        return pa.Table.from_arrays(
            [pa.array(self.user_ids, pa.string()), items, pa.array([plan.model_version] * n, pa.string()),
             pa.array([None if f else plan.strategy for f in self.fallback], pa.string()),
             pa.array(["unknown_user" if f else None for f in self.fallback], pa.string())],
            names=["user_id", "items", "model_version", "strategy", "fallback"])

    def encode(self, plan: Plan) -> bytes:
        if plan.format == "parquet":
            import pyarrow.parquet as pq
            buf = io.BytesIO()
            pq.write_table(self.table(plan), buf)
            return buf.getvalue()
        if plan.format == "jsonl":
            return "".join(json.dumps(r) + "\n" for r in self.dicts(plan)).encode()
        text = io.StringIO()
        w = csv.writer(text, lineterminator="\n")
        for r in self.dicts(plan):
            w.writerows((r["user_id"], rank, e["item_id"], repr(e["score"])) for rank, e in enumerate(r["items"], 1))
        return text.getvalue().encode()


def _join(parts: list[Path], out: Path, fmt: str) -> None:
    """The parts, in order, as one file written beside `out` and renamed onto it; one part in memory at a time."""
    tmp = out.with_name(out.name + ".tmp")
    if fmt == "parquet":
        import pyarrow.parquet as pq
        writer = None
        for part in parts:
            table = pq.read_table(part)
            writer = writer or pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)   # one row group per chunk
        if writer is not None:
            writer.close()
    else:
        with open(tmp, "wb") as f:
            if fmt == "csv":
                f.write(b"user_id,rank,item_id,score\n")
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, f)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out)


def _start_parts(parts_dir: Path, plan: Plan) -> None:
    manifest = parts_dir / MANIFEST
    if manifest.exists():
        try:
            found = json.loads(manifest.read_text())
        except (OSError, ValueError):
            found = None
        if found != asdict(plan):
            raise ExportError(f"{parts_dir} holds the parts of an export with other arguments or another checkpoint "
                              f"({found}); rerun that export to finish it, or remove the directory to start over")
        return
    parts_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(manifest, json.dumps(asdict(plan), indent=1).encode())


def export(checkpoint: str, out: str, k: int = 10, strategy: str | None = None, users: list[str] | None = None,
           fmt: str = "parquet", chunk_users: int = 512, device: str = "auto", progress: bool | None = None,
           after_chunk: Callable[[int], None] | None = None) -> ExportResult:
    """Write every (or each listed) user's top-k to `out`; see the module's docstring. `after_chunk(n)` is called
    once chunk n's part is on disk (tests interrupt an export there)."""
    from model.recommender import Recommender
    from model.store.checkpoint import load_checkpoint
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}")
    if k < 1 or chunk_users < 1:
        raise ExportError("--k and --chunk-users must be at least 1")
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401  (the `train` extra)
        except ImportError:
            raise ExportError("--format parquet needs pyarrow (pip install 'cmn-service[train]')") from None
    start = time.perf_counter()
    ckpt = load_checkpoint(checkpoint)
    rec = Recommender.from_checkpoint(ckpt, device)
    strategy = strategy or rec.default_strategy
    if strategy not in rec.strategies:
        raise ExportError(f"--strategy {strategy!r}: this checkpoint offers {', '.join(rec.strategies)}")
    listed = list(ckpt.user_ids) if users is None else users
    plan = Plan(ckpt.model_version, hashlib.sha256("\n".join(listed).encode()).hexdigest(), len(listed), k,
                strategy, fmt, chunk_users)
    out_path = Path(out)
    parts_dir = out_path.with_name(out_path.name + ".parts")
    _start_parts(parts_dir, plan)

    index = {u: n for n, u in enumerate(ckpt.user_ids)}
    item_ids = np.asarray(list(ckpt.item_ids), dtype=object)
    popular = None
    chunks = range(0, len(listed), chunk_users)
    parts = [parts_dir / f"part-{n:06d}.{fmt}" for n in range(len(chunks))]
    resumed = sum(p.exists() for p in parts)
    if progress is None:
        progress = sys.stderr.isatty()
    from tqdm import tqdm
    bar = tqdm(total=len(listed), initial=min(len(listed), resumed * chunk_users), desc="export", unit="user",
               disable=not progress, mininterval=0.5)
    fallback_users = ranked = 0
    for n, first in enumerate(chunks):
        chunk = listed[first:first + chunk_users]
        fell = [u not in index for u in chunk]
        fallback_users += sum(fell)
        if parts[n].exists():
            continue
        known = [index[u] for u, f in zip(chunk, fell) if not f]
        items = np.full((len(chunk), k), -1, dtype=np.int64)
        scores = np.full((len(chunk), k), -np.inf, dtype=np.float32)
        if known:
            got_items, got_scores = rec.recommend(known, k=k, strategy=strategy)
            rows = np.flatnonzero(~np.asarray(fell))
            items[rows, :got_items.shape[1]], scores[rows, :got_scores.shape[1]] = got_items, got_scores
        if any(fell):  # as the server answers a user it does not know: the k most popular items
            if popular is None:
                popular = [t.numpy() for t in rec.popular(k)]
            rows = np.flatnonzero(fell)
            items[rows, :len(popular[0])], scores[rows, :len(popular[1])] = popular
        _atomic_write(parts[n], Rows(chunk, items, scores, item_ids, fell).encode(plan))
        ranked += len(chunk)
        bar.update(len(chunk))
        if after_chunk is not None:
            after_chunk(n)
    bar.close()
    _join(parts, out_path, fmt)
    shutil.rmtree(parts_dir)
    return ExportResult(str(out_path), len(listed), fallback_users, len(parts), resumed, ranked,
                        time.perf_counter() - start)
