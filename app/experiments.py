"""Experiments: arms (strategy, optionally a model version) sharing users by a stable hash of the user id.

The experiment is a JSON file (CMN_EXPERIMENT_FILE), re-read when it changes:

    {"name": "strategies-1",
     "arms": [{"name": "control", "strategy": "two_stage", "share": 0.5},
              {"name": "full", "strategy": "full", "share": 0.5}]}

A user's bucket is the first 8 bytes of sha256(experiment name, user id) read as a fraction of 2**64: the same in
every process, replica and restart (Python's hash() is salted per process). Arms take consecutive ranges of
[0, 1) in the file's order, as wide as their shares; a bucket past the shares' sum is outside the experiment.
Renaming the experiment reshuffles everyone; changing a share moves only the users at the ranges' edges.

An arm serves its users only while it is active: not stopped (by `"stopped": true` in the file, or through
/admin/experiment, which records it in the feedback store for every process) and its strategy offered by its model.
An arm's model is the one served, unless it names a `model_version`: then it is that version's, which each process
loads beside the served one (app/models.py `Models.keep_arms`, at most CMN_MAX_ARM_MODELS of them) from the arm's
`checkpoint` (a file in CMN_CHECKPOINT_DIR, as /admin/reload takes) or, without one, the newest checkpoint
published in the store with that version (a rollout, or a rollback's). The arm serves nobody until its model is
loaded, nor when it cannot be (/health `arm_models` says so). A user whose arm is not active, an anonymous session,
and a request that names its own `strategy` are served as if there were no experiment: the answer names no arm, and
the impression has none.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.batcher import run_on
from app.schemas import ArmStatus, ExperimentStatus
from model.store.events import FeedbackStore, StoreUnavailable

log = logging.getLogger("cmn.service")

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"   # arm names are metric labels: short, printable, few
MAX_ARMS = 16


class Arm(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(pattern=NAME)
    strategy: Literal["full", "two_stage", "retrieval"]
    share: float = Field(gt=0, le=1, description="fraction of users in this arm")
    model_version: str | None = Field(None, max_length=64, description="the model version the arm serves "
                                                                       "(default: the one served)")
    checkpoint: str | None = Field(None, max_length=4096, description="the file of model_version, in "
                                   "CMN_CHECKPOINT_DIR (default: the newest published with that version)")
    stopped: bool = False

    @model_validator(mode="after")
    def _checkpoint_names_its_version(self):
        if self.checkpoint is not None and self.model_version is None:
            raise ValueError("a checkpoint needs the model_version it holds")
        return self


class Experiment(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(pattern=NAME)
    arms: list[Arm] = Field(min_length=1, max_length=MAX_ARMS)

    @model_validator(mode="after")
    def _arms(self):
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names repeat: {names}")
        if sum(a.share for a in self.arms) > 1 + 1e-9:
            raise ValueError(f"the arms' shares add up to {sum(a.share for a in self.arms):g}, more than 1")
        return self


class ExperimentFileError(ValueError):
    pass


def read_experiment(path: str) -> Experiment:
    """The experiment in `path`; ExperimentFileError (with the file's problem) when it cannot be used."""
    try:
        with open(path, "rb") as f:
            return Experiment.model_validate(json.loads(f.read()))
    except OSError as e:
        raise ExperimentFileError(f"experiment file {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ExperimentFileError(f"experiment file {path}: not JSON ({e})") from None
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'file'}: {err['msg']}" for err in e.errors())
        raise ExperimentFileError(f"experiment file {path}: {problems}") from None


def bucket(experiment: str, user_id: str) -> float:
    """The user's place in [0, 1) for this experiment: the same in every process (not Python's salted hash())."""
    digest = hashlib.sha256(f"{experiment}\0{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def arm_of(experiment: Experiment, user_id: str) -> Arm | None:
    """The arm whose range holds the user's bucket, active or not; None: outside the experiment."""
    at, edge = bucket(experiment.name, user_id), 0.0
    for arm in experiment.arms:
        edge += arm.share
        if at < edge:
            return arm
    return None


class Experiments:
    """The experiment this process runs (None without CMN_EXPERIMENT_FILE), the arms stopped in the store, and the
    arm of each request."""

    def __init__(self, path: str | None, io_threads: Executor, poll_s: float):
        self.path, self.io_threads, self.poll_s = path, io_threads, poll_s
        self.store: FeedbackStore | None = None     # the service's, once opened
        self.experiment = read_experiment(path) if path else None   # a bad file stops the start here
        self._mtime = self._modified()
        self.stopped_in_store: dict[str, bool] = {}

    def _modified(self) -> float | None:
        try:
            return os.stat(self.path).st_mtime_ns if self.path else None
        except OSError:
            return None

    def status(self) -> ExperimentStatus:
        if self.experiment is None:
            return ExperimentStatus(name=None)
        return ExperimentStatus(name=self.experiment.name, arms=[
            ArmStatus(name=a.name, strategy=a.strategy, share=a.share, model_version=a.model_version,
                      stopped=self.stopped(a)) for a in self.experiment.arms])

    def stopped(self, arm: Arm) -> bool:
        """The store's word (an operator's /admin call) overrides the file's."""
        return self.stopped_in_store.get(arm.name, arm.stopped)

    def assign(self, user_id: str | None, strategy: str | None) -> Arm | None:
        """The arm of this request when it is not stopped, or None; whether its model serves it is the caller's
        to check (see the module's docstring)."""
        if self.experiment is None or user_id is None or strategy is not None:
            return None
        arm = arm_of(self.experiment, user_id)
        return None if arm is None or self.stopped(arm) else arm

    def arm_models(self, serving: str) -> dict[str, str | None]:
        """The model versions the arms not stopped serve beside `serving`, each with its arm's checkpoint (None:
        the store's)."""
        wanted: dict[str, str | None] = {}
        for arm in self.experiment.arms if self.experiment else ():
            if arm.model_version not in (None, serving) and not self.stopped(arm):
                wanted.setdefault(arm.model_version, arm.checkpoint)
        return wanted

    async def follow(self, then: Callable[[], Awaitable[None]]) -> None:
        """Poll the file and the arms' states, then `then` (the arms' models follow them)."""
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.refresh()
                await then()
            except Exception:  # a follower that dies would leave stopped arms serving
                log.exception("following the experiment failed", extra={"event": "experiment_follow_failed"})

    async def refresh(self) -> None:
        """Re-read the file when it changed (a bad one keeps the experiment running), then the arms' states."""
        mtime = self._modified()
        if mtime != self._mtime:
            self._mtime = mtime
            try:
                experiment = await run_on(self.io_threads, read_experiment, self.path)
            except ExperimentFileError as e:
                log.error("experiment not reloaded, the one running stays: %s", e,
                          extra={"event": "experiment_reload_failed"})
            else:
                self.experiment = experiment
                log.info("experiment %s reloaded: %s", experiment.name,
                         ", ".join(f"{a.name} {a.share:g}" for a in experiment.arms),
                         extra={"event": "experiment_reload"})
        if self.experiment is not None:
            try:
                self.stopped_in_store = await run_on(self.io_threads, self.store.arm_states, self.experiment.name)
            except StoreUnavailable:
                pass    # the feedback follower reports the store's state; the arms keep their last known states

    async def set_stopped(self, name: str, stopped: bool) -> None:
        """Stop or resume an arm for every process sharing the store (this one at once, the others at their next
        poll). KeyError: no such arm; StoreUnavailable: nothing changed."""
        if self.experiment is None or name not in {a.name for a in self.experiment.arms}:
            raise KeyError(name)
        await run_on(self.io_threads, self.store.set_arm, self.experiment.name, name, stopped)
        self.stopped_in_store = {**self.stopped_in_store, name: stopped}
        log.info("arm %s %s", name, "stopped" if stopped else "resumed",
                 extra={"event": "arm_stopped" if stopped else "arm_resumed", "experiment": self.experiment.name})
