"""Every knob of the server, read from CMN_* environment variables (and .env) by `from_environment`, once per
process. The fields live in one group per concern (server, model, limits, auth, store); `Settings` is all of them,
so each variable keeps its flat name (CMN_PORT, not CMN_SERVER__PORT: deployments set these names) and code reads
`settings.port`. docs/settings.md is generated from these classes: `python -m app.settings --markdown`.
"""
from __future__ import annotations

import argparse
import os
import sys
from functools import lru_cache

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

CONFIG = SettingsConfigDict(env_prefix="CMN_", env_file=".env", extra="ignore")


class ServerSettings(BaseSettings):
    """The HTTP server of `python -m app`: where it listens, its processes and threads, and its connections."""
    model_config = CONFIG

    host: str = Field("127.0.0.1", description="address `python -m app` listens on")
    port: int = Field(8000, ge=1, le=65535, description="port `python -m app` listens on")
    workers: int = Field(1, ge=1, le=64, description="worker processes of `python -m app` (uvicorn's), each with "
                         "its own model copy and model thread; torch threads are shared out between them")
    threads: int = Field(0, ge=0, description="torch intra-op threads; 0 = torch's default")
    max_header_bytes: int = Field(16_384, ge=1024, description="largest request line + headers (then 431)")
    header_timeout_s: float = Field(10.0, gt=0, description="time a connection has to send a whole request head")
    body_timeout_s: float = Field(30.0, gt=0, description="time a request has to send its whole body (then 408)")
    keep_alive_s: float = Field(5.0, gt=0, description="idle time before a keep-alive connection is closed")
    limit_concurrency: int = Field(256, ge=1, description="requests in progress (body read, answer not yet "
                                   "sent) before 503 + Retry-After; idle connections do not count, and /health "
                                   "and /livez are never refused")
    max_connections: int = Field(1024, ge=1, description="open connections of `python -m app` (per worker); past "
                                 "it the one that has waited longest for a request head is closed")
    forwarded_allow_ips: str = Field("", description="addresses (comma-separated IPs or networks, or *) of the "
                                     "proxies whose X-Forwarded-For and X-Forwarded-Proto `python -m app` "
                                     "believes; empty: none, a client's address is its connection's")
    log_level: str = Field("info", description="server log level (debug, info, warning, error)")


class ModelSettings(BaseSettings):
    """The checkpoint served, where it runs, and what it may create online."""
    model_config = CONFIG

    checkpoint: str = Field("artifacts/model.ckpt", description="path of the checkpoint to serve")
    checkpoint_dir: str | None = Field(None, description="the only directory /admin/reload loads a named file from "
                                                         "(symlinks resolved); default: CMN_CHECKPOINT's directory")
    max_checkpoint_bytes: int = Field(2 * 1024 ** 3, ge=1024, description="largest checkpoint file loaded")
    device: str = Field("auto", description="auto (cuda if available), cpu or cuda[:N]")
    graph_catalogue: bool = Field(False, description="score whole-catalogue requests on CUDA through the "
                                  "graph-captured route (model/scoring/graphed.py); off until measured on a GPU")
    warmup_calls: int = Field(3, ge=0, description="rounds of real calls on every scoring route after a load, "
                              "before the model serves (first requests then pay for no lazily built cache)")
    explain_top: int = Field(5, ge=1, le=100, description="neighbours listed per item with explain")
    max_live_users: int = Field(10_000, ge=0, description="users feedback may create in a process before the next "
                                "training run; past it their events are stored and deferred to that run")
    max_live_items: int = Field(1_000, ge=0, description="items feedback may create likewise")
    max_popularity_gain: int = Field(50, ge=0, description="how much feedback may raise an item's popularity (the "
                                     "order of the fallback list unknown users get) over its trained count before the "
                                     "next training run, whoever sends it; the events themselves are all stored and "
                                     "trained on")
    feedback_neighbours_cap: int = Field(200, ge=1, description="users feedback may put into an item's "
                                         "neighbourhood N(i) (or its trained size, if larger) before its oldest drop, "
                                         "for a model trained without --max-neighbours (one trained with a cap keeps "
                                         "its own)")

    @model_validator(mode="after")
    def _checkpoint_dir_defaults_to_the_checkpoints(self):
        if self.checkpoint_dir is None:
            self.checkpoint_dir = os.path.dirname(os.path.abspath(self.checkpoint))
        return self


