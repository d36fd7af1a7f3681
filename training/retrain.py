"""Continuous retraining behind a quality gate (`python -m training retrain`), and `rollback`.

One round:
1. The serving model is the checkpoint the feedback store published last (else the servers' CMN_CHECKPOINT). Its
   metadata says up to which event (`feedback_seq`) it was trained; the events stored since are new to it.
2. The newest `holdout` fraction of those new events is held out: the most recent interactions, by `seq` (the
   order the store committed them in). A candidate is trained on the base data and every event before them.
3. The gate, on those held-out clicks:
   - both models re-rank the list each click was made in (the serving model's top-`list_size` for the user,
     recomputed with the events before the holdout applied, as the servers apply them: model/online.py), each
     scored by where it puts the clicked item (NDCG). Not the whole catalogue: the serving model chose the lists
     that were clicked, so against the catalogue it would rank its own choices first by construction;
   - the candidate also ranks each clicked item against the whole catalogue, next to item popularity: a model below
     popularity is broken whatever the serving model does (shuffled weights rank at chance).
4. The candidate is published (a rollout through the store, which every serving process follows) only if its
   in-list NDCG is at least the serving model's less `tolerance` and its catalogue NDCG@10 is not below
   popularity's; otherwise the serving model stays, and one line with the figures says why. The last `keep`
   published files are kept, older ones deleted.
"""
from __future__ import annotations

import math
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from model.online import Online
from model.recommender import Recommender
from model.store.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from model.store.events import Event, FeedbackStore, StoreUnavailable, masked, open_store
from training import data as data_mod
from training.data import DataError
from training.evaluate import TopPop, _Strategy, evaluate
from training.feedback import PAGE, fold_feedback
from training.train import TrainConfig, train

CANDIDATE = "candidate.ckpt"
REPORTS = (".metrics.json", ".curves.png")   # what training writes next to a checkpoint (training/report.py)


@dataclass
class RetrainConfig:
    feedback: str                        # the store's URL: events in, rollouts out
    out_dir: str = "artifacts/models"    # candidates and published versions; inside the servers' CMN_CHECKPOINT_DIR
    checkpoint: str | None = None        # the serving model when the store has published none (CMN_CHECKPOINT)
    holdout: float = 0.2                 # the newest fraction of the events new to the serving model
    min_events: int = 100                # new events needed before a round trains
    tolerance: float = 0.01              # the candidate may be this much below the serving model's NDCG
    list_size: int = 10                  # the length of the lists clicks are re-ranked in (/recommend's default k)
    keep: int = 5                        # published versions kept on disk
    device: str = "cpu"                  # where both models are evaluated
    train: TrainConfig = field(default_factory=TrainConfig)   # data, epochs, ... (`out` and `feedback` are ours)

    def __post_init__(self):
        if not 0 < self.holdout < 1:
            raise ValueError(f"--holdout-fraction must be between 0 and 1, got {self.holdout}")
        if self.min_events < 2:
            raise ValueError(f"--min-events must be >= 2 (one to train on, one to hold out), got {self.min_events}")
        if not self.tolerance >= 0:
            raise ValueError(f"--tolerance must be >= 0, got {self.tolerance}")
        if self.list_size < 2:
            raise ValueError(f"--list-size must be >= 2, got {self.list_size}")
        if self.keep < 1:
            raise ValueError(f"--keep must be >= 1, got {self.keep}")
        if os.path.exists(self.out_dir) and not os.path.isdir(self.out_dir):
            raise ValueError(f"--out-dir {self.out_dir} is a file; give a directory")


