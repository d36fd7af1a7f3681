"""Shared helpers and fixtures for the core test suite.

- `reference_forward`: an independent numpy rendering of CMN's forward equations
  (../shared/docs/cmn-reference.md) on PADDED neighbourhood arrays with masks; the module uses packed segments.
- small random data/model builders, a hand-built item → users CSR, a CLI runner;
- `api_checkpoint`: a random CMN over a small synthetic data set, built in-process in well under a second, for
  the in-process service tests (api/test_api.py, api/test_shutdown.py, security/, store/), which run the app with
  `serving(settings_for(...))` and `wait_ready`;
- `rewrite_metadata` (a checkpoint whose header says something else) and `read_only` (a file nobody may write);
- `postgres_url` / `fresh_postgres_url`: fresh PostgreSQL databases (skipped without a server, failed in CI);
  `stoppable_postgres`: one on a private server the test may stop and start (tests/harness/postgres.py);
- `trained_checkpoint`: ONE real `python -m training train` run on the synthetic default, shared by the session
  (slow lane: every test that uses it is marked `slow`, see `pytest_collection_modifyitems`), and
  `trained_evaluation`: ONE `python -m training evaluate` of it.
"""
from __future__ import annotations

import asyncio
import json
import os
import struct
import subprocess
import threading
import sys
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from model.cmn import CMN, CMNConfig
from tests.harness.postgres import PrivatePostgres, ScratchDatabases, StoppablePostgres, local_postgres_admin_url

REPO = Path(__file__).resolve().parents[1]
CITEULIKE = Path(__file__).resolve().parents[2] / "shared" / "data" / "citeulike-a.npz"
ACCEPTANCE_EPOCHS = 3


# --------------------------------------------------------------------------- lanes

# `-m "not slow"` is the fast lane (well under a minute). Besides the tests marked in their own files (real
# servers as subprocesses, training through the CLI), these are slow wherever they are:
SLOW_FIXTURES = {"trained_checkpoint"}   # a full `python -m training train` subprocess (~60 s, more when busy)
SLOW_MODULES = {"test_reproduce.py"}     # benchmarks/reproduce_citeulike.py --quick as a subprocess (~40 s)


@pytest.hookimpl(tryfirst=True)          # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


# --------------------------------------------------------------------------- data helpers

def random_train(rng: np.random.Generator, n_users: int, lengths: list[int]) -> np.ndarray:
    """(n, 2) unique (user, item) pairs in which item j has exactly `lengths[j]` distinct users."""
    pairs = [(int(u), j) for j, n in enumerate(lengths) for u in rng.choice(n_users, size=n, replace=False)]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def item_user_csr(train: np.ndarray, n_items: int, rng: np.random.Generator | None = None):
    """Item → users CSR built by hand (not with model.store.checkpoint.csr). With `rng`, users are shuffled within
    each item: attention is order-free, so the model must not depend on the order."""
    by_item = [sorted(set(train[train[:, 1] == j, 0].tolist())) for j in range(n_items)]
    if rng is not None:
        by_item = [list(rng.permutation(users)) for users in by_item]
    indptr = np.zeros(n_items + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(users) for users in by_item])
    indices = np.array([u for users in by_item for u in users], dtype=np.int64)
    return torch.from_numpy(indptr), torch.from_numpy(indices)


def neighbourhood(train: np.ndarray, user: int, item: int, exclude_self: bool = False) -> list[int]:
    """N(i) by the spec: the item's training users (minus the querying user with exclude_self); empty → [u]."""
    users = sorted(set(train[train[:, 1] == item, 0].tolist()))
    if exclude_self:
        users = [v for v in users if v != user]
    return users or [user]


# --------------------------------------------------------------------------- model helpers

def make_cmn(n_users: int, n_items: int, d: int, hops: int, seed: int = 0, embed_std: float = 0.5,
             sparse_grad: bool = True) -> CMN:
    """A CMN whose memories are large enough for non-uniform attention and whose biases are random (so a
    forgotten bias or a wrong one shows up in the scores)."""
    torch.manual_seed(seed)
    model = CMN(CMNConfig(n_users, n_items, d, hops), sparse_grad=sparse_grad)
    with torch.no_grad():
        for table in (model.user_memory, model.user_output, model.item_memory):
            table.normal_(0.0, embed_std)
        for m in list(model.hop_maps) + [model.output]:
            m.bias.uniform_(-0.5, 0.5)
    return model


