"""The HTTP contract (v1) as pydantic models; see docs/api.md."""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator,
                      model_validator)

ID_MAX_CHARS = 256
IMPRESSION_ID = r"^[A-Za-z0-9_-]{1,64}$"


def _short_int(value: int) -> int:
    # an integer id is the string it prints as, so it has the string's length limit (JSON integers are unbounded)
    if len(str(value)) > ID_MAX_CHARS:
        raise ValueError(f"an integer id has at most {ID_MAX_CHARS} characters")
    return value


# Ids arrive as JSON strings or integers; both name the same entity ("123" == 123).
ExternalId = Annotated[Union[Annotated[StrictStr, Field(min_length=1, max_length=ID_MAX_CHARS)],
                             Annotated[StrictInt, AfterValidator(_short_int)]],
                       Field(description="external id, as in the training data (string or integer, at most "
                                         f"{ID_MAX_CHARS} characters)")]


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

    user_id: ExternalId | None = Field(None, description="absent: an anonymous session, personalised from `history`")
    k: int = Field(10, ge=1, le=1000, description="number of items to return")
    history: list[ExternalId] | None = Field(
        None, min_length=1, max_length=10_000,
        description="items the user interacted with (at most CMN_MAX_HISTORY): an unknown or absent user_id gets a "
                    "list personalised by fold-in (nothing is stored); a known user's list also leaves these out "
                    "(counted with `exclude` against CMN_EXCLUDE_WITHOUT_HISTORY without the history scope)")
    candidates: list[ExternalId] | None = Field(
        None, min_length=1, max_length=10_000, description="score only these items; absent = whole catalogue")
    exclude_seen: bool = Field(True, description="drop the user's training and fed-back items")
    exclude: list[ExternalId] = Field(default_factory=list, max_length=10_000, description="items to drop")
    explain: bool = Field(False, description="attach the most attended neighbour users (needs CMN_ALLOW_EXPLAIN)")
    ignore_unknown: bool = Field(False, description="drop unknown candidate/exclude ids instead of answering 422")
    after_seq: int | None = Field(
        None, ge=0, le=2 ** 63 - 1, description="answer from a state that includes the feedback store's event "
        "`seq` (from a /feedback answer): read-your-writes whichever process or replica answers")
    strategy: Literal["full", "two_stage", "retrieval"] | None = Field(
        None, description="full: CMN over the whole catalogue; two_stage: the retrieval stage proposes R items and CMN "
                          "re-ranks them; retrieval: the retrieval stage alone; default: the one chosen on validation at "
                          "training (two_stage or retrieval) when the model has a retrieval stage, else full")

    @field_validator("user_id", mode="after")
    @classmethod
    def _user(cls, v):
        return None if v is None else as_str(v)

    @model_validator(mode="after")
    def _someone(self):
        if self.user_id is None and self.history is None:
            raise ValueError("give a user_id, a history (an anonymous session), or both")
        return self

    @field_validator("history", mode="after")
    @classmethod
    def _history(cls, v):
        return None if v is None else list(dict.fromkeys(as_strs(v)))  # a repeat adds nothing to a history

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
    live: bool | None = Field(None, description="true: a user created from feedback since the last training run")


class ScoredItem(BaseModel):
    item_id: str
    score: float
    live: bool | None = Field(None, description="true: an item created from feedback since the last training run "
                                                "(its embedding was fitted online; absent otherwise)")
    explanation: list[Neighbour] | None = None


class RecommendResponse(BaseModel):
    user_id: str | None
    items: list[ScoredItem]
    model_version: str
    fallback: Literal["unknown_user"] | None = None
    cold_start: Literal["fold_in", "live_user"] | None = Field(
        None, description="fold_in: personalised from the request's history by fitting the user's memory rows to "
                          "it (nothing stored); live_user: a user created from feedback since the last training run")
    strategy: Literal["full", "two_stage", "retrieval"] | None = Field(
        None, description="how a personalised list was ranked (absent for a fallback)")
    impression_id: str = Field(description="names this list: send it (and the item's position) with the feedback "
                                           "it leads to, for the online metrics")
    arm: str | None = Field(None, description="the experiment arm that served the list (absent: none)")
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
        None, description="client id that makes retries idempotent: unique per API key; the same id with another "
                          "user, item or timestamp is a 409")
    impression_id: Annotated[str, Field(pattern=IMPRESSION_ID)] | None = Field(
        None, description="the /recommend answer's impression_id this event responds to (online metrics); an id "
                          "the service has not recorded is stored all the same, unjoined")
    position: int | None = Field(None, ge=1, le=1000, description="the item's position in that list, 1 first "
                                                                  "(needs impression_id)")

    @model_validator(mode="after")
    def _position_names_a_list(self):
        if self.position is not None and self.impression_id is None:
            raise ValueError("position needs the impression_id of the list it is a position in")
        return self


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    events: list[FeedbackEvent] = Field(min_length=1, max_length=1000)


