"""Interaction data: loaders (original .npz, CSV/TSV, synthetic), id maps, leave-one-out split.

Everything downstream works on dense internal ids 0..n-1; `Dataset.user_ids` and
`Dataset.item_ids` map them back to the external string ids a service sees.
"""
from __future__ import annotations

import csv
import os
import pickle
from dataclasses import dataclass

import numpy as np
from numpy.lib import format as npy_format

N_TEST_NEGATIVES = 100

USER_COLUMNS = ("user", "userid", "user_id", "uid", "u", "customer_id", "visitorid", "reviewerid")
ITEM_COLUMNS = ("item", "itemid", "item_id", "iid", "i", "movieid", "movie_id", "product_id", "productid",
                "asin", "article_id", "doc_id", "song_id", "track_id", "business_id", "book_id", "isbn")
RATING_COLUMNS = ("rating", "ratings", "score", "stars", "value", "weight", "count")
TIME_COLUMNS = ("timestamp", "time", "ts", "datetime", "date", "unix_time", "unixreviewtime", "event_time")


class DataError(ValueError):
    """Input data that cannot be used; the message says what is wrong and where."""


@dataclass
class Split:
    """The paper's leave-one-out test split: one held-out positive and sampled negatives per test user."""
    users: np.ndarray      # (U,) int64
    positives: np.ndarray  # (U,) int64
    negatives: np.ndarray  # (U, 100) int64

    def __len__(self) -> int:
        return len(self.users)


@dataclass
class Dataset:
    n_users: int
    n_items: int
    train: np.ndarray         # (n, 2) int64 (user, item), unique pairs
    test: Split | None
    user_ids: list[str]
    item_ids: list[str]
    name: str = "data"
    # when each known pair happened, where the data says: (sorted pair keys, their timestamps)
    timeline: tuple[np.ndarray, np.ndarray] | None = None
    feedback_seq: int = 0     # the last feedback store event folded in (training/feedback.py); 0: none

    def __post_init__(self):
        if len(self.train) == 0:
            raise DataError(f"{self.name}: no training interactions")

    def all_pairs(self) -> np.ndarray:
        """Every interaction the data holds, held-out test positives included: what a service must never re-recommend."""
        if self.test is None or len(self.test) == 0:
            return self.train
        return np.unique(np.concatenate([self.train, np.stack([self.test.users, self.test.positives], 1)]), axis=0)

    def summary(self) -> str:
        pop = np.bincount(self.train[:, 1], minlength=self.n_items)
        n_test = 0 if self.test is None else len(self.test)
        return (f"{self.name}: {self.n_users:,} users, {self.n_items:,} items, {len(self.train):,} training pairs, "
                f"{n_test:,} test users; neighbourhood length mean {pop.mean():.2f}, max {pop.max()}")


def pair_keys(users: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    return users.astype(np.int64) * n_items + items.astype(np.int64)


def by_recency(data: Dataset, pairs: np.ndarray, seed: int) -> np.ndarray:
    """`pairs` reordered oldest first: by timestamp where the data has one (a pair it has none for counts as
    newest), ties and time-less data in a fixed order drawn from `seed` and the pair alone, so that any subset of
    the pairs (a validation cut, the checkpoint's) is ordered alike and a neighbourhood cap keeps a fixed sample."""
    keys = pair_keys(pairs[:, 0], pairs[:, 1], data.n_items)
    when = np.zeros(len(keys))
    if data.timeline is not None:
        known, times = data.timeline
        at = np.minimum(np.searchsorted(known, keys), len(known) - 1)
        when = np.where(known[at] == keys, times[at], np.inf)
    return pairs[np.lexsort((_mix(keys, seed), when))]


def _mix(keys: np.ndarray, seed: int) -> np.ndarray:
    """A pseudo-random uint64 per key (SplitMix64's finaliser): a seeded order that depends on nothing else."""
    with np.errstate(over="ignore"):
        x = keys.astype(np.uint64) + np.uint64(seed + 1) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


# --------------------------------------------------------------------------- loaders

def load(spec: str, seed: int = 0, min_rating: float | None = None, trust_pickle: bool = False) -> Dataset:
    """`synthetic`, a `.npz` in the original CMN format, or a CSV/TSV interaction file (`trust_pickle`: see
    `load_npz`)."""
    if spec == "synthetic" or spec.startswith("synthetic:"):
        return synthetic(seed=seed, **synthetic_options(spec))
    if not os.path.exists(spec):
        raise DataError(f"data file not found: {spec}")
    if os.path.isdir(spec):
        raise DataError(f"data path is a directory, expected a .npz or .csv/.tsv file: {spec}")
    if spec.endswith(".npz"):
        return load_npz(spec, trust_pickle)
    return load_csv(spec, seed=seed, min_rating=min_rating)


class UnsafePickle(pickle.UnpicklingError):
    pass


def _latin1(text: str, encoding: str) -> bytes:
    # how protocol-2 pickles spell bytes; the one use of codecs.encode a data file has
    if encoding not in ("latin1", "latin-1"):
        raise UnsafePickle(f"_codecs.encode(..., {encoding!r})")
    return text.encode("latin1")


_RECONSTRUCT, _SCALAR = np.zeros(0).__reduce__()[0], np.int64(0).__reduce__()[0]   # numpy's own picklers,
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]                                         # whatever their module