@dataclass
class Verdict:
    """The gate's decision on one candidate, from two measurements on the same held-out clicks:
    - `candidate`, `serving`: how each model ranks the clicked item within the list it was clicked in (NDCG, HR@5);
    - `catalogue`, `toppop`: the candidate's full-catalogue NDCG@10 (HR@10) for the clicked items, and item
      popularity's: the floor a working model clears (a broken one, e.g. shuffled weights, ranks at chance)."""
    candidate: dict[str, float]
    serving: dict[str, float] | None     # None: no model is serving, nothing to compare with
    catalogue: dict[str, float] | None = None
    toppop: dict[str, float] | None = None
    held_out: int = 0
    tolerance: float = 0.0

    @property
    def below_toppop(self) -> bool:
        return self.catalogue is not None and self.catalogue["ndcg@10"] < self.toppop["ndcg@10"]

    @property
    def worse(self) -> bool:
        return self.serving is not None and self.candidate["ndcg@10"] < self.serving["ndcg@10"] - self.tolerance

    @property
    def publish(self) -> bool:
        return not (self.worse or self.below_toppop)

    def line(self, candidate: str, serving: str | None) -> str:
        if self.serving is None:
            return f"gate: no model is serving; candidate {candidate} published without a comparison"
        c, s, f, p = self.candidate, self.serving, self.catalogue, self.toppop
        figures = (f"candidate {candidate} NDCG {c['ndcg@10']:.4f} (HR@5 {c['hr@5']:.4f}) vs serving {serving} "
                   f"NDCG {s['ndcg@10']:.4f} (HR@5 {s['hr@5']:.4f}) of the clicked item in its list; full catalogue: "
                   f"candidate NDCG@10 {f['ndcg@10']:.4f} (HR@10 {f['hr@10']:.4f}) vs popularity {p['ndcg@10']:.4f} "
                   f"(HR@10 {p['hr@10']:.4f}); {self.held_out:,} held-out clicks")
        if self.publish:
            return f"gate: published: {figures}; tolerance {self.tolerance:g}"
        why = "; ".join(w for w, bad in (
            (f"it ranks the clicks {s['ndcg@10'] - c['ndcg@10']:.4f} worse than the serving model, more than the "
             f"tolerance of {self.tolerance:g}", self.worse),
            ("it ranks the catalogue below item popularity", self.below_toppop)) if bad)
        return f"gate: refused, still serving {serving}: {why}: {figures}"


@dataclass
class Round:
    """What one round did: `status` is published, refused, waiting (too few new events), superseded (another
    model was published during the round) or failed."""
    status: str
    message: str
    version: str | None = None           # the candidate's
    serving: str | None = None           # the serving model's, before the round
    verdict: Verdict | None = None
    seconds: float = 0.0


# --------------------------------------------------------------------------- the serving model, new events

@dataclass
class Serving:
    path: str
    ckpt: Checkpoint

    @property
    def version(self) -> str:
        return self.ckpt.model_version

    @property
    def trained_through(self) -> int:
        """The last store event it was trained on (0: none, or a checkpoint written before this was recorded)."""
        return int(self.ckpt.meta.get("feedback_seq", 0))


def serving_model(store: FeedbackStore, fallback: str | None) -> Serving | None:
    """The checkpoint the store published last, else `fallback`; None when neither exists."""
    published = store.active_checkpoint()
    path = published.path if published is not None else fallback
    if path is None or not os.path.exists(path):
        if published is not None:
            raise CheckpointError(f"the published checkpoint {published.path} (version {published.version}) is not "
                                  "on this machine: run retrain where the servers' checkpoint directory is mounted")
        return None
    return Serving(path, load_checkpoint(path))


def events_after(store: FeedbackStore, after: int) -> list[tuple[int, Event]]:
    out = []
    while rows := store.events(after=after, limit=PAGE):
        out.extend(rows)
        after = rows[-1][0]
    return out


# --------------------------------------------------------------------------- the gate

def replayed(ckpt: Checkpoint, applied: list[tuple[str, str]] = (), device: str = "cpu") -> Recommender:
    """The checkpoint as a server runs it after applying `applied` as feedback (neighbourhoods, seen-sets:
    model/online.py); interactions naming a user or item it does not know are left out, as a server leaves them out
    of a trained model."""
    rec = Recommender.from_checkpoint(ckpt, device)
    users = {u: n for n, u in enumerate(ckpt.user_ids)}
    items = {i: n for n, i in enumerate(ckpt.item_ids)}
    known = [(users[u], items[i]) for u, i in applied if u in users and i in items]
    if known:
        Online(rec).add_interactions(*zip(*known))
    return rec


def served_lists(rec: Recommender, ckpt: Checkpoint, users: list[str], k: int) -> dict[str, list[str]]:
    """Each user's top-k as the server would answer /recommend (the default strategy, seen items excluded)."""
    index = {u: n for n, u in enumerate(ckpt.user_ids)}
    unique = list(dict.fromkeys(users))
    top, _ = rec.recommend([index[u] for u in unique], k=k)
    return {u: [ckpt.item_ids[i] for i in row.tolist() if i >= 0] for u, row in zip(unique, top)}


