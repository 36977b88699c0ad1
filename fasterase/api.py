"""erase() and load(): the thin public API.

erase resolves the model to a Denoiser, the concepts to a ConceptSet and the method to the
registry, checks what was asked (option types, options that cannot act on this run, prompts the
tokenizers cannot hold) before any work, runs it, applies the Edit (in place unless copy=True)
and reports what it did. An edit that changes nothing is an error, never a result. A failure
leaves the user's weights as they were; a pipeline given in place with another dtype or device
asked for keeps that cast and move once the run has started (casting back would not restore its
values bit for bit), while a run refused by the checks before it leaves it untouched.
"""
from __future__ import annotations

import contextlib
import copy as copylib
import dataclasses
import json
import math
import numbers
import os
import resource
import shlex
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch

from . import methods as registry
from . import models
from . import toy  # noqa: F401  registers "toy-sd" and "toy-flux" with models.load
from .concepts import ConceptSet, as_concepts
from .edit import Edit, base_param, check_lora_layers
from .errors import UserError, out_of_memory, past_any_memory
from .files import check_outside
from .models import meta
from .training import engine, loop


@dataclass
class EraseResult:
    pipeline: object = dataclasses.field(repr=False)  # the edited diffusers pipeline
    model: models.Denoiser = dataclasses.field(repr=False)
    edit: Edit
    report: dict = dataclasses.field(repr=False)


def methods() -> dict[str, str]:
    """Every method's name with a one-line summary."""
    return {name: m.summary for name, m in registry.REGISTRY.items()}


def _is_toy(model: models.Denoiser) -> bool:
    from .toy import components

    return components.is_toy(model.pipeline)


def _resolve_concepts(model: models.Denoiser, concepts, preserve) -> ConceptSet:
    """Concepts as given; in the toy world bare names get the world's templates, and the shapes
    (or colours) no erased concept names are preserved unless the caller says what to preserve."""
    if isinstance(preserve, str) and not preserve.strip():
        raise UserError(f"preserve={preserve!r} names no concept: give the names to keep drawable, or preserve=[] "
                        "to preserve none")
    if not _is_toy(model):
        return as_concepts(concepts, preserve or ())
    from .toy import concepts as toy_concepts

    cs = as_concepts(concepts, default=toy_concepts.concept)
    toy_concepts.check_erasable(cs.names)
    cs = ConceptSet(tuple(toy_concepts.completed(c) for c in cs), cs.preserve)
    toy_concepts.check_not_heldout(cs.concepts)
    if preserve is None:
        return as_concepts(list(cs.concepts), toy_concepts.preserve_for(cs.names))
    kept = as_concepts(list(cs.concepts), preserve)
    kind = toy_concepts.kind_of(cs.names[0])
    other = [p for p in kept.preserve if toy_concepts.kind_of(p) != kind]
    if other:
        plural = {"shape": "shapes", "color": "colours"}[kind]
        raise UserError(f"preserved concept(s) {other} are not {plural}, and this edit erases {plural}; preserve "
                        f"other {plural} (by default every one not erased is preserved)")
    if kind == "shape":
        erased = {s for n in cs.names for s in toy_concepts.shapes_named(n)}
        clash = [p for p in kept.preserve if erased & set(toy_concepts.shapes_named(p))]
        if clash:
            raise UserError(f"preserved concept(s) {clash} name a shape that is erased ({', '.join(sorted(erased))}); "
                            "a concept cannot be both erased and preserved")
    return kept


def _token_limits(model: models.Denoiser) -> list[tuple[object, int, str]]:
    """(tokenizer, tokens it holds, what) for each text encoder the model reads: CLIP's
    model_max_length (77 with its start and end tokens; FLUX's pooled embedding too) and FLUX's T5
    at the Denoiser's max_sequence_length."""
    p = model.pipeline
    limits = [(p.tokenizer, p.tokenizer.model_max_length, "CLIP tokenizer (with its start and end tokens)")]
    if model.kind == "flux":
        limits.append((p.tokenizer_2, model.max_sequence_length, "T5 tokenizer (max_sequence_length)"))
    return limits


