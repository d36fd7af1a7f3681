# threads first: libgomp reads its environment once, when torch loads it (model/threads.py)
import sys

from model.threads import TRAINING_THREADS, configure

# `export` ranks the whole catalogue for batches of users, the server's work (large matrix products): it gets every
# available CPU, as `python -m app` does; training's small ops run best on one
configure(threads=None if sys.argv[1:2] == ["export"] else TRAINING_THREADS)

from training.cli import main

raise SystemExit(main())