def list_metrics(rec: Recommender, ckpt: Checkpoint, rows: list[tuple[str, str, list[str]]]) -> dict[str, float]:
    """How `rec` ranks each clicked item among the other items of the list it was clicked in: (user, clicked,
    others) rows, external ids all known to the checkpoint. HR@5 and NDCG@10 of the clicked item's rank."""
    users = {u: n for n, u in enumerate(ckpt.user_ids)}
    items = {i: n for n, i in enumerate(ckpt.item_ids)}
    split = data_mod.Split(np.array([users[u] for u, _, _ in rows], dtype=np.int64),
                           np.array([items[i] for _, i, _ in rows], dtype=np.int64),
                           np.array([[items[o] for o in others] for _, _, others in rows], dtype=np.int64))
    none_seen = np.zeros((0, 2), dtype=np.int64)   # the lists hold no seen items; every candidate counts
    m = evaluate(_Strategy(rec, rec.default_strategy), split, none_seen, full=False)["sampled"]
    return {"hr@5": m["hr@5"], "ndcg@10": m["ndcg@10"]}


def judge(candidate: Checkpoint, serving: Serving | None, held: list[tuple[str, str]],
          applied: list[tuple[str, str]], tolerance: float, list_size: int = 10, device: str = "cpu") -> Verdict:
    """Both models re-rank the lists the held-out clicks were made in, and each is scored by where it puts the
    clicked item. A click was made on a list the serving model chose, so ranking it against the whole catalogue
    would credit the serving model with its own choice (its HR@10 would be ~1 by construction); within the list,
    both models face the same items. The list is the serving model's top-`list_size` for the user, recomputed with
    the events before the holdout applied (the state it answered from), the clicked item in it; rows whose user or
    items either model lacks are left out."""
    if serving is None:
        return Verdict({}, None)
    live = replayed(serving.ckpt, applied, device)
    users, items = ({x: n for n, x in enumerate(ids)} for ids in (serving.ckpt.user_ids, serving.ckpt.item_ids))
    # an item the user had already interacted with is no click on a list (lists leave seen items out)
    held = [(u, i) for u, i in dict.fromkeys(held) if u in users and items.get(i) not in live.seen(users[u])]
    lists = served_lists(live, serving.ckpt, [u for u, _ in held], list_size)
    known_items = set(candidate.item_ids) & set(serving.ckpt.item_ids)
    known_users = set(candidate.user_ids)
    rows = []
    for u, i in held:
        others = [o for o in lists[u] if o != i][:list_size - 1]
        if u in known_users and len(others) == list_size - 1 and {i, *others} <= known_items:
            rows.append((u, i, others))
    if not rows:
        raise DataError(f"none of the {len(held)} held-out interactions names a user and items both models know; "
                        "nothing to compare on")
    rec = Recommender.from_checkpoint(candidate, device)
    catalogue, toppop = catalogue_metrics(rec, candidate, [(u, i) for u, i, _ in rows])
    return Verdict(list_metrics(rec, candidate, rows), list_metrics(live, serving.ckpt, rows), catalogue, toppop,
                   len(rows), tolerance)


def catalogue_metrics(rec: Recommender, ckpt: Checkpoint, held: list[tuple[str, str]]) -> tuple[dict, dict]:
    """Full-catalogue HR@10 and NDCG@10 of the held-out (user, item) pairs: the model's served strategy, and item
    popularity over its training pairs; the pairs it was trained on are excluded from both rankings."""
    users = {u: n for n, u in enumerate(ckpt.user_ids)}
    items = {i: n for n, i in enumerate(ckpt.item_ids)}
    split = data_mod.Split(np.array([users[u] for u, _ in held], dtype=np.int64),
                           np.array([items[i] for _, i in held], dtype=np.int64), np.zeros((len(held), 0), np.int64))
    out = []
    for model in (_Strategy(rec, rec.default_strategy), TopPop(ckpt.seen, rec.n_items)):
        full = evaluate(model, split, ckpt.seen, full=True)["full"]
        out.append({"hr@10": full["hr@10"], "ndcg@10": full["ndcg@10"]})
    return out[0], out[1]


# --------------------------------------------------------------------------- publishing, versions

def version_path(out_dir: str, version: str) -> str:
    return os.path.join(out_dir, f"model-{version}.ckpt")


