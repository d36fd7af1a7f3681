"""Checkpoint format versions: older files keep loading with the meaning they were written with."""
from pathlib import Path

import torch

from model.store.checkpoint import load_checkpoint
from model.cmn import gather_neighbourhoods
from model.scoring import Scorer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_format_1_checkpoint_loads_with_exclude_self_from_its_training_options():
    """Format 1 kept `exclude_self` in meta["train_config"]; the loader maps it into the config, and a scorer
    built from the file leaves the querying user out of N(i) as that model was trained to."""
    ckpt = load_checkpoint(str(FIXTURES / "format1-exclude-self.ckpt"))
    assert ckpt.config.exclude_self is True
    assert ckpt.model_version == "20261129T0000Z-fmt001"
    model = ckpt.build_model("cpu")
    indptr, indices = (torch.as_tensor(a) for a in ckpt.item_users())
    users = torch.tensor([0, 3, 6]).repeat_interleave(ckpt.config.n_items)
    items = torch.arange(ckpt.config.n_items).repeat(3)
    nbr, seg = gather_neighbourhoods(indptr, indices, users, items, exclude_self=True)
    expected = model(users, items, nbr, seg).view(3, -1)
    got = Scorer(model, indptr, indices).score(torch.tensor([0, 3, 6]))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    with_self = model(users, items, *gather_neighbourhoods(indptr, indices, users, items)).view(3, -1)
    assert not torch.allclose(got, with_self, atol=1e-4)  # the setting changes the scores of this model