class LimitSettings(BaseSettings):
    """What one request may cost, and how much work may wait for the model thread."""
    model_config = CONFIG

    max_batch: int = Field(64, ge=1, description="most requests scored in one model call: concurrent requests are "
                                                   "batched up to this, and a larger /recommend/batch is split")
    max_wait_ms: float = Field(0.0, ge=0, description="extra wait to fill a batch when the device is idle")
    max_queue_pairs: int = Field(20_000_000, ge=1, description="work waiting for the model thread, in scored "
                                 "pairs, before 503 + Retry-After: a whole-catalogue request counts the catalogue, a "
                                 "candidate request its candidates, a fold-in its measured cost in pairs (replaces "
                                 "CMN_MAX_QUEUE, which counted requests)")
    foldin_pairs: int = Field(30_000, ge=1, description="what fitting one `history` (fold-in) costs, in scored "
                              "pairs, until the model thread has measured it (then: its seconds per fold-in times its "
                              "pairs per second); `python -m benchmarks.cost --measure-only` measures it for a model")
    max_call_ms: float = Field(50.0, gt=0, description="most work in one model call, in milliseconds at the model "
                               "thread's measured rate (a request costing more is scored alone, a batch is split): "
                               "with the queue served round-robin by key, what a request waits for behind another "
                               "key's work is one such call")
    max_key_backlog_s: float = Field(1.0, gt=0, description="most work one key may have waiting for the model "
                                     "thread, in seconds at its measured rate, before 429 + Retry-After (with "
                                     "CMN_AUTH_FILE): a key cannot fill the queue others need")
    max_total_k: int = Field(10_000, ge=1, description="largest sum of k over one request (/recommend/batch)")
    max_explain_k: int = Field(20, ge=1, description="largest k of a request with explain")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="largest request body (then 413)")
    max_history: int = Field(500, ge=1, le=10_000, description="most items in a request's `history` (each is "
                             "folded in: its cost grows with the history)")
    max_batch_history: int = Field(5_000, ge=1, description="most `history` items over one /recommend/batch (then "
                                   "422): every history is folded in on the model thread")


