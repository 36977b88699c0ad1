"""ANT: trajectory-aware erasure ("Set You Straight", Sec. 3).

Loss (eq. 3), on x_t from the edited model's own sampling trajectory, at t1 ~ U(t', 1] (early)
and t2 ~ U(0, t'] (late) drawn per training step (t' a noise level: 1 = pure noise). The taus are
drawn continuously, as eq. (3) says, not from the sampler's grid: x_t comes from the grid step
just above each and is moved to it by one DDIM / Euler step (training.sampling).
  early: edited(x_t1, c) -> sg[u* + eta (c* - u*)]   keep the conditional field where structure forms
  late:  edited(x_t2, c) -> sg[u* - eta (c* - u*)]   (lambda1) reverse the condition direction
  both:  edited(x_t, "") -> sg[u*]                   (lambda2 early, lambda3 late) keep the unconditional
where c*, u* are the frozen model's conditional / empty-prompt predictions (noise for SD,
velocity for FLUX). The frozen model is the same network with the change switched off.

One concept: only the entries of the concept saliency map M* train (Sec. 3.3: gradient maps
over prompts x seeds, each thresholded, intersected; cached), with SalientAdamW, so every other
weight stays bit-identical. Several concepts (Sec. 3.4): one LoRA per concept on the projections
that read text, trained with the same loss, then all fused into those projections by the
closed form of eq. (7): every token row of concept i's augmented prompts (begin token, template
words, padding included) is fit to what W + dW_i gives it, every token row of the preserved
concepts' prompts to what W gives it (prior preservation), as MACE's fusion code does (its prior is
a cache of MS-COCO captions; ours the preserved prompts, none if nothing is preserved). Fitting
only the concept words' rows, an earlier version, left the rows every prompt shares (the begin
token, "a") free: they moved by about 130% and no two-shape scene survived (bench/RESULTS.md).

Training prompts are the concept's own ("a photo of a circle"); the augmented ones ("a photo of
a red circle") only pick M*, as in the paper (Fig. 5). Reversing the condition direction of an
augmented prompt also reverses its attribute, which every other concept shares: trained on them,
ANT lost the colour of every toy shape (README, "Erasing circle").
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from ..concepts import Concept, ConceptSet
from ..edit import Edit, base_parameters, fingerprint, remove_adapter
from ..errors import UserError
from ..models import Cond, Denoiser, partitioned
from ..optim import SalientAdamW
from ..training import engine, loop, params, saliency, sampling
from ..training.closed_form import fuse_lora_deltas
from ..training.losses import trajectory_aware_loss
from . import ranges

# Table 6 of the paper (SD1.4 sampled with 50 DDIM steps, so its t' = 43 is the noise level 0.86).
# It has no row for objects; ours is the nudity row (the paper's single-concept task) with four times
# the steps and lambda3 = 3: guided sampling follows c - u, so the late erase term moves it only as
# far as the unconditional prediction stays put. On toy-sd (lr 1e-3, 500 steps) 0 erased no circle,
# 0.5 left about 5%, 2 about 2%, and 3 less but lost one seed of seven; at lr 5e-4 for 1000 steps
# 3 kept every seed (README, "Erasing circle").
DEFAULTS = {
    "nudity": dict(lr=5e-4, steps=250, lambda1=1.0, lambda2=0.5, lambda3=0.5, t_split=43 / 50),
    "celebrity": dict(lr=5e-4, steps=400, lambda1=0.4, lambda2=0.5, lambda3=0.2, t_split=40 / 50),
    "style": dict(lr=5e-4, steps=400, lambda1=0.4, lambda2=0.5, lambda3=0.2, t_split=47 / 50),
    "object": dict(lr=5e-4, steps=1000, lambda1=1.0, lambda2=0.5, lambda3=3.0, t_split=43 / 50),
}
PER_TYPE = tuple(DEFAULTS["object"])


@dataclass
class ANTConfig:
    # Unset (None): Table 6's value for the concept's type (see DEFAULTS).
    t_split: float | None = None  # t' as a noise level in (0, 1): early steps tau > t' are preserved
    lambda1: float | None = None  # weight of the late erase term
    lambda2: float | None = None  # weight of the early unconditional term
    lambda3: float | None = None  # weight of the late unconditional term
    lr: float | None = None
    # training steps; with several concepts, per concept's LoRA. The paper trains each LoRA 50 steps
    # (Sec. 4.1, after MACE); we keep Table 6's per-type steps for every concept (our departure: one
    # setting for one and several concepts; steps=50 gives the paper's)
    steps: int | None = None
    eta: float = 1.0  # guidance scale of the targets (the paper leaves it free; ESD uses 1)
    split: bool = True  # False: the erase term on every step, no early terms (ablation)
    batch_size: int = 4  # prompts per step, all at the same t1 and t2
    sample_steps: int = 20  # sampler steps of the rollouts that give x_t (moved to each drawn tau)
    guidance: float = 3.0  # classifier-free guidance of those rollouts
    saliency: bool = True  # one concept: train only M*; False trains the whole network (ablation)
    # gamma: salient where |grad| >= gamma * RMS of that map's grads. 0.02 keeps ~11% of toy-sd and
    # ~15% of toy-flux after 50 maps; 1.0 kept 0.03% of toy-sd, too few to erase (README, "ANT ablation").
    saliency_threshold: float = 0.02
    # N_c augmented prompts x N_s seeds: the gradient maps intersected into M*. Fig. 4 sees the selected
    # count settle at about 100 maps; we take 50 by default (our departure: half the backward passes,
    # each a full one of the network); saliency_seeds=10 gives 100
    saliency_prompts: int = 10
    saliency_seeds: int = 5
    rank: int = 4  # several concepts: LoRA rank per concept
    preserve_scale: float = 1.0  # several concepts: beta of eq. (7), weight of the preserved prompts
    lam: float = 0.1  # several concepts: regulariser |W* - W|^2 that keeps eq. (7) well posed
    seed: int = 0
    checkpoint: str | None = None  # file to checkpoint to and resume from (one per concept with several)
    checkpoint_every: int = 50  # steps between checkpoints (several processes save only these)
    max_skipped_steps: int = 10  # steps skipped for non-finite gradients before training stops
    zero: int = 0  # 0: plain PyTorch; 2 or 3: DeepSpeed ZeRO stage (training.engine)
    deepspeed_config: str | None = None  # with zero: a DeepSpeed JSON config for its other settings

    def __post_init__(self):
        if self.t_split is not None and not 0.0 < self.t_split < 1.0:
            raise UserError(f"t_split (t') must be a noise level strictly between 0 (clean) and 1 (pure noise), "
                             f"got {self.t_split}; the paper's t' = 43 of 50 DDIM steps is 0.86")
        for k in ("lambda1", "lambda2", "lambda3"):
            if getattr(self, k) is not None:
                ranges.check("ANT", k, getattr(self, k), 0, ranges.MAX_SCALE)
        ranges.check_common("ANT", self)
        for k in ("split", "saliency"):
            if not isinstance(getattr(self, k), bool):
                raise UserError(f"ANT option {k} must be true or false, got {getattr(self, k)!r}")
        # a multiple of each gradient map's RMS; past MAX_SCALE no entry is ever kept
        ranges.check("ANT", "saliency_threshold", self.saliency_threshold, 0, ranges.MAX_SCALE, above=True)
        for k in ("saliency_prompts", "saliency_seeds"):
            ranges.check("ANT", k, getattr(self, k), 1, integer=True)
        ranges.check("ANT", "preserve_scale", self.preserve_scale, 0, ranges.MAX_SCALE)
        ranges.check("ANT", "lam", self.lam, ranges.MIN_LAM, ranges.MAX_SCALE)

    def resolved(self, concept: Concept) -> dict:
        """The per-type settings for this concept: the user's where given, else Table 6's."""
        return {k: DEFAULTS[concept.type][k] if getattr(self, k) is None else getattr(self, k) for k in PER_TYPE}


def idle_options(cfg: ANTConfig, given: set[str], model: Denoiser, concepts: ConceptSet) -> list[str]:
    """The options the user set (`given`) that cannot act on this run, each with why."""
    idle = []
    if len(concepts) == 1:
        idle += [f"{k}: one concept trains its saliency map M*, not LoRAs fused by eq. (7) (several concepts)"
                 for k in ("rank", "preserve_scale", "lam", "preserve") if k in given]
        if not cfg.saliency:
            idle += [f"{k}: saliency=False trains the whole network, without M*"
                     for k in ("saliency_threshold", "saliency_prompts", "saliency_seeds") if k in given]
        available = len(concepts.concepts[0].prompts(augment=True))
        if "saliency_prompts" in given and cfg.saliency_prompts > available:
            idle.append(f"saliency_prompts={cfg.saliency_prompts}: the concept has {available} augmented prompts")
    else:
        idle += [f"{k}: several concepts train one LoRA each, without a saliency map (one concept)"
                 for k in ("saliency", "saliency_threshold", "saliency_prompts", "saliency_seeds") if k in given]
        if "preserve_scale" in given and not concepts.preserve:
            idle.append("preserve_scale: it weighs the preserved concepts, and none are preserved")
    if not cfg.split:
        idle += [f"{k}: split=False has no early steps" for k in ("t_split", "lambda2") if k in given]
    return idle


def draw_taus(t_split: float, split: bool, g: torch.Generator) -> list[tuple[float, bool]]:
    """Eq. (3)'s noise levels with whether each is early: t1 ~ U(t', 1] and t2 ~ U(0, t'];
    without the split one tau ~ U(0, 1], a late (erase) step."""
    u1, u2 = (1.0 - torch.rand(2, generator=g, dtype=torch.float64)).tolist()  # both in (0, 1]
    if not split:
        return [(u1, False)]
    return [(t_split + (1.0 - t_split) * u1, True), (t_split * u2, False)]


def ant_loss(model: Denoiser, cond: Cond, points: list[tuple[torch.Tensor, float, bool]], hp: dict, eta: float,
             teacher) -> torch.Tensor:
    """Eq. (3) for one batch of prompts at each of `points` (x_t, tau, early?); `teacher()` is a
    context in which the network is the frozen original."""
    b = len(cond)
    x = torch.cat([p[0] for p in points])
    tau = torch.cat([torch.full((b,), p[1]) for p in points])
    early = torch.cat([torch.full((b,), p[2]) for p in points])
    n = len(x)
    both = Cond.cat([Cond.cat([cond] * len(points)), model.uncond.repeat(n)])
    xx, tt = torch.cat([x, x]), torch.cat([tau, tau])
    with torch.no_grad(), teacher():
        teacher_cond, teacher_uncond = model.predict(xx, tt, both).chunk(2)
    pred_cond, pred_uncond = model.predict(xx, tt, both).chunk(2)
    return trajectory_aware_loss(pred_cond, pred_uncond, teacher_cond, teacher_uncond, early, eta,
                                 hp["lambda1"], hp["lambda2"], hp["lambda3"])


def trajectory_loss(model: Denoiser, hp: dict, cfg: ANTConfig, teacher):
    """loss(cond, generator): eq. (3) at one t1 and one t2 drawn for the batch (draw_taus), with
    x_t1, x_t2 from one sampling run of the edited model from the generator's noise."""

    def loss(cond: Cond, g: torch.Generator) -> torch.Tensor:
        drawn = draw_taus(hp["t_split"], cfg.split, g)
        xs = sampling.states(model, cond, cfg.sample_steps, [tau for tau, _ in drawn], cfg.guidance, g)
        points = [(x, tau, early) for x, (tau, early) in zip(xs, drawn)]
        return ant_loss(model, cond, points, hp, cfg.eta, teacher)

    return loss


def _training_loss(model: Denoiser, prompts: list[str], hp: dict, cfg: ANTConfig, teacher):
    """loss_fn(step, generator) of the training loop: batch_size prompts drawn from `prompts`."""
    loss = trajectory_loss(model, hp, cfg, teacher)

    def loss_fn(step: int, g: torch.Generator) -> torch.Tensor:
        pick = torch.randint(len(prompts), (cfg.batch_size,), generator=g).tolist()
        return loss(model.encode([prompts[i] for i in pick]), g)

    return loss_fn


# --- one concept: saliency map + masked training ---------------------------------------------------

def _saliency_key(model: Denoiser, concept: Concept, hp: dict, cfg: ANTConfig) -> str:
    net = model.network
    settings = {k: getattr(cfg, k) for k in ("eta", "split", "sample_steps", "guidance", "saliency_threshold",
                                             "saliency_prompts", "saliency_seeds", "seed")}
    loss = {k: hp[k] for k in ("t_split", "lambda1", "lambda2", "lambda3")}
    key = {"model": fingerprint(net, [n for n, _ in net.named_parameters()]), "concept": concept.to_dict(),
           "entries": "base weights, plain names",  # maps from before (a carried LoRA's factors too) are not read
           "loss": loss, "settings": settings, "taus": "U(t', 1], U(0, t']", "setting": model.setting()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def concept_saliency(model: Denoiser, concept: Concept, hp: dict, cfg: ANTConfig,
                     progress: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """M* (Sec. 3.3) over every floating-point parameter of the network: {name: int32 indices}, and
    a report. Cached by model weights and setting (image size, noise schedule, text encoders), concept and
    settings."""
    net = model.network
    key = _saliency_key(model, concept, hp, cfg)
    path = saliency.check_cache() / f"{key}.safetensors"
    if path.is_file():
        mask, meta = saliency.load_mask(path)
        return mask, {**meta, "saliency_cached": True, "saliency_cache": str(path)}
    prompts = concept.prompts(augment=True)
    order = torch.randperm(len(prompts), generator=loop.step_generator(cfg.seed, 1)).tolist()
    chosen = [prompts[i] for i in order[:cfg.saliency_prompts]]
    model.encode(chosen + [""])  # at once: offloaded text encoders come to the device once, not once a map
    tensors = base_parameters(net)
    total = sum(partitioned.numel(p) for p in tensors.values())
    was = [p.requires_grad for p in tensors.values()]
    loss = trajectory_loss(model, hp, cfg, teacher=contextlib.nullcontext)  # the network is the frozen model
    score = saliency.SaliencyScore()
    start = time.perf_counter()
    maps = [(i, j) for i in range(len(chosen)) for j in range(cfg.saliency_seeds)]
    # ZeRO-3 frees a layer's gathered weights after its backward, so a second backward over the same forward
    # finds them gone: there the forward runs again, from the same seed (the same value, recomputed)
    again = any(partitioned.is_partitioned(p) for p in tensors.values())
    try:
        for p in tensors.values():
            p.requires_grad_(True)
        with model.whole_graphs():  # visit_gradients reads each gradient whole, twice
            for i, j in tqdm(maps, desc=f"saliency {concept.name}", disable=not progress, leave=False):
                # seed s_j: the same noise, t1 and t2 for every prompt
                def value():
                    return loss(model.encode([chosen[i]]), loop.step_generator(cfg.seed, 2, j))
                # two backward passes, a layer's gradient at a time: the map's rms, then the score (never a
                # copy of every gradient)
                first, squares = value(), {}
                saliency.visit_gradients(first, tensors,
                                         lambda n, g: squares.__setitem__(n, g.float().square().sum()),
                                         retain_graph=not again, network=net)
                rms = score.map_rms([squares[n] for n in tensors], total)
                saliency.visit_gradients(value() if again else first, tensors, lambda n, g: score.update(n, g, rms),
                                         network=net)
                score.end_map()
    finally:
        for p, w in zip(tensors.values(), was):
            p.requires_grad_(w)
    mask = saliency.check_not_empty(score, cfg.saliency_threshold, "saliency_threshold")
    meta = {"saliency_key": key, "saliency_maps": score.maps, "saliency_prompts": len(chosen),
            "saliency_selected": saliency.selected(mask), "saliency_candidates": score.total,
            "saliency_tensors": len(mask), "saliency_time_s": round(time.perf_counter() - start, 2)}
    saliency.save_mask(path, mask, meta)
    return mask, {**meta, "saliency_cached": False, "saliency_cache": str(path)}


def _single(model: Denoiser, concept: Concept, cfg: ANTConfig, progress: bool) -> Edit:
    net = model.network
    if cfg.checkpoint:  # the base fingerprint is known only once the saliency map chose the entries
        loop.check_run(cfg.checkpoint, loop.identity("ant", [concept], cfg, None, model.setting()))
    hp = cfg.resolved(concept)
    prompts = concept.prompts()
    model.encode(prompts + [""])
    if cfg.saliency:
        with loop.before_training("ANT's saliency map", cfg.checkpoint):
            mask, report = concept_saliency(model, concept, hp, cfg, progress)
    else:
        mask = dict.fromkeys(base_parameters(net))  # None: every entry
        report = {}
    change = params.CompactDelta(net, mask)
    try:  # from here on any failure leaves the network as it came
        base = fingerprint(net, list(change.weights))
        trainable = change.trainable
        optimizer = SalientAdamW(trainable, lr=hp["lr"], weight_decay=0.0)
        loss_fn = _training_loss(model, prompts, hp, cfg, teacher=change.off)
        net.train()
        stats = loop.train(loss_fn, trainable, optimizer, hp["steps"], cfg.seed, cfg.checkpoint,
                           progress=progress, checkpoint_every=cfg.checkpoint_every, desc=f"ant {concept.name}",
                           run=loop.identity("ant", [concept], cfg, base, model.setting()),
                           max_skipped_steps=cfg.max_skipped_steps,
                           zero=cfg.zero, deepspeed_config=cfg.deepspeed_config, after_step=change.sync,
                           model=model)
        values = change.current()
    finally:  # the model leaves as it came; the caller applies the returned Edit
        net.eval()
        change.restore()
    weights, entries = change.edit_parts(values)
    return Edit(method="ant", model_kind=model.kind, concepts=[concept.to_dict()], config=asdict(cfg),
                base_fingerprint=base, weights=weights, entries=entries,
                report={**report, **{f"resolved_{k}": v for k, v in hp.items()},
                        "trained_entries": change.entries,
                        "trained_tensors": len(change.weights), **stats})


# --- several concepts: one LoRA each, fused in closed form (eq. 7) --------------------------------

def _fusion_projections(model: Denoiser):
    """The projections fused by eq. (7): those whose input is the text encoding itself, so that
    fusing one does not change what feeds another (SD: every attn2 to_k / to_v; FLUX:
    context_embedder and the pooled-text embedder)."""
    projections = model.cross_attention_kv()
    return projections[:2] if model.kind == "flux" else projections


def _token_rows(model: Denoiser, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Eq. (7)'s embeddings: every token row that feeds each fused projection for `prompts`, (rows, in)
    in fp32. The pooled-text embedder (FLUX) reads one row per prompt, the prompt's pooled embedding."""
    inputs = model.kv_inputs(model.encode(prompts), [p.name for p in _fusion_projections(model)])
    return {name: x.reshape(-1, x.shape[-1]).float() for name, x in inputs.items()}


def _multi(model: Denoiser, concepts: ConceptSet, cfg: ANTConfig, progress: bool) -> Edit:
    net = model.network
    projections = _fusion_projections(model)
    modules = [p.name for p in projections]
    ranges.check_rank("ANT", cfg.rank, net, modules)  # before any work
    base = fingerprint(net, [f"{m}.weight" for m in modules])
    for k in range(len(concepts)):  # every concept's checkpoint file, before the first trains
        if cfg.checkpoint:
            loop.check_run(f"{cfg.checkpoint}.{k}", loop.identity("ant", concepts, cfg, base, model.setting()))
    deltas, stats = [], {}
    for k, concept in enumerate(concepts):
        hp = cfg.resolved(concept)
        prompts = concept.prompts()
        model.encode(prompts + [""])
        trainable = params.add_lora(net, modules, cfg.rank, cfg.seed + k)
        optimizer = engine.adamw(trainable, hp["lr"], cfg.zero)
        loss_fn = _training_loss(model, prompts, hp, cfg, teacher=lambda: params.lora_off(net))
        checkpoint = f"{cfg.checkpoint}.{k}" if cfg.checkpoint else None
        net.train()
        try:
            stats[concept.name] = loop.train(loss_fn, trainable, optimizer, hp["steps"], cfg.seed + k, checkpoint,
                                             progress=progress, checkpoint_every=cfg.checkpoint_every,
                                             desc=f"ant {concept.name} ({k + 1}/{len(concepts)})",
                                             run=loop.identity("ant", concepts, cfg, base, model.setting()),
                                             max_skipped_steps=cfg.max_skipped_steps, zero=cfg.zero,
                                             deepspeed_config=cfg.deepspeed_config, model=model)
            deltas.append({m: params.lora_delta(net, m) for m in modules})
        finally:
            net.eval()
            remove_adapter(net)
    # eq. (7): W* e = (W + dW_i) e on concept i's prompts' token rows, W* e = W e on the preserved prompts'
    erase_in = [_token_rows(model, c.prompts(augment=True)) for c in concepts]
    preserve = concepts.preserve_prompts()
    keep_in = _token_rows(model, preserve) if preserve else None
    weights = {}
    for p in projections:
        keep = keep_in[p.name] if keep_in is not None else None
        with partitioned.gathered([p.module.weight]):
            new = fuse_lora_deltas(p.module.weight, [x[p.name] for x in erase_in], [d[p.name] for d in deltas],
                                   keep, cfg.preserve_scale, cfg.lam)
        weights[f"{p.name}.weight"] = new
    return Edit(method="ant", model_kind=model.kind, concepts=[c.to_dict() for c in concepts], config=asdict(cfg),
                base_fingerprint=fingerprint(net, list(weights)), weights=weights,
                report={"fused_layers": len(weights), "preserve_prompts": len(preserve),
                        "steps": sum(s["steps"] for s in stats.values()),
                        "skipped_steps": sum(s["skipped_steps"] for s in stats.values()),
                        "last_loss": {k: s["last_loss"] for k, s in stats.items()},
                        "engine": next(iter(stats.values()))["engine"],
                        "memory_options": {k: s["memory_options"] for k, s in stats.items()}})


def run(model: Denoiser, concepts: ConceptSet, cfg: ANTConfig, progress: bool = True) -> Edit:
    if len(concepts) == 1:
        return _single(model, concepts.concepts[0], cfg, progress)
    return _multi(model, concepts, cfg, progress)

