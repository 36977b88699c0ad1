"""The fasterase command line: `fasterase demo | erase | eval | plan | methods` (also `python -m fasterase`).

A UserError (bad input) ends with one line on stderr and exit status 2; a non-finite loss with one
line and exit 1; an interrupt (Ctrl-C, or SIGTERM as a job scheduler or `kill` sends) saves the
training checkpoint, removes half-written files and exits 130 (143 for SIGTERM); anything else is a bug
and keeps its traceback (exit 1).
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import signal
import sys
import warnings
from pathlib import Path

from .concepts import CONCEPT_TYPES
from .errors import UserError, out_of_memory


class UsageError(UserError):
    """A command line argparse refused, named by the (sub)command that refused it."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse, but its usage errors are one line too."""

    def error(self, message):
        raise UsageError(self.prog, message)


class SubcommandParser(Parser):
    """A subcommand's parser: arguments it does not know are its error, named by it (argparse hands them
    to the top-level parser)."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extra = super().parse_known_args(args, namespace)
        if extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        return namespace, extra


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of names, got {text!r}")
    return items


def _resolution(text: str):
    try:
        sides = [int(v) for v in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW in px, got {text!r}") from None
    if len(sides) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected N or HxW in px, got {text!r}")
    return sides[0] if len(sides) == 1 else tuple(sides)


def _settings(pairs: list[str]) -> dict:
    """--set key=value pairs; values are read as JSON (numbers, true/false, null), Python's True/False/None,
    or else text (checkpoint=None is no checkpoint, not a file named None)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"bad --set {pair!r}: expected key=value")
        if key.strip() in out:
            raise UserError(f"--set {key.strip()} is given twice; give each option once")
        python = {"None": None, "True": True, "False": False}
        try:
            out[key.strip()] = python[value.strip()] if value.strip() in python else json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _quiet_libraries() -> None:
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    import torch

    if not torch.cuda.is_available():  # DeepSpeed's fallback (fasterase runs on CUDA or the CPU), chosen: no warning
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def cmd_methods(args) -> int:
    from . import methods

    for name, summary in methods().items():
        print(f"{name:<6} {summary}")
    return 0


def _launched_device(local_rank: int) -> str | None:
    """A launched process's GPU: the one of its local rank (None on a machine without one)."""
    import torch

    return f"cuda:{local_rank}" if torch.cuda.is_available() else None


def cmd_erase(args) -> int:
    from dataclasses import fields

    from . import erase
    from .edit import PIPELINE_DIR, target_folder
    from .methods import get

    out = target_folder(args.out, args.overwrite, model=args.model)  # refused before any training
    settings = _settings(args.set)
    options = [f.name for f in fields(get(args.method).config)]
    own = sorted(set(settings) & set(inspect.signature(erase).parameters))
    if own:  # erase's own arguments, not the method's options (passed on, they would clash with the flags)
        raise UserError(f"unknown option(s) {own} for method {args.method!r} (--set takes the method's options); "
                        f"valid: {', '.join(options)}")
    checkpoint = settings.get("checkpoint")
    if isinstance(checkpoint, str) and checkpoint.strip():
        ckpt = Path(checkpoint).expanduser().resolve()
        if ckpt == out or out in ckpt.parents:
            raise UserError(f"checkpoint {ckpt} is inside --out {out}, which the edit replaces; keep it elsewhere")
        if out.parent == ckpt.parent and out.name.startswith(f"{ckpt.name}."):  # ANT's per-concept FILE.k
            raise UserError(f"--out {out} could be one of the checkpoint files {ckpt}.N of a run with several "
                            "concepts; name --out or the checkpoint differently")
    device, rank = args.device, 0
    local_rank = args.local_rank if args.local_rank is not None else os.environ.get("LOCAL_RANK")
    if local_rank is not None:  # started by a launcher (deepspeed, torchrun): one process per GPU, ZeRO-2 by default
        if "zero" in options:
            settings.setdefault("zero", 2)
        device = device or _launched_device(int(local_rank))
        rank = int(os.environ.get("RANK", 0))
    preserve = args.preserve
    if preserve is not None and any(not p.strip() for p in preserve):  # --preserve "": keep nothing in particular
        if len(preserve) > 1:
            raise UserError(f"--preserve \"\" (preserve nothing) cannot be given with names: {preserve}")
        preserve = []
    concepts = args.concept
    if args.concept_type:
        from .concepts import Concept, split_names

        concepts = [Concept(name, type=args.concept_type) for text in args.concept for name in split_names(text)]
    result = erase(args.model, concepts, method=args.method, preserve=preserve, device=device,
                   dtype=args.dtype, resolution=args.resolution, gradient_checkpointing=args.gradient_checkpointing,
                   micro_batch=args.micro_batch, progress=rank == 0, **settings)
    if rank != 0:  # every process ends with the same edit; one writes it
        return 0
    result.edit.save(out, overwrite=args.overwrite, pipeline=result.model if args.save_pipeline else None)
    r = result.report
    print(f"erased {', '.join(r['concepts'])} from {r['model']} with {r['method']} in {r['wall_time_s']:.1f} s; "
          f"edit saved to {out}" + (f", the edited pipeline to {out / PIPELINE_DIR}" if args.save_pipeline else ""))
    return 0


