"""`python -m training compare`: every peer is ranked by training/evaluate.py on the data's test split, and a peer's
hyperparameters are the validation split's best (never the test split's)."""
import itertools
import json

import numpy as np
import pytest

from conftest import run_cli
from training.baselines import EASE
from training.compare import run_compare
from training.data import holdout_validation, synthetic
from training.evaluate import evaluate


@pytest.fixture(scope="module")
def data():
    return synthetic(n_users=90, n_items=140, per_user=8)


def test_peers_are_the_evaluators_figures_with_validation_chosen_settings(data):
    rows = run_compare(data, log=lambda *_: None)
    assert {"toppop", "rp3beta", "itemknn", "ease", "ials"} <= rows.keys()
    fit = holdout_validation(data, 0)
    settings = [dict(zip(EASE.grid, values)) for values in itertools.product(*EASE.grid.values())]
    figures = [evaluate(EASE(fit.train, fit.n_users, fit.n_items, **setting), fit.test, fit.train)["full"]["ndcg@10"]
               for setting in settings]
    best = settings[int(np.argmax(figures))]   # the first of equals, in the grid's order
    assert {name: rows["ease"]["params"][name] for name in best} == best
    assert len(set(figures)) > 1, "a grid whose settings change nothing checks nothing"
    ease = EASE(data.train, data.n_users, data.n_items, **best)
    assert rows["ease"]["metrics"] == evaluate(ease, data.test, data.train)
    assert all(0 <= r["metrics"]["full"]["ndcg@10"] <= 1 for r in rows.values())


def test_compare_cli_prints_one_json_table():
    done = run_cli("compare", "--data", "synthetic:n_users=60,n_items=80,per_user=6", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout)
    assert {"ease", "ials", "rp3beta"} <= rows.keys() and "validation full NDCG@10" in done.stderr
