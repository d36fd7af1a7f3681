"""`python -m training compare`: every peer is ranked by training/evaluate.py on the data's test split, and a peer's
hyperparameters are the validation split's best (never the test split's)."""
import json

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
    by_l2 = {l2: evaluate(EASE(fit.train, fit.n_users, fit.n_items, l2=l2), fit.test, fit.train)["full"]["ndcg@10"]
             for l2 in EASE.grid["l2"]}
    assert rows["ease"]["params"]["l2"] == max(by_l2, key=by_l2.get)   # the first of equals, in the grid's order
    assert len(set(by_l2.values())) > 1, "a grid whose settings change nothing checks nothing"
    ease = EASE(data.train, data.n_users, data.n_items, l2=rows["ease"]["params"]["l2"])
    assert rows["ease"]["metrics"] == evaluate(ease, data.test, data.train)
    assert all(0 <= r["metrics"]["full"]["ndcg@10"] <= 1 for r in rows.values())


def test_compare_cli_prints_one_json_table():
    done = run_cli("compare", "--data", "synthetic:n_users=60,n_items=80,per_user=6", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout)
    assert {"ease", "ials", "rp3beta"} <= rows.keys() and "validation full NDCG@10" in done.stderr
