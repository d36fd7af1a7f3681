"""The images install only from docker/*.lock (hash-checked, --no-deps): every dependency pyproject.toml
declares must be pinned there, at a version its range allows, with hashes, or the image lacks it or drifts from
what the tests ran against. Regenerate them as docs/deploy.md ("Dependency locks") says when pyproject.toml changes."""
from __future__ import annotations

import re

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from conftest import REPO

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
PIN = re.compile(r"^([A-Za-z0-9_.-]+)==(\S+) \\$")


def pins(name: str) -> dict[str, tuple[Version, int]]:
    """package → (version, number of hashes) of a pip-compile lock."""
    out, current = {}, None
    for line in (REPO / "docker" / name).read_text().splitlines():
        if m := PIN.match(line):
            current = m.group(1).lower().replace("_", "-")
            out[current] = (Version(m.group(2)), 0)
        elif line.strip().startswith("--hash=sha256:") and current:
            version, hashes = out[current]
            out[current] = (version, hashes + 1)
    return out


PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def extra(name: str) -> list[str]:
    """An extra's requirements, those of the project's own extras it names (`cmn-service[pg]`) included."""
    out = []
    for text in PROJECT["optional-dependencies"][name]:
        req = Requirement(text)
        out += [r for e in sorted(req.extras) for r in extra(e)] if req.name == PROJECT["name"] else [text]
    return out


IMAGES = {"api": PROJECT["dependencies"] + extra("serve"), "trainer": extra("train")}
LOCKS = {"api": ("torch-cpu.lock", "requirements-api.lock"),
         "trainer": ("torch-cpu.lock", "requirements-api.lock", "requirements-train.lock")}


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_every_declared_dependency_is_locked_with_hashes(image):
    locked = {}
    for lock in LOCKS[image]:
        locked.update(pins(lock))
    assert locked and all(hashes > 0 for _, hashes in locked.values()), locked
    for text in IMAGES[image]:
        req = Requirement(text)
        name = req.name.lower().replace("_", "-")
        assert name in locked, f"{image}: {text} is not in {LOCKS[image]}"
        assert req.specifier.contains(locked[name][0], prereleases=True), (text, str(locked[name][0]))
