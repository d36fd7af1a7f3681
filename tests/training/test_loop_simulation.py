"""The closed loop, simulated over real HTTP (tests/harness/loop.py): users with hidden preferences click on what a
real server shows them, their clicks come back as feedback, and `Retrainer` rounds publish through the gate.

One run (about a minute on 2 shared cores: four trainings, a server), several assertions on it."""
import pytest

from tests.harness.loop import World, difference, experiment, first_model, run_loop, table
from tests.harness.servers import running_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loop")
    world = World(seed=0)
    checkpoint = first_model(world, tmp)
    with running_server(checkpoint, tmp, experiment_file=experiment(tmp, stopped=True)) as (url, _):
        result = run_loop(url, world, tmp, rounds=3, ab_rounds=4)
    print(table(result))
    return result


def test_online_ctr_rises_over_rounds_of_retraining(loop):
    assert [r.status for r in loop.retrains] == ["published"] * 3
    versions = [s.version for s in loop.rounds]
    assert len(set(versions)) == len(versions), versions   # each round served the model the last retrain published
    d, lo, hi = difference(loop.rounds[-1].rate, loop.rounds[0].rate)
    assert lo > 0, f"CTR {loop.rounds[0].rate.ctr:.4f} → {loop.rounds[-1].rate.ctr:.4f}, difference [{lo}, {hi}]"
    # the measured rise is the users' true preference rising, not luck of the clicks
    assert loop.rounds[-1].preference > loop.rounds[0].preference


def test_a_broken_candidate_is_refused_and_the_serving_model_stays(loop):
    assert loop.broken.status == "refused"
    assert loop.broken.version != loop.rounds[-1].version
    assert loop.serving_after_broken == loop.rounds[-1].version
    assert "below item popularity" in loop.broken.message and loop.rounds[-1].version in loop.broken.message


def test_the_ab_test_picks_the_strategy_users_truly_prefer(loop):
    """The experiment's arms, judged by the online report's numbers (impressions joined with feedback)."""
    ab = loop.ab
    assert set(ab["arms"]) == {"full", "retrieval"} and all(r["impressions"] > 0 for r in ab["arms"].values())
    assert ab["winner"] is not None, ab["comparison"]
    assert ab["winner"] == ab["true_winner"]
