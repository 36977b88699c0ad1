"""Reproduce the README's toy erasure table: erase "circle" with each method from each toy
pipeline through the CLI, evaluate the saved edit with `fasterase eval --edit DIR --json`, and
print one markdown row per run (with the original model's Acc_s for the 0.85x bar).

    python scripts/reproduce_toy_erasure.py --methods uce,esd --out runs/erasure
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from fasterase.edit import Edit


def cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "fasterase", *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"fasterase {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", default="uce,esd")
    p.add_argument("--models", default="toy-sd,toy-flux")
    p.add_argument("--concept", default="circle")
    p.add_argument("--out", type=Path, default=Path("runs/erasure"))
    args = p.parse_args()
    print("| model | method | method wall time (s) | Acc_e | Acc_g | Acc_s (original) | H |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        base = json.loads(cli("eval", "--model", model, "--erased", args.concept, "--json"))
        for method in args.methods.split(","):
            out = args.out / f"{model}-{method}-{args.concept}"
            cli("erase", "--model", model, "--concept", args.concept, "--method", method, "--out", str(out),
                "--overwrite")
            wall = Edit.load(out).report["wall_time_s"]  # the method itself, without start-up
            r = json.loads(cli("eval", "--edit", str(out), "--json"))
            (out / "eval.json").write_text(json.dumps(r, indent=2))
            g = "-" if r["acc_g"] is None else f"{r['acc_g']:.3f}"
            print(f"| {model} | {method} | {wall:.0f} | {r['acc_e']:.3f} | {g} | {r['acc_s']:.3f} "
                  f"({base['acc_s']:.3f}) | {r['H']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
