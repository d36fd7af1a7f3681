"""The full-catalogue scorer has two routes picked by the number of users (packed per user, bucketed batch);
both must equal CMN.forward whatever the call size, also after online feedback into a built cache (see
docs/performance.md; test_scorer.py covers feedback before the buckets are built)."""
import numpy as np
import pytest
import torch

from conftest import item_user_csr, make_cmn, random_train
from model.cmn import gather_neighbourhoods
from model.scoring import Scorer

N_USERS, D = 40, 6
LENGTHS = [0, 1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 40, 0, 1, 1, 2, 6, 11, 0, 3, 8, 15, 21, 2, 1]
N_ITEMS = len(LENGTHS)
ROUTES = {"packed": dict(packed_max_users=10**6), "bucketed": dict(packed_max_users=0),
          "bucketed-small-blocks": dict(packed_max_users=0, block_pairs=7, chunk_items=3)}


def forward_all(model, indptr, indices, users):
    u = torch.as_tensor(users).repeat_interleave(N_ITEMS)
    i = torch.arange(N_ITEMS).repeat(len(users))
    nbr, seg = gather_neighbourhoods(torch.as_tensor(indptr), torch.as_tensor(indices), u, i)
    with torch.no_grad():
        return model(u, i, nbr, seg).view(len(users), N_ITEMS)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("hops", [1, 2, 3])
def test_routes_equal_forward(route, hops):
    train = random_train(np.random.default_rng(1), N_USERS, LENGTHS)
    model = make_cmn(N_USERS, N_ITEMS, D, hops, seed=hops)
    csr = item_user_csr(train, N_ITEMS, rng=np.random.default_rng(0))  # users unsorted within items
    scorer = Scorer(model, *csr, **ROUTES[route])
    for users in ([7], [0, 5, 17, 39, 5]):
        expected = forward_all(model, *csr, users)
        assert expected.std() > 0.1
        torch.testing.assert_close(scorer.score(torch.tensor(users)), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("route", ROUTES)
def test_routes_after_feedback(route):
    train = random_train(np.random.default_rng(2), N_USERS, LENGTHS)
    model = make_cmn(N_USERS, N_ITEMS, D, hops=3, seed=5)
    scorer = Scorer(model, *item_user_csr(train, N_ITEMS), **ROUTES[route])
    scorer.score(torch.tensor([1, 2]))  # the catalogue cache in use before the feedback (built, for bucketed)
    assert (scorer.bucketed is not None) == route.startswith("bucketed")
    # new pairs: into an empty item, into a cap-1 item (outgrows its cap), into a long one, and a duplicate
    new = np.array([[3, 0], [4, 0], [9, 1], [10, 1], [11, 12], [int(train[0, 0]), int(train[0, 1])]])
    fresh = len({(int(u), int(i)) for u, i in new} - {(int(u), int(i)) for u, i in train})
    assert fresh >= 4
    assert scorer.add_interactions(torch.as_tensor(new[:, 0]), torch.as_tensor(new[:, 1])) == fresh
    indptr, indices = item_user_csr(np.concatenate([train, new]), N_ITEMS)
    users = [3, 9, 20]
    torch.testing.assert_close(scorer.score(torch.tensor(users)), forward_all(model, indptr, indices, users),
                               rtol=0, atol=1e-4)
