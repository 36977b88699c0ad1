"""8-bit blockwise optimizer-state format and saliency-mask formats.

8-bit state format (the bitsandbytes blockwise format, so states are interchangeable):
a state of L entries is a uint8 tensor of L codes plus an fp32 ``absmax`` of ceil(L / 256)
entries.  Entry j decodes to ``code[q[j]] * absmax[j // 256]``, where ``code`` is a sorted
256-entry map: the signed dynamic map (:func:`dynamic_map` ``signed=True``) for the first
moment and the unsigned one for the second.  Encoding scales by ``1 / absmax`` (reciprocal,
then multiply), clamps to [-1, 1] and picks the nearest code; a value exactly between two
codes takes the lower one.  ``absmax`` of a block is the largest magnitude in it.

Masks: a *bitmask* is uint8 with ceil(n / 8) bytes, element i selected when bit (i % 8) of
byte i // 8 is set (LSB first, numpy ``packbits(bitorder="little")``); an *index mask* is a
sorted, duplicate-free int32 tensor of selected flat indices (so it addresses at most 2^31 elements).
"""
from __future__ import annotations

import torch

BLOCK = 256
MAX_INDEXED = 2 ** 31  # elements an int32 index mask can address
# attribute of an index mask found valid: (its version counter then, the smallest param size it fits)
_VALID = "_fasterase_valid_below"

_maps: dict[tuple[bool, torch.device], torch.Tensor] = {}


def _build_dynamic_map(signed: bool) -> torch.Tensor:
    # Dynamic exponent/fraction code (Dettmers 2015): for exponent i in 0..6 the magnitudes are
    # 10**(i-6) times the midpoints of an even split of [0.1, 1]; the split gets finer as i grows.
    # The signed map spends one bit on the sign, the unsigned one on an extra fraction bit.
    exponent_bits, magnitude_bits = 7, 7
    values: list[float] = []
    for i in range(exponent_bits):
        n = 2 ** (i + magnitude_bits - exponent_bits + (0 if signed else 1)) + 1
        bounds = torch.linspace(0.1, 1, n, dtype=torch.float32)
        means = ((bounds[:-1] + bounds[1:]) / 2.0) * (10 ** (i - (exponent_bits - 1)))
        values += means.tolist()
        if signed:
            values += (-means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-entry sorted code map (signed for first moments, unsigned for second), cached per device."""
    device = torch.device(device)
    key = (signed, device)
    if key not in _maps:
        _maps[key] = _build_dynamic_map(signed).to(device)
    return _maps[key]


def num_blocks(length: int) -> int:
    """Number of 256-entry absmax blocks for a state of ``length`` entries."""
    return (length + BLOCK - 1) // BLOCK


def quantize_codes(values: torch.Tensor, absmax_per_entry: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Nearest codes (uint8) of fp32 ``values`` scaled by their block's absmax."""
    scaled = torch.clamp(values * (1.0 / absmax_per_entry.clamp(min=1e-38)), -1.0, 1.0)
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints).to(torch.uint8)


def quantize_blockwise(values: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode a flat fp32 tensor: (uint8 codes, fp32 absmax per 256-entry block)."""
    flat = values.reshape(-1).float()
    pad = num_blocks(flat.numel()) * BLOCK - flat.numel()
    absmax = torch.nn.functional.pad(flat.abs(), (0, pad)).view(-1, BLOCK).amax(dim=1)
    codes = quantize_codes(flat, absmax.repeat_interleave(BLOCK)[: flat.numel()], code)
    return codes, absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Decode uint8 ``codes`` with their block ``absmax`` into fp32."""
    flat = codes.reshape(-1)
    return code[flat.long()] * absmax.repeat_interleave(BLOCK)[: flat.numel()]


def pack_mask(selected: torch.Tensor) -> torch.Tensor:
    """Bool tensor (any shape, read flat) -> uint8 bitmask, LSB first."""
    if selected.dtype != torch.bool:
        raise TypeError(f"pack_mask expects a bool tensor, got {selected.dtype}")
    flat = selected.reshape(-1)
    pad = (-flat.numel()) % 8
    bits = torch.nn.functional.pad(flat.to(torch.uint8), (0, pad)).view(-1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=flat.device)
    return (bits * weights).sum(dim=1, dtype=torch.uint8)


def unpack_mask(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 bitmask -> flat bool tensor of ``numel`` entries."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits.view(-1, 1) >> shifts) & 1).view(-1)[:numel].bool()


def mask_to_indices(selected: torch.Tensor) -> torch.Tensor:
    """Bool tensor (read flat) -> sorted int32 index mask."""
    if selected.dtype != torch.bool:
        raise TypeError(f"mask_to_indices expects a bool tensor, got {selected.dtype}")
    if selected.numel() > MAX_INDEXED:  # int32 would wrap the indices past 2^31 - 1
        raise ValueError(f"an index mask holds int32 indices, which address at most 2^31 elements, not "
                         f"{selected.numel()}; use a bitmask (pack_mask) for a tensor this large")
    indices = selected.reshape(-1).nonzero().view(-1).to(torch.int32)
    _remember_valid(indices, selected.numel())  # sorted, unique and in range by construction
    return indices


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter: never remembered, checked each time
        return None


def _remember_valid(indices: torch.Tensor, bound: int) -> None:
    version = _version(indices)
    if version is not None:
        setattr(indices, _VALID, (version, bound))


def check_indices(indices: torch.Tensor, n: int) -> None:
    """Raise ValueError unless the int32 index mask is sorted, duplicate-free and within [0, n).

    The reference would wrap a negative index and the native kernels would read and write past the
    param, so this is checked before any backend runs.  Checking reads the indices, a host
    synchronisation on a GPU, so a mask found valid is remembered with its version counter and not read
    again until it is modified in place: masks are fixed for a training run, so an optimizer step pays
    this once per mask, not once per step (masks from mask_to_indices are valid by construction).
    """
    if indices.numel() == 0:
        return
    seen = getattr(indices, _VALID, None)
    if seen is not None and seen[0] == _version(indices) and seen[1] <= n:
        return
    first, last, unordered = torch.stack([indices[0].long(), indices[-1].long(),
                                          (indices[1:] <= indices[:-1]).sum()]).tolist()  # one synchronisation
    if unordered:
        raise ValueError(f"index mask must be sorted and duplicate-free (strictly increasing); {unordered} "
                         "entries are not above the one before")
    if first < 0 or last >= n:
        raise ValueError(f"index mask holds {first if first < 0 else last}; valid indices of a param of {n} "
                         f"elements: 0 to {n - 1}")
    _remember_valid(indices, last + 1)
