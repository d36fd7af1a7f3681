"""`python -m app`: serve the configured checkpoint with uvicorn (settings from CMN_* environment variables)."""
import signal
import sys

import uvicorn

from app.main import create_app
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
    # uvicorn drains in-flight requests and runs the lifespan shutdown on SIGTERM, then re-raises the signal, which
    # (default handler) would end a cleanly stopped server with status 143; exit 0 instead.
    signal.signal(signal.SIGTERM, _stopped)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None, access_log=False,
                timeout_graceful_shutdown=30)
    return 0


def _stopped(signum, frame):
    raise SystemExit(0)


if __name__ == "__main__":
    raise SystemExit(main())