def cmd_eval(args) -> int:
    import torch

    from . import models
    from .models import meta
    from .concepts import Concept, split_names
    from .edit import Edit
    from .eval import check_grid_path, evaluate, format_table, sample_grid
    from .eval.evaluate import COLUMNS, grid_prompts, outside_toy
    from .files import check_outside
    from .toy import components
    from .toy.concepts import colors_named, shapes_named

    if not args.model and not args.edit:
        raise UserError("give --model, --edit, or both")
    erased = [n for text in args.erased or () for n in split_names(text)]
    if args.grid is not None:
        check_grid_path(args.grid)  # before any model loads or image is drawn
    if args.prompt and not all(p.strip() for p in args.prompt):
        raise UserError("--prompt: each prompt must be a non-empty text")
    edit = Edit.load(args.edit) if args.edit else None
    name = args.model or edit.report.get("model")
    if not name or name in models.ADAPTERS:  # edits of a pipeline object record only its class
        raise UserError("this edit does not record its model; pass --model")
    if name not in models.BUILTINS and models.folder_of(name) is None:
        if not args.model:
            raise UserError(f"this edit was made on {name}, which is no model folder now; pass --model with the "
                            "folder where that model is")
        models.load(name)  # no such model: the loader's own error, before blaming the toy world
    if args.grid is not None:
        check_outside(Path(args.grid), models.folder_of(name), "--grid")
    prompts = args.prompt
    if not components.is_toy_source(name):  # from its name or configs: refused before any weights load
        if erased or not args.grid:
            raise outside_toy(name)
        if args.repeats is not None:
            raise UserError("--repeats sets how often each prompt is scored; outside the toy world nothing is "
                            "scored and the grid shows each prompt once")
        prompts = prompts or (grid_prompts(edit.concepts, edit.report.get("preserve", [])) if edit else None)
        if not prompts:
            raise UserError("a grid of a model outside the toy world draws the prompts given with --prompt, or "
                            "an edit's concepts (--edit); give either")
        if args.sample_steps is not None and args.sample_steps < 1:
            raise UserError(f"--sample-steps must be at least 1, got {args.sample_steps}")
        if args.resolution is not None and models.folder_of(name):  # a bad size before any weights load
            meta.describe(name, torch.float32).denoiser(torch.float32).set_resolution(args.resolution)
    elif prompts or args.resolution is not None or args.sample_steps is not None:
        raise UserError("--prompt, --resolution and --sample-steps set the grid of a model outside the toy world; "
                        "the toy world's grid shows the prompts it scores, at the settings it scores them")
    if edit:
        edit.check_kind_of(name)
    # in the dtype the edit was made in, whose base values its fingerprint holds
    model = models.load(name, dtype=edit.report.get("dtype") if edit else None)
    models.warn_if_fp16_on_cpu(model, model.network.device, "an edit made in fp16 is evaluated in it: make it in "
                               "bf16 or fp32 (erase --dtype) to evaluate it on the CPU" if edit else
                               "save the model in bf16 or fp32 to evaluate it on the CPU")
    toy = components.is_toy(model.pipeline)
    if edit:
        edit.apply(model)
        own = [c["name"] for c in edit.concepts]
        if toy and not erased:  # scored by the toy shapes or colours its concepts name ("red circle": the circle)
            erased = [n for n in own if shapes_named(n) or colors_named(n)]
        elif erased and sorted(" ".join(n.lower().split()) for n in erased) != sorted(n.lower() for n in own):
            print(f"fasterase eval: note: scoring --erased {', '.join(erased)} as erased; the edit erased "
                  f"{', '.join(own)}", file=sys.stderr)
    if toy or erased or not args.grid:  # evaluate refuses a model outside the toy world before any work
        repeats = 2 if args.repeats is None else args.repeats
        report = evaluate(model, erased=erased, seed=args.seed, repeats=repeats, grid=args.grid, progress=True)
    else:
        columns = len(Concept(**edit.concepts[0]).templates) if edit and not args.prompt else min(COLUMNS, len(prompts))
        if args.resolution is not None:
            model.set_resolution(args.resolution)
        if args.sample_steps is not None:
            model.sample_kwargs["num_inference_steps"] = args.sample_steps
        report = sample_grid(model, args.grid, prompts, seed=args.seed, columns=columns)
    if edit:
        report["edit"] = str(args.edit)
    if args.json:
        print(json.dumps(report, indent=2))
    elif "concepts" in report:
        print(format_table(report))
    else:
        print(f"{report['images']} sample image{'s' if report['images'] > 1 else ''} of {report['model']} (no "
              f"scores outside the toy world): {report['grid']}")
    return 0


