"""The memory planner: how much memory a method needs on one GPU, from the model's configs alone.

`plan(model, method, ...)` builds the model's denoising network on the meta device (no weights, no
memory; models.meta) and returns a Plan: for each moment of the run where memory peaks (a column:
"saliency", "refresh", "step", ...) the bytes of every part alive then, their total, and whether
the largest fits in the GPU. Units: GB = 1e9 bytes everywhere (the printed figures and --gpu-mem);
the JSON gives bytes.

What it models is what the methods' code does today (fasterase/methods, fasterase/training), for one
concept of --concept-type (default object) with the method's defaults and the --set overrides: in the
toy world "circle" (an object) or "red" (a style) with the rest of its kind preserved (erase's default
there); elsewhere one concept with its type's templates (concepts.TEMPLATES) and per-type method
defaults, nothing preserved. Every part and its source:

- weights of the network, the VAE and the text encoders in --dtype: parameter and buffer counts of
  the modules built from their configs. The pipeline loads whole onto the GPU; while the method runs
  the text encoders wait on the CPU and come back only while a prompt is encoded
  (Denoiser.text_encoders_offloaded): the "encoding" column is that moment (nothing trains yet: the
  methods encode their prompts before their first step), the other columns leave them out.
- prompt cache: Denoiser.encode keeps every prompt's embedding in --dtype (tokens x width, FLUX also
  the pooled vector), for the distinct prompts the method encodes.
- trainable state, gradients, optimizer states: counted from the parameters the method trains.
  LoRAs (ESD, TRACE) are set up on the meta network by the method's own code (training.params.add_lora:
  fp32 factors) and train with torch's AdamW: two fp32 states an entry.
  ANT's and FADE's salient entries (training.params.CompactDelta) are a share of every tensor's
  entries: FADE's saliency_share; ANT's is known only once its maps are computed (--salient-share,
  default ANT_SHARE). Per entry: the int32 index (none with saliency=false, which trains whole
  parameters), the base value in --dtype and the fp32 master CompactDelta keeps, and the master's fp32
  gradient. SalientAdamW's 8-bit states over the masters
  (ops/quant.py): 2 bytes an entry and two fp32 absmax per 256 entries; fp32, 8 bytes an entry, for a
  tensor with fewer than 4096 (optim.SalientAdamW's min_8bit_size). Every tensor holding a selected
  entry (all of them, assumed here) requires grad, so autograd makes its whole gradient, which a hook
  gathers into the master's gradient and frees at once: one layer's whole gradient (the largest
  tensor's, with its gathered fp32 copy) is counted.
- saliency sums: ANT's running minimum and FADE's sum of |gradient| hold a value in --dtype for every
  parameter (training.saliency.SaliencyScore, methods/fade.py concept_saliency); each layer's gradient
  is folded in and freed as autograd makes it (training.saliency.visit_gradients): one layer's gradient
  and its fp32 temporaries are counted. ANT runs two backward passes over one forward (the map's rms,
  then the score; the first keeps the graph): its graph's peak is the measured one.
- activations: measured, not estimated. Every network call of a step (a Pass: predict() or guided()
  on the rows the method calls it with, with or without a graph) runs on the meta network under a
  dispatch mode that counts the bytes of the tensor storages created and not yet freed (_LiveBytes),
  through the forward and the backward. A call's peak is the largest count; its kept bytes what is
  alive after its forward: the tensors autograd saved for backward (tests/test_plan.py checks them
  against saved_tensors_hooks), its inputs and output. Counting storages rather than saved tensors
  also sees what gradient checkpointing keeps outside autograd (each block's inputs) and the blocks'
  recompute in the backward. A step's activations: the largest, over its calls in order, of the bytes
  the earlier calls keep plus the call's own peak; parameters' gradients are freed as they arrive
  (counted above). Attention runs as a GPU's fused kernel (_fused_attention). With
  --gradient-checkpointing (erase's option: diffusers' enable_gradient_checkpointing; its recompute
  runs on meta) the activations are measured with it on; without, the checkpointed total is shown
  beside the total as a hint. With --micro-batch N (erase's micro_batch) every call runs N rows at a
  time, as Denoiser.predict runs them: a call with a graph keeps its chunks' inputs and outputs, and
  its backward recomputes one chunk at a time (the saliency maps' calls run whole).
- rollout buffers (FADE, TRACE), the discriminator, TRACE's copies of the refined projections, UCE's
  closed form: from their shapes, as the code keeps them (the method's docstring here and each part's
  note say how).

Not counted: the CUDA context and the allocator's cache and fragmentation, the text encoders'
activations over the prompts (a few prompts, no graph), the optimizer step's temporaries, the loss
terms on the network's outputs (a few latent-sized tensors), the saliency updates' per-tensor
temporaries, and safety checkers or other components no method runs.

--gpus N with --set zero=2|3 (the default stage on several GPUs is 2): the methods under DeepSpeed ZeRO
as training.engine runs them. The optimizer's states and DeepSpeed's fp32 copy and gradient partition
are split N ways; every process runs its share of each training call's rows (Meter.shared) and holds
the whole trainable values and their gradients (the engine hands DeepSpeed finished gradients);
DeepSpeed adds a gradient bucket, and under ZeRO-3 the trainables' shadows gathered whole for the
step. Under ZeRO the client optimizer sees one flat partition, so its 8-bit states are one blockwise
tensor. ZeRO-3 also partitions the network for the method's whole run (_Planner.network_bytes): it loads on
the CPU and each GPU holds its slices, the small parameters whole, and the layers gathered for their passes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from tqdm import tqdm

from . import api
from .concepts import Concept, ConceptSet, as_concepts
from .errors import UserError, past_any_memory
from .methods import REGISTRY, esd, fade, get, trace
from .models import meta, real_configs
from .ops.quant import num_blocks
from .optim import SalientAdamW
from .toy import components
from .toy import concepts as toy_concepts
from .training import engine, params
from .training.discriminator import ConceptDiscriminator
from .training.prompt_pairs import prompt_pairs

GB = 1e9
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# ANT's saliency map M* keeps a share of entries known only once its maps are computed: the larger of the
# two measured at the default saliency_threshold (methods/ant.py, ANTConfig: about 11% of toy-sd, 15% of toy-flux).
ANT_SHARE = 0.15
MAX_GPUS = 1024
# The parts in the order the table shows them, after the network's weights.
ORDER = ("VAE", "text encoders", "prompt cache", "refined projections", "trainable state", "gradients",
         "optimizer states", "ZeRO buffers", "saliency sums", "rollout buffer", "discriminator", "closed form", "activations")
CHECKPOINTED = "with --gradient-checkpointing"
PROMPT = "a prompt"  # the text of every measured call's rows (the embeddings are meta: only their shape counts)
TRACE_HELD_OUT = 16  # methods/trace.py, Trajectories.train_scorer: max(16, rollouts) held-out concept prompts
_MIN_8BIT = SalientAdamW.__init__.__kwdefaults__["min_8bit_size"]  # smaller states stay fp32
EXTRAPOLATE_AFTER = 4  # chunks; a call micro-batched into more is measured at 2 and 4 (Meter.measure)
# DeepSpeed ZeRO-3's defaults (zero_optimization; tests/test_plan.py checks them against DeepSpeed's): parameters
# of at most this many entries stay whole on every GPU, and the layers gathered whole for their passes hold at
# most max_live_parameters plus a prefetch bucket
ZERO3_PERSISTENCE_THRESHOLD = 100_000
ZERO3_LIVE_PARAMETERS = 1_000_000_000 + 50_000_000


# --- measuring on the meta device ---------------------------------------------------------------------

class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages created by the ops run under it and still alive, and the peak
    of that count: an op's output whose storage is none of its inputs' is new (views and in-place results
    are not), and leaves the count when its storage is freed."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        known = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in known:
                storage = t.untyped_storage()
                known.add(storage._cdata)
                self.live += storage.nbytes()
                weakref.finalize(storage, self._free, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def _efficient_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                         enable_gqa=False):
    """scaled_dot_product_attention as a GPU runs it: a fused kernel that keeps q, k, v, the output and one
    fp32 logsumexp per query row for backward (flash attention, which a GPU takes for bf16 and fp16, keeps
    the same; the CPU's flash kernel too). On meta, torch would take the math path, which keeps the whole
    attention matrix."""
    return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, attn_mask, True, dropout_p,
                                                                  is_causal, scale=scale)[0]


@contextlib.contextmanager
def _fused_attention():
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention
    functional.scaled_dot_product_attention = _efficient_attention  # diffusers calls it through the module
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


@dataclass(frozen=True)
class Pass:
    """One network call of a method: predict() on `rows` prompts, or guided() (both branches batched, two
    rows a prompt, unless the model takes the guidance scale as an input: FLUX.1-dev); `grad`: its graph is
    kept for backward. `extra`: bytes the method holds only during this call."""

    rows: int
    guided: bool = False
    grad: bool = False
    extra: int = 0
    whole: bool = False  # a saliency map's graph, run whole whatever micro_batch (Denoiser.whole_graphs)


@dataclass(frozen=True)
class DiscriminatorPass:
    """FADE's and TRACE's discriminator on `rows` clean latents: `train`, its own step (its parameters require
    grad); else inside the model's loss (the gradient flows to the latents, and the graph is kept: `grad`)."""

    rows: int
    train: bool
    extra = 0  # nothing held beside it (see Pass.extra)

    @property
    def grad(self) -> bool:
        return not self.train


class Meter:
    """The network calls of one trainable set-up on the meta network, measured (cached by call)."""

    def __init__(self, den, trainable: list[torch.nn.Parameter]):
        self.den, self.trainable = den, trainable
        self.latent = den.latent_shape(1)[1:]
        self.d = None
        self._cache: dict[tuple, tuple[int, int]] = {}
        den.encode([PROMPT, ""])  # cached before measuring: the prompt cache is counted on its own

    def discriminator(self) -> ConceptDiscriminator:
        if self.d is None:
            channels = self.den.latent_channels()
            with torch.device("meta"):
                self.d = ConceptDiscriminator(channels, 1)
        return self.d

    def measure(self, call, checkpointing: bool = False, micro_batch: int | None = None) -> tuple[int, int]:
        """(kept, peak) bytes of one call: what stays alive after its forward when it keeps a graph (else
        0), and the largest count during its forward and backward; a call runs
        `micro_batch` rows at a time (Denoiser.predict).

        A call cut into more than EXTRAPOLATE_AFTER chunks is measured at 2 and 4 chunks and extended along
        the line through them: the network runs once per chunk (twice with a graph), and on the meta device
        that is the planner's cost (FLUX.1-dev: seconds a call). Both counts are affine in the rows once the
        chunks are whole: every chunk runs over the same bytes held for the whole call (its inputs, the
        outputs so far; with a graph, the output, its gradient and the inputs' gradients), so the peak
        comes in a chunk's backward, or without a graph in the last chunk's forward, at an intercept and a
        slope per row that do not depend on how many chunks there are. (Without a graph the final
        concatenation, two copies of the output, would peak higher only once the whole output outgrew one
        chunk's activations.) Measured on both toy pipelines (every pass kind, with and without
        checkpointing, 1 to 5 rows a chunk, up to 8 chunks): equal for whole chunks, and at most 0.35%
        above when the last chunk is short (which peaks lower)."""
        if micro_batch is not None and (isinstance(call, DiscriminatorPass) or call.whole
                                        or micro_batch >= self._rows(call)):
            micro_batch = None  # the call runs whole (Denoiser.predict): one measurement for every micro_batch
        key = (call if isinstance(call, DiscriminatorPass) else dataclasses.replace(call, extra=0), checkpointing,
               micro_batch)
        if key not in self._cache:
            rows = None if micro_batch is None else self._rows(key[0])
            if micro_batch is not None and rows > EXTRAPOLATE_AFTER * micro_batch:
                per_prompt = rows // key[0].rows  # both branches of a guided call: 2 (2 and 4 chunks: even rows)
                (kept2, peak2), (kept4, peak4) = (
                    self.measure(dataclasses.replace(key[0], rows=chunks * micro_batch // per_prompt), checkpointing,
                                 micro_batch) for chunks in (2, 4))
                along = (rows - 2 * micro_batch) / (2 * micro_batch)
                self._cache[key] = (round(kept2 + along * (kept4 - kept2)), round(peak2 + along * (peak4 - peak2)))
            else:
                self.den.micro_batch = micro_batch
                self._cache[key] = self._measure(key[0], checkpointing)
        return self._cache[key]

    def shared(self, call, processes: int):
        """What one of `processes` sharing a training call's rows runs (models/shared_rows.py): a block of
        ceil(rows / processes) rows, the others' blocks (fp32 outputs) received beside it. The
        discriminator runs whole on every process."""
        if processes == 1 or isinstance(call, DiscriminatorPass):
            return call
        per = -(-self._rows(call) // processes)
        received = (processes - 1) * per * math.prod(self.latent) * 4
        return dataclasses.replace(call, rows=per, guided=False, extra=call.extra + received)

    def _rows(self, call: Pass) -> int:
        """Rows of the network's batch: guided() batches both branches unless the guidance scale is an input."""
        return call.rows * (2 if call.guided and not getattr(self.den, "guidance_embeds", False) else 1)

    def _measure(self, call, checkpointing: bool) -> tuple[int, int]:
        if isinstance(call, DiscriminatorPass):
            self.discriminator().requires_grad_(call.train)
            trainable, backward = list(self.d.parameters()) if call.train else [], True
        else:
            net = self.den.network
            (net.enable_gradient_checkpointing if checkpointing else net.disable_gradient_checkpointing)()
            trainable, backward = self.trainable if call.grad else [], call.grad
        # parameters' gradients are counted on their own: freed here as soon as they arrive
        hooks = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in trainable]
        live = _LiveBytes()
        try:
            with _fused_attention(), torch.set_grad_enabled(backward), live:
                out = self._forward(call)
                kept = live.live if call.grad else 0
                if backward:
                    out.square().mean().backward()
        finally:
            for h in hooks:
                h.remove()
        return kept, live.peak

    def _forward(self, call):
        """The call's output, its inputs made inside the measurement as the method makes them inside its step."""
        if isinstance(call, DiscriminatorPass):
            x0 = torch.empty(call.rows, *self.latent, device="meta", requires_grad=not call.train)
            return self.d(self.den.latent_image(x0))
        x = torch.empty(call.rows, *self.latent, device="meta")
        tau, cond = torch.full((call.rows,), 0.5), self.den.encode([PROMPT] * call.rows)
        if call.guided:
            return self.den.guided(x, tau, cond, self.den.default_guidance)
        return self.den.predict(x, tau, cond)

    def activations(self, calls: list, checkpointing: bool = False, micro_batch: int | None = None) -> int:
        """Peak bytes of calls run in order, each kept graph alive until the step's backward."""
        held = peak = 0
        for call in calls:
            kept, top = self.measure(call, checkpointing, micro_batch)
            peak = max(peak, held + top + call.extra)
            held += kept
        return peak


# --- the plan --------------------------------------------------------------------------------------------

@dataclass
class Column:
    """One moment of the run: bytes per part, and the activations with gradient checkpointing when the plan
    is without it (None when no graph is built then, or when the plan checkpoints already)."""

    lines: dict[str, int]
    checkpointed: int | None = None
    graph: bool = False  # a pass with a graph runs at this moment

    @property
    def total(self) -> int:
        return sum(self.lines.values())


@dataclass
class Plan:
    model: str
    method: str
    config: dict
    height: int | None  # px; None when the method runs no image through the network
    width: int | None
    dtype: str
    gpus: int
    gpu_mem: float  # GB
    gradient_checkpointing: bool
    micro_batch: int | None
    columns: dict[str, Column]
    notes: dict[str, str]  # part -> what it holds
    suggestions: list[tuple[str, int]] = field(default_factory=list)  # (option, peak bytes with it)
    # when it does not fit: the same run with erase's memory options added (the same result), if that fits
    fitted: Plan | None = None
    concept_type: str = "object"

    @property
    def peak(self) -> tuple[str, int]:
        name = max(self.columns, key=lambda c: self.columns[c].total)
        return name, self.columns[name].total

    def checkpointed_total(self, column: str) -> int | None:
        c = self.columns[column]
        return None if c.checkpointed is None else c.total - c.lines["activations"] + c.checkpointed

    @property
    def fits(self) -> bool:
        return self.peak[1] <= self.gpu_mem * GB

    def to_json(self) -> dict:
        name, peak = self.peak
        return {"model": self.model, "method": self.method, "concept_type": self.concept_type,
                "config": self.config, "height": self.height,
                "width": self.width, "dtype": self.dtype, "gpus": self.gpus, "gpu_mem_gb": self.gpu_mem,
                "gradient_checkpointing": self.gradient_checkpointing, "micro_batch": self.micro_batch,
                "unit": "bytes (GB = 1e9 bytes)",
                "columns": {k: {"lines": c.lines, "total": c.total, "checkpointed_activations": c.checkpointed,
                                "total_with_checkpointing": self.checkpointed_total(k)}
                            for k, c in self.columns.items()},
                "notes": self.notes, "peak": {"column": name, "bytes": peak}, "fits": self.fits,
                "left_bytes": int(self.gpu_mem * GB) - peak,
                "suggestions": [{"option": o, "peak_bytes": b} for o, b in self.suggestions],
                "fitted_options": self.fitted and self.memory_options(self.fitted),
                "fitted": self.fitted and self.fitted.to_json()}

    def memory_options(self, other: Plan) -> str:
        """The erase options `other` adds to this plan's (gradient checkpointing, micro-batch)."""
        added = ["--gradient-checkpointing"] if other.gradient_checkpointing and not self.gradient_checkpointing else []
        if other.micro_batch != self.micro_batch:
            added.append(f"--micro-batch {other.micro_batch}")
        return " ".join(added)

    def table(self) -> str:
        """The breakdown in GB, a column per moment, the totals, the verdict and what each part holds."""
        names = list(self.columns)
        present = {k for c in self.columns.values() for k in c.lines}
        parts = [next(k for k in present if k.endswith(" weights"))] + [k for k in ORDER if k in present]
        width = max(len(p) for p in parts + [CHECKPOINTED]) + 2

        def row(label: str, values) -> str:
            return f"{label:<{width}}" + "".join(f"{'-':>12}" if v is None else f"{v / GB:>12.2f}" for v in values)

        batch = self.config.get("batch_size") if self.height else None  # no image, no training step
        head = (f"{self.method} on {self.model}" + (f" at {self.height}x{self.width} px" if self.height else "")
                + f", concept type {self.concept_type}"
                + (f", {batch} prompt{'s' if batch > 1 else ''} a step" if batch else "") + f", {self.dtype}, {self.gpus} GPU"
                + ("s" if self.gpus > 1 else "") + f" of {self.gpu_mem:g} GB"
                + (f", DeepSpeed ZeRO-{self.config['zero']}" if self.config.get("zero") else "")
                + (", gradient checkpointing" if self.gradient_checkpointing else "")
                + (f", micro-batch {self.micro_batch}" if self.micro_batch else "") + " (GB = 1e9 bytes)")
        rows = [f"{'GB':<{width}}" + "".join(f"{n:>12}" for n in names)]
        rows += [row(p, [self.columns[n].lines.get(p) for n in names]) for p in parts]
        rows.append(row("total", [self.columns[n].total for n in names]))
        if any(self.columns[n].checkpointed is not None for n in names):
            rows.append(row(CHECKPOINTED, [self.checkpointed_total(n) for n in names]))
        name, peak = self.peak
        fixes = [f"{o} ({b / GB:.2f} GB)" for o, b in self.suggestions]
        over = f"{name} needs {peak / GB:.2f} GB, {(peak - self.gpu_mem * GB) / GB:.2f} GB over {self.gpu_mem:g} GB"
        if self.fitted:  # the breakdown that fits, under the verdict as asked (a script reads "does not fit")
            return "\n".join([f"does not fit as asked: {over}; with {self.memory_options(self.fitted)} (erase's "
                              "memory options: the same result in less memory) it does:", self.fitted.table()]
                             + ([f"or, changing the method's options or the dtype: {' or '.join(fixes)}"] if fixes
                                else []))
        if self.fits:
            verdict = f"fits in {self.gpu_mem:g} GB with {(self.gpu_mem * GB - peak) / GB:.2f} GB left (peak: {name})"
        else:
            verdict = f"does not fit: {over}" + (
                f"; erase's memory options alone do not make it fit; try {' or '.join(fixes)}" if fixes else
                "; nothing tried fits (erase's memory options, smaller method options" +
                (", bf16 weights)" if self.dtype == "fp32" else ")"))
        notes = [f"  {p}: {self.notes[p]}" for p in parts if p in self.notes]
        if CHECKPOINTED in rows[-1]:
            notes.append(f"  {CHECKPOINTED}: the total with erase's gradient_checkpointing (diffusers'), not in "
                         "the total")
        if self.gpus > 1 and not self.config.get("zero"):
            notes.append(f"  GPUs: {self.method} trains nothing; every GPU holds what one does")
        return "\n".join([head, *rows, verdict, "where", *notes])


class _Planner:
    """One model at one dtype and resolution: the method models, sharing measured calls."""

    def __init__(self, model: str, described: meta.MetaModel, dtype: str, resolution: int | tuple[int, int] | None,
                 checkpointing: bool = False, micro_batch: int | None = None, concept_type: str = "object"):
        self.model, self.described, self.dtype, self.concept_type = model, described, dtype, concept_type
        self.checkpointing, self.micro_batch = checkpointing, micro_batch
        self.torch_dtype = DTYPES[dtype]
        self.resolution = resolution
        self.den = self._denoiser()  # for shapes and the methods' checks
        self.bytes = torch.finfo(self.torch_dtype).bits // 8
        self.entries = [p.numel() for p in self.den.network.parameters() if p.is_floating_point()]
        self._meters: dict[tuple, Meter] = {}
        self.progress: tqdm | None = None  # plan()'s bar, counting the plans made
        if components.is_toy_source(model):  # the toy world's defaults, as erase resolves them
            name = {"object": "circle", "style": "red"}.get(concept_type)
            if name is None:
                raise UserError(f"the toy world's concepts are objects (its shapes) and styles (its colours), not "
                                f"{concept_type!r}")
            cs = as_concepts(name, default=toy_concepts.concept)
            self.concepts = as_concepts(list(cs.concepts), toy_concepts.preserve_for(cs.names))
        else:
            self.concepts = ConceptSet((Concept("concept", type=concept_type),))

    def _denoiser(self):
        r = self.resolution
        if r is None:
            return self.described.denoiser(self.torch_dtype)
        return self.described.denoiser(self.torch_dtype, *((r, r) if isinstance(r, int) else r))

    def meter(self, key: tuple, setup) -> Meter:
        """The Meter of a trainable set-up: setup(denoiser) makes the parameters train, returns them."""
        if key not in self._meters:
            den = self._denoiser()
            self._meters[key] = Meter(den, setup(den))
        return self._meters[key]

    def every_entry(self) -> Meter:
        """Every parameter requires grad: ANT's and FADE's saliency maps, and their masked training."""
        def setup(den):
            den.network.requires_grad_(True)
            return [p for p in den.network.parameters() if p.is_floating_point()]
        return self.meter(("every entry",), setup)

    def lora(self, modules, rank: int, seed: int) -> Meter:
        """A LoRA of `rank` on the layers modules(denoiser) names, added by the methods' own add_lora."""
        return self.meter(("lora", rank, tuple(modules(self.den))),
                          lambda den: params.add_lora(den.network, modules(den), rank, seed))

    # --- parts common to every method ---
    def resident(self, prompts: int) -> tuple[dict[str, int], dict[str, str]]:
        d = self.described
        cond = self.den.encode([PROMPT])
        per_prompt = sum(t.numel() * self.bytes for t in (cond.embeds, cond.pooled) if t is not None)
        lines = {f"{d.network_name} weights": meta.entry_bytes(self.den.network, self.torch_dtype),
                 "VAE": meta.entry_bytes(d.others["vae"], self.torch_dtype),
                 "prompt cache": prompts * per_prompt}
        notes = {f"{d.network_name} weights": f"{sum(self.entries) / 1e9:.3g} B parameters in {self.dtype}",
                 "text encoders": f"{', '.join(n for n in d.others if n.startswith('text_encoder'))} in {self.dtype}, "
                                  "on the GPU only while prompts are encoded (the encoding column)",
                 "prompt cache": f"{prompts} prompts' embeddings in {self.dtype} ({tuple(cond.embeds.shape[1:])} each)"}
        return lines, notes

    def network_bytes(self, gpus: int, zero: int, passes: bool = True) -> int:
        """The network's weights on one GPU: whole, or under ZeRO-3 (training.engine.partitioned, for the
        method's whole run) a 1/gpus slice of every parameter, the small ones also whole, the buffers whole,
        and while the network runs (`passes`) the layers gathered for their passes, at most DeepSpeed's
        live-parameter limit."""
        whole = meta.entry_bytes(self.den.network, self.torch_dtype)
        if zero != 3:
            return whole
        small = sum(n for n in self.entries if n <= ZERO3_PERSISTENCE_THRESHOLD)
        gathered = min(sum(self.entries) - small, ZERO3_LIVE_PARAMETERS) if passes else 0
        slices = sum(-(-n // gpus) for n in self.entries)
        return (slices + small + gathered) * self.bytes + whole - sum(self.entries) * self.bytes

    def partitioned(self, lines: dict[str, int], notes: dict[str, str], gpus: int, zero: int) -> dict[str, int]:
        """The resident parts with the network as ZeRO-3 holds it while it runs (network_bytes)."""
        if zero != 3:
            return lines
        name = f"{self.described.network_name} weights"
        gathered = self.network_bytes(gpus, zero) - self.network_bytes(gpus, zero, passes=False)
        notes[name] += (f"; ZeRO-3 over {gpus} GPU{'s' if gpus > 1 else ''} for the whole run: a 1/{gpus} slice of "
                        f"each, parameters of up to {ZERO3_PERSISTENCE_THRESHOLD:,} entries also whole, and up to "
                        f"{gathered / self.bytes / 1e6:.4g} M entries gathered for their layers' passes (none while "
                        f"encoding); each process first loads it on the CPU ({lines[name] / GB:.2f} GB of host memory "
                        "a process)")
        return {**lines, name: self.network_bytes(gpus, zero)}

    def encoding(self, lines: dict[str, int], gpus: int, zero: int) -> Column:
        """The moment prompts are encoded: the pipeline's weights (the network as ZeRO-3 holds it between passes),
        the text encoders back on the GPU."""
        encoders = [m for n, m in self.described.others.items() if n.startswith("text_encoder")]
        return Column({f"{self.described.network_name} weights": self.network_bytes(gpus, zero, passes=False),
                       "VAE": lines["VAE"], "prompt cache": lines["prompt cache"],
                       "text encoders": sum(meta.entry_bytes(m, self.torch_dtype) for m in encoders)})

    def layer_gradient(self, temporaries: int) -> int:
        """One layer's whole gradient (the largest tensor's) in --dtype with `temporaries` fp32 copies of it."""
        return max(self.entries) * (self.bytes + 4 * temporaries)

    def salient(self, share: float | None, gpus: int, zero: int) -> tuple[dict[str, int], dict[str, str], int]:
        """CompactDelta with a `share` of every tensor's entries selected (a tensor left with none is not
        touched; None: every entry, whole parameters, no index held): the per-entry bookkeeping, the masters'
        gradients and one layer's whole gradient, and SalientAdamW's states (under ZeRO, zero_parts); and the
        number of entries selected."""
        selected = list(self.entries) if share is None else [round(share * n) for n in self.entries if round(share * n)]
        k = sum(selected)
        per_entry = self.bytes + 4 + (0 if share is None else 4)
        lines = {"trainable state": k * per_entry, "gradients": 4 * k + self.layer_gradient(1),
                 "optimizer states": sum(_salient_states(s) for s in selected)}
        held = ("" if share is None else "int32 index, ") + f"{self.dtype} base value, fp32 master"
        which = "entries (every one)" if share is None else f"salient entries ({share:.3g} of each tensor)"
        notes = {"trainable state": f"{k / 1e6:.4g} M {which}, {per_entry} bytes each: {held}",
                 "gradients": "the masters' fp32 gradients, and one layer's whole gradient in "
                              f"{self.dtype} (gathered and freed as autograd makes it)",
                 "optimizer states": "SalientAdamW over the masters, 8-bit blockwise (fp32 under 4096 entries)"}
        if zero:
            zero_lines, zero_notes = zero_parts(k, gpus, zero)
            lines.update(zero_lines)
            notes.update(zero_notes)
        return lines, notes, k

    def lora_parts(self, meter: Meter, gpus: int, zero: int) -> tuple[dict[str, int], dict[str, str]]:
        k = sum(p.numel() for p in meter.trainable)
        size = sum(p.numel() * p.element_size() for p in meter.trainable)
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in meter.trainable})
        lines = {"trainable state": size, "gradients": size, "optimizer states": 2 * size}
        notes = {"trainable state": f"LoRA factors, {k / 1e6:.4g} M entries in {', '.join(dtypes)}",
                 "optimizer states": f"torch AdamW, two {', '.join(dtypes)} states an entry"}
        if zero:
            zero_lines, zero_notes = zero_parts(k, gpus, zero)
            lines.update(zero_lines)
            notes.update(zero_notes)
        return lines, notes

    def buffer(self, steps: int, rows: int, copies: int) -> int:
        """`copies` fp32 stacks of `steps` x `rows` latents (rollout buffers)."""
        return copies * steps * rows * math.prod(self.den.latent_shape(1)[1:]) * 4

    def discriminator(self, meter: Meter, per_entry: int) -> int:
        return per_entry * sum(p.numel() for p in meter.discriminator().parameters())


def _salient_states(n: int) -> int:
    """SalientAdamW's states over n entries of one tensor: 8-bit blockwise, fp32 under its minimum."""
    return (2 * n + 8 * num_blocks(n) if n >= _MIN_8BIT else 8 * n) + 4


def zero_parts(k: int, gpus: int, zero: int) -> tuple[dict[str, int], dict[str, str]]:
    """k fp32 trainable entries under DeepSpeed ZeRO-`zero` on `gpus` processes (training.engine): the client
    optimizer's 8-bit states over each process's flat partition, DeepSpeed's fp32 copy and gradient
    partition, its gradient bucket, and under ZeRO-3 the partitioned shadows and their whole gathered copy."""
    share = -(-k // gpus)
    bucket = min(engine.BUCKET, k)
    buffers = 2 * 4 * share + 4 * bucket + (4 * share + 4 * k if zero == 3 else 0)
    return ({"optimizer states": _salient_states(share), "ZeRO buffers": buffers},
            {"optimizer states": f"SalientAdamW, DeepSpeed's client optimizer, 8-bit blockwise over this GPU's flat "
                                 f"partition of {share / 1e6:.4g} M entries",
             "ZeRO buffers": f"ZeRO-{zero} over {gpus} GPU{'s' if gpus > 1 else ''}: DeepSpeed's fp32 copy and gradient "
                             f"partition, a gradient bucket of {bucket / 1e6:.4g} M fp32 entries"
                             + (", the shadows' partition and their whole copy gathered for the step"
                                if zero == 3 else "")})


def _column(p: _Planner, meter: Meter, lines: dict, calls: list, shared: int = 1) -> Column:
    """A moment's parts and its calls' activations, with --gradient-checkpointing as the plan has it (and,
    without it, the activations with it as a hint); the training loop's calls `shared` out between that
    many processes (Meter.shared)."""
    calls = [meter.shared(c, shared) for c in calls]
    graph = any(c.grad for c in calls)
    return Column({**lines, "activations": meter.activations(calls, p.checkpointing, p.micro_batch)},
                  meter.activations(calls, True, p.micro_batch) if graph and not p.checkpointing else None, graph)


# --- the methods, as their code runs ------------------------------------------------------------------

def _uce(p: _Planner, cfg, gpus: int):
    """methods/uce.py: kv_inputs of the edited projections on the erase, guide and preserve prompts in turn (read
    from the encoded prompts where a projection reads them directly, else a hooked forward, no graph, in
    batches of kv_batch), all three sets' inputs kept to the end; then one
    closed form per group of projections reading the same input (training.closed_form.uce_weights): its
    sources and targets in fp32 and fp64, R = D C M^-1 (fp64), the in x in transform built in fp64 (eye, product,
    sum: ops.rank_update.closed_form_transform), fp32 copies of the group's weights; and the edited weights in
    the model's dtype, kept for the edit."""
    c = p.concepts.concepts[0]
    sets = [c.prompts(augment=True), c.anchor_prompts(augment=True),
            p.concepts.preserve_prompts() + p.concepts.preserve_scene_prompts()]
    projections = p.den.cross_attention_kv()
    edited = projections[:2] if p.den.kind == "flux" and not cfg.text_kv else projections
    den = p.den
    for prompts in filter(None, sets):
        den.encode(prompts)
    live = _LiveBytes()
    with _fused_attention(), live:  # uce.run keeps all three sets' inputs to the end
        erase, _guide, preserve = [den.kv_inputs(den.encode(prompts), [q.name for q in edited]) if prompts else None
                                   for prompts in sets]
    groups: dict[tuple, list] = {}
    for proj in edited:
        x = erase[proj.name]
        groups.setdefault((x.untyped_storage()._cdata, tuple(x.shape)), []).append(proj)
    solves = []
    for members in groups.values():
        name, width = members[0].name, members[0].module.weight.shape[1]
        rows = erase[name].numel() // width + (preserve[name].numel() // width if preserve else 0)
        solves.append(24 * rows * width + 24 * width ** 2 + 4 * sum(q.module.weight.numel() for q in members))
    weights = sum(q.module.weight.numel() for q in edited)
    lines, notes = p.resident(len(set(sum(sets, []))))
    lines.update({"closed form": max(solves) + weights * p.bytes, "activations": live.peak})
    notes["closed form"] = (f"{len(edited)} projections in {len(groups)} solve{'s' if len(groups) > 1 else ''}: "
                            f"the largest solve's sources, targets, R and transform in fp32 and fp64, its weights in fp32, and the edit in {p.dtype}")
    hooked = [q for q in edited if q.name not in den.direct_kv_inputs(den.encode([PROMPT]))]
    notes["activations"] = (f"the inputs of {len(edited)} text projections for {sum(1 for s in sets if s)} prompt sets"
                            + (f", {len(hooked)} of them from forwards without a graph on up to {den.kv_batch} prompts"
                               if hooked else ", read from the encoded prompts"))
    return {"closed form": Column(lines)}, notes


def _esd(p: _Planner, cfg, gpus: int):
    """methods/esd.py, a step: the rollout to tau and the move to it (guided, no graph), the teacher on the
    concept and the empty prompt at once (no graph), the edited prediction with its graph; a LoRA of rank
    `rank` on the parameter set (esd-u for objects, esd-x for styles), torch AdamW."""
    parameters = esd.parameter_set(cfg, p.concepts)
    meter = p.lora(lambda den: esd.parameter_modules(den.network, den.kind, parameters), cfg.rank, cfg.seed)
    b = cfg.batch_size
    lines, notes = p.resident(len(set(p.concepts.concepts[0].prompts() + [""])))
    lines = p.partitioned(lines, notes, gpus, cfg.zero)
    trained, lora_notes = p.lora_parts(meter, gpus, cfg.zero)
    notes.update(lora_notes)
    notes["activations"] = f"{parameters}: rollout guided on {b}, teacher on {2 * b}, edited prediction on {b} rows"
    calls = [Pass(b, guided=True), Pass(2 * b), Pass(b, grad=True)]
    step = _column(p, meter, {**lines, **trained}, calls, gpus)
    return {"step": step}, notes


def _ant(p: _Planner, cfg, gpus: int, share: float):
    """methods/ant.py, one concept. Saliency (batch 1 per map): the rollout to t1 and t2 and the moves to them
    (guided, no graph), the frozen teacher on the concept and empty prompts at both (no graph), the same
    prediction with a graph over every parameter, back-propagated twice (visit_gradients: a layer's gradient
    at a time, with two fp32 temporaries of it), and SaliencyScore's minimum in --dtype. A training step: the
    same on batch_size prompts, the teacher switched on by CompactDelta.off (in place). split=False: one tau."""
    taus = 2 if cfg.split else 1
    meter = p.every_entry()
    b = cfg.batch_size
    concept = p.concepts.concepts[0]
    lines, notes = p.resident(len(set(concept.prompts() + concept.prompts(augment=True) + [""])))
    lines = p.partitioned(lines, notes, gpus, cfg.zero)
    trained, salient_notes, _ = p.salient(share if cfg.saliency else None, gpus, cfg.zero)
    notes.update(salient_notes)

    def calls(n: int) -> list:
        return [Pass(n, guided=True), Pass(taus * n, guided=True), Pass(2 * taus * n), Pass(2 * taus * n, grad=True)]

    columns = {}
    if cfg.saliency:
        saliency_map = calls(1)[:-1] + [Pass(2 * taus, grad=True, whole=True)]
        columns["saliency"] = _column(p, meter, {**lines, "gradients": p.layer_gradient(2),
                                                 "saliency sums": p.bytes * sum(p.entries)}, saliency_map)
        notes["saliency sums"] = f"running minimum over the maps in {p.dtype}, one per parameter"
    columns["step"] = _column(p, meter, {**lines, **trained}, calls(b), gpus)
    notes["activations"] = (f"rollout guided on {b} rows, the move to {taus} taus guided on {taus * b}, teacher on "
                            f"{2 * taus * b}, prediction on {2 * taus * b} rows with every parameter requiring grad; "
                            "saliency maps at 1 prompt")
    return columns, notes


def _fade(p: _Planner, cfg, gpus: int):
    """methods/fade.py. A refresh (every refresh_every steps, at the step's start): one guided rollout, no
    graph, of `rollouts` concept prompts, as many neutral and (when preserved) preserved ones, keeping every
    grid step's x_t and one-step x0 in fp32 (lists, then stacked), while the loop's checkpoint snapshot still
    holds the old buffer. A step: d_steps discriminator steps on d_batch latents, the teacher on batch_size
    rows (no graph; CompactDelta.off, in place), L_rem's guided prediction and D on it, L_pres's prediction,
    both graphs alive until backward; on a refresh step the old buffer is still held. Saliency: one
    concept and one neutral prompt per map, a graph over every parameter, sums in --dtype, a layer's
    gradient at a time. D: fp32 weights, gradients and AdamW states, and the snapshot's copy of weights and states."""
    cfg = fade.resolved(cfg, p.concepts)
    meter = p.every_entry()
    pairs = prompt_pairs(p.concepts, cfg.neutral)
    rows = cfg.rollouts * (3 if pairs.preserved else 2)
    b = cfg.batch_size
    lines, notes = p.resident(len(set([t for t, _ in pairs.concept] + pairs.neutral + pairs.preserved + [""])))
    lines = p.partitioned(lines, notes, gpus, cfg.zero)
    trained, salient_notes, _ = p.salient(cfg.saliency_share if cfg.saliency else None, gpus, cfg.zero)
    notes.update(salient_notes)
    d = p.discriminator(meter, 4 * 7)
    columns = {}
    if cfg.saliency:
        columns["saliency"] = _column(p, meter, {**lines, "gradients": p.layer_gradient(1),
                                                 "saliency sums": p.bytes * sum(p.entries),
                                                 "rollout buffer": p.buffer(cfg.sample_steps, rows, 2),
                                                 "discriminator": p.discriminator(meter, 4 * 4)},
                                      [Pass(2, grad=True, whole=True)])
        notes["saliency sums"] = f"sum of |gradient| in {p.dtype}, one per parameter"
    base = {**lines, **trained, "discriminator": d}
    columns["refresh"] = _column(p, meter, {**base, "rollout buffer": p.buffer(cfg.sample_steps, rows, 6)},
                                 [Pass(rows, guided=True)], gpus)
    step = [DiscriminatorPass(cfg.d_batch, train=True)]
    if cfg.lambda_pres > 0:
        step.append(Pass(b))
    step += [Pass(b, guided=True, grad=True)]
    step += [DiscriminatorPass(b, train=False)] if cfg.removal == "adversarial" else [Pass(b, guided=True)]
    if cfg.lambda_pres > 0:
        step.append(Pass(b, grad=True))
    columns["step"] = _column(p, meter, {**base, "rollout buffer": p.buffer(cfg.sample_steps, rows, 4)}, step, gpus)
    notes["rollout buffer"] = (f"{cfg.sample_steps} steps x {rows} rows of x_t and x0 in fp32: 2 copies while "
                               "computing saliency, 6 at a refresh (old, new lists, stacked), 4 on a refresh step")
    notes["discriminator"] = "fp32 weights, gradients, AdamW states and the checkpoint snapshot's copies"
    notes["activations"] = (f"refresh: guided rollout on {rows} prompts; step: D on {cfg.d_batch} latents, teacher on "
                            f"{b}, L_rem guided on {b} with D, L_pres on {b} rows, every parameter requiring grad")
    return columns, notes


def _trace(p: _Planner, cfg, gpus: int):
    """methods/trace.py, one concept. Refinement: the original and refined values of the refined projections
    are kept. The scorer (scorer='discriminator'): one guided rollout, no graph, of max(d_batch, 2 rollouts)
    concept prompts and their neutral pairs, keeping every grid step's x0 (lists, then stacked), D's steps,
    then a held-out rollout of max(16, rollouts) prompts and pairs beside the first one's x0. A refresh
    (every refresh_every steps): the original's switched rollout and the edited model's rollout on `rollouts`
    concept and as many clean rows, no graph, each keeping every grid step's x in fp32 (lists, then stacked;
    the buffer's clean ends are a view that keeps the original's whole stack), while the checkpoint snapshot
    holds the old buffer. A step: the concept rows' guided prediction (and D on it), the
    clean rows' guided prediction, and (trajectory, lambda_drift > 0) the teacher and the drift rows'
    prediction, all graphs alive until backward; on a refresh step the old buffer is still held. One LoRA of
    rank `rank` on every text projection, torch AdamW."""
    refined = [q.module.weight for q in trace.refined_projections(p.den)] if cfg.refine else []
    pairs = trace.target_pairs(p.concepts, cfg)
    lines, notes = p.resident(len(set([t for t, _ in pairs.concept] + pairs.neutral + pairs.preserved + [""])))
    lines = p.partitioned(lines, notes, gpus, cfg.zero)
    lines["refined projections"] = 2 * sum(w.numel() for w in refined) * p.bytes
    notes["refined projections"] = (f"{len(refined)} projection{'s' if len(refined) != 1 else ''}, original and "
                                    f"refined copies in {p.dtype}")
    if not cfg.finetune:
        return {"refinement": Column(lines)}, notes
    meter = p.lora(lambda den: [q.name for q in den.cross_attention_kv()], cfg.rank, cfg.seed)
    trained, lora_notes = p.lora_parts(meter, gpus, cfg.zero)
    notes.update(lora_notes)
    b = cfg.batch_size
    rows = 2 * cfg.rollouts  # concept rows and as many clean ones (one concept: no pair rows)
    scorer = cfg.scorer == "discriminator"
    columns = {}
    if scorer:  # the larger of two moments: the training rollout, and the held-out one beside its x0
        first, held = 2 * max(cfg.d_batch, 2 * cfg.rollouts), 2 * max(TRACE_HELD_OUT, cfg.rollouts)
        scoring = {**lines, "trainable state": trained["trainable state"],
                   "discriminator": p.discriminator(meter, 4 * 4)}
        moments = [_column(p, meter, {**scoring, "rollout buffer": p.buffer(cfg.sample_steps, first, 4)},
                           [Pass(first, guided=True)]),
                   _column(p, meter, {**scoring, "rollout buffer": p.buffer(cfg.sample_steps, first, 1)
                                   + p.buffer(cfg.sample_steps, held, 4)}, [Pass(held, guided=True)])]
        columns["scorer"] = max(moments, key=lambda c: c.total)
    base = {**lines, **trained,
            "discriminator": p.discriminator(meter, 4 * 3) if scorer else 0}
    columns["refresh"] = _column(p, meter, {**base, "rollout buffer": p.buffer(cfg.sample_steps + 1, rows, 5)},
                                 [Pass(rows, guided=True)], gpus)
    step = [Pass(b, guided=True, grad=True)]
    if scorer and cfg.lambda_score > 0:
        step.append(DiscriminatorPass(b, train=False))
    step.append(Pass(b, guided=True, grad=True))
    if cfg.trajectory and cfg.lambda_drift > 0:
        step += [Pass(b), Pass(b, grad=True)]
    columns["step"] = _column(p, meter, {**base, "rollout buffer": p.buffer(cfg.sample_steps + 1, rows, 4)}, step,
                              gpus)
    notes["rollout buffer"] = (f"{cfg.sample_steps + 1} steps x {rows} rows of x in fp32: 5 copies at a refresh, 4 on "
                               f"a refresh step" + (f"; the scorer's rollouts: x and x0 of {first} rows (lists, "
                                                     f"stacked), then of {held} held-out rows beside the first x0"
                                                     if scorer else ""))
    if scorer:
        notes["discriminator"] = "fp32 weights and AdamW states while it trains; then weights, leftover gradients, " \
                                 "the snapshot's copy"
    notes["activations"] = (f"refresh: guided rollout on {rows} prompts; step: concept and clean rows guided on {b} "
                            f"each" + (", D on the concept rows" if scorer and cfg.lambda_score > 0 else "")
                            + (f", teacher and drift prediction on {b}" if cfg.trajectory and cfg.lambda_drift > 0
                               else ""))
    return columns, notes


def _columns(p: _Planner, method: str, cfg, gpus: int, share: float):
    if method == "ant":
        return _ant(p, cfg, gpus, share)
    return {"uce": _uce, "esd": _esd, "fade": _fade, "trace": _trace}[method](p, cfg, gpus)


# --- options ----------------------------------------------------------------------------------------------

def _halvings(value, low) -> list:
    """value halved (integers rounded down) while at least `low`, largest first."""
    out = []
    while value / 2 >= low:
        value = value // 2 if isinstance(value, int) else value / 2
        out.append(value)
    return out


# Options whose smaller values need less memory, per method, with the least value tried (FADE's d_batch
# splits into concept and neutral rows; its saliency_share down to about 1/1000 of the default's).
SHRINK = {"esd": {"batch_size": 1}, "ant": {"batch_size": 1}, "trace": {"batch_size": 1, "rollouts": 1, "d_batch": 1},
          "fade": {"batch_size": 1, "rollouts": 1, "d_batch": 2, "saliency_share": 5e-5}}


def plan(model: str, method: str, options: dict | None = None, *, resolution: int | tuple[int, int] | None = None,
         batch_size: int | None = None, gpus: int = 1, gpu_mem: float = 80.0, dtype: str | None = None,
         salient_share: float | None = None, gradient_checkpointing: bool = False,
         micro_batch: int | None = None, concept_type: str = "object", progress: bool = False) -> Plan:
    """The Plan of `method` on `model` (a toy name, sd15, flux-dev, or a local diffusers folder) with the
    method's `options` (validated as erase validates them), at `resolution` px (an int: square, or (height, width); default: the model's
    own size), `batch_size` prompts a step (the method's batch_size), in `dtype` (default: what erase loads
    the model in, a folder's stored dtype, the toy pipelines' fp32; bf16 for sd15 and flux-dev, configs
    without weights) on `gpus` GPUs of `gpu_mem` GB each, with erase's `gradient_checkpointing` and `micro_batch`; `salient_share` (ANT only): the share of entries its
    saliency map keeps (default ANT_SHARE); `concept_type`: the planned concept's (object, style, celebrity,
    nudity; in the toy world object or style), which picks its templates and the methods' per-type defaults.
    When it does not fit, `fitted` is the same run with erase's memory options added (micro-batch, gradient
    checkpointing: the same result in less memory) when that fits, and `suggestions` holds each change of the
    method's own options (or the dtype) that alone would make it fit, with its peak. progress: a bar on stderr
    counting the plans made (a search for a fitting one makes several; minutes each on FLUX.1-dev)."""
    m = get(method)
    options = dict(options or {})
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    if not isinstance(gpus, int) or not 1 <= gpus <= MAX_GPUS:
        raise UserError(f"--gpus must be an integer from 1 to {MAX_GPUS}, got {gpus!r}")
    if not isinstance(gpu_mem, (int, float)) or not 0 < gpu_mem < math.inf:
        raise UserError(f"--gpu-mem must be a positive number of GB (1 GB = 1e9 bytes), got {gpu_mem!r}")
    if micro_batch is not None and (isinstance(micro_batch, bool) or not isinstance(micro_batch, int)
                                    or micro_batch < 1):
        raise UserError(f"--micro-batch must be a whole number of rows >= 1, got {micro_batch!r}")
    if batch_size is not None:
        if "batch_size" not in {f.name for f in dataclasses.fields(m.config)}:
            trained = [n for n, r in REGISTRY.items() if "batch_size" in {f.name for f in dataclasses.fields(r.config)}]
            raise UserError(f"{method} has no training steps, so no batch size; --batch-size applies to "
                            f"{', '.join(trained)}")
        if "batch_size" in options and options["batch_size"] != batch_size:
            raise UserError(f"--batch-size {batch_size} and --set batch_size={options['batch_size']} disagree; "
                            "give one")
        options["batch_size"] = batch_size
    if salient_share is not None:
        if method != "ant":
            raise UserError("--salient-share is ANT's (its saliency map's size is known only once computed); "
                            + ("FADE's share is its option: --set saliency_share=..." if method == "fade"
                               else f"{method} trains no saliency map"))
        if not isinstance(salient_share, (int, float)) or not 0 < salient_share <= 1:
            raise UserError(f"--salient-share must be a share of entries in (0, 1], got {salient_share!r}")
    share = ANT_SHARE if salient_share is None else salient_share
    trains = "zero" in {f.name for f in dataclasses.fields(m.config)}
    if gpus > 1 and trains:  # several GPUs: the methods run under ZeRO, stage 2 unless asked otherwise
        options.setdefault("zero", 2)
        if not options["zero"]:
            raise UserError(f"--gpus {gpus} runs {method} under DeepSpeed ZeRO; zero=0 is one process: "
                            "set zero=2 or 3, or plan one GPU")
    cfg = api._options(m, options)
    if salient_share is not None and not cfg.saliency:
        raise UserError("--salient-share sizes ANT's saliency map, and saliency=false trains every entry without one")
    described = meta.describe(model, DTYPES.get(dtype))
    if model in real_configs.NAMES and (Path(model) / "model_index.json").is_file():
        model = str(Path(model).resolve())  # a local folder of the name is planned (as erase loads it): say so
    if dtype is None:
        dtype = "bf16" if described.dtype is None else next(k for k, v in DTYPES.items() if v == described.dtype)
    if resolution is not None:
        den = described.denoiser(torch.float32)
        den.set_resolution(resolution)  # erase's own rule and error
        resolution = (den.height, den.width)
    p = _Planner(model, described, dtype, resolution, gradient_checkpointing, micro_batch, concept_type)
    api._check_idle(m, cfg, api._given(options, None, resolution, gradient_checkpointing, micro_batch), p.den,
                    p.concepts)
    with tqdm(desc=f"planning {method} on {model}", unit=" plans", disable=not progress, leave=False) as bar:
        p.progress = bar
        try:
            result = _plan(p, method, cfg, gpus, gpu_mem, share)
        except RuntimeError as exc:
            if not past_any_memory(exc):
                raise
            raise UserError(f"{p.den.height}x{p.den.width} px is too large to plan: a tensor of the run would "
                            "exceed 2**63 bytes") from None
        if not result.fits:
            bar.set_description_str(f"planning {method} on {model}, searching options that fit")
            result.fitted = _memory_fit(p, m, cfg, result, share)
            result.suggestions = _suggest(p, m, options, result, share)
    return result


def _plan(p: _Planner, method: str, cfg, gpus: int, gpu_mem: float, share: float) -> Plan:
    columns, notes = _columns(p, method, cfg, gpus, share)
    columns = {"encoding": p.encoding(next(iter(columns.values())).lines, gpus, getattr(cfg, "zero", 0)), **columns}
    if p.progress is not None:
        p.progress.update()
    size = (p.den.height, p.den.width) if get(method).runs_images(cfg) else (None, None)
    return Plan(p.model, method, dataclasses.asdict(cfg), *size, p.dtype, gpus, gpu_mem,
                p.checkpointing, p.micro_batch, columns, notes, concept_type=p.concept_type)


@contextlib.contextmanager
def _memory_options(p: _Planner, checkpointing: bool, micro_batch: int | None):
    """p plans with these memory options inside the block."""
    was = p.checkpointing, p.micro_batch
    p.checkpointing, p.micro_batch = checkpointing, micro_batch
    try:
        yield p
    finally:
        p.checkpointing, p.micro_batch = was


def _with_memory(p: _Planner, m, cfg, result: Plan, share: float, checkpointing: bool, micro_batch: int | None) -> Plan:
    """The plan of `result`'s run with these memory options."""
    with _memory_options(p, checkpointing, micro_batch):
        return _plan(p, m.name, cfg, result.gpus, result.gpu_mem, share)


def _memory_fit(p: _Planner, m, cfg, result: Plan, share: float) -> Plan | None:
    """The plan with erase's memory options added, which change no result: the largest micro-batch that fits,
    else gradient checkpointing, else both (the largest micro-batch with it); None when none fits."""
    smaller = [rows for rows in (16, 8, 4, 2, 1) if result.micro_batch is None or rows < result.micro_batch]

    def micro_batched(checkpointing: bool) -> Plan | None:
        # a call's peak only falls with its chunks, so when one row at a time does not fit none does (its
        # passes are measured once, cached for the search)
        if not smaller or not _with_memory(p, m, cfg, result, share, checkpointing, smaller[-1]).fits:
            return None
        return next(fitted for rows in smaller
                    if (fitted := _with_memory(p, m, cfg, result, share, checkpointing, rows)).fits)

    fitted = micro_batched(p.checkpointing)
    if fitted is None and not p.checkpointing:
        fitted = _with_memory(p, m, cfg, result, share, True, p.micro_batch)
        fitted = fitted if fitted.fits else micro_batched(True)
    return fitted


def _suggest(p: _Planner, m, options: dict, result: Plan, share: float) -> list[tuple[str, int]]:
    """Each single change of the method's options (or of the dtype) that makes the plan fit, with the largest
    value that does; when none does and no memory option fits either, gradient checkpointing with each of them."""
    limit = result.gpu_mem * GB
    out = _shrunk(p, m, options, result, share, "")
    cfg = api._options(m, options)
    if result.dtype == "fp32":
        bf16 = _Planner(p.model, p.described, "bf16", p.resolution, p.checkpointing, p.micro_batch, p.concept_type)
        bf16.progress = p.progress
        peak = _plan(bf16, m.name, cfg, result.gpus, result.gpu_mem, share).peak[1]
        if peak <= limit:
            out.append(("--dtype bf16", peak))
    if not out and not p.checkpointing and result.fitted is None:
        with _memory_options(p, True, p.micro_batch):
            out = _shrunk(p, m, options, result, share, "--gradient-checkpointing ")
    return out


def _shrunk(p: _Planner, m, options: dict, result: Plan, share: float, prefix: str) -> list[tuple[str, int]]:
    """Each of the method's SHRINK options at the largest value that fits, as planned by p."""
    out = []
    for name, low in SHRINK.get(m.name, {}).items():
        value = options.get(name, getattr(m.config(), name))
        for smaller in _halvings(value, low):
            cfg = api._options(m, {**options, name: smaller})
            peak = _plan(p, m.name, cfg, result.gpus, result.gpu_mem, share).peak[1]
            if peak <= result.gpu_mem * GB:
                out.append((f"{prefix}--set {name}={smaller:g}", peak))
                break
    return out
