"""Reproduce the README's toy erasure tables: erase concepts with each method from each toy
pipeline through the CLI, evaluate the saved edit with `fasterase eval --edit DIR --json`, and
print one markdown row per run (with the original model's Acc_s, for the 0.9x / 0.85x bars).

    python scripts/reproduce_toy_erasure.py --concepts circle --concepts circle,square --concepts red
    python scripts/reproduce_toy_erasure.py --methods ant --concepts circle,square --out runs/multi
    python scripts/reproduce_toy_erasure.py --methods ant --set saliency=false --label full-network
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from fasterase.edit import Edit
from fasterase.eval.evaluate import erased_concepts
from fasterase.eval.metrics import erasure_metrics


def cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "fasterase", *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"fasterase {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def num(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", default="uce,esd,ant,fade")
    p.add_argument("--models", default="toy-sd,toy-flux")
    p.add_argument("--concepts", action="append",
                   help="comma-separated: erased together in one edit; repeat for several edits (default circle)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method option (repeatable)")
    p.add_argument("--label", default="", help="a name for the option set, shown in the table")
    p.add_argument("--out", type=Path, default=Path("runs/erasure"))
    p.add_argument("--no-header", action="store_true")
    p.add_argument("--original", type=Path, metavar="JSON",
                   help="the original model's saved evaluation (one model), instead of evaluating it again")
    args = p.parse_args()
    edits = [c.split(",") for c in args.concepts or ["circle"]]
    sets = [a for s in args.set for a in ("--set", s)]
    if not args.no_header:
        print("| model | method | options | concepts | method wall time (s) | Acc_e | held-out | Acc_g | "
              "Acc_s (original) | H | Col_s (original) | erased in scenes | kept in scenes | erased pair | "
              "both (kept scenes) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    if args.original and "," in args.models:
        sys.exit("--original is one model's evaluation: give one model with --models")
    for model in args.models.split(","):
        args.out.mkdir(parents=True, exist_ok=True)
        if args.original:
            original = json.loads(args.original.read_text())
        else:
            start = time.perf_counter()
            original = json.loads(cli("eval", "--model", model, "--json"))
            print(f"{model}: the original model's evaluation took {time.perf_counter() - start:.0f} s", file=sys.stderr)
            (args.out / f"{model}.eval.json").write_text(json.dumps(original, indent=2))
        accs = original["concepts"]
        for concepts in edits:
            # the original model's Acc_s and Col_s for these concepts, from its per-concept accuracies
            base = erasure_metrics(accs, erased_concepts(concepts))
            for method in args.methods.split(","):
                out = args.out / "-".join([model, method, *concepts] + ([args.label] if args.label else []))
                cli("erase", "--model", model, *[a for c in concepts for a in ("--concept", c)], "--method", method,
                    *sets, "--out", str(out), "--overwrite")
                wall = Edit.load(out).report["wall_time_s"]  # the method itself, without start-up
                r = json.loads(cli("eval", "--edit", str(out), "--json"))
                # beside the edit folder: --overwrite replaces only a folder that holds nothing but an edit
                out.with_name(out.name + ".eval.json").write_text(json.dumps(r, indent=2))
                print(f"| {model} | {method} | {args.label or 'defaults'} | {'+'.join(concepts)} | {wall:.0f} | "
                      f"{num(r['acc_e'])} | {num(r['acc_e_heldout'])} | {num(r['acc_g'])} | "
                      f"{num(r['acc_s'])} ({num(base['acc_s'])}) | {num(r['H'])} | "
                      f"{num(r['color_s'])} ({num(base['color_s'])}) | {num(r['acc_e_scene'])} | "
                      f"{num(r['acc_s_scene'])} | {num(r.get('acc_e_pair'))} | {num(r['scenes']['acc_both'])} |",
                      flush=True)


if __name__ == "__main__":
    main()
