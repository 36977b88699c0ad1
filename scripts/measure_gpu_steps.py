"""Each training method's steps on a real-size random-initialised pipeline on one GPU: peak memory, s/step,
the compute floor and the planner's peak beside them; and one method under DeepSpeed ZeRO-2 with its
optimizer offloaded to the CPU against the same run without DeepSpeed.

    python scripts/measure_gpu_steps.py flux-dev --resolution 512                  # issue 18
    python scripts/measure_gpu_steps.py flux-dev --resolution 512 --methods esd --offload   # issue 19

The pipeline is built in this process, on the device and in the dtype (default bf16), from the published
config (scripts/make_real_size.py's build: no folder is written, no weights downloaded); --joint-blocks,
--single-blocks and --t5-layers slim FLUX as make_real_size does (the planner is then not asked: it
plans the published configs; else it plans each run in a CPU process of its own while the GPU runs).
Each method runs `fasterase.erase` with its defaults except the settings of FEW (steps, rollouts,
pretraining cut so that a step's own passes dominate) and with the memory options FLUX_512_MEMORY names
for it on flux-dev at 512 px (the plan's choice for the 75 GB goal; --gradient-checkpointing and
--micro-batch replace them); the erase report gives the GPU peak (torch.cuda.max_memory_allocated from
the run's start) and the training loop's time. The edit is removed before the next method.

Compute floor: the FLOPs the loop's network calls need (torch.utils.flop_counter on one row at the
resolution, times the rows each step's calls ran: a forward each, and twice that again for a call that
keeps its graph; recomputation by checkpointing or micro-batches not counted), at the GPU's dense peak
(--peak-tflops; default 989, an H100's or H200's bf16). On random weights FADE's discriminator cannot
tell the concept's generations apart and FADE refuses to train (so it is not among the methods here: a run
of it ends at that refusal, before its first step); TRACE runs without its scorer.
Prints a Markdown table; --json writes the rows too.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import fasterase
from fasterase import models
from fasterase.models.base import Cond
from fasterase.training import loop
from make_real_size import DTYPES, FLUX_DEPTH, build  # scripts/ is this script's folder

FEW = {
    "esd": {"steps": 3, "sample_steps": 4},
    "ant": {"steps": 3, "sample_steps": 4, "saliency_prompts": 1, "saliency_seeds": 1},
    "trace": {"steps": 3, "sample_steps": 10, "rollouts": 2, "refresh_every": 2, "scorer": "none"},
}
OFFLOAD = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}
# erase's memory options for each method on FLUX.1-dev at 512 px with FEW's settings: what `fasterase plan`
# adds so that the plan fits the 75 GB goal (bench/RESULTS.md, 2026-12-02: planned as asked, and with them).
# Used there unless --gradient-checkpointing or --micro-batch is given.
FLUX_512_MEMORY = {
    "esd": {"micro_batch": 2},  # 92.47 GB as asked, 58.39 with it
    "ant": {"gradient_checkpointing": True},  # 281.21, 66.43
    "trace": {"micro_batch": 2},  # 131.28, 42.19
}


class LoopRows:
    """Rows the network runs inside the training loop, with and without a graph, outside backward (a
    recomputation runs inside it): loop.train is wrapped for the count, the network hooked while it runs."""

    def __init__(self):
        self.forward = self.graph = 0
        self.train = loop.train

    def __enter__(self):
        def counted(*args, model=None, **kwargs):
            def hook(module, inputs, output):
                if torch._C._current_graph_task_id() == -1:  # not a recomputation inside backward
                    rows = output.shape[0] if torch.is_tensor(output) else output[0].shape[0]
                    self.forward += rows
                    self.graph += rows if torch.is_grad_enabled() else 0
            handle = model.network.register_forward_hook(hook)
            try:
                return self.train(*args, model=model, **kwargs)
            finally:
                handle.remove()
        loop.train = counted
        return self

    def __exit__(self, *exc):
        loop.train = self.train


def flops_per_row(den) -> int:
    """FLOPs of the network's forward on one row at the run's resolution."""
    cond = den.encode(["a photo of a dog"])
    x = den.noise(1, torch.Generator(device="cpu").manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        den.predict(x, torch.full((1,), 0.5, device=x.device), Cond(cond.embeds, cond.pooled))
    return counter.get_total_flops()


def planned_gb(name: str, method: str, settings: dict, resolution: int, dtype: str, memory: dict) -> float:
    """The planner's peak for the run (run in a process of its own beside the GPU's runs, on one thread: the
    meta network's calls take tens of seconds of one CPU core on FLUX.1-dev)."""
    from fasterase.plan import plan
    torch.set_num_threads(1)
    result = plan(name, method, settings, resolution=resolution, dtype=dtype, gpu_mem=10_000, **memory)
    return result.peak[1] / 1e9