def _check_prompts(model: models.Denoiser, concepts: ConceptSet) -> None:
    """Every prompt a method may train on must reach the model whole: a concept or preserved name
    with a word the tokenizer does not know (it would train as the unknown token), or a prompt
    truncated at the tokenizer's limit, cannot be erased."""
    names = [("concept", c.name) for c in concepts] + [("preserved concept", n) for n in concepts.preserve]
    for tokenizer, _, what in _token_limits(model):
        unk = tokenizer.unk_token_id
        for kind, name in names:
            unknown = [w for w in name.split() if not (ids := tokenizer(w, add_special_tokens=False).input_ids)
                       or unk in ids]
            if unknown:
                raise UserError(f"{kind} {name!r}: the word(s) {', '.join(map(repr, unknown))} tokenize to nothing "
                                f"this model's {what.split(' (')[0]} knows (each would be its unknown token); "
                                f"name what the model was trained on")
    for k, c in enumerate(concepts):
        prompts = (c.prompts(augment=True) + c.anchor_prompts(augment=True) + concepts.preserve_prompts(c)
                   + concepts.preserve_scene_prompts(c)
                   + [p for j in range(len(concepts)) if j != k for p in concepts.pair_prompts(k, j)])
        for tokenizer, limit, what in _token_limits(model):
            # words alone: CLIP's unknown token is its end token, which every encoded prompt ends with
            words = tokenizer(prompts, add_special_tokens=False).input_ids
            for prompt, ids, plain in zip(prompts, tokenizer(prompts).input_ids, words):
                if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in plain:
                    unknown = [w for w in prompt.split()
                               if tokenizer.unk_token_id in tokenizer(w, add_special_tokens=False).input_ids]
                    raise UserError(f"prompt {prompt!r} of concept {c.name!r} (its templates, pair templates, "
                                    f"attributes, anchor or preserved names) holds {', '.join(map(repr, unknown))}, "
                                    f"which this model's {what.split(' (')[0]} does not know (it would train as the "
                                    f"unknown token)")
                if len(ids) > limit:
                    raise UserError(f"prompt {prompt!r} of concept {c.name!r} is {len(ids)} tokens, and this model's "
                                    f"{what} holds {limit}: truncated, it would lose the concept. Shorten the "
                                    f"concept's name, templates, pair templates or attributes, or the preserved names")


# Each option type: what it is called, which values it takes (a bool is no number, a number is finite; numpy
# scalars and paths too), and their plain Python value (what the config and the edit's JSON metadata hold).
_ACCEPTS = {
    bool: ("true or false", lambda v: isinstance(v, (bool, numpy.bool_)), bool),
    int: ("an integer", lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool), int),
    float: ("a number", lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v), float),
    str: ("text", lambda v: isinstance(v, (str, os.PathLike)), os.fspath),
    type(None): ("null (unset)", lambda v: v is None, lambda v: v),
}


