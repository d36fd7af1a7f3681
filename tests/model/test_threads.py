"""Threads sized to the CPUs the process may use (affinity, cgroup v1/v2 quota), and the passive OpenMP wait
policy in force before torch loads, for both entry points (`python -m training`, `python -m app`)."""
import os
import subprocess
import sys

import pytest

from conftest import REPO
from model.threads import available_cpus, cgroup_cpu_quota, configure


def affinity() -> int:
    return len(os.sched_getaffinity(0))


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_of_the_tightest_ancestor(tmp_path):
    write(tmp_path / "self", "0::/jobs/train\n")
    write(tmp_path / "cg" / "jobs" / "train" / "cpu.max", "max 100000\n")
    write(tmp_path / "cg" / "jobs" / "cpu.max", "150000 100000\n")          # 1.5 CPUs for the whole slice
    assert cgroup_cpu_quota(str(tmp_path / "cg"), str(tmp_path / "self")) == pytest.approx(1.5)
    assert available_cpus(str(tmp_path / "cg"), str(tmp_path / "self")) == 1   # a second thread would be throttled


def test_cgroup_v1_quota_inside_a_container(tmp_path):
    # the container sees its own cgroup as the mount's root: the path in /proc/self/cgroup does not exist there
    write(tmp_path / "self", "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n")
    write(tmp_path / "cg" / "cpu,cpuacct" / "cpu.cfs_quota_us", "300000\n")
    write(tmp_path / "cg" / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(str(tmp_path / "cg"), str(tmp_path / "self")) == pytest.approx(3.0)
    assert available_cpus(str(tmp_path / "cg"), str(tmp_path / "self")) == min(3, affinity())


def test_no_quota_means_the_affinity_mask(tmp_path):
    write(tmp_path / "self", "4:cpu,cpuacct:/\n0::/\n")
    write(tmp_path / "cg" / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    write(tmp_path / "cg" / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    write(tmp_path / "cg" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(str(tmp_path / "cg"), str(tmp_path / "self")) is None
    assert available_cpus(str(tmp_path / "cg"), str(tmp_path / "self")) == affinity()
    assert available_cpus(str(tmp_path / "none"), str(tmp_path / "missing")) == affinity()


def test_configure_fills_in_only_what_the_user_left_unset(tmp_path):
    write(tmp_path / "self", "0::/\n")
    write(tmp_path / "cg" / "cpu.max", "200000 100000\n")                # 2 CPUs
    where = dict(cgroup_root=str(tmp_path / "cg"), proc_cgroup=str(tmp_path / "self"))
    env = {}
    configure(env, **where)
    assert env == {"OMP_NUM_THREADS": str(min(2, affinity())), "OMP_WAIT_POLICY": "PASSIVE"}
    env = {}
    configure(env, threads=64, **where)                                    # never more than the CPUs
    assert env["OMP_NUM_THREADS"] == str(min(2, affinity()))
    env = {}
    configure(env, threads=1, **where)
    assert env["OMP_NUM_THREADS"] == "1"
    mine = {"OMP_NUM_THREADS": "7", "OMP_WAIT_POLICY": "ACTIVE"}
    configure(mine, **where)
    assert mine == {"OMP_NUM_THREADS": "7", "OMP_WAIT_POLICY": "ACTIVE"}


def openmp_environment(*args: str) -> str:
    """stderr of a subprocess whose GNU OpenMP prints the settings it was loaded with (OMP_DISPLAY_ENV)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "CMN_"))}
    env.update(OMP_DISPLAY_ENV="VERBOSE", CMN_CHECKPOINT=str(REPO / "no-such.ckpt"))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300).stderr


@pytest.mark.slow
def test_both_entry_points_load_openmp_with_the_passive_policy():
    bare = openmp_environment("-c", "import torch")
    if "GOMP_SPINCOUNT" not in bare:
        pytest.skip("torch's OpenMP runtime here is not GNU libgomp (nothing displays its settings)")
    assert "GOMP_SPINCOUNT = '300000'" in bare                     # torch alone: spin 300k times, then sleep
    for entry, threads in ((["-m", "training", "--help"], 1),                 # TRAINING_THREADS
                           (["-m", "app"], available_cpus())):                # exits at once: no checkpoint
        shown = openmp_environment(*entry)
        assert "GOMP_SPINCOUNT = '0'" in shown, entry              # passive: sleep at once
        assert f"OMP_NUM_THREADS = '{threads}'" in shown, entry