class PlainDataUnpickler(pickle.Unpickler):
    """Unpickles plain data only: dicts, lists, tuples, numbers, strings and numpy arrays and scalars, which is
    what the original format's pickled `test_data` holds. Any other global a pickle names (`os.system`,
    `builtins.eval`, a class) is refused before it can be called; unpickling anything else is running code."""

    ALLOWED = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1,
               # numpy 1.x pickles name numpy.core, numpy 2.x numpy._core
               ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
               ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
               ("numpy.core.multiarray", "scalar"): _SCALAR, ("numpy._core.multiarray", "scalar"): _SCALAR,
               ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
               ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER}

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickle(f"{module}.{name}") from None


def _npz_member(blob, name: str, trust_pickle: bool) -> np.ndarray:
    """One array of an .npz; an object array is unpickled by `PlainDataUnpickler` unless `trust_pickle`."""
    if trust_pickle:
        return blob[name]
    with blob.zip.open(f"{name}.npy") as f:
        version = npy_format.read_magic(f)
        read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        _, _, dtype = read_header(f)
        if dtype.hasobject:
            return PlainDataUnpickler(f).load()
    return blob[name]   # numbers only: numpy reads it without pickle (np.load had allow_pickle=False)


def read_npz(path: str, trust_pickle: bool = False) -> tuple[np.ndarray, dict]:
    """The original format's two arrays as stored: `train_data` and the `test_data` dict ({} when absent).

    `test_data` is a pickled dict, and unpickling a file runs whatever it says: by default only plain data is
    rebuilt (`PlainDataUnpickler`), which the paper's files are, and anything else is refused unrun.
    `trust_pickle` (the CLI's --trust-pickle) unpickles without that check: for a file from a trusted source."""
    try:
        with np.load(path, allow_pickle=trust_pickle) as blob:
            train = np.asarray(blob["train_data"])
            test = _npz_member(blob, "test_data", trust_pickle).item() if "test_data" in blob.files else {}
    except KeyError as e:
        raise DataError(f"{path}: not in the CMN .npz format (missing array {e})") from None
    except UnsafePickle as e:
        raise DataError(f"{path}: test_data is a pickle that calls {e}, which a data file has no need of; refused "
                        "without running it (--trust-pickle unpickles a file you trust as it is)") from None
    except Exception as e:  # zipfile/pickle errors carry no useful type for a user
        raise DataError(f"{path}: cannot read as .npz ({type(e).__name__}: {e})") from None
    if not isinstance(test, dict):
        raise DataError(f"{path}: test_data is a {type(test).__name__}, not a dict of user → (positive, negatives)")
    return train, test


