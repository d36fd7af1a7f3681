"""Every knob of the server, read once from the environment (prefix CMN_)."""
from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CMN_", env_file=".env", extra="ignore")

    checkpoint: str = Field("artifacts/model.ckpt", description="path of the checkpoint to serve")
    device: str = Field("auto", description="auto (cuda if available), cpu or cuda[:N]")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    threads: int = Field(0, ge=0, description="torch intra-op threads; 0 = torch's default")

    max_batch: int = Field(64, ge=1, description="most requests scored in one model call: concurrent requests are "
                                                   "batched up to this, and a larger /recommend/batch is split")
    max_wait_ms: float = Field(0.0, ge=0, description="extra wait to fill a batch when the device is idle")
    max_queue: int = Field(1024, ge=1, description="queued requests before 503 + Retry-After")
    max_body_bytes: int = Field(1_000_000, ge=1024)
    explain_top: int = Field(5, ge=1, le=100, description="neighbours listed per item with explain")

    allow_explain: bool = Field(False, description="explanations reveal other users' ids: off unless enabled")
    api_key: SecretStr | None = Field(None, description="X-API-Key for /admin routes; unset disables them")
    feedback_path: str = Field("artifacts/feedback.sqlite3", description="durable feedback store")
    log_level: str = "info"
    warmup_calls: int = Field(3, ge=0)

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_no_key(cls, v):
        return None if v is None or (isinstance(v, str) and not v.strip()) else v
