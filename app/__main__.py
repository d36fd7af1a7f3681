"""`python -m app`: serve app.main's `app` with uvicorn, with this server's options (app/protocol.py: its host,
port, workers, head timeouts and connection limits from CMN_* variables), after checking that the checkpoint loads
and sharing the CPUs out between workers. `uvicorn app.main:app` serves the same app with uvicorn's defaults."""
# threads first: libgomp reads its environment once, when torch loads it (model/threads.py); worker processes
# inherit the environment, so each gets its share of the CPUs
import os

from model.threads import available_cpus, configure


def _workers() -> int:
    try:  # Settings validates it (and explains a bad value) once torch may load
        return max(1, int(os.environ.get("CMN_WORKERS", "1")))
    except ValueError:
        return 1


configure(threads=max(1, available_cpus() // _workers()))

import signal
import sys
import tempfile

import uvicorn

from app.experiments import ExperimentFileError, read_experiment
from app.main import app
from app.protocol import server_options
from model.store.checkpoint import CheckpointError, load_checkpoint


def main() -> int:
    settings = app.state.settings
    try:  # fail fast, in one line, on a checkpoint that can never load
        load_checkpoint(settings.checkpoint, settings.max_checkpoint_bytes)
    except CheckpointError as e:
        print(f"error: {e} (set CMN_CHECKPOINT, or train one: python -m training train --out "
              f"{settings.checkpoint})", file=sys.stderr)
        return 2
    if settings.experiment_file:  # likewise an experiment file that cannot be used (each worker reads it again)
        try:
            read_experiment(settings.experiment_file)
        except ExperimentFileError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if "CMN_MAX_QUEUE" in os.environ:  # the setting it replaces: ignoring it silently would lift an operator's limit
        print("warning: CMN_MAX_QUEUE (requests) is no longer read; the queue is bounded by CMN_MAX_QUEUE_PAIRS "
              f"((user, item) pairs waiting to be scored, now {settings.max_queue_pairs})", file=sys.stderr)
    # uvicorn drains in-flight requests and runs the lifespan shutdown on SIGTERM, then re-raises the signal, which
    # (default handler) would end a cleanly stopped server with status 143; exit 0 instead.
    signal.signal(signal.SIGTERM, _stopped)
    if settings.workers == 1:
        uvicorn.run(app, **server_options(settings))
    else:  # uvicorn's supervisor: it restarts a worker that dies, and SIGHUP restarts them all, one at a time
        # one metrics directory for all workers (app/metrics.py), made before they start and import the client
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="cmn-metrics-"))
        uvicorn.run("app.main:app", workers=settings.workers, **server_options(settings))
    return 0


def _stopped(signum, frame):
    raise SystemExit(0)


if __name__ == "__main__":
    raise SystemExit(main())
