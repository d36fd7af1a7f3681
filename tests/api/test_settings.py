"""The settings reference (docs/settings.md) is what `python -m app.settings --markdown` generates from
app/settings.py, so a setting added without a description, or a doc edited by hand, fails here; every variable
keeps its flat CMN_ name whatever group holds it; and importing app.main (what `uvicorn app.main:app` does) builds
the app without loading a checkpoint or opening a store."""
from __future__ import annotations

import subprocess
import sys

from app.settings import GROUPS, Settings, markdown
from conftest import REPO


def test_docs_settings_md_is_what_the_generator_writes():
    assert (REPO / "docs" / "settings.md").read_text() == markdown() + "\n", \
        "docs/settings.md is stale: python -m app.settings --markdown > docs/settings.md"


def test_every_setting_is_in_exactly_one_group_and_described():
    grouped = [name for cls in GROUPS.values() for name in cls.__annotations__]
    assert sorted(grouped) == sorted(Settings.model_fields) and len(set(grouped)) == len(grouped)
    assert all(f.description for f in Settings.model_fields.values())


def test_variables_keep_their_flat_names(monkeypatch):
    monkeypatch.setenv("CMN_PORT", "9123")
    monkeypatch.setenv("CMN_MAX_HISTORY", "7")
    monkeypatch.setenv("CMN_FEEDBACK_URL", "sqlite:///x.sqlite3")
    s = Settings()
    assert (s.port, s.max_history, s.store_url) == (9123, 7, "sqlite:///x.sqlite3")


def test_importing_app_main_loads_nothing(tmp_path):
    """A module-level app, as FastAPI's templates have: built from the environment at import, its checkpoint and
    store opened only by the lifespan (a missing checkpoint and an unreachable database are no import error)."""
    env = {"CMN_CHECKPOINT": str(tmp_path / "missing.ckpt"), "CMN_FEEDBACK_URL": "postgresql://nobody@127.0.0.1:1/x",
           "PATH": "/usr/bin:/bin"}
    code = "import app.main as m; print(type(m.app).__name__, m.app.state.settings.checkpoint)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["FastAPI", str(tmp_path / "missing.ckpt")]
    assert not (tmp_path / "missing.ckpt").exists()
