"""Intra-op threads sized to the CPUs this process may use, chosen before torch loads.

torch sizes its OpenMP pool from the machine's cores, not from what the process is allowed: an affinity mask
(`taskset`, `docker --cpuset-cpus`) or a CFS quota (`docker --cpus`, Kubernetes limits) leaves it with more
threads than CPUs. And GNU OpenMP threads spin-wait at every barrier for a while before sleeping: when a sibling
thread is descheduled (another busy process on the host, or more threads than the quota allows) each of the
thousands of small parallel regions per second waits for it (issue 13: GMF pretraining at ~800 triples/s
against ~30,000 alone). libgomp reads OMP_WAIT_POLICY and OMP_NUM_THREADS once, when it is loaded, so
`configure()` runs before `import torch`: `python -m training` (one thread: TRAINING_THREADS) and `python -m app`
(every available CPU) call it first thing in their `__main__`. docs/performance.md has the measurements behind
the choice (benchmarks/threads.py).
"""
from __future__ import annotations

import math
import os
import sys
from collections.abc import MutableMapping

CGROUP_ROOT = "/sys/fs/cgroup"


def available_cpus(cgroup_root: str = CGROUP_ROOT, proc_cgroup: str = "/proc/self/cgroup") -> int:
    """CPUs this process may run on: its affinity mask, lowered to the CFS quota of its cgroup (v1 or v2) when
    there is one (a quota of 1.5 CPUs gives 1: a second thread would be throttled, not run)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


def cgroup_cpu_quota(cgroup_root: str = CGROUP_ROOT, proc_cgroup: str = "/proc/self/cgroup") -> float | None:
    """The tightest CFS quota (in CPUs) on this process's cgroup and its ancestors, or None when unlimited.

    v2 keeps `cpu.max` ("max 100000" or "<quota> <period>") in the unified hierarchy; v1 keeps
    `cpu.cfs_quota_us` (-1: unlimited) and `cpu.cfs_period_us` in the cpu controller's. Inside a container the
    cgroup path of /proc/self/cgroup may not exist under the mount (the container sees its own cgroup as the
    root), so the mount's root directory is read too.
    """
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":           # v2
            limits += _limits(cgroup_root, path, _cpu_max)
        elif "cpu" in controllers.split(","):
            for mount in {controllers, "cpu", "cpu,cpuacct"}:  # where distributions mount the v1 cpu controller
                limits += _limits(os.path.join(cgroup_root, mount), path, _cfs_quota)
    return min(limits, default=None)


def _limits(mount: str, path: str, read) -> list[float]:
    """The quotas found on `path` and each of its ancestors under `mount`, and on the mount's root."""
    found, parts = [], [p for p in path.strip("/").split("/") if p]
    for depth in range(len(parts), -1, -1):
        quota = read(os.path.join(mount, *parts[:depth]))
        if quota is not None:
            found.append(quota)
    return found


def _cpu_max(directory: str) -> float | None:
    try:
        with open(os.path.join(directory, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _cfs_quota(directory: str) -> float | None:
    try:
        with open(os.path.join(directory, "cpu.cfs_quota_us")) as f:
            quota = int(f.read())
        with open(os.path.join(directory, "cpu.cfs_period_us")) as f:
            period = int(f.read())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


# `python -m training`'s intra-op threads: its ops are small (a batch of 128 triples is a few dozen ops on ~4,500 x 50
# arrays), and on 2 CPUs one thread measured 0.77x two spinning threads on an idle machine, 3x them next to one busy
# process, and 2x two passive threads idle (docs/performance.md, benchmarks/threads.py)
TRAINING_THREADS = 1


def configure(environ: MutableMapping[str, str] = os.environ, threads: int | None = None,
              cgroup_root: str = CGROUP_ROOT, proc_cgroup: str = "/proc/self/cgroup") -> str:
    """Sets OMP_NUM_THREADS to `threads` (default: the available CPUs; never more) and OMP_WAIT_POLICY to
    PASSIVE, each only when the user has not set it; returns `describe()`. Must run before torch is imported to
    set the wait policy; if torch is already loaded only the thread count still takes effect."""
    cpus = available_cpus(cgroup_root, proc_cgroup)
    environ.setdefault("OMP_NUM_THREADS", str(min(threads or cpus, cpus)))
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "torch" in sys.modules:
        import torch
        try:
            torch.set_num_threads(max(1, int(environ["OMP_NUM_THREADS"].split(",")[0])))
        except ValueError:
            pass  # a malformed OMP_NUM_THREADS is the user's: OpenMP itself ignores it
    return describe(environ)


def describe(environ: MutableMapping[str, str] = os.environ) -> str:
    """One line for the log: the threads in effect and the wait policy torch's OpenMP was loaded with."""
    threads = "?"
    if "torch" in sys.modules:
        threads = str(sys.modules["torch"].get_num_threads())
    return (f"{threads} intra-op threads ({available_cpus()} CPUs available), "
            f"OMP_WAIT_POLICY={environ.get('OMP_WAIT_POLICY', '(unset: spin, then sleep)')}")
