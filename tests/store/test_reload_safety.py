"""Checkpoint files as an attacker hands them over: FIFOs, devices, symlinks and paths out of the checkpoint
directory, oversized files, and metadata that lies about the tensors. `load_checkpoint` refuses each one without
blocking and before building anything the metadata asks for; `/admin/reload` answers every refusal with the same
409 (the reason goes to the server log only) while the old model keeps serving.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import threading

import numpy as np
import pytest

import model.store.checkpoint as checkpoint_module
from conftest import rewrite_metadata, serving, settings_for, small_checkpoint, wait_ready
from model.store.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from model.cmn import CMN

ADMIN_KEY = "adm-reload-safety-0123456789"


def load_or_hang(path, **kwargs):
    """load_checkpoint on a thread, given 30 s: a reader that blocks (on a FIFO) fails the test instead of hanging
    the suite. Returns the CheckpointError raised, or the Checkpoint."""
    result = []

    def run():
        try:
            result.append(load_checkpoint(str(path), **kwargs))
        except CheckpointError as e:
            result.append(e)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), f"load_checkpoint({path}) blocked"
    return result[0]


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "fifo.ckpt"
    os.mkfifo(path)
    yield path
    try:  # should a reader be stuck on it after all, a writer that connects and leaves lets it go
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


# --------------------------------------------------------------------------- the loader

def test_a_fifo_is_refused_at_once(fifo):
    e = load_or_hang(fifo)
    assert isinstance(e, CheckpointError) and "not a regular file" in str(e)


def test_devices_and_directories_are_refused(tmp_path):
    for path, fragment in (("/dev/zero", "not a regular file"), (tmp_path, "is a directory"),
                           (tmp_path / "missing.ckpt", "not found")):
        e = load_or_hang(path)
        assert isinstance(e, CheckpointError) and fragment in str(e), (path, e)


def test_a_file_over_the_size_cap_is_refused(tmp_path):
    path = small_checkpoint(tmp_path / "model.ckpt")
    size = os.path.getsize(path)
    with pytest.raises(CheckpointError, match=f"{size} bytes, over the {size - 1}-byte limit"):
        load_checkpoint(path, max_bytes=size - 1)
    assert load_checkpoint(path, max_bytes=size).config.n_users == 7


def test_within_a_directory_symlinks_and_dot_dots_may_not_leave_it(tmp_path):
    inside, outside = tmp_path / "checkpoints", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    small_checkpoint(inside / "model.ckpt")
    small_checkpoint(outside / "other.ckpt", seed=1)
    os.symlink(inside / "model.ckpt", inside / "current.ckpt")
    os.symlink(outside / "other.ckpt", inside / "escape.ckpt")
    for name in ("model.ckpt", str(inside / "model.ckpt"), "current.ckpt", "./sub/../model.ckpt"):
        assert load_checkpoint(name, within=str(inside)).config.n_users == 7, name
    for name in ("escape.ckpt", "../elsewhere/other.ckpt", str(outside / "other.ckpt"), "/etc/passwd", "/"):
        with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
            load_checkpoint(name, within=str(inside))
    # without `within` (the CLI, the configured CMN_CHECKPOINT) a symlink is followed wherever it points
    assert load_checkpoint(str(inside / "escape.ckpt")).config.n_users == 7


def test_the_config_is_checked_against_the_tensor_shapes_before_any_model_is_built(tmp_path, monkeypatch):
    """The finding: a 2 MB file whose config said 1M users built a 1M-user model (13 s, 1 GB) before its 409.
    Now the only model built is on the meta device (shapes, no memory), and the file is refused."""
    built = []

    class Recorded(CMN):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self.user_memory.device.type)
    monkeypatch.setattr(checkpoint_module, "CMN", Recorded)
    good = small_checkpoint(tmp_path / "good.ckpt")
    cfg = {"n_users": 1_000_000, "n_items": 6, "embed_size": 4, "hops": 2, "l2": 0.1}
    bomb = rewrite_metadata(good, tmp_path / "bomb.ckpt", config=json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model.user_memory is F32 \[7, 4\], the config \(1000000 users"):
        load_checkpoint(bomb)
    assert built == ["meta"]
    built.clear()
    hops = rewrite_metadata(good, tmp_path / "hops.ckpt", config=json.dumps({**cfg, "n_users": 7, "hops": 10**6}))
    with pytest.raises(CheckpointError, match="config says 1000000 hops, the file holds 2"):
        load_checkpoint(hops)
    assert built == []   # not even on the meta device: a million hop maps would take minutes to build


def test_id_maps_and_pairs_must_fit_the_config(tmp_path):
    good = load_checkpoint(small_checkpoint(tmp_path / "good.ckpt"))

    def variant(name, **changes):
        fields = {f: getattr(good, f) for f in ("config", "state", "user_ids", "item_ids", "train", "seen",
                                               "test_users", "test_positives", "test_negatives")}
        save_checkpoint(Checkpoint(**{**fields, **changes}), str(tmp_path / name))
        return str(tmp_path / name)
    cases = {"duplicate user ids": (variant("dupes.ckpt", user_ids=["u0"] * 7), "user id map"),
             "one item id short": (variant("short.ckpt", item_ids=good.item_ids[:-1]), "item id map"),
             "a user beyond n_users": (variant("far-user.ckpt", seen=np.array([[7, 0]])), "seen (users)"),
             "a negative item": (variant("neg-item.ckpt", train=np.array([[0, -1]])), "train (items)"),
             "a test negative beyond n_items": (variant("far-neg.ckpt", test_negatives=np.array([[1, 3], [0, 6]])),
                                                "test.negatives")}
    for case, (path, fragment) in cases.items():
        with pytest.raises(CheckpointError, match="inconsistent checkpoint contents") as e:
            load_checkpoint(path)
        assert fragment in str(e.value), case


# --------------------------------------------------------------------------- /admin/reload

class Captured(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def service_log():
    handler, logger = Captured(), logging.getLogger("cmn.service")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


@pytest.mark.anyio
async def test_reload_refuses_every_bad_path_alike_and_keeps_serving(api_checkpoint, tmp_path, fifo, service_log):
    """A FIFO (the finding: it froze every route until something wrote to it), a device, a directory, a missing
    file, paths out of CMN_CHECKPOINT_DIR: the same 409 for each, so the answer tells nothing about the file
    system; /health is answered while the FIFO reload runs; the log says why."""
    serving_dir = fifo.parent
    shutil.copy(api_checkpoint, serving_dir / "model.ckpt")
    small_checkpoint(serving_dir / "next.ckpt")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.ckpt"
    shutil.copy(api_checkpoint, outside)
    os.symlink(outside, serving_dir / "link-out.ckpt")
    async with serving(settings_for(str(serving_dir / "model.ckpt"), tmp_path, api_key=ADMIN_KEY)) as c:
        version = (await wait_ready(c)).json()["model_version"]
        headers = {"X-API-Key": ADMIN_KEY}
        reload = asyncio.create_task(c.post("/admin/reload", json={"checkpoint": "fifo.ckpt"}, headers=headers))
        health = await asyncio.wait_for(c.get("/health"), 30)
        assert health.status_code == 200
        first = await asyncio.wait_for(reload, 30)
        assert first.status_code == 409
        answers = {"fifo": first.json()}
        for name, path in (("device", "/dev/zero"), ("directory", str(serving_dir)), ("missing", "missing.ckpt"),
                           ("outside", str(outside)), ("symlink out", "link-out.ckpt"),
                           ("dot-dot out", f"../{outside.name}")):
            r = await c.post("/admin/reload", json={"checkpoint": path}, headers=headers)
            assert r.status_code == 409, (name, r.text)
            answers[name] = r.json()
        assert all(a == {"detail": "checkpoint refused, still serving the previous model (the reason is in the "
                                   "server log)", "model_version": version} for a in answers.values()), answers
        assert (await c.get("/health")).json()["model_version"] == version
        for fragment in ("not a regular file", "is a directory", "not found", "outside the checkpoint directory"):
            assert any(fragment in line for line in service_log), (fragment, service_log)
        # a name inside the directory is loaded
        r = await c.post("/admin/reload", json={"checkpoint": "next.ckpt"}, headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["previous_version"] == version and r.json()["model_version"] != version