def numpy_params(model: CMN) -> dict:
    """The model's weights as float64 numpy arrays under the spec's names."""
    np_ = lambda t: t.detach().cpu().double().numpy()
    return {"M": np_(model.user_memory), "C": np_(model.user_output), "E": np_(model.item_memory),
            "W": [np_(m.weight) for m in model.hop_maps], "b": [np_(m.bias) for m in model.hop_maps],
            "U": np_(model.output.weight), "U_b": np_(model.output.bias), "v": np_(model.v.weight)[0]}


def relu(x):
    return np.maximum(x, 0.0)


def reference_forward(P: dict, users, items, nbrs: list[list[int]]):
    """Scores and last-hop attention of the pairs (users[b], items[b]) with neighbourhoods nbrs[b].

    Padded layout: neighbours in a (B, L) array, L = the longest neighbourhood, plus a boolean mask.
        z¹ = m_u + e_i;  zʰ = ReLU(W_h zʰ⁻¹ + b_h + oʰ⁻¹) for h ≥ 2
        p  = softmax over the real slots of q_v = zʰ·M[v]   (padding: weight 0)
        oʰ = Σ_v p_v C[v]
        r  = vᵀ ReLU(U [m_u ⊙ e_i ; o^H] + b)
    Returns (scores (B,), attention (B, L), padded neighbour ids (B, L), mask (B, L)).
    """
    users, items = np.asarray(users), np.asarray(items)
    B, L = len(users), max(len(n) for n in nbrs)
    nbr = np.zeros((B, L), dtype=np.int64)
    mask = np.zeros((B, L), dtype=bool)
    for b, n in enumerate(nbrs):
        nbr[b, :len(n)] = n
        mask[b, :len(n)] = True
    m_u, e_i = P["M"][users], P["E"][items]
    keys, values = P["M"][nbr], P["C"][nbr]                      # (B, L, d)
    z, o, p = m_u + e_i, None, None
    for h in range(len(P["W"]) + 1):
        if h > 0:
            z = relu(z @ P["W"][h - 1].T + P["b"][h - 1] + o)
        q = np.einsum("bld,bd->bl", keys, z)
        q = np.where(mask, q, -np.inf)
        q = q - q.max(axis=1, keepdims=True)
        w = np.where(mask, np.exp(q), 0.0)
        p = w / w.sum(axis=1, keepdims=True)
        o = np.einsum("bl,bld->bd", p, values)
    hidden = relu(np.concatenate([m_u * e_i, o], axis=1) @ P["U"].T + P["U_b"])
    return hidden @ P["v"], p, nbr, mask


# --------------------------------------------------------------------------- checkpoint helper

def small_checkpoint(path, n_users: int = 7, n_items: int = 6, seed: int = 0) -> str:
    """Writes a small but complete checkpoint (random CMN, id maps, CSR pairs, test split) with the real
    `save_checkpoint`; returns its path."""
    from model.store.checkpoint import Checkpoint, save_checkpoint
    rng = np.random.default_rng(seed)
    model = make_cmn(n_users, n_items, d=4, hops=2, seed=seed)
    train = random_train(rng, n_users, [3, 1, 0, 2, 4, 2])
    ckpt = Checkpoint(model.cfg, model.state_dict(), [f"u{i}" for i in range(n_users)],
                      [f"i{i}" for i in range(n_items)], train=train, seen=train,
                      test_users=np.array([0, 1]), test_positives=np.array([2, 5]),
                      test_negatives=np.array([[1, 3], [0, 4]]))
    save_checkpoint(ckpt, str(path))
    return str(path)


API_USERS, API_ITEMS = 200, 1600    # 1,178 items have an interaction and are kept


