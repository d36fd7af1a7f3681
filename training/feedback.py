"""Fold the server's feedback store into a training data set (`python -m training train --feedback PATH`)."""
from __future__ import annotations

import numpy as np

from model.feedback import FeedbackLog
from training.data import DataError, Dataset, pair_keys


def fold_feedback(data: Dataset, path: str, log=print, unverified: bool = False) -> Dataset:
    """Add stored events as training pairs; users and items the data has never seen get new ids.

    Events the server marked unverified (their user or item was unknown to the serving model: anyone with a
    feedback key can invent ids) get no new ids unless `unverified`: those naming a user or item the data lacks
    are left out. An event equal to a held-out test positive is left out, so the test split stays unseen."""
    try:
        store = FeedbackLog(path, readonly=True)
        events = [e for _, e in store.events()]
        store.close()
    except Exception as e:
        raise DataError(f"cannot read feedback store {path}: {e}") from None
    user_ids, item_ids = list(data.user_ids), list(data.item_ids)
    users = {u: n for n, u in enumerate(user_ids)}
    items = {i: n for n, i in enumerate(item_ids)}
    if not unverified:
        kept = [e for e in events if e.verified or (e.user_id in users and e.item_id in items)]
        if len(kept) < len(events):
            log(f"feedback: {len(events) - len(kept):,} unverified events name users or items the data does not "
                "have; left out (--feedback-unverified folds them in as new users and items)")
        events = kept
    for e in events:
        for ids, index, key in ((user_ids, users, e.user_id), (item_ids, items, e.item_id)):
            if key not in index:
                index[key] = len(ids)
                ids.append(key)
    pairs = np.array([(users[e.user_id], items[e.item_id]) for e in events], dtype=np.int64).reshape(-1, 2)
    n_items = len(item_ids)
    if data.test is not None and len(pairs):
        held = np.isin(pair_keys(pairs[:, 0], pairs[:, 1], n_items),
                       pair_keys(data.test.users, data.test.positives, n_items))
        if held.any():
            log(f"feedback: {int(held.sum())} events equal held-out test positives; left out of training")
        pairs = pairs[~held]
    train = np.unique(np.concatenate([data.train, pairs]), axis=0)
    log(f"feedback: {len(events):,} events from {path}, {len(train) - len(data.train):,} new training pairs, "
        f"{len(user_ids) - data.n_users} new users, {len(item_ids) - data.n_items} new items")
    return Dataset(len(user_ids), len(item_ids), train, data.test, user_ids, item_ids, name=data.name + "+feedback")
