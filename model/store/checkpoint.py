"""One checkpoint file per trained model: safetensors tensors + JSON metadata, never pickle.

Holds the weights, the config, the external ↔ internal id maps, the item → users CSR of the training
interactions (N(i)), the user → items CSR of every known interaction (seen-sets), the evaluation split,
the metrics and a `model_version`. Written atomically; a truncated, corrupt or foreign file gives one
`CheckpointError` line naming the problem.

Reading is defensive, for the server's `/admin/reload` and for anyone handed a file: one descriptor, opened
without blocking and checked to be a regular file under a size cap before a byte is read; the header (dtypes,
shapes, config) checked against itself before any tensor is built; then the id maps and pairs against the config.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from model.cmn import CMN, CMNConfig
from model.neighbours import neighbour_csr
from model.retrieval import Retrieval, TwoStage, retrieval_from_tensors, retrieval_layout

FORMAT = "cmn-checkpoint"
# 2: exclude_self is in the config (1 kept it in meta['train_config']); 3: max_neighbours is in the config, and
# `train` rows are oldest first (the cap keeps each item's newest)
FORMAT_VERSION = 3
READABLE_VERSIONS = ("1", "2", "3")
MAX_BYTES = 2 * 1024 ** 3          # default size cap on a checkpoint file (the server's CMN_MAX_CHECKPOINT_BYTES)
HEADER_LIMIT = 100 * 1024 ** 2     # safetensors' own cap on its JSON header
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def csr(rows: np.ndarray, cols: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, indices) of the unique (row, col) pairs, columns sorted within each row."""
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    width = int(cols.max(initial=-1)) + 1
    keys = np.unique(rows * width + cols)
    rows, cols = keys // width, keys % width
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
    return indptr, cols.astype(np.int64)


@dataclass
class Checkpoint:
    config: CMNConfig
    state: dict[str, torch.Tensor]
    user_ids: list[str]
    item_ids: list[str]
    train: np.ndarray                   # (n, 2) training pairs, oldest first: N(i) is built from these
    seen: np.ndarray                    # (m, 2) every known interaction: never re-recommended
    test_users: np.ndarray | None = None
    test_positives: np.ndarray | None = None
    test_negatives: np.ndarray | None = None
    metrics: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    model_version: str = ""
    retrieval: Retrieval | None = None   # the two-stage retrieval stage (on cpu), with its settings
    two_stage: TwoStage | None = None

    def build_model(self, device: str | torch.device = "cpu") -> CMN:
        model = CMN(self.config)
        model.load_state_dict(self.state)
        return model.to(device).eval()

    def item_users(self) -> tuple[np.ndarray, np.ndarray]:
        """N(i) as an item → users CSR, capped to `config.max_neighbours` as in training."""
        return neighbour_csr(self.train, self.config.n_items, self.config.max_neighbours)[:2]

    def user_items(self) -> tuple[np.ndarray, np.ndarray]:
        return csr(self.seen[:, 0], self.seen[:, 1], self.config.n_users)


def model_version(state: dict[str, torch.Tensor], created: float | None = None) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    stamp = time.strftime("%Y%m%dT%H%MZ", time.gmtime(created))
    return f"{stamp}-{digest.hexdigest()[:6]}"


def _text(obj) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)


def save_checkpoint(ckpt: Checkpoint, path: str) -> str:
    """Write atomically (temp file + fsync + rename): a crash never leaves a half file under `path`."""
    state = {k: v.detach().cpu().contiguous() for k, v in ckpt.state.items()}
    ckpt.model_version = ckpt.model_version or model_version(state)
    tensors = {f"model.{k}": v for k, v in state.items()}
    tensors["user_ids"], tensors["item_ids"] = _text(ckpt.user_ids), _text(ckpt.item_ids)
    # torch.tensor copies: `seen` is often the very array `train` is (--holdout none), and safetensors refuses
    # tensors that share memory
    tensors["train"] = torch.tensor(np.asarray(ckpt.train, dtype=np.int64)).reshape(-1, 2)
    tensors["seen"] = torch.tensor(np.asarray(ckpt.seen, dtype=np.int64)).reshape(-1, 2)
    if ckpt.test_users is not None:
        tensors["test.users"] = torch.as_tensor(ckpt.test_users, dtype=torch.long)
        tensors["test.positives"] = torch.as_tensor(ckpt.test_positives, dtype=torch.long)
        tensors["test.negatives"] = torch.as_tensor(ckpt.test_negatives, dtype=torch.long)
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "model_version": ckpt.model_version,
                "config": json.dumps(ckpt.config.to_dict()), "metrics": json.dumps(ckpt.metrics),
                "meta": json.dumps(ckpt.meta)}
    if ckpt.retrieval is not None:
        tensors.update({f"retrieval.{k}": v for k, v in ckpt.retrieval.tensors().items()})
        metadata["two_stage"] = json.dumps(ckpt.two_stage.to_dict())
    blob = save_tensors(tensors, metadata=metadata)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return ckpt.model_version