def cmd_plan(args) -> int:
    from .plan import plan

    result = plan(args.model, args.method, _settings(args.set), resolution=args.resolution, batch_size=args.batch_size,
                  gpus=args.gpus, gpu_mem=args.gpu_mem, dtype=args.dtype, salient_share=args.salient_share,
                  gradient_checkpointing=args.gradient_checkpointing, micro_batch=args.micro_batch,
                  concept_type=args.concept_type, progress=True)
    print(json.dumps(result.to_json(), indent=2) if args.json else result.table())
    return 0


def cmd_demo(args) -> int:
    import torch

    from . import erase, methods, models
    from .eval import check_grid_path, evaluate, format_table, save_grid
    from .files import check_writable
    from .toy import components, shapes

    if args.method not in methods():  # what was asked is checked before the "before" evaluation
        raise UserError(f"unknown method {args.method!r}; valid: {', '.join(methods())}")
    not_toy = [name for name in args.models if not components.is_toy_source(name)]
    if not_toy:
        raise UserError(f"the demo scores its edits in the toy world, and {', '.join(not_toy)} is not of it; "
                        f"valid: {', '.join(components.SAMPLE_KWARGS)} (or a saved copy of one)")
    out = Path(args.out).expanduser()
    if (out.exists() and not out.is_dir()) or (out.is_symlink() and not out.exists()) or not out.parent.is_dir():
        raise UserError(f"--out {out} must be a folder (new or existing) in an existing folder")
    check_writable(out, f"--out {out}")
    out.mkdir(exist_ok=True)
    grids = {name: check_grid_path(out / f"{Path(name).name}-circle-{args.method}.png") for name in args.models}
    prompts = [f"a {c} {s}" for s in shapes.SHAPES for c in shapes.COLORS]
    for name in args.models:
        model = models.load(name)
        before = evaluate(model, seed=args.seed, erased=["circle"], repeats=1, progress=True)
        before_images = model.generate(prompts, seed=args.seed)
        result = erase(model, "circle", method=args.method, progress=True)
        after = evaluate(model, seed=args.seed, erased=["circle"], repeats=1, progress=True)
        grid = save_grid(torch.cat([before_images, model.generate(prompts, seed=args.seed)]),
                         grids[name], columns=len(prompts))
        print(f"\n== {name}: erase 'circle' with {args.method} ({result.report['wall_time_s']:.1f} s) ==")
        print("before (the original model, scored against 'circle' as after):\n" + format_table(before))
        print("after:\n" + format_table(after))
        print(f"before (top) / after (bottom) grid: {grid}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="fasterase", description="Concept erasure for diffusion models.")
    # the deepspeed launcher starts `python -m fasterase --local_rank=N erase ...`
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, parser_class=SubcommandParser)

    d = sub.add_parser("demo", help="erase 'circle' from the toy pipelines; before/after table and grid")
    d.add_argument("--models", type=_csv, default=["toy-sd", "toy-flux"], help="comma-separated toy models")
    d.add_argument("--method", default="uce", help="the method to erase with (see `fasterase methods`)")
    d.add_argument("--out", default="fasterase_demo", help="folder for the image grids")
    d.add_argument("--seed", type=int, default=0, help="seed of the scored samples and the grids")
    d.set_defaults(run=cmd_demo)

    e = sub.add_parser("erase", help="erase concepts and save the edit")
    e.add_argument("--model", required=True, help="toy-sd, toy-flux, or a local diffusers folder")
    e.add_argument("--concept", action="append", required=True,
                   help="concepts to erase; commas separate several (\"circle, square\"), as does repeating the option")
    e.add_argument("--method", required=True, help="see `fasterase methods`")
    e.add_argument("--concept-type", choices=CONCEPT_TYPES,
                   help="what every --concept is (default object; in the toy world the name's own: a shape is an "
                        "object, a colour a style): picks its prompt templates (\"a painting by "
                        "{}\" for a style) and the method's per-type defaults (ESD trains esd-x for a style or "
                        "celebrity)")
    e.add_argument("--preserve", action="append",
                   help="concepts to keep, named like --concept (default: none, or in the toy world every shape or "
                        "colour not erased); --preserve \"\" keeps none")
    e.add_argument("--set", action="append", metavar="KEY=VALUE", help="a method option (repeatable)")
    e.add_argument("--out", required=True, help="folder to write the edit to")
    e.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out that holds an edit (never a model's or any other folder)")
    e.add_argument("--device", help="cpu, cuda or cuda:N (default: the GPU if there is one, else the CPU)")
    e.add_argument("--dtype", help="fp32, bf16 or fp16: the frozen model's dtype (default: the model's own); "
                                   "what trains is held in fp32")
    e.add_argument("--resolution", type=_resolution, help="training and sampling size in px: N or HxW "
                                                            "(default: the model's own)")
    e.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the network's activations in the backward pass (less memory, slower)")
    e.add_argument("--micro-batch", type=int, metavar="ROWS",
                   help="rows per network call, passes with a graph accumulated chunk by chunk: less memory")
    e.add_argument("--save-pipeline", action="store_true",
                   help="also save the edited pipeline, LoRA fused into its weights, in OUT/pipeline")
    e.set_defaults(run=cmd_erase)

    v = sub.add_parser("eval", help="detector-scored accuracies (and erasure metrics) on the toy world; "
                                    "a sample grid for any model")
    v.add_argument("--model", help="toy-sd, toy-flux, or a local diffusers folder")
    v.add_argument("--edit", help="a saved edit folder to apply first (the toy shapes its concepts name "
                                  "become --erased)")
    v.add_argument("--erased", action="append",
                   help="erased concepts, scored by the toy shapes or colours they name; commas separate several "
                        "(\"circle, square\"), as does repeating the option")
    v.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    v.add_argument("--grid", help="write a PNG grid of sample images here (alone: the only output for a model "
                                  "outside the toy world, which has no detector)")
    v.add_argument("--prompt", action="append",
                   help="outside the toy world: a prompt the grid draws (repeatable; default: an --edit's concepts "
                        "in their templates, then the concepts it preserved)")
    v.add_argument("--resolution", type=_resolution,
                   help="outside the toy world: the grid's image size in px, N or HxW (default: the model's own)")
    v.add_argument("--sample-steps", type=int, metavar="N",
                   help="outside the toy world: sampler steps per grid image (default: the pipeline's own, 50 for "
                        "SD and 28 for FLUX)")
    v.add_argument("--seed", type=int, default=0, help="seed of the first image; each batch adds its offset")
    v.add_argument("--repeats", type=int,
                   help="samples per prompt (default 2: 32 images per shape); more gives a less noisy rate")
    v.set_defaults(run=cmd_eval)

    pl = sub.add_parser("plan", help="the memory a method needs per GPU on a model (from its configs, on the meta "
                                     "device), whether it fits, and else the memory options that make it fit")
    pl.add_argument("--model", required=True, help="toy-sd, toy-flux, sd15, flux-dev, or a local diffusers folder")
    pl.add_argument("--method", required=True, help="see `fasterase methods`")
    pl.add_argument("--resolution", type=_resolution, help="training and sampling size in px: N or HxW "
                    "(default: the model's own size)")
    pl.add_argument("--concept-type", choices=CONCEPT_TYPES, default="object",
                    help="the planned concept's type, as erase's --concept-type (default object; ESD plans esd-x "
                         "for a style or celebrity)")
    pl.add_argument("--batch-size", type=int, help="prompts per training step (the method's batch_size)")
    pl.add_argument("--gpus", type=int, default=1,
                    help="GPUs, one process each, the methods under DeepSpeed ZeRO (--set zero=2|3, 2 by default; "
                         "default 1)")
    pl.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU in GB, 1 GB = 1e9 bytes (default 80)")
    pl.add_argument("--dtype", help="bf16, fp16 or fp32: the pipeline's weights (default: what erase loads "
                    "it in, a folder's stored dtype, the toy pipelines' fp32; bf16 for sd15 and flux-dev)")
    pl.add_argument("--salient-share", type=float,
                    help="ANT: the share of entries its saliency map keeps (default 0.15, measured on toy-flux)")
    pl.add_argument("--gradient-checkpointing", action="store_true",
                    help="plan with erase's --gradient-checkpointing (less activation memory)")
    pl.add_argument("--micro-batch", type=int, metavar="ROWS", help="plan with erase's --micro-batch")
    pl.add_argument("--set", action="append", metavar="KEY=VALUE", help="a method option (repeatable)")
    pl.add_argument("--json", action="store_true", help="print one JSON object (bytes) instead of a table")
    pl.set_defaults(run=cmd_plan)

    m = sub.add_parser("methods", help="list the erasure methods")
    m.set_defaults(run=cmd_methods)
    return p


@contextlib.contextmanager
def _one_line_warnings(command: str):
    """Within the block fasterase's own warnings are one line on stderr, named by the command; others
    show as Python shows them."""
    from .models import SlowRunWarning

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, SlowRunWarning):
            print(f"{command}: warning: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is: it unwinds as Ctrl-C does (training saves its checkpoint, a
    half-written edit is removed) instead of dying where it stands."""


@contextlib.contextmanager
def _sigterm_interrupts():
    def terminate(signum, frame):
        raise Terminated()

    was = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, was)


def main(argv: list[str] | None = None) -> int:
    command = "fasterase"
    try:
        args = parser().parse_args(argv)
        command = f"fasterase {args.command}"
        _quiet_libraries()
        with _one_line_warnings(command), _sigterm_interrupts():
            return args.run(args)
    except UserError as exc:
        print(f"{exc.prog if isinstance(exc, UsageError) else command}: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # a non-finite loss: what happened, not a bug in the code
        print(f"{command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"{command}: {'terminated (SIGTERM)' if isinstance(exc, Terminated) else 'interrupted'}", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except RuntimeError as exc:  # out of memory: torch's account of it, and the planner's command for the run
        if not out_of_memory(exc):
            raise
        print(f"{command}: error: {exc}", *getattr(exc, "__notes__", ()), sep="\n", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