def load_npz(path: str, trust_pickle: bool = False) -> Dataset:
    """The authors' format: `train_data` (n, 2) user/item and `test_data` {user: (positive, [negatives])}."""
    train, test_dict = read_npz(path, trust_pickle)
    try:
        train = train[:, :2].astype(np.int64)
    except (IndexError, ValueError, TypeError):
        raise DataError(f"{path}: train_data is not (n, 2) numbers") from None
    if train.ndim != 2 or len(train) == 0:
        raise DataError(f"{path}: train_data is empty or not (n, 2)")
    users = sorted(test_dict)
    test = None
    if users:
        negatives = [list(test_dict[u][1]) for u in users]
        if len({len(n) for n in negatives}) != 1:
            raise DataError(f"{path}: test users have different numbers of negatives")
        test = Split(np.asarray(users, dtype=np.int64),
                     np.asarray([test_dict[u][0] for u in users], dtype=np.int64),
                     np.asarray(negatives, dtype=np.int64))
    n_users = int(max(train[:, 0].max(), test.users.max() if test else 0)) + 1
    n_items = int(max(train[:, 1].max(), test.positives.max() if test else 0,
                      test.negatives.max() if test else 0)) + 1
    train = np.unique(train, axis=0)
    return Dataset(n_users, n_items, train, test, [str(u) for u in range(n_users)],
                   [str(i) for i in range(n_items)], name=os.path.basename(path))


def _find_column(header: list[str], names: tuple[str, ...]) -> int | None:
    norm = [h.strip().strip('"').lower().replace(" ", "_") for h in header]
    for name in names:
        if name in norm:
            return norm.index(name)
    return None


