"""Requests ↔ jobs: what a /recommend request becomes once its ids are resolved against one engine (`Job`, made by
`Engine.prepare`), what the model thread answers (`Answer`), the request errors the model decides (unknown ids, a
strategy it does not offer), and the limits on what one request may cost (`check_limits`), checked before anything
is queued.
"""
from __future__ import annotations

from dataclasses import dataclass

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from app.schemas import RecommendRequest
from app.settings import Settings


class UnsupportedStrategy(ValueError):
    """A strategy the loaded model does not offer (→ 422)."""


class UnknownIds(ValueError):
    """Candidate or exclude ids the model does not know. The 422 lists only the first ECHOED of them (each id is
    up to 256 characters) and counts the rest: a request naming 10,000 unknown ids gets a short answer."""
    ECHOED = 20

    def __init__(self, field: str, ids: list[str]):
        more = f" (the first {self.ECHOED} are listed)" if len(ids) > self.ECHOED else ""
        super().__init__(f"{len(ids)} {field} ids are unknown to the model{more}")
        self.field, self.ids = field, ids[:self.ECHOED]
        self.count = len(ids)


@dataclass
class Job:
    """One request with ids resolved against one engine."""
    user_id: str | None
    user: int | None                  # None: unknown or anonymous user: fold-in of `history`, else popularity
    k: int
    candidates: list[int] | None      # item ids, or None for the whole catalogue
    exclude: list[int]                # item ids removed besides the seen-set
    exclude_seen: bool
    explain: bool
    strategy: str
    pairs: int                        # what it costs the model thread, in scored pairs (a fold-in: its measured
                                      # cost more, app/engine.py `Throughput`)
    history: list[int] | None = None  # an unknown user's items, folded in for this request


@dataclass
class Answer:
    # (item id, score, live item, explanation: [(user id, attention weight, live user)] or None)
    items: list[tuple[str, float, bool, list[tuple[str, float, bool]] | None]]
    fallback: str | None
    strategy: str | None = None
    cold_start: str | None = None




def check_limits(settings: Settings, reqs: list[RecommendRequest], batch: bool) -> None:
    """403 for explain while disabled; 422 (the shape of any invalid body) past CMN_MAX_EXPLAIN_K,
    CMN_MAX_TOTAL_K, CMN_MAX_HISTORY or CMN_MAX_BATCH_HISTORY. The cost of an answer grows with k, far more with
    explanations, and a 7 KB batch could otherwise ask for 256,000 items; a 912 KB batch of 256 × 500-item
    histories held the model thread 4.9 s."""
    if any(r.explain for r in reqs) and not settings.allow_explain:
        raise HTTPException(403, "explanations reveal other users' ids and are disabled on this server "
                                 "(set CMN_ALLOW_EXPLAIN=true to enable)")
    where = (lambda n, field: ("body", "requests", n, field)) if batch else (lambda n, field: ("body", field))
    errors = [{"type": "less_than_equal", "loc": where(n, "k"),
               "msg": f"k is at most {settings.max_explain_k} when explain is true"}
              for n, r in enumerate(reqs) if r.explain and r.k > settings.max_explain_k]
    errors += [{"type": "too_long", "loc": where(n, "history"),
                "msg": f"history holds {len(r.history)} items; at most {settings.max_history}"}
               for n, r in enumerate(reqs) if r.history and len(r.history) > settings.max_history]
    total = sum(r.k for r in reqs)
    if total > settings.max_total_k:
        errors.append({"type": "less_than_equal", "loc": ("body", "requests") if batch else ("body", "k"),
                       "msg": f"k adds up to {total} over the request; at most {settings.max_total_k}"})
    histories = sum(len(r.history or ()) for r in reqs)
    if batch and histories > settings.max_batch_history:
        errors.append({"type": "less_than_equal", "loc": ("body", "requests"),
                       "msg": f"history items add up to {histories} over the batch; at most "
                              f"{settings.max_batch_history} (each history is folded in): send fewer per batch"})
    if errors:
        raise RequestValidationError(errors)


def beyond_the_store(seq: int, last: int, batch: bool) -> RequestValidationError:
    """422 for an after_seq the store does not hold yet."""
    return RequestValidationError([{"type": "less_than_equal", "loc": ("body", "requests") if batch else
                                    ("body", "after_seq"), "msg": f"after_seq {seq} is beyond the last event of "
                                    f"the feedback store ({last})"}])
