"""Write a random-initialised pipeline of a real model's size as a local diffusers folder.

    python scripts/make_real_size.py sd15 OUT [--dtype fp32|bf16|fp16] [--seed 0]
    python scripts/make_real_size.py flux-dev OUT [--joint-blocks 2 --single-blocks 1 --t5-layers 2]

Every component is the real class built from the published config in fasterase/models/configs/
(fasterase.models.real_configs), so the folder loads with fasterase.models.load and samples with the
diffusers pipeline. Random weights cannot be scored for erasure; such folders show that every method
runs, at what memory and speed. sd15 is written whole (860M UNet). flux-dev keeps FLUX.1-dev's widths
with fewer blocks: --joint-blocks of its 19, --single-blocks of its 38 and --t5-layers of T5-XXL's 24
(the defaults, 2, 1 and 2, give a 0.89B transformer and a 0.52B T5 encoder, 3.0 GiB in bf16; one
full-parameter AdamW step of that transformer at 256x256 peaks at 9.4 GB of memory in bf16, 16.6 GB
in fp32); 19, 38 and 24 build the full model, 12B + 4.8B (34 GB in bf16; the transformer is built in
fp32 first, 48 GB).

--dtype defaults to the published checkpoint's (sd15 fp32, flux-dev bf16). Weights are built in fp32
and cast, component by component, from a seed per component, so a seed gives the same weights every
run. The tokenizers are built here with no download: CLIP's byte-level BPE over single bytes (each
word is its bytes, the last marked "</w>", alone as in a prompt) with the start and end tokens at the
published ids 49406 and 49407, and T5's unigram over "▁" (a word's start) and single characters
(printable ASCII and Latin-1), so English prompts never meet the unknown token. Prompts then take one
token per character: CLIP's 77 hold 75 letters, digits and punctuation marks. The embedding tables
keep their published sizes.

The folder is written into a temporary sibling and renamed at the end; an OUT that exists and is not
an empty folder is refused.
"""
from __future__ import annotations

import argparse
import os
import shutil
import string
import sys
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from fasterase import models
from fasterase.models import real_configs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PUBLISHED_DTYPE = {"sd15": "fp32", "flux-dev": "bf16"}
FLUX_DEPTH = {"joint_blocks": 2, "single_blocks": 1, "t5_layers": 2}  # defaults of the slim FLUX
CLIP_MAX_TOKENS, T5_MAX_TOKENS = 77, 512


def clip_tokenizer(vocab_size: int) -> CLIPTokenizer:
    """Byte-level BPE with no merges: every byte a token, and again with "</w>" ending a word. The
    start and end tokens take the last two ids, as in CLIP (its pooling reads the end token as the
    largest id)."""
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": vocab_size - 2, "<|endoftext|>": vocab_size - 1})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_TOKENS)


def t5_tokenizer() -> T5TokenizerFast:
    """Unigram over "▁" and single characters, with T5's <pad> 0, </s> 1 and <unk> 2."""
    chars = [c for c in string.printable if not c.isspace()] + [chr(i) for i in range(0xA1, 0x100)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(c, -1.0) for c in chars]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_TOKENS)


def component(name: str, part: str, cls: str, dtype: torch.dtype, overrides: dict):
    """One component of `name`'s pipeline: class `cls` from its published config (with
    `overrides`), modules cast to `dtype`."""
    if cls == "CLIPTokenizer":
        return clip_tokenizer(real_configs.component_config(name, "text_encoder")["vocab_size"])
    if cls == "T5TokenizerFast":
        return t5_tokenizer()
    config = real_configs.component_config(name, part)
    if cls == "CLIPTextModel":
        module = CLIPTextModel(CLIPTextConfig.from_dict(config, **overrides))
    elif cls == "T5EncoderModel":
        module = T5EncoderModel(T5Config.from_dict(config, **overrides))
    elif part == real_configs.network_component(name):
        module = real_configs.network(name, **overrides)
    else:  # the VAE and the scheduler
        module = getattr(diffusers, cls).from_config(config, **overrides)
    if not isinstance(module, torch.nn.Module):
        return module
    with models.casting():
        return module.to(dtype).eval()


def component_seed(seed: int, part: str) -> int:
    """The torch seed of component `part`'s weights, from (seed, part): a component's weights do
    not depend on the other components or their sizes."""
    return int(np.random.SeedSequence([seed, *part.encode()]).generate_state(1)[0])


def build(name: str, dtype: torch.dtype, seed: int, overrides: dict[str, dict]):
    """The pipeline of `name` with random weights (see component_seed). `overrides` maps a
    component to config values that replace the published ones."""
    index = real_configs.model_index(name)
    parts = {}
    for part, spec in index.items():
        if part.startswith("_") or not isinstance(spec, list):
            continue
        torch.manual_seed(component_seed(seed, part))
        parts[part] = None if spec[1] is None else component(name, part, spec[1], dtype, overrides.get(part, {}))
    if "requires_safety_checker" in index:
        parts["requires_safety_checker"] = index["requires_safety_checker"]
    return getattr(diffusers, index["_class_name"])(**parts)


def write(pipeline, out: Path) -> None:
    """Save as safetensors into a temporary sibling of `out`, then rename it to `out`."""
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    tmp.mkdir()
    try:
        pipeline.save_pretrained(str(tmp), safe_serialization=True)
        if out.exists():
            out.rmdir()  # checked empty before building
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=real_configs.NAMES)
    parser.add_argument("out", type=Path, help="the folder to write (absent or empty)")
    parser.add_argument("--dtype", choices=DTYPES, help="default: the published checkpoint's (sd15 fp32, flux-dev bf16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--joint-blocks", type=int, help=f"flux-dev only: joint blocks (of 19; default {FLUX_DEPTH['joint_blocks']})")
    parser.add_argument("--single-blocks", type=int, help=f"flux-dev only: single blocks (of 38; default {FLUX_DEPTH['single_blocks']})")
    parser.add_argument("--t5-layers", type=int, help=f"flux-dev only: T5 encoder layers (of 24; default {FLUX_DEPTH['t5_layers']})")
    args = parser.parse_args(argv)

    depth = {k: getattr(args, k) for k in FLUX_DEPTH}
    if args.name != "flux-dev" and any(v is not None for v in depth.values()):
        given = ", ".join("--" + k.replace("_", "-") for k, v in depth.items() if v is not None)
        parser.error(f"{given}: only flux-dev has fewer blocks; {args.name} is written whole")
    depth = {k: FLUX_DEPTH[k] if v is None else v for k, v in depth.items()}
    if args.name == "flux-dev" and min(depth.values()) < 1:
        parser.error(f"block and layer counts must be at least 1, got {depth}")
    out = args.out.expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        parser.error(f"{out} exists and is not an empty folder; name a new folder (it is never overwritten)")
    if not out.parent.is_dir():
        parser.error(f"{out.parent} is not a folder; the output's parent must exist")

    overrides = {}
    if args.name == "flux-dev":
        overrides = {"transformer": {"num_layers": depth["joint_blocks"], "num_single_layers": depth["single_blocks"]},
                     "text_encoder_2": {"num_layers": depth["t5_layers"]}}
    dtype = args.dtype or PUBLISHED_DTYPE[args.name]
    start = time.perf_counter()
    pipeline = build(args.name, DTYPES[dtype], args.seed, overrides)
    write(pipeline, out)
    for part, module in pipeline.components.items():
        if isinstance(module, torch.nn.Module):
            print(f"{part}: {sum(p.numel() for p in module.parameters()):,} parameters")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({args.name}, {dtype}, seed {args.seed}): {size / 2**30:.2f} GiB in "
          f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