def run(pipeline, method: str, settings: dict, args, memory: dict, floor_flops: int) -> dict:
    counted = LoopRows()
    with counted:
        result = fasterase.erase(pipeline, "dog", method=method, device=args.device, resolution=args.resolution,
                                 progress=False, **memory, **settings)
    result.edit.remove(result.model)
    report = result.report
    steps = report["steps"]
    need = (counted.forward + 2 * counted.graph) * floor_flops
    peak_mb = report.get("peak_cuda_mb", report.get("peak_process_rss_mb"))
    return {"method": method, "settings": settings, "steps": steps, "peak_gb": peak_mb * 2**20 / 1e9,
            "s_per_step": report["train_time_s"] / steps, "floor_s_per_step": need / (args.peak_tflops * 1e12) / steps,
            "rows_per_step": counted.forward / steps, "graph_rows_per_step": counted.graph / steps,
            "engine": report["engine"], "wall_s": report["wall_time_s"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=("sd15", "flux-dev"))
    p.add_argument("--methods", default="esd,ant,trace")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="every method with it (default: FLUX_512_MEMORY's options for flux-dev at 512 px, else none)")
    p.add_argument("--micro-batch", type=int, help="every method with it (as --gradient-checkpointing)")
    p.add_argument("--offload", action="store_true",
                   help="also run each method under ZeRO-2 with the optimizer offloaded to the CPU")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    for k in FLUX_DEPTH:
        p.add_argument("--" + k.replace("_", "-"), type=int, help="flux-dev: fewer blocks (make_real_size.py)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    depth = {k: getattr(args, k) for k in FLUX_DEPTH if getattr(args, k) is not None}
    overrides = {}
    if depth:
        if args.name != "flux-dev":
            p.error("--joint-blocks, --single-blocks, --t5-layers: flux-dev only")
        depth = {**{"joint_blocks": 19, "single_blocks": 38, "t5_layers": 24}, **depth}
        overrides = {"transformer": {"num_layers": depth["joint_blocks"], "num_single_layers": depth["single_blocks"]},
                     "text_encoder_2": {"num_layers": depth["t5_layers"]}}
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(FEW))
    if unknown:
        p.error(f"unknown method(s) {unknown}; valid: {', '.join(FEW)} (FADE refuses to train on random weights)")
    given = {"gradient_checkpointing": args.gradient_checkpointing, "micro_batch": args.micro_batch}
    own = not args.gradient_checkpointing and args.micro_batch is None and (args.name, args.resolution) == (
        "flux-dev", 512)
    memory = {m: {**given, **FLUX_512_MEMORY[m]} if own else given for m in methods}
    # the planner's peaks, computed on the CPU in processes beside the GPU's runs (published configs only)
    planner = None if overrides else multiprocessing.get_context("spawn").Pool(len(methods))
    planned = {m: planner.apply_async(planned_gb, (args.name, m, FEW[m], args.resolution, args.dtype, memory[m]))
               for m in methods} if planner else {}
    try:
        rows, floor_flops = measure(args, methods, memory, overrides)
        for row in rows:
            row["planned_gb"] = planned[row["method"]].get() if row["method"] in planned and \
                row["engine_asked"] == "plain" else None
    finally:
        if planner:
            planner.terminate()  # a failed run does not wait for the plans
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print_table(args, rows, depth, floor_flops)
    return 0


def measure(args, methods: list[str], memory: dict, overrides: dict) -> tuple[list[dict], int]:
    """Builds the pipeline on the device and runs each method (and its ZeRO-2 + offload run when asked): the
    rows, and the FLOPs of a forward row."""
    start = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[args.dtype])  # built in its dtype where it runs: FLUX's fp32 build is 48 GB
    try:
        with torch.device(args.device):
            pipeline = build(args.name, DTYPES[args.dtype], 0, overrides)
    finally:
        torch.set_default_dtype(default)
    print(f"built {args.name} {args.dtype} on {args.device} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    den = models.load(pipeline, args.device)
    den.set_resolution(args.resolution)
    floor_flops = flops_per_row(den)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            settings = dict(FEW[method])
            runs = [("plain", settings)]
            if args.offload:
                config = Path(tmp) / "offload.json"
                config.write_text(json.dumps(OFFLOAD))
                runs.append(("zero2+offload", {**settings, "zero": 2, "deepspeed_config": str(config)}))
            for engine, s in runs:
                row = {"engine_asked": engine, **run(pipeline, method, s, args, memory[method], floor_flops),
                       "memory": memory[method]}
                if engine != "plain" and (row["engine"]["optimizer"], row["engine"]["optimizer_states"]) != (
                        "SalientAdamW", "8bit"):
                    raise SystemExit(f"DeepSpeed stepped with {row['engine']}, not SalientAdamW with 8-bit states")
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    return rows, floor_flops


def print_table(args, rows: list[dict], depth: dict, floor_flops: int) -> None:
    name = args.name + (f" ({depth['joint_blocks']}+{depth['single_blocks']} blocks)" if depth else "")
    print(f"{name}, {args.dtype}, {args.resolution} px, {args.device} "
          f"({torch.cuda.get_device_name(args.device) if args.device.startswith('cuda') else 'CPU'}); "
          f"a forward row {floor_flops / 1e12:.2f} TFLOP; floor at {args.peak_tflops:g} TFLOPS\n")
    peak = "peak GB" if args.device.startswith("cuda") else "process peak RSS GB (so far)"
    print(f"| method | engine | memory options | steps | s/step | floor s/step | rows/step (with graph) | {peak} | "
          "planned GB |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        planned = f"{r['planned_gb']:.2f}" if r["planned_gb"] is not None else "-"
        engine = " ".join(r["engine"][k] for k in ("engine", "optimizer", "optimizer_states"))
        options = ", ".join(f"{k}={v}" for k, v in r["memory"].items() if v) or "-"
        print(f"| {r['method']} | {engine} | {options} | "
              f"{r['steps']} | {r['s_per_step']:.3f} | {r['floor_s_per_step']:.3f} | {r['rows_per_step']:.0f} "
              f"({r['graph_rows_per_step']:.0f}) | {r['peak_gb']:.2f} | {planned} |")


if __name__ == "__main__":
    sys.exit(main())
