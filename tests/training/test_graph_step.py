"""The graph-ready training step (training/graph_step.py) against the eager one (training.train.fit_epoch): the same
weights and TF1 RMSProp state after several steps, on batches that fit the slot budget (padded), batches that
exceed it (run uncaptured), a partial last batch, items without neighbours and, with exclude_self, items whose
only user is the querying one. Plus: the step reads no tensor on the host and has no data-dependent shape (it
runs on the meta device, where either raises), the two conditions for capturing it in a CUDA graph."""
import copy

import numpy as np
import pytest
import torch

from conftest import item_user_csr, make_cmn, random_train
from model.cmn import CMN, CMNConfig
from training.graph_step import GraphStep, batch_slots, slot_budget, slot_counts
from training.optim import TFRMSProp, clip_per_tensor_
from training.train import TrainConfig, cmn_pair_scores, fit_epoch

LENGTHS = [0, 1, 2, 3, 5, 8, 13, 1, 0, 4, 6, 2, 9, 1, 3, 7]
N_USERS, D, BATCH = 31, 6, 8   # user 30 is in no neighbourhood and no batch
UNTOUCHED_ITEM = 15


class FixedTriples:
    """A sampler whose epoch e is a fixed permutation of the given triples."""

    def __init__(self, users, pos, neg):
        self.triples = users, pos, neg

    def epoch(self, epoch: int):
        order = np.random.default_rng(epoch).permutation(len(self.triples[0]))
        return tuple(a[order] for a in self.triples)


def triples(train: np.ndarray, n: int, rng: np.random.Generator):
    """Positives are training pairs (so u is in N(pos), and alone in it for the items with one user); negatives
    are any item but UNTOUCHED_ITEM, the items without training users included."""
    pick = rng.choice(len(train), n)
    users, pos = train[pick, 0], train[pick, 1]
    alone = [(u, i) for u, i in train.tolist() if LENGTHS[i] == 1]
    users[:len(alone)], pos[:len(alone)] = np.array(alone).T
    neg = rng.choice([i for i in range(len(LENGTHS)) if i != UNTOUCHED_ITEM], n)
    neg[:2] = [0, 8]   # no training users: N(i) = [u]
    keep = pos != UNTOUCHED_ITEM
    return users[keep], pos[keep], neg[keep]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("hops, exclude_self", [(3, False), (3, True), (1, False)])
def test_graph_steps_equal_eager_steps(hops, exclude_self, device):
    """On CUDA the first WARMUP_STEPS batches that fit run uncaptured, the next is captured, the rest replayed."""
    device = torch.device(device)
    train = random_train(np.random.default_rng(0), N_USERS - 1, LENGTHS)
    indptr, indices = (t.to(device) for t in item_user_csr(train, len(LENGTHS)))
    users, pos, neg = triples(train, 7 * BATCH + 3, np.random.default_rng(1))
    sampler = FixedTriples(users, pos, neg)
    eager = make_cmn(N_USERS, len(LENGTHS), D, hops, seed=hops).to(device)
    eager.cfg.exclude_self = exclude_self
    graph = copy.deepcopy(eager)
    start = {k: v.clone() for k, v in eager.state_dict().items()}
    eager_opt, graph_opt = TFRMSProp(eager.parameters()), TFRMSProp(graph.parameters())
    cfg = TrainConfig(batch_size=BATCH, clip=0.2, progress=False)   # clips the weight matrices, not the biases

    counts = slot_counts(indptr.cpu().numpy())
    full = [batch_slots(counts, *sampler.epoch(e)[1:], BATCH)[:-1] for e in range(2)]
    budget = int(np.median(np.concatenate(full)))
    assert 0 < sum((f > budget).sum() for f in full) < sum(len(f) for f in full)   # some fit, some exceed
    step = GraphStep(graph, graph_opt, indptr, indices, BATCH, budget, clip=cfg.clip)
    pair_scores = cmn_pair_scores(eager, indptr, indices, exclude_self)
    for epoch in range(2):
        expected = fit_epoch(eager, pair_scores, eager_opt, sampler, epoch, cfg, device, "")
        got = step.fit_epoch(sampler, epoch)
        assert got["fallback_steps"] == (full[epoch] > budget).sum() + 1   # + the partial last batch
        assert got["loss"] == pytest.approx(expected["loss"], abs=1e-6)
    assert (step.graph is not None) == (device.type == "cuda")

    atol = 1e-6 if device.type == "cpu" else 1e-5   # a GPU's index_add adds in a varying order
    for (name, p), q in zip(eager.named_parameters(), graph.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=atol, msg=name)
        for key in ("ms", "mom"):
            torch.testing.assert_close(graph_opt.state[q][key], eager_opt.state[p][key], rtol=0, atol=atol,
                                       msg=f"{name} {key}")
    # sparse semantics, by the spec rather than by the eager step: rows no batch touched keep every value
    for name, row in (("user_memory", N_USERS - 1), ("user_output", N_USERS - 1), ("item_memory", UNTOUCHED_ITEM)):
        p = getattr(graph, name)
        assert torch.equal(p[row], start[name][row])
        assert torch.equal(graph_opt.state[p]["ms"][row], torch.ones(D, device=device))
        assert torch.equal(graph_opt.state[p]["mom"][row], torch.zeros(D, device=device))
    assert not torch.equal(graph.user_memory[0], start["user_memory"][0])


@pytest.mark.parametrize("exclude_self", [False, True])
def test_step_reads_no_tensor_data(exclude_self):
    """On the meta device tensors have shapes but no data: `.item()`, `bool(t)`, `nonzero`, a `repeat_interleave`
    without output_size all raise there. The graph step runs; the eager step does not (the control)."""
    model = CMN(CMNConfig(12, 9, 4, hops=3, exclude_self=exclude_self)).to("meta")
    optimizer = TFRMSProp(model.parameters())
    indptr, indices = (torch.empty(n, dtype=torch.long, device="meta") for n in (10, 30))
    batch = torch.empty(BATCH, dtype=torch.long, device="meta")
    step = GraphStep(model, optimizer, indptr, indices, BATCH, slot_budget=64)
    step.step(batch, batch, batch, slots=64)
    assert step.fallback_steps == 0
    assert step.total.is_meta and optimizer.state[model.user_memory]["ms"].is_meta

    with pytest.raises((RuntimeError, NotImplementedError)):
        cmn_pair_scores(model, indptr, indices, exclude_self)(batch, batch, batch)
    grads = [torch.empty_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    with pytest.raises((RuntimeError, NotImplementedError)):
        clip_per_tensor_(list(model.parameters()), 5.0)


def test_slot_budget_covers_the_largest_full_batch():
    counts = slot_counts(np.array([0, 0, 3, 8, 108]))   # items with 0, 3, 5 and 100 users: 1, 3, 5, 100 slots
    pos = np.array([1, 1, 2, 2, 0, 0, 3])
    neg = np.array([0, 0, 0, 1, 2, 2, 0])
    assert batch_slots(counts, pos, neg, 2).tolist() == [8, 14, 12, 101]
    assert slot_budget(counts, pos, neg, 2) == 256            # 14·1.05 rounded up to 256; 101 is a partial batch
    assert slot_budget(counts, np.repeat(pos, 40), np.repeat(neg, 40), 80) == 768   # 40·14 = 560 → 588 → 768
