"""`python -m app`: serve the configured checkpoint with uvicorn (settings from CMN_* environment variables)."""
import sys

import uvicorn

from app.settings import Settings
from model.checkpoint import CheckpointError, load_checkpoint


def main() -> int:
    settings = Settings()
    try:  # fail fast, in one line, on a checkpoint that can never load
        load_checkpoint(settings.checkpoint)
    except CheckpointError as e:
        print(f"error: {e} (set CMN_CHECKPOINT, or train one: python -m training train --out "
              f"{settings.checkpoint})", file=sys.stderr)
        return 2
    uvicorn.run("app.main:app", host=settings.host, port=settings.port, log_config=None, access_log=False,
                timeout_graceful_shutdown=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