def _one_line(e: Exception) -> str:
    """An exception's message on one line (a log line, a CLI error)."""
    return " ".join(str(e).split())


def _format1_settings(metadata: dict, meta: dict) -> dict:
    """Format 1 kept the inference setting `exclude_self` with the training options; format 2 has it in the config."""
    if metadata.get("format_version") != "1":
        return {}
    return {"exclude_self": bool(meta.get("train_config", {}).get("exclude_self", False))}


def confined(path: str, directory: str) -> str:
    """`path` (relative to `directory` unless absolute) with every symlink resolved, if that lies inside
    `directory`; CheckpointError otherwise. What the server applies to a path a client names."""
    root = os.path.realpath(directory)
    real = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, real]) != root:
        raise CheckpointError(f"{path}: outside the checkpoint directory {root}")
    return real


def _open(path: str, max_bytes: int, follow_symlinks: bool) -> tuple[int, int]:
    """(descriptor, size) of a regular file of at most `max_bytes`. O_NONBLOCK: opening a FIFO with no writer
    (or a device) returns at once instead of blocking the reader, and fstat on the descriptor then refuses it;
    the checks apply to the very file that will be read, not to whatever the path names a moment later."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointError(f"{path}: is a symbolic link (not followed here)") from None
        raise CheckpointError(f"{path}: cannot open ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise CheckpointError(f"checkpoint path is a directory: {path}")
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: not a regular file (a FIFO, socket or device)")
        if st.st_size > max_bytes:
            raise CheckpointError(f"{path}: {st.st_size} bytes, over the {max_bytes}-byte limit on a checkpoint")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def _header(fd: int, size: int, path: str) -> dict:
    """The safetensors JSON header: an 8-byte little-endian length, then that many bytes of JSON."""
    corrupt = f"{path}: unreadable checkpoint, truncated or corrupt"
    if size < 8:
        raise CheckpointError(f"{corrupt} ({size} bytes)")
    length = int.from_bytes(os.pread(fd, 8, 0), "little")
    if length > min(size - 8, HEADER_LIMIT):
        raise CheckpointError(f"{corrupt} (header of {length} bytes in a {size}-byte file)")
    try:
        header = json.loads(os.pread(fd, length, 8))
    except ValueError as e:
        raise CheckpointError(f"{corrupt} (header: {_one_line(e)})") from None
    if not isinstance(header, dict) or not all(isinstance(v, dict) for v in header.values()):
        raise CheckpointError(f"{corrupt} (header is not a JSON object of objects)")
    return header


def _expected_layout(config: CMNConfig, tensors: dict) -> dict[str, tuple[str, list | None]]:
    """name → (dtype, shape) every tensor must have; None for a dimension read from the file (pair counts)."""
    # the model's own tensors, from the model built on the meta device (shapes only, nothing allocated)
    with torch.device("meta"):
        state = CMN(config).state_dict()
    layout = {f"model.{k}": (SAFETENSORS_DTYPES.get(v.dtype, str(v.dtype)), list(v.shape)) for k, v in state.items()}
    layout.update({"user_ids": ("U8", [None]), "item_ids": ("U8", [None]),
                   "train": ("I64", [None, 2]), "seen": ("I64", [None, 2])})
    if any(name.startswith("test.") for name in tensors):
        n_test = (tensors.get("test.users", {}).get("shape") or [None])[0]
        layout.update({"test.users": ("I64", [n_test]), "test.positives": ("I64", [n_test]),
                       "test.negatives": ("I64", [n_test, None])})
    if any(name.startswith("retrieval.") for name in tensors):
        stage = [name[len("retrieval."):] for name in tensors if name.startswith("retrieval.")]
        layout.update({f"retrieval.{k}": v for k, v in retrieval_layout(stage, config.n_users, config.n_items).items()})
    return layout


def _check_layout(path: str, header: dict, config: CMNConfig) -> None:
    """Every tensor's dtype and shape against the config, from the header alone: a file whose config names a
    million users but holds ten is refused before anything that size is built."""
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    # the number of hop maps first: it bounds the model that _expected_layout builds (even on the meta device)
    hop_maps = sum(1 for k in tensors if k.startswith("model.hop_maps.") and k.endswith(".weight"))
    if hop_maps != config.hops - 1:
        raise CheckpointError(f"{path}: inconsistent checkpoint contents (config says {config.hops} hops, the file "
                              f"holds {hop_maps + 1})")
    expected = _expected_layout(config, tensors)
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise CheckpointError(f"{path}: inconsistent checkpoint contents (missing tensors {missing[:5]}, "
                              f"unexpected {extra[:5]})")
    for name, (dtype, shape) in expected.items():
        got = tensors[name]
        got_shape = got.get("shape")
        if got.get("dtype") != dtype or not isinstance(got_shape, list) or len(got_shape) != len(shape) or \
                any(want is not None and have != want for have, want in zip(got_shape, shape)):
            raise CheckpointError(f"{path}: inconsistent checkpoint contents (tensor {name} is {got.get('dtype')} "
                                  f"{got_shape}, the config ({config.n_users} users, {config.n_items} items, "
                                  f"d {config.embed_size}) needs {dtype} {['n' if d is None else d for d in shape]})")


def _read_all(fd: int, size: int, path: str) -> bytes:
    with os.fdopen(fd, "rb", closefd=False) as f:
        data = f.read(size + 1)
    if len(data) != size:
        raise CheckpointError(f"{path}: changed while being read ({size} bytes, then {len(data)})")
    return data


def _ids(tensor: torch.Tensor, what: str, n: int, path: str) -> list[str]:
    ids = json.loads(bytes(tensor.numpy()).decode())
    if not isinstance(ids, list) or len(ids) != n or not all(isinstance(i, str) for i in ids) or \
            len(set(ids)) != n:
        raise CheckpointError(f"{path}: inconsistent checkpoint contents (the {what} id map is not {n} distinct "
                              f"strings, one per {what} of the model)")
    return ids


def _check_ids_in_range(path: str, name: str, values: np.ndarray, bound: int) -> None:
    if values.size and (values.min() < 0 or values.max() >= bound):
        raise CheckpointError(f"{path}: inconsistent checkpoint contents ({name} holds ids outside 0..{bound - 1})")


def load_checkpoint(path: str, max_bytes: int = MAX_BYTES, within: str | None = None) -> Checkpoint:
    """Read and check a checkpoint. `within`: a directory the file must lie in (symlinks resolved, the file
    itself opened without following one); the server passes CMN_CHECKPOINT_DIR for a path a client names."""
    follow = within is None
    if within is not None:
        path = confined(path, within)
    fd, size = _open(path, max_bytes, follow)
    try:
        header = _header(fd, size, path)
        meta = header.get("__metadata__") or {}
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not a CMN checkpoint (format {meta.get('format')!r})")
        if meta.get("format_version") not in READABLE_VERSIONS:
            raise CheckpointError(f"{path}: checkpoint format version {meta.get('format_version')} is not "
                                  f"supported (this build reads versions {', '.join(READABLE_VERSIONS)}); "
                                  "retrain it")
        try:
            extra = json.loads(meta.get("meta", "{}"))
            config = CMNConfig(**json.loads(meta["config"]), **_format1_settings(meta, extra))
            _check_layout(path, header, config)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
            raise CheckpointError(f"{path}: inconsistent checkpoint contents ({type(e).__name__}: "
                                  f"{_one_line(e)})") from None
        data = _read_all(fd, size, path)
    finally:
        os.close(fd)
    try:
        tensors = load_tensors(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint, truncated or corrupt ({_one_line(e)})") from None
    del data
    try:
        ckpt = Checkpoint(
            config=config, state={k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
            user_ids=_ids(tensors["user_ids"], "user", config.n_users, path),
            item_ids=_ids(tensors["item_ids"], "item", config.n_items, path),
            train=tensors["train"].numpy(), seen=tensors["seen"].numpy(),
            test_users=tensors["test.users"].numpy() if "test.users" in tensors else None,
            test_positives=tensors["test.positives"].numpy() if "test.positives" in tensors else None,
            test_negatives=tensors["test.negatives"].numpy() if "test.negatives" in tensors else None,
            metrics=json.loads(meta.get("metrics", "{}")), meta=extra,
            model_version=meta.get("model_version", ""))
        stage = {k[len("retrieval."):]: v for k, v in tensors.items() if k.startswith("retrieval.")}
        if stage:
            ckpt.two_stage = TwoStage(**json.loads(meta["two_stage"]))
            ckpt.retrieval = retrieval_from_tensors(stage, config.n_items, ckpt.two_stage)
    except CheckpointError:
        raise
    except (KeyError, TypeError) as e:  # retrieval tensors without their settings, or settings of another shape
        raise CheckpointError(f"{path}: inconsistent checkpoint contents ({type(e).__name__}: "
                              f"{_one_line(e)})") from None
    except ValueError as e:  # an id map or the metrics that is not JSON (UnicodeDecodeError is a ValueError)
        raise CheckpointError(f"{path}: inconsistent checkpoint contents ({type(e).__name__}: "
                              f"{_one_line(e)})") from None
    for name, pairs in (("train", ckpt.train), ("seen", ckpt.seen)):
        _check_ids_in_range(path, f"{name} (users)", pairs[:, 0], config.n_users)
        _check_ids_in_range(path, f"{name} (items)", pairs[:, 1], config.n_items)
    if ckpt.test_users is not None:
        _check_ids_in_range(path, "test.users", ckpt.test_users, config.n_users)
        _check_ids_in_range(path, "test.positives", ckpt.test_positives, config.n_items)
        _check_ids_in_range(path, "test.negatives", ckpt.test_negatives, config.n_items)
    return ckpt