def publish(store: FeedbackStore, out_dir: str, candidate: str, version: str, keep: int, log=print) -> str:
    """Move the candidate's files to their version's name, publish it in the store (every serving process follows)
    and delete all but the `keep` newest published versions; returns the published path."""
    path = os.path.abspath(version_path(out_dir, version))
    for suffix in ("",) + REPORTS:
        if os.path.exists(candidate + suffix):
            os.replace(candidate + suffix, path + suffix)
    rollout = store.publish_checkpoint(path, version)
    log(f"published {path} as rollout {rollout}: the servers load it at their next poll")
    prune(out_dir, keep, path, log)
    return path


def prune(out_dir: str, keep: int, active: str, log=print) -> None:
    """Delete published versions beyond the `keep` newest; never the active one."""
    names = [n for n in os.listdir(out_dir) if re.fullmatch(r"model-.+\.ckpt", n)]
    paths = sorted((os.path.abspath(os.path.join(out_dir, n)) for n in names), key=os.path.getmtime, reverse=True)
    for path in paths[keep:]:
        if path == active:
            continue
        for suffix in ("",) + REPORTS:
            if os.path.exists(path + suffix):
                os.remove(path + suffix)
        log(f"deleted {path} (keeping the {keep} newest versions)")


def rollback(url: str, version: str | None = None, checkpoint: str | None = None, log=print) -> str:
    """Publish an earlier version again: `version`, else the newest published one that differs from the active
    one. Candidates are the store's rollouts whose file still exists, and `checkpoint` (the servers' configured
    one). Returns the version now published."""
    open_store(url, readonly=True).close()   # a store that does not exist is a mistyped URL: never create one
    store = open_store(url)
    try:
        if store.fault:
            raise StoreUnavailable(store.fault)
        rollouts = store.rollouts()
        active = rollouts[0].version if rollouts else None
        choices: dict[str, str] = {}
        for r in rollouts:
            if os.path.exists(r.path):
                choices.setdefault(r.version, r.path)
        if checkpoint and os.path.exists(checkpoint):
            choices.setdefault(load_checkpoint(checkpoint).model_version, os.path.abspath(checkpoint))
        if version is None:
            earlier = [v for v in choices if v != active]
            if not earlier:
                raise ValueError(f"nothing to roll back to: no published version other than the active "
                                 f"{active or '(none)'} has its file left")
            version = earlier[0]
        if version not in choices:
            raise ValueError(f"version {version!r} is not one that can be restored; these can: "
                             f"{', '.join(choices) or '(none)'}")
        load_checkpoint(choices[version])   # refuse a file that no server could load
        rollout = store.publish_checkpoint(choices[version], version)
    finally:
        store.close()
    log(f"rolled back: version {version} ({choices[version]}) published as rollout {rollout}, replacing "
        f"{active or 'the configured checkpoint'}; the servers load it at their next poll")
    return version


# --------------------------------------------------------------------------- one round, the schedule