def synthetic_checkpoint(path, n_users: int = API_USERS, n_items: int = API_ITEMS, d: int = 8, hops: int = 2,
                         seed: int = 0) -> str:
    """A complete checkpoint over `training.data.synthetic` (integer-like external ids, power-law popularity,
    a leave-one-out test split) with a random CMN, written with the real `save_checkpoint`, the way
    `training.train.write_checkpoint` lays it out; returns its path. Well under a second: for tests about the
    service, which compute their ground truth from the checkpoint itself, not about what training learns.

    Only items someone interacted with are kept; at the defaults the catalogue (1,178) is larger than the
    largest `k` (1000) plus any user's seen items, so "k is honoured" and "k larger than what remains" are
    different cases."""
    from model.store.checkpoint import Checkpoint, save_checkpoint
    from training.data import synthetic
    data = synthetic(seed=seed, n_users=n_users, n_items=n_items)
    model = make_cmn(data.n_users, data.n_items, d=d, hops=hops, seed=seed)
    ckpt = Checkpoint(model.cfg, model.state_dict(), data.user_ids, data.item_ids, train=data.train,
                      seen=data.all_pairs(), meta={"data": data.name, "built_by": "tests/conftest.py"},
                      test_users=data.test.users, test_positives=data.test.positives,
                      test_negatives=data.test.negatives)
    save_checkpoint(ckpt, str(path))
    return str(path)


def staged_checkpoint(path, n_users: int, n_items: int, seed: int = 0) -> str:
    """A small random CMN over `training.data.synthetic` with a retrieval stage chosen on a validation split, so
    that every strategy (full, two_stage, retrieval) is on offer; seen-sets hold every pair, as a served model's
    do. Returns its path."""
    from model.store.checkpoint import Checkpoint, save_checkpoint
    from training.data import holdout_validation, synthetic
    from training.two_stage import fit_two_stage
    data = synthetic(n_users=n_users, n_items=n_items, per_user=10, seed=seed)
    model = make_cmn(data.n_users, data.n_items, d=6, hops=2, seed=seed)
    retrieval, stage, _ = fit_two_stage(model, holdout_validation(data, 0), data, log=lambda *_: None)
    save_checkpoint(Checkpoint(model.cfg, model.state_dict(), data.user_ids, data.item_ids, train=data.train,
                               seen=data.all_pairs(), retrieval=retrieval, two_stage=stage), str(path))
    return str(path)


@pytest.fixture(scope="session")
def api_checkpoint(tmp_path_factory) -> str:
    """The checkpoint the in-process service tests serve (see `synthetic_checkpoint`), built once per session."""
    return synthetic_checkpoint(tmp_path_factory.mktemp("api-checkpoint") / "model.ckpt")


def rewrite_metadata(src, dst, **changes):
    """Copy a safetensors file with its JSON header's __metadata__ entries changed (offsets stay valid:
    they are relative to the end of the header)."""
    blob = open(src, "rb").read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    header["__metadata__"].update(changes)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + blob[8 + n:])
    return str(dst)


