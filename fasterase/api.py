"""erase() and load(): the thin public API.

erase resolves the model to a Denoiser, the concepts to a ConceptSet and the method to the
registry, runs it, applies the Edit (in place unless copy=True) and reports what it did. A
failure leaves the user's model as it was.
"""
from __future__ import annotations

import copy as copylib
import dataclasses
import resource
import time
from dataclasses import dataclass

import torch

from . import methods as registry
from . import models
from .concepts import ConceptSet, as_concepts
from .edit import Edit


@dataclass
class EraseResult:
    pipeline: object  # the edited diffusers pipeline
    model: models.Denoiser
    edit: Edit
    report: dict


def methods() -> dict[str, str]:
    """Every method's name with a one-line summary."""
    return {name: m.summary for name, m in registry.REGISTRY.items()}


def _is_toy(model: models.Denoiser) -> bool:
    from .toy import components

    return components.is_toy(model.pipeline)


def _resolve_concepts(model: models.Denoiser, concepts, preserve) -> ConceptSet:
    """Concepts as given; in the toy world bare names get the world's templates, and the
    other shapes are preserved unless the caller says what to preserve."""
    if not _is_toy(model):
        return as_concepts(concepts, preserve or ())
    from .toy import concepts as toy_concepts

    cs = as_concepts(concepts, default=toy_concepts.concept)
    if preserve is None:
        preserve = toy_concepts.preserve_for(cs.names)
    return ConceptSet(cs.concepts, tuple([preserve] if isinstance(preserve, str) else preserve))


def _check_tokens(model: models.Denoiser, concepts: ConceptSet) -> None:
    """A concept whose words the tokenizer does not know cannot be erased: say so."""
    tok = model.pipeline.tokenizer
    for c in concepts:
        ids = tok(c.name, add_special_tokens=False).input_ids
        if not ids or (tok.unk_token_id is not None and all(i == tok.unk_token_id for i in ids)):
            raise ValueError(f"concept {c.name!r} tokenizes to nothing this model's tokenizer knows")


def _options(method: registry.Method, options: dict):
    valid = [f.name for f in dataclasses.fields(method.config)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method.name!r}; valid: {', '.join(valid)}")
    return method.config(**options)


def _peak_memory_mb() -> dict:
    if torch.cuda.is_available():
        return {"peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20}
    return {"peak_process_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def erase(model, concepts, method: str, *, preserve=None, copy: bool = False, progress: bool = True,
          **options) -> EraseResult:
    """Erase `concepts` from `model` with `method`.

    model: a diffusers pipeline, a local diffusers folder, or "toy-sd" / "toy-flux".
    concepts: a string, a Concept, or a list of them. preserve: concept names to keep drawable
    (the toy world preserves its other shapes by default). options: the method's config fields
    (see fasterase.methods() and each method's config). copy=True edits a copy and leaves the
    given pipeline untouched; otherwise it is edited in place.
    """
    m = registry.get(method)
    cfg = _options(m, options)
    den = models.load(model)
    if copy:
        copied = models.load(copylib.deepcopy(den.pipeline))
        copied.name, den = den.name, copied
    cs = _resolve_concepts(den, concepts, preserve)
    _check_tokens(den, cs)
    start = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    edit = m.run(den, cs, cfg, progress=progress)  # leaves den unchanged, also when it fails
    edit.apply(den)  # rolls itself back if it fails
    report = {"model": den.name, "method": method, "concepts": cs.names, "preserve": list(cs.preserve),
              "config": vars(cfg).copy(), "steps": edit.report.get("steps", 0),
              "wall_time_s": time.perf_counter() - start, **_peak_memory_mb(), **edit.report}
    edit.report = report
    return EraseResult(den.pipeline, den, edit, report)


def load(model, path) -> object:
    """Apply a saved edit to `model` (a pipeline, folder or toy name); returns the pipeline."""
    den = models.load(model)
    Edit.load(path).apply(den)
    return den.pipeline
