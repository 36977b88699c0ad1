"""Test support shared by the training methods' tests (ANT, FADE, TRACE)."""
import pytest
import torch

from fasterase import models
from fasterase.training import loop


def moved_entries(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], edit,
                  selected: dict[str, torch.Tensor] | None = None) -> int:
    """How many entries an applied entry edit moved; asserts that every tensor outside `selected` is
    bit-identical and that in the ones it names only the selected entries moved. selected: {name:
    indices} of the trained entries, needed where the edit stores a tensor whole (so many entries
    selected that indices would take more room); default, the edit's own entries."""
    selected = selected if selected is not None else {k: i for k, (i, _) in edit.entries.items()}
    assert set(edit.entries) | set(edit.weights) <= set(selected)
    moved = 0
    for k in before:
        changed = (before[k] != after[k]).reshape(-1)
        if k not in selected:
            assert not changed.any(), k  # bit-identical
            continue
        outside = torch.ones_like(changed)
        outside[selected[k].long()] = False
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