@contextmanager
def read_only(path: Path):
    """`path` cannot be written, by root either, until the block ends."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], check=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        mode = path.stat().st_mode
        path.chmod(0o444)
        try:
            yield
        finally:
            path.chmod(mode)


# --------------------------------------------------------------------------- the app in-process

@asynccontextmanager
async def serving(settings: Settings):
    """The app with its lifespan running and a client on it (the lifespan starts the load in the background)."""
    from app.main import create_app
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cmn.test",
                                     timeout=60) as client:
            yield client


async def wait_ready(client: httpx.AsyncClient, timeout: float = 120) -> httpx.Response:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        r = await client.get("/health")
        if r.status_code == 200:
            return r
        assert r.status_code == 503, r.text
        await asyncio.sleep(0.05)
    raise TimeoutError(f"not healthy after {timeout} s: {r.text}")


def settings_for(path: str, tmp, **kw) -> Settings:
    from app.settings import Settings
    return Settings(checkpoint=path, feedback_path=str(tmp / "feedback.sqlite3"), device="cpu", warmup_calls=1,
                    **kw)


# --------------------------------------------------------------------------- CLI

def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m training ARGS` as a real subprocess from the repository root.

    One intra-op thread unless the caller's environment says otherwise: the model's ops are small, and on a
    busy machine (other test sessions training too) OpenMP threads that spin at barriers made the acceptance
    run ~100x slower (measured: GMF 1.4k triples/s with 2 threads against 130k with 1 at load ~6 on 2 cores).
    """
    env = {"OMP_NUM_THREADS": "1", **os.environ, "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@dataclass
class TrainedCheckpoint:
    path: Path                              # the checkpoint; metrics JSON and PNG lie next to it
    train: subprocess.CompletedProcess      # the finished `train` run (stdout, stderr)


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> TrainedCheckpoint:
    """`python -m training train --data synthetic --out X --epochs 3 --seed 0 --device cpu`, run once per session
    (~60 s on 2 cores, most of it the auto-sized GMF pretraining). `train`'s defaults otherwise: it cuts a
    validation split and chooses the served strategy on it (the suite's one run of that path through the CLI).
    On the cpu: the tests compare it with offline figures computed on the cpu (`trained_evaluation`)."""
    out = tmp_path_factory.mktemp("trained") / "model.ckpt"
    # ~60 s on an idle 2-core machine; the generous limit is for a busy one, where it has taken over 10 minutes
    proc = run_cli("train", "--data", "synthetic", "--out", str(out), "--epochs", str(ACCEPTANCE_EPOCHS),
                   "--seed", "0", "--device", "cpu", timeout=1800)
    assert proc.returncode == 0, f"training failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return TrainedCheckpoint(out, proc)


@pytest.fixture(scope="session")
def trained_evaluation(trained_checkpoint) -> dict:
    """`python -m training evaluate --checkpoint <trained_checkpoint> --json --device cpu`'s JSON, run once per
    session (every strategy of the checkpoint, sampled and full-catalogue: tens of seconds on 2 cores)."""
    proc = run_cli("evaluate", "--checkpoint", str(trained_checkpoint.path), "--json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture
def held_loading(monkeypatch):
    """The service's model load waits on the returned gate until the test sets it (so "before the model is
    loaded" is a state a test can hold, not a race)."""
    import app.models as models_module
    from app.engine import Engine

    gate = threading.Event()

    class GatedEngine(Engine):
        def __init__(self, *args, **kwargs):
            gate.wait(60)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(models_module, "Engine", GatedEngine)
    yield gate
    gate.set()


# --------------------------------------------------------------------------- PostgreSQL

def no_postgres(why: str):
    """Skip, except in CI (`CI` set), which must really test PostgreSQL: there the test fails."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must test PostgreSQL, but: {why}")
    pytest.skip(why)


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    url, why = local_postgres_admin_url()
    if url is None:
        no_postgres(why)
    return url


@pytest.fixture
def fresh_postgres_url(postgres_admin_url):
    """A function returning the URL of a new, empty database at each call (usable by subprocesses: it carries
    its own credentials); all are dropped after the test. Skips without a server (fails in CI)."""
    databases = ScratchDatabases(postgres_admin_url)
    yield databases
    databases.drop()


@pytest.fixture
def postgres_url(fresh_postgres_url) -> str:
    """The URL of a fresh, empty PostgreSQL database of its own (see `fresh_postgres_url`)."""
    return fresh_postgres_url()


@pytest.fixture(scope="session")
def private_postgres():
    import glob
    import shutil
    found = shutil.which("pg_ctl") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                                                       key=lambda p: int(p.split("/")[-3]), reverse=True)), None)
    if found is None:
        no_postgres("PostgreSQL's server programs (pg_ctl, initdb) are not installed")
    if os.geteuid() == 0 and subprocess.run(["id", "postgres"], capture_output=True).returncode:
        no_postgres("running as root, but there is no postgres user to run a private server as")
    server = PrivatePostgres(Path(found).parent)
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture
def stoppable_postgres(private_postgres):
    """A fresh database on the session's private PostgreSQL server, which the test may `.stop()` and `.start()`
    (an outage and the recovery from it); `.url` stays valid across both. Restarted after the test if stopped."""
    private_postgres.start()
    databases = ScratchDatabases(private_postgres.admin_url)
    yield StoppablePostgres(databases(), private_postgres)
    private_postgres.start()
    databases.drop()
