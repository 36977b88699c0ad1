"""Run every method a few steps on a real-size folder and print s/step and peak memory per method.

    python scripts/make_real_size.py sd15 /tmp/realsize/sd15-bf16 --dtype bf16
    python scripts/measure_real_size.py /tmp/realsize/sd15-bf16 --resolution 256

Each method runs as `fasterase erase` in a fresh process (`/usr/bin/time -f %M` reads its peak
resident memory, model loading included) with its defaults except the settings below, which cut
the passes a step makes so a CPU finishes; the edit's report gives the training loop's own time
(train_time_s), so s/step leaves out loading, D's pretraining and saliency ranking. Random weights
cannot be scored: this shows that each method runs, and at what cost. Beside each run: the memory
planner's prediction of the same run on the CPU (fasterase/plan.py: its peak with the text encoders
kept, as nothing moves on a CPU; ANT at the share its saliency map kept) plus the RSS of a process
that has imported fasterase and torch. Every run has glibc map each block above 64 KiB on its own
(MALLOC_MMAP_THRESHOLD_), so RSS follows the live tensors. UCE's RSS stays below its weights' size:
the weights load memory-mapped and UCE reads only the text projections (our reading), so the planner
over-counts it. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors import safe_open

# What each method changes from its defaults here: fewer steps, rollouts and pretraining, so that a
# CPU run ends in minutes; the per-step passes of the loss are the defaults' (batch sizes kept). On random
# weights a discriminator cannot tell the concept's generations from the neutral ones (held-back accuracy
# 0.50 after 100 pretraining steps on SD1.5), so FADE refuses to train there, and TRACE runs without its
# scorer (scorer=none).
FEW = {
    "uce": [],
    "esd": ["steps=2", "sample_steps=4"],
    "ant": ["steps=2", "sample_steps=4", "saliency_prompts=1", "saliency_seeds=1"],
    "fade": ["steps=2", "sample_steps=4", "rollouts=2", "refresh_every=2", "d_pretrain_steps=2", "d_batch=4",
             "saliency_samples=1"],
    "trace": ["steps=2", "sample_steps=10", "rollouts=2", "refresh_every=2", "scorer=none"],  # t0 needs steps on both sides
}


# Every tensor above 64 KiB its own mapping, unmapped when freed, so that RSS follows the live tensors
# rather than the high-water mark of glibc's heap (tests/test_plan.py measures the same way).
ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def baseline_rss() -> int:
    """KiB of resident memory a process holds once torch, diffusers and fasterase are imported."""
    done = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-c", "import fasterase.plan"],
                          capture_output=True, text=True, check=True, env=ENV)
    return int(done.stderr.strip().splitlines()[-1])


def planned_cpu(model: str, method: str, resolution: str, dtype: str | None, share: float | None,
                memory: dict) -> int:
    """Bytes the planner says the run holds at its peak on a CPU (the text encoders stay)."""
    from fasterase.cli import _settings
    from fasterase.plan import plan

    image = {} if method == "uce" else {"resolution": int(resolution), **memory}
    result = plan(model, method, _settings(FEW[method]), dtype=dtype, salient_share=share, **image)
    encoders = result.columns["encoding"].lines["text encoders"]
    return max(c.total + (0 if name == "encoding" else encoders) for name, c in result.columns.items())


def run(model: str, method: str, concept: str, resolution: str, dtype: str | None, memory: dict, out: Path) -> dict:
    """memory: erase's gradient_checkpointing and micro_batch."""
    cmd = ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "fasterase", "erase", "--model", model,
           "--concept", concept, "--method", method, "--out", str(out)]
    cmd += ["--dtype", dtype] if dtype else []
    if method != "uce":  # UCE runs no image through the network: it refuses image and memory options
        cmd += ["--resolution", resolution]
        cmd += ["--gradient-checkpointing"] if memory["gradient_checkpointing"] else []
        cmd += ["--micro-batch", str(memory["micro_batch"])] if memory["micro_batch"] else []
    for setting in FEW[method]:
        cmd += ["--set", setting]
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    if done.returncode != 0:
        raise SystemExit(f"{method} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    peak_kib = int(done.stderr.strip().splitlines()[-1])
    with safe_open(str(out / "edit.safetensors"), "pt") as f:
        report = json.loads(f.metadata()["fasterase"])["report"]
    steps = report.get("steps", 0)
    share = report["saliency_selected"] / report["saliency_candidates"] if method == "ant" else None
    return {"method": method, "settings": " ".join(FEW[method]) or "defaults", "wall_s": report["wall_time_s"],
            "planned_gib": planned_cpu(model, method, resolution, dtype, share, memory) / 2**30, "share": share,
            "steps": steps, "s_per_step": report.get("train_time_s", 0.0) / steps if steps else None,
            "peak_rss_gib": peak_kib / 2**20}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="a local diffusers folder (scripts/make_real_size.py)")
    p.add_argument("--methods", default="uce,esd,ant,trace", help="comma-separated (FADE refuses random weights)")
    p.add_argument("--concept", default="dog")
    p.add_argument("--resolution", default="256")
    p.add_argument("--dtype")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--steps", type=int, help="training steps of every method (default: FEW's)")
    args = p.parse_args(argv)
    memory = {"gradient_checkpointing": args.gradient_checkpointing, "micro_batch": args.micro_batch}
    if args.steps:
        for settings in FEW.values():
            settings[:] = [s for s in settings if not s.startswith("steps=")] + [f"steps={args.steps}"]
    rows, base = [], baseline_rss() / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            rows.append(run(args.model, method, args.concept, args.resolution, args.dtype, memory,
                            Path(tmp) / method))
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"Planned: the planner's CPU peak + {base:.2f} GiB (the RSS of a process with fasterase imported).\n")
    print("| method | settings | erase() wall s | s/step | peak RSS GiB | planned GiB | planned / measured |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        step = f"{r['s_per_step']:.1f}" if r["s_per_step"] is not None else "-"
        planned = r["planned_gib"] + base
        print(f"| {r['method']} | {r['settings']} | {r['wall_s']:.1f} | {step} | {r['peak_rss_gib']:.2f} | "
              f"{planned:.2f} | {planned / r['peak_rss_gib']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