class FeedbackResponse(BaseModel):
    stored: int = Field(description="events written durably by this call")
    duplicates: int = Field(description="events that change nothing: an event_id already stored, or a user and "
                                        "item this key has already fed back (its event_id is recorded)")
    applied: int = Field(description="events now visible to recommendations (known user and item)")
    deferred: int = Field(description="events this process could not apply (live-user or live-item bound reached): "
                                      "stored, folded in by the next training run")
    unjoined: int = Field(0, description="events naming an impression_id that does not join (yet): not recorded "
                                         "(sampling), not written yet by another process, pruned, or a list without "
                                         "that user or item; stored all the same")
    seq: int | None = Field(None, description="the store's sequence number once these events are in it: a "
                                              "/recommend with this `after_seq` is answered only from a state that "
                                              "includes them, by any process")
    note: str | None = None


class FeedbackConflictDetail(BaseModel):
    message: str
    event_ids: list[str] = Field(description="the first event ids already used for another event (at most 10)")
    count: int = Field(description="how many event ids of the request conflict")


class FeedbackConflict(BaseModel):
    """409: event ids this key already used for another event; nothing of the request was stored."""
    detail: FeedbackConflictDetail


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    checkpoint: str | None = Field(None, max_length=4096,
                                   description="a checkpoint file in CMN_CHECKPOINT_DIR: a name relative to it, or an "
                                               "absolute path inside it; default: the configured CMN_CHECKPOINT")


class ReloadResponse(BaseModel):
    model_version: str
    previous_version: str | None
    took_ms: float
    rollout: Literal["published", "local"] = Field(
        description="published: recorded in the feedback store, every process sharing it loads it within the lag "
                    "bound; local: this process only (the store could not be written, see note)")
    note: str | None = None


class Rollout(BaseModel):
    id: int = Field(description="the newest checkpoint published in the store that this process acted on")
    model_version: str
    status: Literal["ok", "failed"] = Field(description="failed: this process could not load it and keeps "
                                                        "serving its model (detail says why)")
    detail: str | None = None


class ArmModel(BaseModel):
    model_version: str = Field(description="the version an experiment arm serves beside the served model")
    status: Literal["ok", "failed"] = Field(description="failed: it could not be loaded here, and the arm's users "
                                                        "are served as outside the experiment (detail says why)")
    detail: str | None = None


class Health(BaseModel):
    status: Literal["ok", "degraded", "loading", "failed"] = Field(
        description="degraded: recommendations are served, but the feedback store cannot be written or read, or "
                    "this process lags behind it by more than CMN_MAX_LAG_S (see detail)")
    store: Literal["ok", "not_writable", "unreachable"] | None = Field(
        None, description="not_writable: /feedback cannot store events; unreachable: the store cannot be read either")
    applied_seq: int | None = Field(None, description="sequence number of the last stored event applied here")
    lag_s: float | None = Field(None, description="time since this process last read the store to its end")
    rollout: Rollout | None = None
    arm_models: list[ArmModel] = Field(default_factory=list, description="the other model versions this process "
                                       "loaded for experiment arms (app/experiments.py)")
    worker: str | None = Field(None, description="who answered: host name and process id (replicas and "
                                                 "CMN_WORKERS > 1 run several)")
    model_version: str | None = None
    device: str | None = None
    users: int | None = None
    items: int | None = None
    interactions: int | None = None
    live_users: int | None = Field(None, description="users (of `users`) created from feedback since training")
    live_items: int | None = Field(None, description="items (of `items`) created from feedback since training")
    feedback_events: int | None = None
    uptime_s: float
    detail: str | None = None
    warnings: list[str] = Field(default_factory=list, description="about the served model, e.g. its stored test "
                                                                   "metrics rank it below popularity")


class Liveness(BaseModel):
    status: Literal["alive"]


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
    unknown: list[str] = Field(description="the first ids the model does not know (at most 20)")
    unknown_count: int = Field(description="how many ids of the field the model does not know")


class UnknownIdsError(BaseModel):
    """422 for candidate or exclude ids the model does not know (unless ignore_unknown)."""
    detail: UnknownIdsDetail


class ArmStatus(BaseModel):
    name: str
    strategy: str
    share: float
    model_version: str | None = None
    stopped: bool


class ExperimentStatus(BaseModel):
    name: str | None = Field(description="the experiment running; null: none (CMN_EXPERIMENT_FILE unset)")
    arms: list[ArmStatus] = Field(default_factory=list)
