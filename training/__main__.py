# threads first: libgomp reads its environment once, when torch loads it (model/threads.py)
from model.threads import TRAINING_THREADS, configure

configure(threads=TRAINING_THREADS)

from training.cli import main

raise SystemExit(main())
