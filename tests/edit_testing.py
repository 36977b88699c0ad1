"""Test support shared by the training methods' tests (ANT, FADE, TRACE)."""
import pytest
import torch

from fasterase import models
from fasterase.training import loop


def moved_entries(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], edit) -> int:
    """How many entries an applied entry edit moved; asserts that every tensor it does not name is
    bit-identical and that in the ones it names only its entries moved."""
    moved = 0
    for k in before:
        changed = (before[k] != after[k]).reshape(-1)
        if k not in edit.entries:
            assert not changed.any(), k  # bit-identical
            continue
        outside = torch.ones_like(changed)
        outside[edit.entries[k][0].long()] = False
        assert not (changed & outside).any(), k  # only the edit's entries move
        moved += int(changed.sum())
    return moved


def interrupted_step(run, checkpoint, device="cpu") -> int:
    """Run `run(model)` on a fresh toy-sd on `device` until it raises KeyboardInterrupt; asserts the model is
    left bit-identical, and returns the step the checkpoint was saved at."""
    model = models.load("toy-sd", device=device)
    before = {k: v.detach().clone() for k, v in model.network.state_dict().items()}
    with pytest.raises(KeyboardInterrupt):
        run(model)
    assert all(torch.equal(before[k], v) for k, v in model.network.state_dict().items())
    return loop.read_checkpoint(checkpoint)["step"]