def read_interactions(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """External (user, item, rating?, timestamp?) columns of a delimited file with or without a header."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            sample = f.read(64 * 1024)
            if not sample.strip():
                raise DataError(f"{path}: file is empty")
            try:
                dialect = csv.Sniffer().sniff(sample.splitlines()[0], delimiters=",\t;| ")
            except csv.Error:
                dialect = csv.excel
            f.seek(0)
            rows = [r for r in csv.reader(f, dialect) if r and any(c.strip() for c in r)]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    header = rows[0]
    u_col, i_col = _find_column(header, USER_COLUMNS), _find_column(header, ITEM_COLUMNS)
    has_header = u_col is not None or i_col is not None or not any(c.strip().lstrip("-").replace(".", "").isdigit()
                                                                   for c in header)
    if has_header:
        if u_col is None or i_col is None:
            raise DataError(f"{path}: cannot find the {'user' if u_col is None else 'item'} column in header "
                            f"{header}; expected one of {USER_COLUMNS if u_col is None else ITEM_COLUMNS}")
        r_col, t_col = _find_column(header, RATING_COLUMNS), _find_column(header, TIME_COLUMNS)
        rows = rows[1:]
    else:  # headerless files follow the MovieLens order: user, item, rating, timestamp
        width = len(header)
        if width < 2:
            raise DataError(f"{path}: needs at least two columns (user, item); found {width}")
        u_col, i_col = 0, 1
        r_col, t_col = (2 if width > 2 else None), (3 if width > 3 else None)
    if not rows:
        raise DataError(f"{path}: no interactions after the header")
    need = max(c for c in (u_col, i_col, r_col, t_col) if c is not None)
    bad = next((n for n, r in enumerate(rows) if len(r) <= need), None)
    if bad is not None:
        raise DataError(f"{path}: line {bad + 1 + has_header} has {len(rows[bad])} fields, expected {need + 1}")
    users = np.array([r[u_col].strip() for r in rows], dtype=object)
    items = np.array([r[i_col].strip() for r in rows], dtype=object)
    ratings = _numeric(path, [r[r_col] for r in rows], "rating") if r_col is not None else None
    times = _numeric(path, [r[t_col] for r in rows], "timestamp") if t_col is not None else None
    return users, items, ratings, times


def _numeric(path: str, values: list[str], what: str) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.float64)
    except ValueError:
        if what == "timestamp":  # ISO dates sort correctly as datetime64
            try:
                return np.asarray(values, dtype="datetime64[s]").astype(np.int64).astype(np.float64)
            except ValueError:
                pass
        bad = next(v for v in values if not _is_number(v))
        raise DataError(f"{path}: {what} column holds a non-numeric value {bad!r}") from None


def _is_number(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def load_csv(path: str, seed: int = 0, min_rating: float | None = None) -> Dataset:
    users, items, ratings, times = read_interactions(path)
    if min_rating is not None:
        if ratings is None:
            raise DataError(f"{path}: --min-rating given but the file has no rating column")
        keep = ratings >= min_rating
        users, items, times = users[keep], items[keep], None if times is None else times[keep]
        if not keep.any():
            raise DataError(f"{path}: no interactions left after keeping ratings >= {min_rating}")
    return from_interactions(users, items, times, seed=seed, name=os.path.basename(path))


def from_interactions(users, items, times=None, seed: int = 0, name: str = "data") -> Dataset:
    """Id maps + deterministic leave-one-out split: the latest interaction per user when timestamps exist,
    a seeded random one otherwise. Users with a single interaction are kept for training only."""
    user_ids, u = np.unique(np.asarray(users, dtype=str), return_inverse=True)
    item_ids, i = np.unique(np.asarray(items, dtype=str), return_inverse=True)
    n_users, n_items = len(user_ids), len(item_ids)
    rng = np.random.default_rng(seed)
    # one row per (user, item): a repeated interaction keeps its latest time
    t = np.asarray(times, dtype=np.float64) if times is not None else rng.random(len(u))
    order = np.lexsort((t, i, u))
    u, i, t = u[order], i[order], t[order]
    last = np.ones(len(u), dtype=bool)
    last[:-1] = (u[1:] != u[:-1]) | (i[1:] != i[:-1])
    u, i, t = u[last], i[last], t[last]
    timeline = None if times is None else (pair_keys(u, i, n_items), t)  # sorted: u, i are
    # held-out = the latest (ties broken by the random tiebreak) among users with >= 2 items
    tiebreak = rng.random(len(u))
    order = np.lexsort((tiebreak, t, u))
    u, i = u[order], i[order]
    counts = np.bincount(u, minlength=n_users)
    is_last = np.ones(len(u), dtype=bool)
    is_last[:-1] = u[1:] != u[:-1]
    held = is_last & (counts[u] >= 2)
    train = np.stack([u[~held], i[~held]], 1).astype(np.int64)
    test_users, test_pos = u[held].astype(np.int64), i[held].astype(np.int64)
    negatives = sample_test_negatives(np.stack([u, i], 1), test_users, n_items, rng)
    test = Split(test_users, test_pos, negatives) if len(test_users) else None
    return Dataset(n_users, n_items, train, test, [str(x) for x in user_ids], [str(x) for x in item_ids], name=name,
                   timeline=timeline)


def sample_test_negatives(pairs: np.ndarray, users: np.ndarray, n_items: int, rng: np.random.Generator,
                          n: int = N_TEST_NEGATIVES) -> np.ndarray:
    """`n` distinct items per user that the user never interacted with (fewer exist: repeated, the evaluator
    de-duplicates candidates)."""
    seen_keys = np.unique(pair_keys(pairs[:, 0], pairs[:, 1], n_items))
    out = rng.integers(0, n_items, size=(len(users), n))
    bad = np.ones_like(out, dtype=bool)
    for _ in range(100):
        keys = pair_keys(np.repeat(users, n), out.ravel(), n_items).reshape(out.shape)
        bad = np.isin(keys, seen_keys) | _duplicates(out)
        if not bad.any():
            return out
        out[bad] = rng.integers(0, n_items, size=int(bad.sum()))
    # users with fewer than n unseen items: fill with repeats of what exists
    seen = set(seen_keys.tolist())
    for r in np.flatnonzero(bad.any(1)):
        user = int(users[r])
        unseen = [j for j in range(n_items) if user * n_items + j not in seen]
        if not unseen:
            raise DataError(f"user {user} has interacted with every item; no negatives can be sampled")
        out[r] = np.resize(rng.permutation(unseen), n)
    return out


def _duplicates(a: np.ndarray) -> np.ndarray:
    """Mask of entries equal to an earlier entry of the same row."""
    order = np.argsort(a, axis=1, kind="stable")
    srt = np.take_along_axis(a, order, 1)
    dup = np.zeros_like(a, dtype=bool)
    dup_sorted = np.zeros_like(srt, dtype=bool)
    dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
    np.put_along_axis(dup, order, dup_sorted, 1)
    return dup


def holdout_validation(data: Dataset, seed: int) -> Dataset:
    """Cut a leave-one-out validation split from the training pairs (for early stopping and tuning
    without touching the test split). The returned dataset's `test` is the validation split."""
    rng = np.random.default_rng(seed + 1)
    u, i = data.train[:, 0], data.train[:, 1]
    order = np.lexsort((rng.random(len(u)), u))
    u, i = u[order], i[order]
    counts = np.bincount(u, minlength=data.n_users)
    is_last = np.ones(len(u), dtype=bool)
    is_last[:-1] = u[1:] != u[:-1]
    held = is_last & (counts[u] >= 2)
    negatives = sample_test_negatives(data.all_pairs(), u[held], data.n_items, rng)
    return Dataset(data.n_users, data.n_items, np.stack([u[~held], i[~held]], 1), Split(u[held], i[held], negatives),
                   data.user_ids, data.item_ids, name=data.name + ":validation", timeline=data.timeline)


# `--data synthetic:movielens`: MovieLens-like popularity (the most popular items reach most users), the size at
# which an uncapped neighbourhood is unaffordable; `synthetic:n_users=...,zipf=...` sets any parameter
SYNTHETIC_PRESETS = {"movielens": dict(n_users=50_000, n_items=20_000, n_clusters=20, per_user=40, zipf=1.2)}


def synthetic_options(spec: str) -> dict:
    """`synthetic[:preset][,name=value...]` → keyword arguments of `synthetic`."""
    options: dict = {}
    parameters = {"n_users": int, "n_items": int, "n_clusters": int, "per_user": int, "in_cluster": float,
                  "zipf": float}
    for part in filter(None, spec.partition(":")[2].split(",")):
        name, eq, value = part.partition("=")
        if not eq:
            if name not in SYNTHETIC_PRESETS:
                raise DataError(f"--data {spec}: unknown synthetic preset {name!r} (presets: "
                                f"{', '.join(SYNTHETIC_PRESETS)})")
            options.update(SYNTHETIC_PRESETS[name])
        elif name in parameters:
            try:
                options[name] = parameters[name](value)
            except ValueError:
                raise DataError(f"--data {spec}: {name} must be a {parameters[name].__name__}, got {value!r}") from None
        else:
            raise DataError(f"--data {spec}: unknown synthetic parameter {name!r} (parameters: "
                            f"{', '.join(parameters)})")
    lowest = {"n_users": 1, "n_items": 2, "n_clusters": 1, "per_user": 1, "in_cluster": 0, "zipf": 0}
    bad = [f"{k} >= {lowest[k]}" for k, v in options.items() if v < lowest[k]] + \
        (["in_cluster <= 1"] if options.get("in_cluster", 0) > 1 else [])
    if bad:
        raise DataError(f"--data {spec}: needs {', '.join(bad)}")
    return options


def synthetic(seed: int = 0, n_users: int = 800, n_items: int = 1200, n_clusters: int = 8,
              per_user: int = 24, in_cluster: float = 0.85, zipf: float = 1.0) -> Dataset:
    """A deterministic data set with planted structure, the default when no data is given.

    Users and items belong to latent clusters; a user picks most items from its own cluster. Item popularity
    follows a power law (Zipf, exponent `zipf`), so popularity alone is a weak but non-trivial baseline, and a
    model that learns the clusters beats it by a wide margin. Each interaction has a random timestamp.
    """
    rng = np.random.default_rng(seed)
    user_cluster = rng.integers(0, n_clusters, n_users)
    item_cluster = rng.integers(0, n_clusters, n_items)
    weight = 1.0 / rng.permutation(np.arange(1, n_items + 1)) ** zipf  # power law, random rank per item
    users, items = [], []
    for c in range(n_clusters):
        members = np.flatnonzero(user_cluster == c)
        inside, outside = item_cluster == c, item_cluster != c
        p_in = np.where(inside, weight, 0) / weight[inside].sum()
        p_out = np.where(outside, weight, 0) / weight[outside].sum()
        p = in_cluster * p_in + (1 - in_cluster) * p_out
        sizes = rng.poisson(per_user, len(members)).clip(3, n_items // 2)
        for user, size in zip(members, sizes):
            users.append(np.full(size, user))
            items.append(rng.choice(n_items, size=size, replace=False, p=p))
    users, items = np.concatenate(users), np.concatenate(items)
    times = rng.random(len(users))
    return from_interactions(users.astype(str), items.astype(str), times, seed=seed, name="synthetic")
