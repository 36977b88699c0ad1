"""How far an fp16 network's LoRA gradients are from an fp32 one's, with and without loss scaling.

    python scripts/measure_fp16_gradients.py --resolution 256x384

The toy UNet (fasterase's toy-sd) at a chosen size, LoRA (rank 4, fp32 factors, B drawn non-zero so
A gets gradients too) on its attention and feed-forward output layers, one ESD-like loss: the mean
squared error of a batch of 4 predictions to fixed random targets. The same weights in fp32 give the
reference; in fp16 the loss is multiplied by each scale before backward and the fp32 gradients
divided back, as training.loss_scale does. bf16 (no scale) beside them. Prints one line per run:
the relative L2 error of the gradients to fp32's and the share of them that came out zero where
fp32's did not.
"""
from __future__ import annotations

import argparse

import torch

from fasterase import models
from fasterase.training import params

LAYERS = r".*attn2\.to_[kv]|.*attn1\.to_q|.*ff\.net\.2"


def lora_gradients(dtype: torch.dtype, scale: float, size: tuple[int, int]) -> torch.Tensor:
    model = models.load("toy-sd", dtype=dtype)
    model.set_resolution(size)
    lora = params.add_lora(model.network, params.layer_names(model.network, LAYERS), rank=4, init_seed=0)
    with torch.no_grad():
        for p in lora:
            if not p.abs().sum():
                p.normal_(0, 0.01, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    x = model.noise(4, g)
    tau = torch.tensor([0.9, 0.6, 0.4, 0.2])
    cond = model.encode(["a photo of a red circle"] * 4)
    target = torch.randn(x.shape, generator=g)
    loss = (model.predict(x, tau, cond) - target).square().mean()
    (loss * scale).backward()
    return torch.cat([p.grad.flatten() / scale for p in lora])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", default="256x384", help="HxW in px (multiples of 32)")
    args = ap.parse_args()
    size = tuple(int(v) for v in args.resolution.split("x"))
    reference = lora_gradients(torch.float32, 1.0, size)
    runs = [(torch.float16, s) for s in (1.0, 2.0**10, 2.0**16)] + [(torch.bfloat16, 1.0)]
    for dtype, scale in runs:
        grads = lora_gradients(dtype, scale, size)
        error = ((grads - reference).norm() / reference.norm()).item()
        zeroed = ((grads == 0) & (reference != 0)).float().mean().item()
        print(f"{args.resolution} {str(dtype).removeprefix('torch.')} loss scale {scale:g}: relative error "
              f"{error:.4f}, zeroed {zeroed:.4f}, finite {bool(torch.isfinite(grads).all())} "
              f"(median |fp32 gradient| {reference.abs().median():.2e})")


if __name__ == "__main__":
    main()
