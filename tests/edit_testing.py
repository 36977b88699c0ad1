"""Test support shared by the masked-training methods' tests (ANT, FADE)."""
import torch


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
