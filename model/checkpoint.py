"""One checkpoint file per trained model: safetensors tensors + JSON metadata, never pickle.

Holds the weights, the config, the external ↔ internal id maps, the item → users CSR of the training
interactions (N(i)), the user → items CSR of every known interaction (seen-sets), the evaluation split,
the metrics and a `model_version`. Written atomically; a truncated, corrupt or foreign file gives one
`CheckpointError` line naming the problem.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_tensors

from model.cmn import CMN, CMNConfig

FORMAT = "cmn-checkpoint"
FORMAT_VERSION = 2  # 2: exclude_self is in the config (1 kept it in meta['train_config'])
READABLE_VERSIONS = ("1", "2")


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
    train: np.ndarray                   # (n, 2) training pairs: N(i) is built from these
    seen: np.ndarray                    # (m, 2) every known interaction: never re-recommended
    test_users: np.ndarray | None = None
    test_positives: np.ndarray | None = None
    test_negatives: np.ndarray | None = None
    metrics: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    model_version: str = ""

    def build_model(self, device: str | torch.device = "cpu") -> CMN:
        model = CMN(self.config)
        model.load_state_dict(self.state)
        return model.to(device).eval()

    def item_users(self) -> tuple[np.ndarray, np.ndarray]:
        return csr(self.train[:, 1], self.train[:, 0], self.config.n_items)

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
    """An exception's message on one line (load_state_dict's lists one size mismatch per line)."""
    return " ".join(str(e).split())


def _format1_settings(metadata: dict, meta: dict) -> dict:
    """Format 1 kept the inference setting `exclude_self` with the training options; format 2 has it in the config."""
    if metadata.get("format_version") != "1":
        return {}
    return {"exclude_self": bool(meta.get("train_config", {}).get("exclude_self", False))}


def load_checkpoint(path: str) -> Checkpoint:
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint path is a directory: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{path}: not a CMN checkpoint (format {meta.get('format')!r})")
            if meta.get("format_version") not in READABLE_VERSIONS:
                raise CheckpointError(f"{path}: checkpoint format version {meta.get('format_version')} is not "
                                      f"supported (this build reads versions {', '.join(READABLE_VERSIONS)}); "
                                      "retrain it")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint, truncated or corrupt ({_one_line(e)})") from None
    try:
        extra = json.loads(meta.get("meta", "{}"))
        config = CMNConfig(**json.loads(meta["config"]), **_format1_settings(meta, extra))
        state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        ckpt = Checkpoint(
            config=config, state=state,
            user_ids=json.loads(bytes(tensors["user_ids"].numpy()).decode()),
            item_ids=json.loads(bytes(tensors["item_ids"].numpy()).decode()),
            train=tensors["train"].numpy(), seen=tensors["seen"].numpy(),
            test_users=tensors["test.users"].numpy() if "test.users" in tensors else None,
            test_positives=tensors["test.positives"].numpy() if "test.positives" in tensors else None,
            test_negatives=tensors["test.negatives"].numpy() if "test.negatives" in tensors else None,
            metrics=json.loads(meta.get("metrics", "{}")), meta=extra,
            model_version=meta.get("model_version", ""))
        CMN(config).load_state_dict(state)  # shapes and names must match the config
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: inconsistent checkpoint contents ({type(e).__name__}: {_one_line(e)})") from None
    if len(ckpt.user_ids) != config.n_users or len(ckpt.item_ids) != config.n_items:
        raise CheckpointError(f"{path}: id maps ({len(ckpt.user_ids)} users, {len(ckpt.item_ids)} items) do not "
                              f"match the model ({config.n_users}, {config.n_items})")
    return ckpt
