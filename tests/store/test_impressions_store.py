"""The store's impression tables on both backends (SQLite and PostgreSQL): impressions recorded once per id, clicks
recorded with the feedback event that names them (in the same transaction: a duplicate event records none, a
repeated pair under a new id does), the
retention by age and by count, and the arms stopped for every process."""
from __future__ import annotations

import time

import pytest

from model.store.events import Event, EventIdConflict, open_store
from model.store.impressions import Click, Impression, joined_position


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    url = (f"sqlite:///{tmp_path}/feedback.sqlite3" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    store = open_store(url)
    yield store
    store.close()


def shown(n: int, at: float, user: str = "u1", arm: str | None = "a") -> Impression:
    return Impression(f"imp{n}", user, ("i1", "i2", "i3"), "full", "v1", arm, at)


def test_impressions_are_stored_once_per_id_in_order(store):
    now = time.time()
    store.record_impressions([shown(1, now), shown(2, now + 1, user=None, arm=None)])
    store.record_impressions([shown(1, now + 5)])          # a retried write changes nothing
    assert store.impressions() == [shown(1, now), shown(2, now + 1, user=None, arm=None)]
    assert store.impressions(since=now + 0.5) == [shown(2, now + 1, user=None, arm=None)]
    assert store.impressions_by_id(["imp2", "nope"]) == {"imp2": shown(2, now + 1, user=None, arm=None)}
    assert store.impression_count() == 2


def test_a_click_is_recorded_with_its_event_and_only_once(store):
    now = time.time()
    store.record_impressions([shown(1, now)])
    seqs = store.append([Event("u1", "i2", None, "e1"), Event("u1", "i9", None, "e2")], "key",
                        clicks=[("imp1", 2), None])
    (click,) = store.clicks()
    assert click == Click("imp1", "u1", "i2", 2, click.received) and seqs[0] is not None
    assert store.click_count() == 1
    # the same event again is a duplicate: no second click; a conflicting one stores nothing at all
    assert store.append([Event("u1", "i2", None, "e1")], "key", clicks=[("imp1", 2)]) == [None]
    with pytest.raises(EventIdConflict):
        store.append([Event("u1", "i3", None, "e3"), Event("u1", "i3", None, "e1")], "key",
                     clicks=[("imp1", 3), ("imp1", 3)])
    assert len(store.clicks()) == 1 and len(store.events()) == 2
    # a new event on the same pair (a second click on i2, from another list) is a repeat: not logged again, but
    # a click of that list; without an id it could be a retry, so it is neither
    store.record_impressions([shown(2, now + 1)])
    assert store.append([Event("u1", "i2", None, "e4")], "key", clicks=[("imp2", 2)]) == [None]
    assert store.append([Event("u1", "i2", None)], "key", clicks=[("imp2", 2)]) == [None]
    assert [(c.impression_id, c.item_id) for c in store.clicks()] == [("imp1", "i2"), ("imp2", "i2")]
    assert len(store.events()) == 2


def test_clicks_join_only_the_user_and_items_of_their_list():
    impression = Impression("x", "u1", ("a", "b", "c"), "full", "v1", None, 0.0)
    assert joined_position(impression, "u1", "c") == 3
    assert joined_position(impression, "u1", "z") is None      # not shown
    assert joined_position(impression, "u2", "a") is None      # another user's list
    anonymous = Impression("y", None, ("a",), "full", "v1", None, 0.0)
    assert joined_position(anonymous, "anyone", "a") == 1


def test_retention_removes_old_impressions_the_oldest_beyond_the_count_and_their_clicks(store):
    now = time.time()
    store.record_impressions([shown(n, now - 100 + n) for n in range(6)])
    store.append([Event("u1", "i1", None, "old")], clicks=[("imp0", 1)])
    assert store.prune_impressions(before=now - 98.5, keep=3) == 3     # imp0, imp1 by age; imp2 by count
    assert [i.impression_id for i in store.impressions()] == ["imp3", "imp4", "imp5"]
    # the click on imp0 arrived after the impressions left were shown (it might answer one not written yet): kept
    # until it is older than all of them
    assert store.click_count() == 1 and store.clicks() == []
    assert store.prune_impressions(before=time.time() + 1, keep=3) == 3
    assert store.impression_count() == 0 and store.click_count() == 0


def test_arm_states_are_shared_and_the_last_word_counts(store, tmp_path):
    store.set_arm("exp", "b", True)
    store.set_arm("exp", "c", True)
    store.set_arm("exp", "c", False)
    store.set_arm("other", "b", False)
    assert store.arm_states("exp") == {"b": True, "c": False}
    assert store.arm_states("none") == {}
