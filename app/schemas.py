"""The HTTP contract (v1) as pydantic models; see docs/api.md."""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

# Ids arrive as JSON strings or integers; both name the same entity ("123" == 123).
ExternalId = Annotated[Union[Annotated[StrictStr, Field(min_length=1, max_length=256)], StrictInt],
                       Field(description="external id, as in the training data (string or integer)")]


def as_str(value: str | int) -> str:
    return value if isinstance(value, str) else str(value)


def as_strs(values: list[str | int]) -> list[str]:
    return [v if v.__class__ is str else str(v) for v in values]  # inline: this runs for every id of every request


def no_duplicates(values: list | None, what: str) -> list[str] | None:
    if values is None:
        return None
    out = as_strs(values)
    if len(set(out)) != len(out):
        seen, dupes = set(), []
        for v in out:
            if v in seen and v not in dupes:
                dupes.append(v)
            seen.add(v)
        raise ValueError(f"duplicate {what}: {dupes[:10]}")
    return out


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "examples": [{"user_id": "123", "k": 10, "exclude_seen": True}]})

    user_id: ExternalId
    k: int = Field(10, ge=1, le=1000, description="number of items to return")
    candidates: list[ExternalId] | None = Field(
        None, min_length=1, max_length=10_000, description="score only these items; absent = whole catalogue")
    exclude_seen: bool = Field(True, description="drop the user's training and fed-back items")
    exclude: list[ExternalId] = Field(default_factory=list, max_length=10_000, description="items to drop")
    explain: bool = Field(False, description="attach the most attended neighbour users (needs CMN_ALLOW_EXPLAIN)")
    ignore_unknown: bool = Field(False, description="drop unknown candidate/exclude ids instead of answering 422")

    @field_validator("user_id", mode="after")
    @classmethod
    def _user(cls, v):
        return as_str(v)

    @field_validator("candidates", mode="after")
    @classmethod
    def _candidates(cls, v):
        return no_duplicates(v, "candidates")

    @field_validator("exclude", mode="after")
    @classmethod
    def _exclude(cls, v):
        return as_strs(v)


class Neighbour(BaseModel):
    user_id: str
    weight: float


class ScoredItem(BaseModel):
    item_id: str
    score: float
    explanation: list[Neighbour] | None = None


class RecommendResponse(BaseModel):
    user_id: str
    items: list[ScoredItem]
    model_version: str
    fallback: Literal["unknown_user"] | None = None
    took_ms: float


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    requests: list[RecommendRequest] = Field(min_length=1, max_length=256)


class BatchResponse(BaseModel):
    results: list[RecommendResponse]
    model_version: str
    took_ms: float


class FeedbackEvent(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    user_id: ExternalId
    item_id: ExternalId
    timestamp: float | None = Field(None, ge=0, le=1e11, description="unix seconds; default: time received")
    event_id: Annotated[str, Field(min_length=1, max_length=128)] | None = Field(
        None, description="client id that makes retries idempotent")


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    events: list[FeedbackEvent] = Field(min_length=1, max_length=1000)


class FeedbackResponse(BaseModel):
    stored: int = Field(description="events written durably by this call")
    duplicates: int = Field(description="events whose event_id was already stored")
    applied: int = Field(description="events now visible to recommendations (known user and item)")
    deferred: int = Field(description="events for unknown users or items: used by the next training run")
    note: str | None = None


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    checkpoint: str | None = Field(None, max_length=4096, description="path; default: the configured one")


class ReloadResponse(BaseModel):
    model_version: str
    previous_version: str | None
    took_ms: float


class Health(BaseModel):
    status: Literal["ok", "loading", "failed"]
    model_version: str | None = None
    device: str | None = None
    users: int | None = None
    items: int | None = None
    interactions: int | None = None
    feedback_events: int | None = None
    uptime_s: float
    detail: str | None = None


class FieldError(BaseModel):
    type: str
    loc: list[str | int]
    msg: str


class InvalidRequest(BaseModel):
    """422 for a body that is not JSON or does not match the request model (inputs are never echoed)."""
    detail: list[FieldError]


class UnknownIdsDetail(BaseModel):
    message: str
    field: str = Field(description="candidates or exclude")
    unknown: list[str] = Field(description="the ids the model does not know (at most 1000)")


class UnknownIdsError(BaseModel):
    """422 for candidate or exclude ids the model does not know (unless ignore_unknown)."""
    detail: UnknownIdsDetail
