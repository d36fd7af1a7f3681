"""The scorer's two private torch calls, each behind a check made once at import, with a public fallback.

- `softmax_into`: `torch._softmax(..., out=)` writes into a reused buffer; `torch.softmax` allocates its result,
  and a fresh large tensor page-faults on every call (the bucketed route's blocks would pay it per piece).
- `segment_max`: `torch.segment_reduce(..., unsafe=True)` skips a validation pass over the lengths that the
  packed routes' own CSR never needs; the fallback, `scatter_reduce` amax, took twice as long on the
  packed catalogue's 200k slots.

A private call is used only on the torch series it was checked on (2.x), only if it exists, and only if a tiny
self-test gives what the public call gives; otherwise the public call runs. Both give bit-identical results
(the same softmax kernel; a maximum has no rounding). The flags are module attributes so that tests can force
the fallback.
"""
from __future__ import annotations

import torch

# the torch series whose private signatures these are (pyproject allows 2.3 to < 3); a new major version is
# re-checked by hand, not by the self-tests alone, which only see the cases they try
CHECKED_SERIES = ((2, 0), (3, 0))


def _checked_version() -> bool:
    return CHECKED_SERIES[0] <= torch.__version__ < CHECKED_SERIES[1]


def _softmax_public(logits: torch.Tensor, dim: int, out: torch.Tensor) -> torch.Tensor:
    return out.copy_(torch.softmax(logits, dim))


def _segment_max_public(values: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    peak = torch.full((len(lengths),), -torch.inf, dtype=values.dtype, device=values.device)
    return peak.scatter_reduce_(0, rows, values, "amax")


def _private_softmax_works() -> bool:
    if not _checked_version() or not hasattr(torch, "_softmax"):
        return False
    logits = torch.tensor([[0.0, 1.0, -torch.inf], [2.0, 2.0, -3.0]])
    out = torch.empty_like(logits)
    try:
        got = torch._softmax(logits, 1, False, out=out)
    except Exception:  # any failure (a changed signature, a missing kernel) just means: use the public call
        return False
    return got.data_ptr() == out.data_ptr() and torch.equal(out, torch.softmax(logits, 1))


def _private_segment_max_works() -> bool:
    if not _checked_version() or not hasattr(torch, "segment_reduce"):
        return False
    values, lengths = torch.tensor([3.0, -1.0, 2.0, 5.0, -4.0]), torch.tensor([2, 0, 3])
    try:
        got = torch.segment_reduce(values, "max", lengths=lengths, unsafe=True)
    except Exception:  # as above
        return False
    return torch.equal(got, _segment_max_public(values, lengths, torch.tensor([0, 0, 2, 2, 2])))


PRIVATE_SOFTMAX = _private_softmax_works()
PRIVATE_SEGMENT_MAX = _private_segment_max_works()


def softmax_into(logits: torch.Tensor, dim: int, out: torch.Tensor) -> torch.Tensor:
    """softmax(logits) along `dim`, written into `out` (same shape), which is returned."""
    if PRIVATE_SOFTMAX:
        return torch._softmax(logits, dim, False, out=out)
    return _softmax_public(logits, dim, out)


def segment_max(values: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The maximum of each of the `len(lengths)` runs of `values` (-inf for an empty one); `rows[s]` is the run of
    `values[s]`, runs back to back in order."""
    if PRIVATE_SEGMENT_MAX:
        return torch.segment_reduce(values, "max", lengths=lengths, unsafe=True)
    return _segment_max_public(values, lengths, rows)
