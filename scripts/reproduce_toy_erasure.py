"""Reproduce the README's toy erasure tables: erase concepts with each method from each toy
pipeline through the CLI, evaluate the saved edit with `fasterase eval --edit DIR --json`, and
print one markdown row per run (with the original model's Acc_s, for the 0.9x / 0.85x bars).

    python scripts/reproduce_toy_erasure.py --methods uce,esd,ant --out runs/erasure
    python scripts/reproduce_toy_erasure.py --methods ant --concepts circle,square --out runs/multi
    python scripts/reproduce_toy_erasure.py --methods ant --set saliency=false --label full-network
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
    p.add_argument("--methods", default="uce,esd,ant")
    p.add_argument("--models", default="toy-sd,toy-flux")
    p.add_argument("--concepts", default="circle", help="comma-separated: erased together in one edit")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method option (repeatable)")
    p.add_argument("--label", default="", help="a name for the option set, shown in the table")
    p.add_argument("--out", type=Path, default=Path("runs/erasure"))
    p.add_argument("--no-header", action="store_true")
    args = p.parse_args()
    concepts = args.concepts.split(",")
    sets = [a for s in args.set for a in ("--set", s)]
    if not args.no_header:
        print("| model | method | options | concepts | method wall time (s) | Acc_e | Acc_g | Acc_s (original) | H "
              "| Col_s (original) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        base = json.loads(cli("eval", "--model", model, "--erased", args.concepts, "--json"))
        for method in args.methods.split(","):
            out = args.out / "-".join([model, method, *concepts] + ([args.label] if args.label else []))
            cli("erase", "--model", model, *[a for c in concepts for a in ("--concept", c)], "--method", method,
                *sets, "--out", str(out), "--overwrite")
            wall = Edit.load(out).report["wall_time_s"]  # the method itself, without start-up
            r = json.loads(cli("eval", "--edit", str(out), "--json"))
            # beside the edit folder: --overwrite replaces only a folder that holds nothing but an edit
            out.with_name(out.name + ".eval.json").write_text(json.dumps(r, indent=2))
            g = "-" if r["acc_g"] is None else f"{r['acc_g']:.3f}"
            print(f"| {model} | {method} | {args.label or 'defaults'} | {'+'.join(concepts)} | {wall:.0f} | "
                  f"{r['acc_e']:.3f} | {g} | {r['acc_s']:.3f} ({base['acc_s']:.3f}) | {r['H']:.3f} | "
                  f"{r['color_s']:.3f} ({base['color_s']:.3f}) |", flush=True)


if __name__ == "__main__":
    main()
