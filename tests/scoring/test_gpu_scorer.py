"""The graph-captured full-catalogue route (model/scoring/graphed.py) must equal CMN.forward whatever the call size: a
call padded up to a captured batch size, one split over several, and after online feedback (which rebuilds its
buckets and drops its captures). On a CPU nothing is captured; the padding, chunking and rebuilding are the
same code as on a GPU."""
import numpy as np
import pytest
import torch

from conftest import item_user_csr, make_cmn, random_train
from model.scoring import Scorer
from model.scoring.graphed import GraphedCatalogue
from model.tables import Tables
from test_scorer_routes import D, LENGTHS, N_ITEMS, N_USERS, forward_all


@pytest.mark.parametrize("hops", [1, 2, 3])
def test_graphed_route_equals_forward_at_every_call_size(hops):
    train = random_train(np.random.default_rng(1), N_USERS, LENGTHS)
    model = make_cmn(N_USERS, N_ITEMS, D, hops, seed=hops)
    csr = item_user_csr(train, N_ITEMS, rng=np.random.default_rng(0))
    route = GraphedCatalogue.build(model, Tables.of(model), *csr, batch_sizes=(1, 4))
    for users in ([7], [0, 5, 17], [3, 1, 4, 1], [0, 5, 17, 39, 5, 8, 2, 30, 11]):   # 1; 3 → 4; 4; 9 → 4 + 4 + 1
        expected = forward_all(model, *csr, users)
        assert expected.std() > 0.1
        torch.testing.assert_close(route.score(torch.tensor(users)), expected, rtol=0, atol=1e-4)
    assert sorted(route.captured) == [1, 4]


def test_scorer_takes_the_graphed_route_and_follows_feedback():
    train = random_train(np.random.default_rng(1), N_USERS, LENGTHS)
    model = make_cmn(N_USERS, N_ITEMS, D, hops=3, seed=5)
    assert not Scorer(model, *item_user_csr(train, N_ITEMS)).graph_catalogue   # on a CPU: off unless asked for
    scorer = Scorer(model, *item_user_csr(train, N_ITEMS), graph_catalogue=True)
    scorer.score(torch.tensor([1]))
    assert scorer.graphed is not None and scorer.bucketed is None and list(scorer.graphed.captured) == [1]
    new = np.array([[3, 0], [4, 0], [9, 1], [10, 1], [11, 12]])   # into an empty item, a cap-1 item, a long one
    fresh = len({(u, i) for u, i in new.tolist()} - {(u, i) for u, i in train.tolist()})
    assert fresh >= 3
    assert scorer.add_interactions(torch.as_tensor(new[:, 0]), torch.as_tensor(new[:, 1])) == fresh
    assert scorer.graphed.captured == {}
    indptr, indices = item_user_csr(np.concatenate([train, new]), N_ITEMS)
    for users in ([3], [3, 9, 20]):
        torch.testing.assert_close(scorer.score(torch.tensor(users)), forward_all(model, indptr, indices, users),
                                   rtol=0, atol=1e-4)