class Retrainer:
    """Rounds of retraining against one store. The steps are methods so that a caller (the simulation,
    tests/harness/loop.py) can put a candidate of its own through the same gate."""

    def __init__(self, cfg: RetrainConfig, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log
        os.makedirs(cfg.out_dir, exist_ok=True)
        self.store = open_store(cfg.feedback)
        if self.store.fault:
            shown = masked(cfg.feedback)
            self.store.close()
            raise StoreUnavailable(f"cannot open the feedback store {shown}: {self.store.fault}")

    def close(self) -> None:
        self.store.close()

    def plan(self) -> tuple[Serving | None, int, list[tuple[str, str]], list[tuple[str, str]]] | str:
        """(serving model, last seq trained on, held-out pairs, new pairs before them), or why not to train."""
        serving = serving_model(self.store, self.cfg.checkpoint)
        if serving is None:   # nothing to compare with or to wait for: the first model, on every event
            return None, self.store.last_seq(), [], []
        since = serving.trained_through
        new = events_after(self.store, since)
        if len(new) < self.cfg.min_events:
            return (f"waiting: {len(new):,} events since the serving model's (seq > {since}), "
                    f"{self.cfg.min_events:,} needed (--min-events)")
        n_held = max(1, math.ceil(self.cfg.holdout * len(new)))
        train_part, held_part = new[:len(new) - n_held], new[len(new) - n_held:]
        cut = train_part[-1][0] if train_part else since
        pairs = lambda rows: [(e.user_id, e.item_id) for _, e in rows]
        return serving, cut, pairs(held_part), pairs(train_part)

    def train_candidate(self, through: int) -> tuple[str, Checkpoint]:
        """Train on the base data and the store's events up to seq `through`; (path, checkpoint)."""
        t = self.cfg.train
        base = data_mod.load(t.data, seed=t.seed, min_rating=t.min_rating, trust_pickle=t.trust_pickle)
        base = data_mod.Dataset(base.n_users, base.n_items, base.all_pairs(), None, base.user_ids, base.item_ids,
                                name=base.name, timeline=base.timeline)
        data = fold_feedback(base, self.cfg.feedback, self.log, unverified=t.feedback_unverified,
                             progress=bool(t.progress), through=through)
        out = os.path.join(self.cfg.out_dir, CANDIDATE)
        train(replace(t, out=out, holdout="none", feedback=self.cfg.feedback, resume=False), self.log, data=data)
        return out, load_checkpoint(out)

    def run_once(self, corrupt: Callable[[str], None] | None = None) -> Round:
        """One round. `corrupt(path)`: change the candidate's file before the gate sees it (the simulation's
        deliberately broken model)."""
        start = time.perf_counter()
        planned = self.plan()
        if isinstance(planned, str):
            self.log(planned)
            return Round("waiting", planned, seconds=time.perf_counter() - start)
        serving, cut, held, applied = planned
        rollout = self.store.active_checkpoint()   # what the round compares against, checked again before publishing
        self.log(f"retrain: {len(applied):,} new events to train on (through seq {cut}), the newest {len(held):,} "
                 f"held out; serving {serving.version if serving else '(none)'}")
        path, candidate = self.train_candidate(cut)
        if corrupt is not None:
            corrupt(path)
            candidate = load_checkpoint(path)
        verdict = judge(candidate, serving, held, applied, self.cfg.tolerance, self.cfg.list_size, self.cfg.device)
        line = verdict.line(candidate.model_version, serving.version if serving else None)
        self.log(line)
        status = "published" if verdict.publish else "refused"
        now = self.store.active_checkpoint()
        if verdict.publish and (now and now.id) != (rollout and rollout.id):
            # a rollback or a reload during the round: it stands, and the next round compares against it
            status = "superseded"
            line = (f"retrain: not publishing {candidate.model_version}: the serving model changed during the round "
                    f"(rollout {now.id}: {now.version}); the next round compares against it")
            self.log(line)
        if status == "published":
            publish(self.store, self.cfg.out_dir, path, candidate.model_version, self.cfg.keep, self.log)
        else:
            for suffix in ("",) + REPORTS:
                if os.path.exists(path + suffix):
                    os.remove(path + suffix)
        return Round(status, line, candidate.model_version, serving.version if serving else None, verdict,
                     time.perf_counter() - start)

    def run(self, every: float, rounds: int | None = None, stop: threading.Event | None = None) -> list[Round]:
        """A round every `every` seconds (from the start of one to the next) until `stop` is set or `rounds` ran.
        A round that fails (the store unreachable, training collapsed) is logged and the schedule goes on."""
        from training.train import TrainingCollapsed
        stop = stop or threading.Event()
        done: list[Round] = []
        while not stop.is_set() and (rounds is None or len(done) < rounds):
            began = time.monotonic()
            try:
                done.append(self.run_once())
            except (StoreUnavailable, DataError, CheckpointError, TrainingCollapsed, OSError) as e:
                self.log(f"retrain: round failed, serving model unchanged: {e}")
                done.append(Round("failed", str(e)))
            self.log(summary(done))
            stop.wait(max(0.0, every - (time.monotonic() - began)))
        return done


def summary(rounds: list[Round]) -> str:
    counts = {s: sum(r.status == s for r in rounds)
              for s in ("published", "refused", "waiting", "superseded", "failed")}
    last = rounds[-1]
    counted = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return (f"retrain: {len(rounds)} round{'' if len(rounds) == 1 else 's'} ({counted}); last: "
            f"{last.status}{f' in {last.seconds:.1f} s' if last.seconds else ''}")


UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """'90', '90s', '15m', '1h', '1d' → seconds (> 0)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text or "")
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"--every must be a positive duration such as 90s, 15m, 1h or 1d, got {text!r}")
    return float(m.group(1)) * UNITS[m.group(2) or "s"]


def stop_on_sigterm() -> threading.Event:
    """An event set by SIGTERM (docker stop): the schedule ends after the current round instead of mid-write."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return stop