class AuthSettings(BaseSettings):
    """Keys, scopes and per-key quotas (app/auth.py, docs/security.md)."""
    model_config = CONFIG

    auth_file: str | None = Field(None, description="API keys, one '<sha256 hex> <scopes> [name]' a line; unset: "
                                                    "auth off (quick start on loopback)")
    api_key: SecretStr | None = Field(None, description="X-API-Key for /admin routes; unset (and no "
                                                        "CMN_AUTH_FILE) disables them")
    allow_explain: bool = Field(False, description="explanations reveal other users' ids: off unless enabled")
    metrics_open: bool = Field(False, description="/metrics needs no key even with CMN_AUTH_FILE")
    rate_per_s: float = Field(50.0, ge=0, description="requests per second per key (token bucket; 0: no limit)")
    rate_burst: int = Field(100, ge=1, description="requests a key may send at once, past its rate")
    pairs_per_s: float = Field(2_000_000, ge=0, description="work per key per second, in scored pairs (a fold-in "
                               "at its measured cost), before 429 + Retry-After (token bucket; 0: no limit)")
    pairs_burst: int = Field(10_000_000, ge=1, description="work, in scored pairs, a key may queue at once past its "
                             "rate; a request costing more is a 413")
    feedback_events_per_min: int = Field(6000, ge=0, description="feedback events per key per minute (0: no limit)")
    feedback_per_user_per_hour: int = Field(100, ge=0, description="feedback events one key may send for one user "
                                            "per hour (0: no limit): how fast a key can rewrite one user's list")
    unknown_events_per_min: int = Field(1000, ge=0, description="feedback events naming a user or item the model "
                                                                "does not know, per key per minute (0: no limit)")
    auth_failures_per_min: int = Field(10, ge=0, description="wrong keys per client address per minute before "
                                                             "429 (0: no limit)")
    exclude_without_history: int = Field(100, ge=0, description="most exclude ids in a request of a key without "
                                                                "the history scope")

    @field_validator("api_key", "auth_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, v):
        return None if v is None or (isinstance(v, str) and not v.strip()) else v


class StoreSettings(BaseSettings):
    """The feedback store every process shares, and how closely each follows it."""
    model_config = CONFIG

    feedback_path: str = Field("artifacts/feedback.sqlite3", description="the SQLite feedback store's file, when "
                               "CMN_FEEDBACK_URL is unset")
    feedback_url: str | None = Field(None, description="the durable feedback store every process shares: "
                                     "sqlite:///relative/path, sqlite:////absolute/path or postgresql://user@host/db "
                                     "(needs the `pg` extra); unset: CMN_FEEDBACK_PATH")
    feedback_poll_s: float = Field(0.1, gt=0, le=60, description="how often each process reads the events other "
                                   "processes stored, and the active checkpoint")
    max_lag_s: float = Field(5.0, gt=0, description="/health is degraded when this process has not read the store "
                             "to its end for this long")

    @field_validator("feedback_url", mode="before")
    @classmethod
    def _store_url(cls, v):
        if v is None or (isinstance(v, str) and not v.strip()):
            return None
        if not v.startswith(("sqlite://", "postgresql://", "postgres://")):
            raise ValueError("CMN_FEEDBACK_URL must start with sqlite://, postgresql:// or postgres://")
        return v

    @property
    def store_url(self) -> str:
        """The feedback store to open: CMN_FEEDBACK_URL, else the file CMN_FEEDBACK_PATH names."""
        return self.feedback_url or self.feedback_path


class OnlineSettings(BaseSettings):
    """Impressions (what was shown, joined with feedback for online metrics) and experiments (app/impressions.py,
    app/experiments.py, docs/api.md#impressions-and-experiments)."""
    model_config = CONFIG

    impression_sample: float = Field(1.0, ge=0, le=1, description="fraction of answers recorded as impressions "
                                     "(0: none). Every answer carries an impression_id; feedback naming one that "
                                     "was not recorded is stored, unjoined")
    impression_flush_s: float = Field(0.5, gt=0, le=60, description="how often each process writes the "
                                      "impressions it recorded to the store (one transaction, off the request path)")
    impression_buffer: int = Field(100_000, ge=1, description="impressions waiting to be written, per process; "
                                   "past it (the store cannot be written) the oldest are dropped and counted")
    impression_retention_days: float = Field(30.0, gt=0, description="impressions older than this are removed "
                                             "from the store (with the clicks on them)")
    impression_max_rows: int = Field(10_000_000, ge=1, description="most impressions the store keeps; the oldest "
                                     "go first")
    experiment_file: str | None = Field(None, description="a JSON experiment (arms: strategy, share, optional "
                                        "model_version and checkpoint); re-read when it changes; unset: no "
                                        "experiment")
    max_arm_models: int = Field(2, ge=0, description="model versions loaded beside the served one for experiment "
                                "arms, each as large in memory as the served model; an arm past it serves nobody")

    @field_validator("experiment_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, v):
        return None if v is None or (isinstance(v, str) and not v.strip()) else v


GROUPS = {"server": ServerSettings, "model": ModelSettings, "limits": LimitSettings, "auth": AuthSettings,
          "store": StoreSettings, "online": OnlineSettings}


class Settings(ServerSettings, ModelSettings, LimitSettings, AuthSettings, StoreSettings, OnlineSettings):
    """Every group's fields, flat."""
    model_config = CONFIG


@lru_cache(maxsize=1)
def from_environment() -> Settings:
    """The process's settings, read once: the module-level app, `python -m app` and each worker's protocol share it."""
    return Settings()


def markdown() -> str:
    """docs/settings.md: one table per group, every field with its variable, type, default and description."""
    out = ["# Settings", "",
           "Generated from [app/settings.py](../app/settings.py) by `python -m app.settings --markdown > "
           "docs/settings.md`;", "tests/api/test_settings.py fails when this file and the code disagree.",
           "Every setting is an environment variable (or a line of `.env`). The names docker-compose.yml reads "
           "itself", "(`CMN_API_REPLICAS`, `CMN_DATA`, ...) are in [deploy.md](deploy.md#settings).", ""]
    for group, cls in GROUPS.items():
        out += [f"## {group}", "", cls.__doc__.strip(), "", "| variable | type | default | description |",
                "|---|---|---|---|"]
        for name in cls.__annotations__:
            field = cls.model_fields[name]
            out.append(f"| `CMN_{name.upper()}` | {type_name(field.annotation)} | {default_of(field)} | "
                       f"{field.description} |")
        out.append("")
    return "\n".join(out)


def type_name(annotation) -> str:
    return str(annotation).replace("pydantic.types.", "").replace("<class '", "").replace("'>", "")


def default_of(field) -> str:
    if field.default is None:
        return "unset"
    if isinstance(field.default, int) and not isinstance(field.default, bool) and field.default >= 10_000:
        return f"`{field.default:_}`"
    return f"`{str(field.default).lower() if isinstance(field.default, bool) else field.default}`"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m app.settings", description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print the settings reference (docs/settings.md)")
    args = parser.parse_args()
    print(markdown() if args.markdown else from_environment().model_dump_json(indent=2), file=sys.stdout)