def _options(method: registry.Method, options: dict):
    valid = [f.name for f in dataclasses.fields(method.config)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UserError(f"unknown option(s) {unknown} for method {method.name!r}; valid: {', '.join(valid)}")
    hints = typing.get_type_hints(method.config)
    plain = {}
    for name, value in options.items():
        kinds = typing.get_args(hints[name]) or (hints[name],)
        kind = next((k for k in kinds if _ACCEPTS[k][1](value)), None)
        if kind is None:
            raise UserError(f"option {name!r} of method {method.name!r} must be "
                            f"{' or '.join(_ACCEPTS[k][0] for k in kinds)}, got {value!r}")
        plain[name] = _ACCEPTS[kind][2](value)
    return method.config(**plain)


def _given(options: dict, preserve, resolution, gradient_checkpointing: bool, micro_batch) -> set[str]:
    """The names of what the user set: the method's options and erase's own."""
    # preserving nothing (preserve=[]) asks nothing of a method
    erase_own = {"preserve": bool(preserve), "resolution": resolution is not None,
                 "gradient_checkpointing": gradient_checkpointing, "micro_batch": micro_batch is not None}
    return set(options) | {name for name, given in erase_own.items() if given}


def _check_idle(method: registry.Method, cfg, given: set[str], model: models.Denoiser, concepts: ConceptSet) -> None:
    """An option the user set that cannot act on this run is an error, not silently ignored."""
    idle = method.idle_options(cfg, given, model, concepts)
    if "checkpoint_every" in given and getattr(cfg, "checkpoint", None) is None and not idle:
        idle = ["checkpoint_every: no checkpoint file is set (--set checkpoint=FILE)"]
    if idle:
        raise UserError(f"{method.name} with {len(concepts)} concept(s) on this {model.kind} model cannot use "
                        f"what was set: {'; '.join(idle)}")


@torch.no_grad()
def _changes_nothing(edit: Edit, net: torch.nn.Module) -> bool:
    """True when applying `edit` would leave every weight as it is: whole weights equal to the
    base, selected entries equal to theirs, every LoRA product B A zero."""
    for name, value in edit.weights.items():
        p = base_param(net, name)
        if not torch.equal(value.to(p), p):
            return False
    for name, (idx, values) in edit.entries.items():
        flat = base_param(net, name).reshape(-1)
        if not torch.equal(values.to(flat), flat[idx.long()]):
            return False
    for key, a in edit.lora.items():
        if ".lora_A." in key:
            b = edit.lora[key.replace(".lora_A.", ".lora_B.")]
            if (b.float().flatten(1) @ a.float().flatten(1)).any():
                return False
    return True


def _model_record(den: models.Denoiser) -> str:
    """The model as the edit's report names it, for `eval --edit` and the overwrite rule: a built-in
    name, else the local folder the pipeline came from, absolute (so it is found from anywhere),
    else the pipeline's class, which names no model to load."""
    if den.name in models.BUILTINS:
        return den.name
    config = den.pipeline.config
    for name in (den.name, config.get("_name_or_path"), getattr(den.pipeline, "name_or_path", None)):
        if name and (Path(name).expanduser() / "model_index.json").is_file():
            return str(Path(name).expanduser().resolve())
    return den.name


def _peak_memory_mb(device: torch.device) -> dict:
    """The run's peak: allocated on its GPU (reset when it started), else the process's peak RSS."""
    if device.type == "cuda":
        return {"peak_cuda_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    return {"peak_process_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _plan_command(model: str, method: registry.Method, options: dict, concept_type: str, dtype: torch.dtype | None,
                  resolution, gradient_checkpointing: bool, micro_batch: int | None, where: torch.device) -> str:
    """The `fasterase plan` command line of an erase run (what it left out, plan defaults to as erase does)."""
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    words = ["fasterase", "plan", "--model", model, "--method", method.name]
    if dtype is not None:
        words += ["--dtype", names[dtype]]
    if resolution is not None:
        words += ["--resolution", str(resolution) if isinstance(resolution, numbers.Integral) else
                  "x".join(map(str, resolution))]
    if concept_type != "object":
        words += ["--concept-type", concept_type]
    if where.type == "cuda":
        words += ["--gpu-mem", f"{torch.cuda.get_device_properties(where).total_memory / 1e9:.1f}"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a launcher's processes, before the process group starts
        words += ["--gpus", os.environ["WORLD_SIZE"]]
    if gradient_checkpointing:
        words.append("--gradient-checkpointing")
    if micro_batch is not None:
        words += ["--micro-batch", str(micro_batch)]
    for key, value in options.items():
        value = os.fspath(value) if isinstance(value, os.PathLike) else value
        text = value if isinstance(value, str) and not _reads_as_json(value) else json.dumps(value, default=str)
        words += ["--set", f"{key}={text}"]
    return shlex.join(words)


def _reads_as_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


@contextlib.contextmanager
def _memory_hint(command: typing.Callable[[], str], what: str, den: models.Denoiser | None = None):
    """An out-of-memory error leaves with the planner's command for the run (made then) added to its message;
    with the run's `den`, a tensor past 2**63 bytes is a UserError naming its image size, as plan says it."""
    try:
        yield
    except RuntimeError as exc:
        if den is not None and past_any_memory(exc):
            raise UserError(f"{den.height}x{den.width} px is too large to run: a tensor of the run would exceed "
                            "2**63 bytes") from None
        if not out_of_memory(exc):
            raise
        text = command()
        placeholder = (" (FOLDER: a diffusers folder of this pipeline, e.g. from pipe.save_pretrained(FOLDER))"
                       if " --model FOLDER " in text else "")
        exc.add_note(f"`{text}`{placeholder} gives {what} part by part, and the options that make it fit "
                     "(gradient checkpointing and micro-batches give the same result in less memory)")
        raise


def erase(model, concepts, method: str, *, preserve=None, copy: bool = False, progress: bool = True,
          device=None, dtype=None, resolution=None, gradient_checkpointing: bool = False, micro_batch=None,
          **options) -> EraseResult:
    """Erase `concepts` from `model` with `method`.

    model: a diffusers pipeline, a local diffusers folder, or "toy-sd" / "toy-flux".
    concepts: a string, a Concept, or a list of them; commas in a string separate concepts
    ("circle, square" is two). preserve: concept names to keep drawable, named the same way (the
    toy world preserves the shapes no erased concept names by default; [] preserves none). options: the
    method's config fields (each method's config dataclass in fasterase/methods/<name>.py; an unknown one is refused, naming
    the valid ones). copy=True edits a copy and leaves the
    given pipeline untouched; otherwise it is edited in place. device: "cpu", "cuda", "cuda:N"
    (default: a name or folder loads on the GPU if there is one, else the CPU; a pipeline stays
    where it is); dtype: "fp32", "bf16" or "fp16" for every
    component (default: the model's own); resolution: the training and sampling image size in px,
    an int or (height, width) (default: the model's own). The frozen model stays in that dtype; what trains (LoRA
    weights, selected entries, discriminators) is held in fp32. While the method runs, the text
    encoders wait on the CPU (moved in only to encode), and gradient_checkpointing=True switches on
    diffusers' gradient checkpointing of the network (less activation memory, one more forward);
    micro_batch: rows per network call (default: each pass whole): passes without a graph (rollouts,
    the frozen teacher) free a chunk's activations once it is done, passes with one are checkpointed
    per chunk and recomputed one chunk at a time in backward (gradient accumulation; one more forward):
    the same results up to rounding, in less activation memory (Denoiser.predict); a method that runs no
    image through the network (UCE, TRACE with finetune=False) refuses resolution and both. The report's
    micro_batch and gradient_checkpointing are this call's; a training method's memory_options list
    the steps each setting ran (a run resumed from its checkpoint with other settings has several).
    With zero=3 the network is never whole on the device: it loads (or stays) where it is, DeepSpeed
    ZeRO-3 partitions it onto the device for the run, and it is gathered back there at the end (a name
    or folder: the CPU; move the pipeline yourself if the GPU holds it whole).
    """
    for name, value in (("copy", copy), ("progress", progress), ("gradient_checkpointing", gradient_checkpointing)):
        if not isinstance(value, bool):
            raise UserError(f"{name} must be true or false, got {value!r}")
    if micro_batch is not None and (isinstance(micro_batch, bool) or not isinstance(micro_batch, numbers.Integral)
                                    or micro_batch < 1):
        raise UserError(f"micro_batch (--micro-batch) must be a whole number of rows >= 1 (or None: whole passes), "
                        f"got {micro_batch!r}")
    micro_batch = None if micro_batch is None else int(micro_batch)
    m = registry.get(method)
    cfg = _options(m, options)
    fresh = isinstance(model, (str, Path))
    if getattr(cfg, "checkpoint", None) is not None:
        check_outside(Path(cfg.checkpoint), models.folder_of(model) if fresh else None, "checkpoint")
        loop.check_checkpoint(cfg.checkpoint)  # a bad path, or a file that is not a checkpoint, before any work
    if device is not None:
        models.resolve_device(device)  # before any weights load
    models.resolve_dtype(dtype)
    # ZeRO-3 partitions the network onto the device for the run (training.engine.partitioned): it never
    # moves there whole, and goes back where it was at the end
    zero3 = getattr(cfg, "zero", 0) == 3
    if fresh and resolution is not None and models.folder_of(model):
        # from the folder's configs: a bad size before any weights load (a registered name is built once, then checked)
        meta.describe(str(model)).denoiser(torch.float32).set_resolution(resolution)
    if fresh:  # a name or folder loads afresh (a copy already), in its dtype
        where = models.resolve_device(device)
        command = lambda: _plan_command(str(model), m, {}, "object", models.resolve_dtype(dtype), None,  # noqa: E731
                                        False, None, where)
        with _memory_hint(command, "the model's weights"):
            den = models.load(model, device, dtype, keep_network=zero3)
    elif copy:  # the given pipeline stays as it is, where it is
        given = model if isinstance(model, models.Denoiser) else None
        den = models.load(copylib.deepcopy(given.pipeline if given else model))
        if given:
            den.name = given.name
    else:
        den = models.load(model)
    if resolution is not None:
        den.set_resolution(resolution)
    check_lora_layers(den.network)
    cs = _resolve_concepts(den, concepts, preserve)
    _check_idle(m, cfg, _given(options, preserve, resolution, gradient_checkpointing, micro_batch), den, cs)
    _check_prompts(den, cs)
    where = models.resolve_device(device) if device is not None or fresh else den.network.device

    def command() -> str:  # the planner plans one concept: options idle for one are left out
        record = _model_record(den)
        named = record in models.BUILTINS or models.folder_of(record) is not None
        one = ConceptSet(cs.concepts[:1])
        idle = {text.split(":")[0] for text in m.idle_options(cfg, set(options), den, one)}
        return _plan_command(record if named else "FOLDER", m, {k: v for k, v in options.items() if k not in idle},
                             cs.concepts[0].type, models.resolve_dtype(dtype) or (None if fresh else den.network.dtype),
                             resolution, gradient_checkpointing, micro_batch, where)

    what = "this run's memory" + (" for one of its concepts" if len(cs.concepts) > 1 else "")
    with _memory_hint(command, what):  # cast and moved once the run is checked: a refused one leaves it as it was
        models.load(den, device, dtype, keep_network=zero3)
    models.warn_if_fp16_on_cpu(den, where, "choose bf16 or fp32 (dtype=, --dtype)")
    start = time.perf_counter()
    if where.type == "cuda":
        torch.cuda.reset_peak_memory_stats(where)
    if gradient_checkpointing:
        den.network.enable_gradient_checkpointing()
    den.micro_batch = micro_batch
    partition = engine.partitioned(den.network, where, cfg.deepspeed_config) if zero3 else contextlib.nullcontext()
    try:
        with _memory_hint(command, what, den), partition, den.text_encoders_offloaded():
            edit = m.run(den, cs, cfg, progress=progress)  # leaves den unchanged, also when it fails
    finally:
        den.micro_batch = None
        if gradient_checkpointing:
            den.network.disable_gradient_checkpointing()
    if _changes_nothing(edit, den.network):
        raise UserError(f"{method} changed no weight of the model for {', '.join(cs.names)}: nothing was erased, "
                        f"and the model is as it was (check the concepts' prompts and the method's options)")
    edit.apply(den)  # rolls itself back if it fails
    report = {"model": _model_record(den), "method": method, "concepts": cs.names, "preserve": list(cs.preserve),
              "config": dict(edit.config), "steps": edit.report.get("steps", 0),  # as the method resolved it
              "wall_time_s": time.perf_counter() - start, **_peak_memory_mb(where),
              "device": str(where), "dtype": str(den.network.dtype).removeprefix("torch."),
              "gradient_checkpointing": gradient_checkpointing, "micro_batch": micro_batch,
              "resolution": [den.height, den.width] if m.runs_images(cfg) else None,
              **edit.report}
    edit.report = report
    return EraseResult(den.pipeline, den, edit, report)


def load(model, path, device=None, dtype=None) -> object:
    """Apply a saved edit to `model` (a pipeline, folder or toy name), on `device` in `dtype` (as
    erase() takes them; a name or folder loads by default in the dtype the edit was made in, whose base
    values its fingerprint checks; a pipeline in memory is checked before it is cast or moved, so a refused
    edit leaves it as it was); returns the pipeline. UserError when the edit does not fit the model."""
    edit = Edit.load(path)
    if isinstance(model, (str, Path)):
        edit.check_kind_of(model)
        den = models.load(model, device, dtype or edit.report.get("dtype"))
    else:  # a model in memory is checked before it is cast: a refused edit leaves it as it was
        den = models.load(model)
        if device is not None:
            models.resolve_device(device)
        cast = models.resolve_dtype(dtype)
        if cast is not None and cast != den.network.dtype:  # (else apply's own check is the one)
            check_lora_layers(den.network, adds_lora=bool(edit.lora))
            edit.check_fits(den, cast)
        models.load(den, device, dtype)
    models.warn_if_fp16_on_cpu(den, den.network.device, "choose bf16 or fp32 (dtype=) and an edit made in it")
    edit.apply(den)
    return den.pipeline
