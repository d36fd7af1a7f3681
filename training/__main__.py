# threads first: libgomp reads its environment once, when torch loads it (model/threads.py)
from model.threads import configure

configure()

from training.cli import main

raise SystemExit(main())
