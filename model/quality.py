"""Warnings about a trained model's quality, from the metrics training stores in its checkpoint.

A CMN that ranks worse than item popularity (TopPop) is worse than no model: the usual cause is a training run
that collapsed to constant scores (docs/model.md). Training refuses to write such a model when it sees the collapse,
but a checkpoint from an older build, or one that degraded later, can still reach `evaluate` and the server, which
both say so loudly.
"""
from __future__ import annotations


def below_toppop(cmn: dict, toppop: dict) -> str | None:
    """A one-line warning when CMN's sampled HR@10 is below TopPop's (evaluator result dicts), else None."""
    try:
        ours, theirs = float(cmn["sampled"]["hr@10"]), float(toppop["sampled"]["hr@10"])
    except (KeyError, TypeError, ValueError):
        return None
    if ours >= theirs:
        return None
    return (f"CMN ranks below popularity: sampled HR@10 {ours:.4f} against TopPop's {theirs:.4f} on this model's "
            "test split; it has most likely collapsed to near-constant scores (retrain it, see docs/model.md)")


def checkpoint_warnings(metrics: dict) -> list[str]:
    """What a checkpoint's stored training metrics (`final`, `toppop`) warn about; empty when nothing (or no
    test split was held out to tell)."""
    warning = below_toppop(metrics.get("final"), metrics.get("toppop")) if isinstance(metrics, dict) else None
    return [warning] if warning else []
