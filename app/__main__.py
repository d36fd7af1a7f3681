"""`python -m app`: serve the configured checkpoint with uvicorn (settings from CMN_* environment variables)."""
# threads first: libgomp reads its environment once, when torch loads it (model/threads.py)
from model.threads import configure

configure()

import os
import signal
import sys

import uvicorn

from app.main import create_app
from app.protocol import server_options
from app.settings import Settings
from model.checkpoint import CheckpointError, load_checkpoint


def main() -> int:
    settings = Settings()
    try:  # fail fast, in one line, on a checkpoint that can never load
        load_checkpoint(settings.checkpoint, settings.max_checkpoint_bytes)
    except CheckpointError as e:
        print(f"error: {e} (set CMN_CHECKPOINT, or train one: python -m training train --out "
              f"{settings.checkpoint})", file=sys.stderr)
        return 2
    if "CMN_MAX_QUEUE" in os.environ:  # the setting it replaces: ignoring it silently would lift an operator's limit
        print("warning: CMN_MAX_QUEUE (requests) is no longer read; the queue is bounded by CMN_MAX_QUEUE_PAIRS "
              f"((user, item) pairs waiting to be scored, now {settings.max_queue_pairs})", file=sys.stderr)
    # uvicorn drains in-flight requests and runs the lifespan shutdown on SIGTERM, then re-raises the signal, which
    # (default handler) would end a cleanly stopped server with status 143; exit 0 instead.
    signal.signal(signal.SIGTERM, _stopped)
    uvicorn.run(create_app(settings), **server_options(settings))
    return 0


def _stopped(signum, frame):
    raise SystemExit(0)


if __name__ == "__main__":
    raise SystemExit(main())
