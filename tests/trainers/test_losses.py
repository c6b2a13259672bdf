"""EWC against a value computed by hand on a two-parameter model."""

import torch
from torch import nn

from mmdeploy.trainers.losses import EWC


def squared_error(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).sum()


def test_ewc_penalty_matches_hand_computation():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    batches = [(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0]])),
               (torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0]]))]
    # grads 2(w.x - y)x: (2, 0) and (0, 2); Fisher = mean of squares = (2, 2)
    ewc = EWC.estimate(model, batches, squared_error, strength=3.0)
    assert torch.equal(ewc.fisher["weight"], torch.tensor([[2.0, 2.0]]))
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2.0, 0.0]]))
    # reference was cloned, not aliased: it still holds (1, 2)
    assert torch.equal(ewc.reference["weight"], torch.tensor([[1.0, 2.0]]))
    # 3/2 * (2 * 1^2 + 2 * 2^2) = 15
    assert ewc.penalty(model).item() == 15.0


def test_ewc_state_round_trip():
    model = nn.Linear(2, 1, bias=False)
    batches = [(torch.randn(4, 2), torch.randn(4, 1))]
    ewc = EWC.estimate(model, batches, squared_error, strength=1.0)
    restored = EWC.from_state_dict(ewc.state_dict(), strength=1.0)
    assert restored.fisher.keys() == ewc.fisher.keys()
    assert torch.equal(restored.reference["weight"], ewc.reference["weight"])
