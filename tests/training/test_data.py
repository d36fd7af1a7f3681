"""Loaders (CSV/TSV, original .npz, synthetic) and the leave-one-out split."""
import numpy as np
import pytest

from conftest import CITEULIKE
from training.data import N_TEST_NEGATIVES, DataError, load, synthetic


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def external_pairs(data, pairs):
    return {(data.user_ids[u], data.item_ids[i]) for u, i in pairs}


def held_out_pairs(data):
    return {(data.user_ids[u], data.item_ids[i]) for u, i in zip(data.test.users, data.test.positives)}


def assert_negatives_unseen(data):
    """Every test user gets N_TEST_NEGATIVES negatives, none of them an item the user interacted with."""
    seen = {(int(u), int(i)) for u, i in data.train} | set(zip(data.test.users.tolist(), data.test.positives.tolist()))
    assert data.test.negatives.shape == (len(data.test), N_TEST_NEGATIVES)
    for u, row in zip(data.test.users.tolist(), data.test.negatives.tolist()):
        assert not any((u, i) in seen for i in row)
        assert all(0 <= i < data.n_items for i in row)


@pytest.fixture
def movielens(tmp_path):
    """MovieLens-style file, rows shuffled so that the latest interaction is not the last line."""
    rng = np.random.default_rng(0)
    rows, latest = [], {}
    for user in range(1, 13):
        items = rng.choice(np.arange(100, 160), size=int(rng.integers(2, 9)), replace=False)
        times = rng.choice(np.arange(1_000_000, 1_001_000), size=len(items), replace=False)
        latest[str(user)] = str(items[np.argmax(times)])
        rows += [f"{user},{item},{rng.integers(1, 11) / 2},{t}" for item, t in zip(items, times)]
    rows.append("13,100,4.0,1000500")  # a user with a single interaction: training only
    rows = [rows[k] for k in rng.permutation(len(rows))]
    return write(tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\n" + "\n".join(rows) + "\n"), latest


def test_movielens_header_and_latest_held_out(movielens):
    path, latest = movielens
    data = load(path)
    assert data.n_users == 13 and "13" in data.user_ids
    assert all(uid.isdigit() for uid in data.user_ids) and "userId" not in data.user_ids
    assert held_out_pairs(data) == set(latest.items())   # exactly the latest item of every user with >= 2
    assert not external_pairs(data, data.train) & held_out_pairs(data)
    n_rows = sum(1 for _ in open(path)) - 1
    assert len(data.train) + len(data.test) == n_rows
    assert_negatives_unseen(data)


def test_repeated_interaction_keeps_latest_time(tmp_path):
    path = write(tmp_path, "r.csv", "user,item,timestamp\na,x,5\na,y,3\na,x,1\nb,y,1\nb,x,2\nc,w,9\n")
    data = load(path)
    # (a, x) happened at 1 and at 5: its latest time 5 makes it a's held-out item, and it appears once
    assert held_out_pairs(data) == {("a", "x"), ("b", "x")}
    assert external_pairs(data, data.train) == {("a", "y"), ("b", "y"), ("c", "w")}


def test_tsv_headerless_string_ids(tmp_path):
    text = "u1\tbook a\t4\t100\nu1\tbook b\t5\t50\nu2\tbook a\t3\t10\nu2\tbook c\t1\t20\nu3\tbook c\t2\t1\n"
    data = load(write(tmp_path, "data.tsv", text))
    assert sorted(data.user_ids) == ["u1", "u2", "u3"]
    assert sorted(data.item_ids) == ["book a", "book b", "book c"]
    assert held_out_pairs(data) == {("u1", "book a"), ("u2", "book c")}
    assert external_pairs(data, data.train) == {("u1", "book b"), ("u2", "book a"), ("u3", "book c")}


def test_headerless_csv_first_row_is_data(tmp_path):
    data = load(write(tmp_path, "plain.csv", "1,31,2.5,1260759144\n1,1029,3.0,1260759179\n2,31,4.0,1\n3,7,1,5\n"))
    assert sorted(data.user_ids) == ["1", "2", "3"] and sorted(data.item_ids) == ["1029", "31", "7"]
    assert held_out_pairs(data) == {("1", "1029")}
    assert external_pairs(data, data.train) == {("1", "31"), ("2", "31"), ("3", "7")}


def test_header_with_string_ids_and_other_names(tmp_path):
    text = "Item_ID;extra;User_ID\nbook-1;z;alice\nbook-2;z;alice\nbook-1;z;bob\nbook-3;z;carol\n"
    data = load(write(tmp_path, "s.csv", text))
    assert sorted(data.user_ids) == ["alice", "bob", "carol"]
    assert sorted(data.item_ids) == ["book-1", "book-2", "book-3"]
    assert len(data.train) + len(data.test) == 4


def test_split_is_deterministic_per_seed(tmp_path):
    rng = np.random.default_rng(3)
    rows = [f"user{u},item{i}" for u in range(30) for i in rng.choice(40, 6, replace=False)]
    path = write(tmp_path, "nt.csv", "user,item\n" + "\n".join(rows) + "\n")
    a, b, c = load(path, seed=0), load(path, seed=0), load(path, seed=1)
    for x, y in ((a.train, b.train), (a.test.users, b.test.users), (a.test.positives, b.test.positives),
                 (a.test.negatives, b.test.negatives)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.test.positives, c.test.positives)
    assert len(a.test) == 30 and len(a.train) == 30 * 5
    assert_negatives_unseen(a)


def test_negatives_when_fewer_than_100_unseen_items(tmp_path):
    rows = [f"u{u},i{i}" for u in range(4) for i in range(u, u + 5)] + [f"u9,i{i}" for i in range(8, 21)]
    data = load(write(tmp_path, "few.csv", "user,item\n" + "\n".join(rows) + "\n"))
    assert data.n_items == 21 and len(data.test) == 5
    assert_negatives_unseen(data)
    n_seen = {data.user_ids.index(u): n for u, n in (("u0", 5), ("u1", 5), ("u2", 5), ("u3", 5), ("u9", 13))}
    for u, row in zip(data.test.users.tolist(), data.test.negatives.tolist()):
        assert len(set(row)) == 21 - n_seen[u]           # every unseen item, repeated to fill 100 slots


def test_synthetic_negatives_and_shape():
    data = synthetic(seed=0)
    assert data.n_users == 800 and 1100 < data.n_items <= 1200
    assert len(data.test) == 800
    assert_negatives_unseen(data)
    assert all(len(set(row)) == N_TEST_NEGATIVES for row in data.test.negatives.tolist())
    again = synthetic(seed=0)
    np.testing.assert_array_equal(data.train, again.train)
    np.testing.assert_array_equal(data.test.negatives, again.test.negatives)


def test_min_rating(tmp_path):
    text = "user,item,rating,timestamp\na,x,5,1\na,y,2,2\na,z,4,3\nb,x,1,1\nb,y,4.5,2\nb,z,4,3\nc,x,3.9,1\nc,y,4,2\nd,w,5,1\n"
    path = write(tmp_path, "r.csv", text)
    data = load(path, min_rating=4)
    kept = external_pairs(data, data.train) | held_out_pairs(data)
    assert kept == {("a", "x"), ("a", "z"), ("b", "y"), ("b", "z"), ("c", "y"), ("d", "w")}
    assert held_out_pairs(data) == {("a", "z"), ("b", "z")}  # c has one interaction left: training only
    assert len(load(path).train) + len(load(path).test) == 9  # without the flag nothing is dropped
    with pytest.raises(DataError, match="no interactions left"):
        load(path, min_rating=6)


def test_npz_original_format(tmp_path):
    train = np.array([[0, 0], [0, 1], [1, 1], [2, 3], [0, 1], [1, 2]], dtype=np.uint32)  # (0, 1) twice
    test = {2: (1, [0, 4]), 0: (2, [3, 4]), 1: (0, [3, 4])}
    path = tmp_path / "tiny.npz"
    np.savez(path, train_data=train, test_data=np.array(test, dtype=object))
    assert np.load(path, allow_pickle=True)["test_data"].shape == ()   # really the 0-d object layout
    data = load(str(path))
    assert (data.n_users, data.n_items) == (3, 5)                       # item 4 appears only as a negative
    assert sorted(map(tuple, data.train.tolist())) == [(0, 0), (0, 1), (1, 1), (1, 2), (2, 3)]
    assert data.test.users.tolist() == [0, 1, 2]
    assert data.test.positives.tolist() == [2, 0, 1]
    assert data.test.negatives.tolist() == [[3, 4], [3, 4], [0, 4]]
    assert data.user_ids == ["0", "1", "2"] and data.item_ids == ["0", "1", "2", "3", "4"]


@pytest.mark.skipif(not CITEULIKE.exists(), reason=f"citeulike-a not available at {CITEULIKE}")
def test_citeulike_a_figures():
    data = load(str(CITEULIKE))
    assert (data.n_users, data.n_items, len(data.train)) == (5551, 16980, 199_435)
    popularity = np.bincount(data.train[:, 1], minlength=data.n_items)
    assert popularity.max() == 311
    assert popularity.mean() == pytest.approx(11.75, abs=0.005)
    assert len(data.test) == 5551 and data.test.negatives.shape == (5551, 100)
    assert (popularity[data.test.positives] == 0).sum() == 8        # spec: 8 test positives with no users
    assert (popularity[data.test.negatives] == 0).sum() == 268      # and 268 negative slots
