"""Fold the server's feedback store into a training data set (`python -m training train --feedback URL`), and
compact it (`python -m training compact --feedback URL`)."""
from __future__ import annotations

import time

import numpy as np
from tqdm import tqdm

from model.store.events import Compaction, StoreUnavailable, masked, open_store
from training.data import DataError, Dataset, pair_keys

PAGE = 50_000   # events read at a time: a store of any size is folded in bounded memory (besides the pairs)


def fold_feedback(data: Dataset, url: str, log=print, unverified: bool = False, progress: bool = True,
                  page: int = PAGE, through: int | None = None) -> Dataset:
    """Add the events of the store at `url` (a sqlite:/// or postgresql:// URL, or a file path) as training pairs;
    users and items the data has never seen get new ids.

    Events the server marked unverified (their user or item was unknown to the serving model: anyone with a
    feedback key can invent ids) get no new ids unless `unverified`: those naming a user or item the data lacks
    are left out. An event equal to a held-out test positive is left out, so the test split stays unseen.
    `through`: fold in the events up to this seq only (retraining holds the newer ones out, training/retrain.py);
    the last seq folded in is the result's `feedback_seq`."""
    shown = masked(url)
    user_ids, item_ids = list(data.user_ids), list(data.item_ids)
    users = {u: n for n, u in enumerate(user_ids)}
    items = {i: n for n, i in enumerate(item_ids)}

    def index(ids: list[str], known: dict[str, int], key: str) -> int:
        if key not in known:
            known[key] = len(ids)
            ids.append(key)
        return known[key]

    chunks, folded, left_out = [], 0, 0
    try:
        store = open_store(url, readonly=True)
        try:
            with tqdm(total=store.count(), desc="feedback", unit="event", leave=False, disable=not progress,
                      mininterval=1.0) as bar:
                last = 0
                while rows := store.events(after=last, limit=page):
                    rows = [r for r in rows if through is None or r[0] <= through]
                    if not rows:
                        break
                    last = rows[-1][0]
                    kept = [e for _, e in rows if unverified or e.verified or (
                        users.get(e.user_id, data.n_users) < data.n_users
                        and items.get(e.item_id, data.n_items) < data.n_items)]
                    left_out += len(rows) - len(kept)
                    folded += len(kept)
                    chunks.append(np.array([(index(user_ids, users, e.user_id), index(item_ids, items, e.item_id))
                                            for e in kept], dtype=np.int64).reshape(-1, 2))
                    bar.update(len(rows))
        finally:
            store.close()
    except (OSError, ValueError, StoreUnavailable) as e:
        raise DataError(f"cannot read feedback store {shown}: {e}") from None
    if left_out:
        log(f"feedback: {left_out:,} unverified events name users or items the data does not have; left out "
            "(--feedback-unverified folds them in as new users and items)")
    pairs = np.concatenate(chunks) if chunks else np.zeros((0, 2), dtype=np.int64)
    n_items = len(item_ids)
    if data.test is not None and len(pairs):
        held = np.isin(pair_keys(pairs[:, 0], pairs[:, 1], n_items),
                       pair_keys(data.test.users, data.test.positives, n_items))
        if held.any():
            log(f"feedback: {int(held.sum())} events equal held-out test positives; left out of training")
        pairs = pairs[~held]
    train = np.unique(np.concatenate([data.train, pairs]), axis=0)
    log(f"feedback: {folded:,} events from {shown}, {len(train) - len(data.train):,} new training pairs, "
        f"{len(user_ids) - data.n_users} new users, {len(item_ids) - data.n_items} new items")
    return Dataset(len(user_ids), len(item_ids), train, data.test, user_ids, item_ids, name=data.name + "+feedback",
                   feedback_seq=last)


def compact_store(url: str, forget_ids_after_days: float | None = None, progress: bool = True) -> Compaction:
    """Move the repeats out of the store at `url` (`FeedbackStore.compact`), forgetting repeat ids received more than
    `forget_ids_after_days` ago (None: keep them all). Safe while servers write and follow the store."""
    shown = masked(url)
    if forget_ids_after_days is not None and not forget_ids_after_days >= 0:
        raise ValueError(f"--forget-ids-after must be a number of days >= 0, got {forget_ids_after_days}")
    try:
        open_store(url, readonly=True).close()      # opened for writing, a missing store would be created
        store = open_store(url)
        try:
            if store.fault:
                raise StoreUnavailable(store.fault)
            cutoff = None if forget_ids_after_days is None else time.time() - forget_ids_after_days * 86_400
            with tqdm(total=store.last_seq(), desc="compact", unit="seq", disable=not progress,
                      mininterval=1.0) as bar:
                return store.compact(cutoff, bar.update)
        finally:
            store.close()
    except (OSError, StoreUnavailable) as e:
        raise DataError(f"cannot compact feedback store {shown}: {e}") from None
