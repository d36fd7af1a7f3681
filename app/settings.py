"""Every knob of the server, read once from the environment (prefix CMN_)."""
from __future__ import annotations

import os

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CMN_", env_file=".env", extra="ignore")

    checkpoint: str = Field("artifacts/model.ckpt", description="path of the checkpoint to serve")
    checkpoint_dir: str | None = Field(None, description="the only directory /admin/reload loads a named file from "
                                                         "(symlinks resolved); default: CMN_CHECKPOINT's directory")
    max_checkpoint_bytes: int = Field(2 * 1024 ** 3, ge=1024, description="largest checkpoint file loaded")
    device: str = Field("auto", description="auto (cuda if available), cpu or cuda[:N]")
    graph_catalogue: bool = Field(False, description="score whole-catalogue requests on CUDA through the "
                                  "graph-captured route (model/scoring/graphed.py); off until measured on a GPU")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    threads: int = Field(0, ge=0, description="torch intra-op threads; 0 = torch's default")

    max_batch: int = Field(64, ge=1, description="most requests scored in one model call: concurrent requests are "
                                                   "batched up to this, and a larger /recommend/batch is split")
    max_wait_ms: float = Field(0.0, ge=0, description="extra wait to fill a batch when the device is idle")
    max_queue_pairs: int = Field(20_000_000, ge=1, description="(user, item) pairs waiting to be scored before "
                                 "503 + Retry-After: a whole-catalogue request counts the catalogue, a candidate "
                                 "request its candidates (replaces CMN_MAX_QUEUE, which counted requests)")
    max_total_k: int = Field(10_000, ge=1, description="largest sum of k over one request (/recommend/batch)")
    max_explain_k: int = Field(20, ge=1, description="largest k of a request with explain")
    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_header_bytes: int = Field(16_384, ge=1024, description="largest request line + headers")
    header_timeout_s: float = Field(10.0, gt=0, description="time a connection has to send a whole request head")
    body_timeout_s: float = Field(30.0, gt=0, description="time a request has to send its whole body (then 408)")
    keep_alive_s: float = Field(5.0, gt=0, description="idle time before a keep-alive connection is closed")
    limit_concurrency: int = Field(256, ge=1, description="open connections + requests in progress before "
                                                           "uvicorn answers 503")
    explain_top: int = Field(5, ge=1, le=100, description="neighbours listed per item with explain")
    max_history: int = Field(500, ge=1, le=10_000, description="most items in a request's `history` (each is "
                             "folded in: its cost grows with the history)")
    max_live_users: int = Field(10_000, ge=0, description="users feedback may create in a process before the next "
                                "training run; past it their events are stored and deferred to that run")
    max_live_items: int = Field(1_000, ge=0, description="items feedback may create likewise")

    allow_explain: bool = Field(False, description="explanations reveal other users' ids: off unless enabled")
    api_key: SecretStr | None = Field(None, description="X-API-Key for /admin routes; unset (and no "
                                                        "CMN_AUTH_FILE) disables them")
    feedback_path: str = Field("artifacts/feedback.sqlite3", description="the SQLite feedback store's file, when "
                               "CMN_FEEDBACK_URL is unset")
    feedback_url: str | None = Field(None, description="the durable feedback store every process shares: "
                                     "sqlite:///relative/path, sqlite:////absolute/path or postgresql://user@host/db; "
                                     "unset: CMN_FEEDBACK_PATH")
    feedback_poll_s: float = Field(0.1, gt=0, le=60, description="how often each process reads the events other "
                                   "processes stored, and the active checkpoint")
    max_lag_s: float = Field(5.0, gt=0, description="/health is degraded when this process has not read the store "
                             "to its end for this long")
    workers: int = Field(1, ge=1, le=64, description="worker processes of `python -m app` (uvicorn's), each with "
                         "its own model copy and model thread; torch threads are shared out between them")

    # auth and quotas (app/auth.py, docs/security.md)
    auth_file: str | None = Field(None, description="API keys, one '<sha256 hex> <scopes> [name]' a line; unset: "
                                                    "auth off (quick start on loopback)")
    metrics_open: bool = Field(False, description="/metrics needs no key even with CMN_AUTH_FILE")
    rate_per_s: float = Field(50.0, ge=0, description="requests per second per key (token bucket; 0: no limit)")
    rate_burst: int = Field(100, ge=1, description="requests a key may send at once, past its rate")
    feedback_events_per_min: int = Field(6000, ge=0, description="feedback events per key per minute (0: no limit)")
    unknown_events_per_min: int = Field(1000, ge=0, description="feedback events naming a user or item the model "
                                                                "does not know, per key per minute (0: no limit)")
    auth_failures_per_min: int = Field(10, ge=0, description="wrong keys per client address per minute before "
                                                             "429 (0: no limit)")
    exclude_without_history: int = Field(100, ge=0, description="most exclude ids in a request of a key without "
                                                                "the history scope")
    dedup_window_s: float = Field(3600.0, ge=0, description="an event without event_id repeating the same key, "
                                                            "user and item within this window is a duplicate")
    log_level: str = "info"
    warmup_calls: int = Field(3, ge=0)

    @model_validator(mode="after")
    def _checkpoint_dir_defaults_to_the_checkpoints(self):
        if self.checkpoint_dir is None:
            self.checkpoint_dir = os.path.dirname(os.path.abspath(self.checkpoint))
        return self

    @field_validator("feedback_url")
    @classmethod
    def _store_url(cls, v):
        if v is not None and not v.startswith(("sqlite://", "postgresql://", "postgres://")):
            raise ValueError("CMN_FEEDBACK_URL must start with sqlite://, postgresql:// or postgres://")
        return v

    @property
    def store_url(self) -> str:
        """The feedback store to open: CMN_FEEDBACK_URL, else the file CMN_FEEDBACK_PATH names."""
        return self.feedback_url or self.feedback_path

    @field_validator("api_key", "auth_file", "feedback_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, v):
        return None if v is None or (isinstance(v, str) and not v.strip()) else v
