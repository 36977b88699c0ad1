"""TRACE: Trajectory-Constrained Attentional Concept Erasure (trace.txt Sec. 3.2, 4.1-4.3).

Phase 1, closed-form refinement (eq. 1): every projection that reads the text encoder's token
output gets W += eta W (e_u - e_w) e_w^T / |e_w|^2, all layers in one call of
ops.rank_one_update, so that (W + dW) e_w = W e_u at eta = 1. e_w: the concept word's token
rows of the text encoding, averaged over the concept's prompts (one row per token of the word;
the paper's footnote allows the average); e_u: the end-of-sequence token's row (the paper's
default) of the empty prompt, the "empty concept" (a prompt's own EOS row holds the whole prompt,
the concept too, in a causal CLIP), or the anchor word's rows averaged into one vector. Several
concepts are solved jointly (one system, Sec. 4.3), which keeps every e_w exact where a sum of
eq.-1 updates would not.
Where: SD, every cross-attention to_k / to_v (they read the CLIP encoder's output). FLUX: the
context_embedder only, the one projection whose input is the T5 token rows themselves; the joint
blocks' add_k / add_v read the text stream after the blocks' time-modulated norms and after
attending to the image tokens, so their input depends on x_t and t and no fixed e_w exists
there: an update exact at one (x_t, t) is not at another. The pooled CLIP embedding (FLUX's
time_text_embed) is one vector per prompt, not a token row, and is not refined.

Phase 2, trajectory-constrained LoRA (Sec. 4.2), over the refined base, which stays frozen:
one peft LoRA per concept (rank 4) on the projections that read text (SD: to_k / to_v; FLUX:
context_embedder, the pooled-text embedder and every joint block's add_k / add_v).
  target x*: the ORIGINAL model (refinement and LoRAs off) sampling the concept prompt until the
    first grid step at or below t0, then its neutral pair (the concept replaced) from there on,
    to its clean end x*_0;
  L_traj (concept prompts, steps at or below t0): |x0_theta(x_t) - x*_0|^2, where x_t is a state
    of the edited model's own rollout from the same noise and x0_theta the clean latents its
    guided prediction there implies;
  L_score (same rows and prediction): -log(1 - D_k(x0_theta)) of the concept's head of the
    scorer D (the paper's "classifier-based loss");
  L_keep (clean prompts, steps at or below t0): |x0_theta(x_t) - x^orig_0|^2 against the original
    model's own clean end from the same noise;
  L_drift (clean prompts, steps above t0): |eps_theta(x_t, q) - eps_orig(x_t, q)|^2, the paper's
    "small penalty on early-step prediction drift";
  L_int (several concepts, every int_every steps): the scorer's heads of both concepts on x0_theta
    of prompts that name two erased concepts together (Sec. 4.3), through both concepts' LoRAs;
  loss = lambda_traj L_traj + lambda_score (L_score + L_int) + lambda_keep L_keep + lambda_drift L_drift.
Which gradients flow where, and what it costs: every state x_t comes from a no-grad rollout; the
gradient reaches the LoRAs through the one guided prediction at x_t (both branches, so the empty
prompt's too), never through the chain of steps before it. Rollouts come from a buffer
refreshed every refresh_every steps: `rollouts` rows per concept, as many clean and (several
concepts) pair rows, run by the edited model and (concept and clean rows) by the original, each
sample_steps guided steps (2 network passes a step). A training step then costs, per concept, a
guided forward and backward on batch_size concept rows and on batch_size clean rows and a
forward and backward plus a teacher forward on batch_size early clean rows, plus the buffer's
share: 2 x sample_steps x (rows run by each model) / refresh_every forward passes. The buffer
keeps every grid step's x_t of the edited rollouts in fp32 on the model's device (computed from the
shapes, not measured: 20 steps x 16 rows for one concept, FLUX's 4096 x 64 latents at 1024 px
1 MiB each, 320 MiB; SD1.5's 4 x 64 x 64 at 512 px, 20 MiB).

The scorer D is FADE's concept discriminator (training/discriminator.py), trained before phase 2
on the original model's own generations (concept prompts against their neutral pairs), then
frozen: never the evaluation's detector. scorer="none" drops L_score and L_int.

Gradient isolation (Sec. 4.3: "for concept w_i, we only update its own LoRA parameters"): each
concept's terms (its rows, and the clean terms run beside them, for its LoRA) are built with only
its own LoRA requiring grad and back-propagated, nested in the training loop's backward, with the
same flags (_isolated). Every LoRA acts in the forward (a concept's rows see the whole edit); the
other LoRAs are constants of its gradient, so its loss leaves theirs zero, also where backward runs
the network again (micro_batch's chunks, gradient checkpointing's recompute, which then recomputes
exactly what the forward saved). L_int's rows update the two LoRAs of their pair. At the end the
LoRAs are joined along the rank into one adapter (an exact sum of their changes) that diffusers'
load_lora_weights reads over the refined weights; the Edit holds both, and a saved pipeline has
them merged.

Where this departs from the paper, and why:
- The trajectory terms compare the clean end that the edited model's state implies with the
  target's clean end (the paper: "one or two intermediate latents plus the final image x_0^*
  suffice"), with the gradient of that one prediction, not of the whole chain (it does not
  scale). Compared one step on instead (x_{t-1} against x*_{t-1}), the edited model's own state
  has drifted from x*_t by far more than one step can move, and the loss asked for predictions
  far outside the data's range (toy-sd: terms of 30 in prediction units).
- The clean prompts' x_0 term is in latents, not a CLIP-feature distance: the toy world has no
  CLIP, and latents are what the trajectory terms already compare.
- Clean prompts: the preserved concepts' prompts, or with none preserved the neutral pairs.
- The target's replacement word (the paper does not name one): one word for every prompt, the first
  preserved concept's name (or the concept's anchor with none preserved), not FADE's preserved names
  in turn (target_pairs). L_traj regresses the concept prompts' predictions onto x*_0, so the
  target must be one image per prompt and noise that the text alone selects: with a different shape
  per template and colour, toy-flux drew a blend the detector read as a circle in 25% of circle
  prompts (bench/RESULTS.md; with one word, none).
- L_int penalises the concepts' presence in the pair prompts' outputs outright, not its increase
  over the single-concept prompts' (the paper compares the two): erased, both should be absent.
- e_u as a learned vector (an option the paper mentions) is not offered: the paper gives no
  objective for it. Nor is the negatively guided target: the concept is replaced.
- No concept-prompt term above t0. The paper has one: Thm 3.5 sums the concept term over t = t0..T
  (its T is pure noise: the steps before the switch), and Sec. 4.2 adds "for t > t_0 ... a
  latent-space l2 loss between x_t and x_t^*". Above t0, x* is still the original model's own run of
  the concept prompt (the target switches at t0), so that term keeps the concept prompts' early
  trajectory where the original had it: it preserves, it does not erase. Here the concept terms
  (L_traj, L_score) act at tau <= t0 only, and above t0 only L_drift, on clean prompts, holds the
  early steps. Why: as a distance of states it has no gradient in this design (x_t comes from a
  no-grad rollout, the gradient flows through one prediction); its one-prediction form, the drift
  term on concept rows (eps_theta(x_t, p) against eps_orig(x_t, p) at tau > t0), would pull the
  concept prompts' predictions back to the original's through the same LoRA factors that L_traj
  moves (the LoRAs act at every step), for one more guided forward and backward and one teacher
  forward per concept a step. Not measured: whether it would help.
- t0 = 0.86, ANT's t' = 43 of 50 DDIM steps: the value of ANT's NSFW row (its Table 6; celebrities
  40 and art styles 47, i.e. 0.80 and 0.94; the table has no objects row), not the paper's unstated
  "post the symmetry breaking point" value: on toy-sd the shape is decided before tau 0.7 (t0 = 0.5
  and 0.7 erased nothing; bench/RESULTS.md).
- steps = 400 by default, not the paper's "1000-2000 steps on a batch size of 4": 400 was chosen on
  the toy world (TRACEConfig).
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import ops
from ..concepts import ConceptSet
from ..edit import ADAPTER, Edit, fingerprint, remove_adapter
from ..errors import UserError
from ..models import Cond, Denoiser, partitioned
from ..training import engine, loop, params, sampling
from ..training.discriminator import ConceptDiscriminator, accuracy, removal_loss, train_step
from ..training.prompt_pairs import PromptPairs, prompt_pairs
from . import ranges

CLEAN, PAIR = -1, -2  # buffer row kinds besides concept indices


@dataclass
class TRACEConfig:
    """TRACE's options (module doc). steps defaults to 400 optimizer steps, fewer than the paper's
    1000-2000 (at its batch size of 4, this one's default too): the default is sized for the toy world,
    where it was chosen (bench/RESULTS.md, issue #17: on toy-sd the circle stayed in 12% of scenes
    after 200 steps, 3% after 300, 1% after 400 with lambda_keep 3; on toy-flux the losses were flat
    after about 100 steps), on 2 CPU cores, where a step costs a guided forward and backward per
    concept and a buffer share of rollouts (module doc). On SD1.5 or FLUX, set steps to the paper's
    1000-2000."""
    # phase 1
    refine: bool = True  # False: no closed-form refinement (Table 2's w/o attention refinement)
    eta: float = 1.0  # damping of eq. (1) in [0, 1]
    neutral_token: str = "eos"  # e_u: "eos" (the empty prompt's, the paper's default) or "anchor" (the anchor word's)
    # phase 2
    finetune: bool = True  # False: the refinement alone (phase 1); on the toy models it erases nothing (module doc)
    rank: int = 4  # LoRA rank per concept
    separate: bool = True  # one LoRA per concept; False: one LoRA for all (Table 2)
    t0: float = 0.86  # noise level where the target switches to the neutral prompt (1 = pure noise); module doc
    trajectory: bool = True  # False: the target switches at the first step, L_traj on every step, no drift term
    neutral: str | None = None  # replaces the concept's name in the target; None: target_pairs' choice
    lambda_traj: float = 1.0
    lambda_score: float = 0.1
    lambda_keep: float = 3.0  # measured on toy-sd (1.0 cost the other shapes 8% of their colour)
    lambda_drift: float = 0.1
    integration: bool = True  # L_int on prompts naming two erased concepts (several concepts)
    int_every: int = 4  # steps between L_int terms
    scorer: str = "discriminator"  # the concept scorer D: trained on the original's generations, or "none"
    d_pretrain_steps: int = 300
    d_batch: int = 64
    steps: int = 400  # the paper: 1000-2000; see the class doc
    lr: float = 1e-3
    batch_size: int = 4
    rollouts: int = 8  # concept rows (and as many clean, and pair, rows) per buffer refresh
    refresh_every: int = 4
    sample_steps: int = 20
    guidance: float = 3.0  # classifier-free guidance of every rollout
    seed: int = 0
    checkpoint: str | None = None
    checkpoint_every: int = 50  # steps between checkpoints (several processes save only these)
    max_skipped_steps: int = 10
    zero: int = 0  # 0: plain PyTorch; 2 or 3: DeepSpeed ZeRO stage (training.engine)
    deepspeed_config: str | None = None  # with zero: a DeepSpeed JSON config for its other settings

    def __post_init__(self):
        ranges.check_common("TRACE", self)
        for k in ("refine", "finetune", "separate", "trajectory", "integration"):
            if not isinstance(getattr(self, k), bool):
                raise UserError(f"TRACE option {k} must be true or false, got {getattr(self, k)!r}")
        if not self.refine and not self.finetune:
            raise UserError("TRACE options refine=False and finetune=False leave nothing to do; keep one")
        ranges.check("TRACE", "eta", self.eta, 0, 1, above=True)
        if self.neutral_token not in ("eos", "anchor"):
            raise UserError(f"TRACE option neutral_token must be 'eos' (the end-of-sequence token) or 'anchor' "
                            f"(the concept's anchor word), got {self.neutral_token!r}")
        if not 0.0 < self.t0 < 1.0:
            raise UserError(f"TRACE option t0 must be a noise level strictly between 0 (clean) and 1 (pure noise), "
                            f"got {self.t0!r}")
        if self.neutral is not None and (not isinstance(self.neutral, str) or "," in self.neutral):
            raise UserError(f"TRACE option neutral must be a word or phrase without commas (or unset), "
                            f"got {self.neutral!r}")
        if self.scorer not in ("discriminator", "none"):
            raise UserError(f"TRACE option scorer must be 'discriminator' (trained on the model's own generations) "
                            f"or 'none', got {self.scorer!r}")
        for k in ("lambda_traj", "lambda_score", "lambda_keep", "lambda_drift"):
            ranges.check("TRACE", k, getattr(self, k), 0, ranges.MAX_SCALE)
        for k in ("int_every", "d_batch", "rollouts", "refresh_every"):
            ranges.check("TRACE", k, getattr(self, k), 1, ranges.MAX_BATCH, integer=True)
        ranges.check("TRACE", "d_pretrain_steps", self.d_pretrain_steps, 1, integer=True)


def idle_options(cfg: TRACEConfig, given: set[str], model: Denoiser, concepts: ConceptSet) -> list[str]:
    """The options the user set (`given`) that cannot act on this run, each with why. Raises UserError when
    t0 leaves no sampler step on one side (ranges.check_switch)."""
    if cfg.finetune and cfg.trajectory:
        ranges.check_switch("TRACE", cfg.t0, cfg.sample_steps, model,
                            "the target switches at t0 and the drift term acts above it")
    idle = []
    if not cfg.refine:
        idle += [f"{k}: refine=False skips the refinement" for k in ("eta", "neutral_token") if k in given]
    if not cfg.finetune:
        phase2 = set(asdict(cfg)) - {"refine", "eta", "neutral_token", "finetune", "seed", "max_skipped_steps"}
        phase2 |= {"resolution", "gradient_checkpointing", "micro_batch"}  # erase's: no image goes through the network
        idle += [f"{k}: finetune=False runs the refinement alone" for k in sorted(given & phase2)]
    else:
        if len(concepts) == 1:
            idle += [f"{k}: it acts between several concepts" for k in ("separate", "integration", "int_every")
                     if k in given]
        if cfg.scorer == "none":
            idle += [f"{k}: scorer='none' trains no scorer (L_score, L_int)"
                     for k in ("lambda_score", "d_pretrain_steps", "d_batch", "integration", "int_every") if k in given]
        if not cfg.trajectory:
            idle += [f"{k}: trajectory=False has no t0" for k in ("t0", "lambda_drift") if k in given]
    return idle


# --- phase 1 ----------------------------------------------------------------------------------------

def refined_projections(model: Denoiser):
    """The projections eq. (1) edits: those fed by the text encoder's token rows themselves (module doc)."""
    projections = model.cross_attention_kv()
    return [p for p in projections if p.name == "context_embedder"] if model.kind == "flux" else projections


def _eos_rows(model: Denoiser, prompts: list[str]) -> list[int]:
    tok = model.text_tokenizer
    length = model.encode(prompts).embeds.shape[1]
    ids = tok(prompts, truncation=True, max_length=length).input_ids
    if any(tok.eos_token_id not in seq for seq in ids):
        raise UserError(f"a prompt has no end-of-sequence token within the encoder's {length} tokens; "
                        f"use neutral_token='anchor' or shorter prompts")
    return [seq.index(tok.eos_token_id) for seq in ids]


def refinement_embeddings(model: Denoiser, concepts: ConceptSet,
                          neutral_token: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(e_u, e_w), each (k, width) fp32: a row per token of each concept's name, averaged over the
    concept's prompts (augmented), and its replacement (module doc)."""
    e_u, e_w = [], []
    for c in concepts:
        prompts = c.prompts(augment=True)
        embeds = model.encode(prompts).embeds.float()
        rows = model.word_rows(prompts, [c.name])
        if len({len(r) for r in rows}) != 1:
            raise UserError(f"the name {c.name!r} takes a different number of tokens in different prompts; "
                            f"TRACE's refinement needs one row per token")
        word = torch.stack([embeds[i, r] for i, r in enumerate(rows)]).mean(0)  # (tokens, width)
        if neutral_token == "eos":  # the empty prompt's: the same prompt's EOS row holds the prompt (causal CLIP)
            empty = model.encode([""]).embeds.float()
            u = empty[0, _eos_rows(model, [""])[0]]
        else:
            if not c.anchor.strip():
                raise UserError(f"neutral_token='anchor' needs an anchor word for {c.name!r}, which has none; "
                                f"give the concept an anchor or use neutral_token='eos'")
            anchor = c.anchor_prompts(augment=True)
            a_embeds = model.encode(anchor).embeds.float()
            a_rows = model.word_rows(anchor, [c.anchor])
            u = torch.cat([a_embeds[i, r] for i, r in enumerate(a_rows)]).mean(0)
        e_w.append(word)
        e_u.append(u.expand_as(word))
    return torch.cat(e_u), torch.cat(e_w)


@torch.no_grad()
def refine(model: Denoiser, concepts: ConceptSet, cfg: TRACEConfig) -> dict[str, torch.Tensor]:
    """Eq. (1) on the network's refined projections, in place, in one call of the batched op.
    Returns their original weights by module name (put them back with `put`)."""
    projections = refined_projections(model)
    e_u, e_w = refinement_embeddings(model, concepts, cfg.neutral_token)
    if len(e_w) > ops.rank_update.MAX_RANK:
        raise UserError(f"the concepts' names take {len(e_w)} tokens together; the refinement solves at most "
                        f"{ops.rank_update.MAX_RANK} at once")
    with partitioned.gathered([p.module.weight for p in projections], modify=True):  # ZeRO-3: whole, then re-sliced
        original = {p.name: p.module.weight.detach().clone() for p in projections}
        try:
            ops.rank_one_update([p.module.weight.data for p in projections], e_u, e_w, eta=cfg.eta)
        except BaseException as exc:  # the op updates one shape group at a time: undo a partial update
            put(model, original)
            if isinstance(exc, ValueError):
                raise UserError(f"TRACE refinement: {exc}") from None
            raise
    return original


@torch.no_grad()
def put(model: Denoiser, weights: dict[str, torch.Tensor]) -> None:
    """Copy weights (by module name) into the refined projections, also under a LoRA wrapper, and into
    their slices while ZeRO-3 partitions the network (params.put_entries)."""
    modules = {p.name: p.module for p in refined_projections(model)}
    for name, w in weights.items():
        params.put_entries(modules[name].weight, None, w)


# --- phase 2 ----------------------------------------------------------------------------------------

class Trajectories:
    """The rollout buffer (`rollouts` rows per concept, as many clean and pair rows) and the frozen
    scorer: the state TRACE trains beside the LoRAs (a loop.Companion, checkpointed with them)."""

    def __init__(self, model: Denoiser, prompts: PromptPairs, pairs: list[tuple[str, tuple[int, int]]],
                 concepts: int, cfg: TRACEConfig, teacher):
        self.model, self.prompts, self.pairs, self.cfg, self.teacher = model, prompts, pairs, cfg, teacher
        self.concepts = concepts
        self.clean = prompts.preserved or prompts.neutral
        self.texts = list(dict.fromkeys([t for t, _ in prompts.concept] + prompts.neutral + self.clean
                                        + [t for t, _ in pairs]))
        self.text_ids = {t: i for i, t in enumerate(self.texts)}
        grid = model.sampling_taus(cfg.sample_steps)
        self.switch = next((i for i, t in enumerate(grid) if t <= cfg.t0), cfg.sample_steps) if cfg.trajectory else 0
        self.d = None
        if cfg.scorer == "discriminator":
            channels = model.latent_channels()
            with torch.random.fork_rng():
                torch.manual_seed(cfg.seed)
                self.d = ConceptDiscriminator(channels, concepts).to(model.network.device)
            self.d.requires_grad_(False)
        self.buffer: dict[str, torch.Tensor] = {}
        self.scorer_accuracy = float("nan")
        self.last = {k: float("nan") for k in ("traj", "score", "keep", "drift", "int")}

    # --- loop.Companion ---
    def state_dict(self) -> dict:
        return {"d": copy.deepcopy(self.d.state_dict()) if self.d is not None else {}, "buffer": dict(self.buffer),
                "scorer_accuracy": self.scorer_accuracy, "last": dict(self.last)}

    def load_state_dict(self, state: dict) -> None:
        if self.d is not None:
            self.d.load_state_dict(state["d"])
        # the latents are on the model's device, where the rollouts put them (a checkpoint reads onto the CPU)
        device = self.model.network.device
        self.buffer = {k: v.to(device) if k in ("x", "x_end") else v for k, v in state["buffer"].items()}
        self.last = dict(state["last"])
        self.scorer_accuracy = float(state["scorer_accuracy"])

    def postfix(self) -> dict:
        return {k: f"{v:.3g}" for k, v in self.last.items() if v == v}

    def finished(self) -> bool:
        return False

    # --- the scorer ---
    def _concept_rollouts(self, g: torch.Generator, rows: int):
        """The original model's guided x0 predictions at every grid step, for `rows` concept prompts
        and their neutral pairs from the same noise: (x0 (steps, 2 rows, ...), kinds (2 rows,))."""
        p = self.prompts
        pick = torch.randint(len(p.concept), (rows,), generator=g).tolist()
        texts = [p.concept[i][0] for i in pick] + [p.neutral[i] for i in pick]
        kinds = torch.tensor([p.concept[i][1] for i in pick] + [-1] * rows)
        noise = self.model.noise(rows, g)
        with self.teacher():
            _, _, x0 = sampling.rollout_predictions(self.model, self.model.encode(texts), self.cfg.sample_steps,
                                                    self.cfg.guidance, torch.cat([noise, noise]))
        return x0, kinds

    def train_scorer(self, progress: bool) -> float:
        """D trained on the original model's generations, then its accuracy on new ones it has not seen
        (their clean ends). Raises UserError when that is no better than chance."""
        cfg = self.cfg
        x0, kinds = self._concept_rollouts(loop.step_generator(cfg.seed, 0, 1), max(cfg.d_batch, 2 * cfg.rollouts))
        optimizer = torch.optim.AdamW(self.d.parameters(), lr=1e-3, weight_decay=0.0)
        g = loop.step_generator(cfg.seed, 0, 2)
        for _ in tqdm(range(cfg.d_pretrain_steps), desc="trace scorer", disable=not progress, leave=False):
            rows = torch.randint(len(kinds), (cfg.d_batch,), generator=g)
            steps = torch.randint(len(x0), (cfg.d_batch,), generator=g)
            train_step(self.d, optimizer, self.model.latent_image(x0[steps, rows]), kinds[rows])
        held, held_kinds = self._concept_rollouts(loop.step_generator(cfg.seed, 0, 3), max(16, cfg.rollouts))
        with torch.no_grad():
            self.scorer_accuracy = accuracy(self.d(self.model.latent_image(held[-1])), held_kinds)
        if self.scorer_accuracy <= 0.6:
            raise UserError(f"TRACE's concept scorer tells the concept's generations from the neutral prompts' "
                            f"no better than {self.scorer_accuracy:.2f} on new ones: the model may not draw the "
                            f"concept, or the scorer needs more d_pretrain_steps (or use scorer='none')")
        return self.scorer_accuracy

    # --- the buffer ---
    @torch.no_grad()
    def refresh(self, g: torch.Generator) -> None:
        """New rollouts from the same noise: the edited model's on concept, clean and pair prompts,
        the original's targets on concept rows (switched at t0) and clean rows."""
        cfg, p, n = self.cfg, self.prompts, self.cfg.rollouts
        pick = []
        for k in range(self.concepts):  # as many rows for every concept: each gets equal attention (Sec. 4.3)
            own = [i for i, (_, c) in enumerate(p.concept) if c == k]
            pick += [own[i] for i in torch.randint(len(own), (n,), generator=g).tolist()]
        keep = torch.randint(len(self.clean), (n,), generator=g).tolist()
        texts = [p.concept[i][0] for i in pick] + [self.clean[i] for i in keep]
        after = [p.neutral[i] for i in pick] + [self.clean[i] for i in keep]
        kinds = [p.concept[i][1] for i in pick] + [CLEAN] * n
        if self.pairs:
            both = torch.randint(len(self.pairs), (n,), generator=g).tolist()
            pairs = [self.pairs[i][0] for i in both]
        targets = len(pick) + n
        noise = self.model.noise(targets + (n if self.pairs else 0), g)
        with self.teacher():
            x_star, _ = sampling.switched_rollout(self.model, self.model.encode(texts), self.model.encode(after),
                                                  self.switch, cfg.sample_steps, cfg.guidance, noise[:targets])
        if self.pairs:
            texts, kinds = texts + pairs, kinds + [PAIR] * n
        cond = self.model.encode(texts)
        x, tau = sampling.switched_rollout(self.model, cond, cond, cfg.sample_steps, cfg.sample_steps, cfg.guidance,
                                           noise)
        self.buffer = {"x": x[:-1], "x_end": x_star[-1], "tau": tau, "kind": torch.tensor(kinds),
                       "text": torch.tensor([self.text_ids[t] for t in texts]),
                       "pair": torch.tensor([self.pairs[i][1] for i in both]) if self.pairs else torch.zeros(0, 2)}

    def cond(self, rows: torch.Tensor) -> Cond:
        return self.model.encode([self.texts[int(i)] for i in self.buffer["text"][rows]])

    def draw(self, n: int, kinds: list[int], g: torch.Generator, above: float | None = None,
             below: float | None = None, pair: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n (row, step) pairs: rows of one of `kinds` (PAIR rows of the concept pair `pair` when given),
        at grid steps with tau above `above` / at or below `below` when given."""
        match = torch.isin(self.buffer["kind"], torch.tensor(kinds))
        if pair is not None:
            match[len(match) - len(self.buffer["pair"]):] &= (self.buffer["pair"] == pair).all(dim=1)
        rows = torch.nonzero(match).reshape(-1)
        taus = self.buffer["tau"][:-1]
        steps = torch.arange(len(taus))
        if above is not None:
            steps = steps[taus > above]
        if below is not None:
            steps = steps[taus <= below]
        return rows[torch.randint(len(rows), (n,), generator=g)], steps[torch.randint(len(steps), (n,), generator=g)]


def _predict_x0(model: Denoiser, buf: dict, rows: torch.Tensor, steps: torch.Tensor, cond: Cond,
                guidance: float) -> torch.Tensor:
    """The clean latents that the edited model's guided prediction implies at buffer states (rows,
    steps), with grad through that one prediction."""
    x, tau = buf["x"][steps, rows], buf["tau"][steps]
    out = model.guided(x, tau, cond, guidance) if guidance != 1.0 else model.predict(x, tau, cond)
    return sampling.split(model, x, out, tau)[0]


@contextlib.contextmanager
def _grad_only(groups: list[list[torch.nn.Parameter]], keep: set[int]):
    """Only the LoRAs of `keep` require grad inside (each LoRA's flag as it was after): a graph built
    here reaches no other LoRA."""
    before = [[p.requires_grad for p in group] for group in groups]
    for k, group in enumerate(groups):
        for p in group:
            p.requires_grad_(k in keep)
    try:
        yield
    finally:
        for group, flags in zip(groups, before):
            for p, flag in zip(group, flags):
                p.requires_grad_(flag)


class _Isolated(torch.autograd.Function):
    """A loss built inside `scope` (a context manager factory), back-propagated inside it again (_isolated).
    anchor: an empty leaf that requires grad, so that the outer graph reaches this node; held: [the loss
    with its graph], in a list so that autograd does not take the loss for an input and back-propagate
    it outside the scope."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, value: torch.Tensor, held: list, scope) -> torch.Tensor:
        ctx.held, ctx.scope = held, scope
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.held:
            raise RuntimeError("TRACE's isolated terms were back-propagated once already; their graph is freed")
        loss = ctx.held.pop()
        with ctx.scope():
            torch.autograd.backward(loss, grad)
        return None, None, None, None


def _isolated(groups: list[list[torch.nn.Parameter]], keep: set[int], terms) -> torch.Tensor:
    """terms() (a loss) with its gradient reaching the LoRAs of `keep` only, whatever the backward
    recomputes. The graph is built with only those LoRAs requiring grad (_grad_only), and its
    backward runs, nested in the training loop's, inside the same _grad_only: a pass that runs the
    network again during backward (micro_batch's chunks, models/micro_batch.py; gradient
    checkpointing's recompute) sees the flags the forward saw, so it builds no graph through the
    other LoRAs and recomputes the tensors the forward saved. Costs nothing more than the plain
    backward: the graph is the one built in the forward. Like micro_batch, the LoRAs' gradients
    arrive through the nested backward only (into .grad): torch.autograd.grad() of the total loss
    cannot ask for them. With `keep` every LoRA (one concept, separate=False) it is terms() itself."""
    if keep >= set(range(len(groups))):
        return terms()
    scope = lambda: _grad_only(groups, keep)  # noqa: E731
    with scope():
        loss = terms()
    if not loss.requires_grad:
        return loss
    return _Isolated.apply(torch.empty(0, requires_grad=True), loss.detach(), [loss], scope)


def trace_loss(model: Denoiser, traj: Trajectories, groups: list[list[torch.nn.Parameter]], concepts: int,
               cfg: TRACEConfig, teacher):
    """loss_fn(step, generator) of the training loop (module doc)."""
    b = cfg.batch_size
    late = cfg.t0 if cfg.trajectory else None

    def concept_terms(k: int, g: torch.Generator) -> torch.Tensor:
        buf = traj.buffer
        rows, steps = traj.draw(b, list(range(concepts)) if k < 0 else [k], g, below=late)
        x0 = _predict_x0(model, buf, rows, steps, traj.cond(rows), cfg.guidance)
        traj_term = F.mse_loss(x0, buf["x_end"][rows])
        traj.last["traj"] = traj_term.item()
        loss = cfg.lambda_traj * traj_term
        if traj.d is not None and cfg.lambda_score > 0:
            score = removal_loss(traj.d(model.latent_image(x0)), buf["kind"][rows])
            traj.last["score"] = score.item()
            loss = loss + cfg.lambda_score * score
        return loss

    def clean_terms(g: torch.Generator) -> torch.Tensor:
        buf = traj.buffer
        rows, steps = traj.draw(b, [CLEAN], g, below=late)
        keep = F.mse_loss(_predict_x0(model, buf, rows, steps, traj.cond(rows), cfg.guidance), buf["x_end"][rows])
        traj.last["keep"] = keep.item()
        loss = cfg.lambda_keep * keep
        if cfg.trajectory and cfg.lambda_drift > 0:
            drow, dstep = traj.draw(b, [CLEAN], g, above=cfg.t0)
            x, tau, cond = buf["x"][dstep, drow], buf["tau"][dstep], traj.cond(drow)
            with torch.no_grad(), teacher():
                original = model.predict(x, tau, cond)
            drift = F.mse_loss(model.predict(x, tau, cond), original)
            traj.last["drift"] = drift.item()
            loss = loss + cfg.lambda_drift * drift
        return loss

    def loss_fn(step: int, g: torch.Generator) -> torch.Tensor:
        if step % cfg.refresh_every == 0:
            traj.refresh(g)
        total = torch.zeros(())
        owners = range(len(groups)) if len(groups) > 1 else [-1]  # one LoRA for all: every concept's rows
        for k in owners:
            total = total + _isolated(groups, {max(k, 0)}, lambda k=k: concept_terms(k, g) + clean_terms(g))
        if traj.pairs and traj.d is not None and cfg.integration and step % cfg.int_every == 0:
            buf = traj.buffer  # one pair of concepts per term: its rows update those two LoRAs only
            pair = buf["pair"][torch.randint(len(buf["pair"]), (1,), generator=g)][0]
            rows, steps = traj.draw(b, [PAIR], g, below=late, pair=pair)

            def integration() -> torch.Tensor:
                x0 = _predict_x0(model, buf, rows, steps, traj.cond(rows), cfg.guidance)
                logits = traj.d(model.latent_image(x0))
                return removal_loss(logits, pair[0].repeat(b)) + removal_loss(logits, pair[1].repeat(b))

            integ = _isolated(groups, set(pair.tolist()) if len(groups) > 1 else {0}, integration)
            traj.last["int"] = integ.item()
            total = total + cfg.lambda_score * integ
        return total

    return loss_fn


def _pair_prompts(concepts: ConceptSet) -> list[tuple[str, tuple[int, int]]]:
    return [(p, (i, j)) for i in range(len(concepts)) for j in range(i + 1, len(concepts))
            for p in concepts.pair_prompts(i, j)]


def run(model: Denoiser, concepts: ConceptSet, cfg: TRACEConfig, progress: bool = True) -> Edit:
    net = model.network
    model.check_known("TRACE option neutral", cfg.neutral)
    lora_modules = [p.name for p in model.cross_attention_kv()]
    refined = [p.name for p in refined_projections(model)] if cfg.refine else []
    if cfg.finetune:
        ranges.check_rank("TRACE", cfg.rank, net, lora_modules)
    touched = sorted(set(f"{m}.weight" for m in refined + (lora_modules if cfg.finetune else [])))
    base = fingerprint(net, touched)
    if cfg.finetune and cfg.checkpoint:
        loop.check_run(cfg.checkpoint,
                       loop.identity("trace", concepts, cfg, base, model.setting(), concepts.preserve))
    start = time.perf_counter()
    original = refine(model, concepts, cfg) if cfg.refine else {}
    report = {"refined_layers": len(refined), "refine_time_s": round(time.perf_counter() - start, 3)}
    changed = [p for p in refined_projections(model) if p.name in original]
    with partitioned.gathered([p.module.weight for p in changed]):
        refined_values = {p.name: p.module.weight.detach().clone() for p in changed}
    weights = {f"{name}.weight": w for name, w in refined_values.items()}
    lora = {}
    try:
        if cfg.finetune:
            lora, stats = _finetune(model, concepts, cfg, lora_modules, original, refined_values, base, progress)
            report.update(stats)
    finally:  # the model leaves as it came; the caller applies the returned Edit
        put(model, original)
    return Edit(method="trace", model_kind=model.kind, concepts=[c.to_dict() for c in concepts], config=asdict(cfg),
                base_fingerprint=base, weights=weights, lora=lora, report=report)


def target_pairs(concepts: ConceptSet, cfg: TRACEConfig) -> PromptPairs:
    """The concept prompts and their targets' prompts (training.prompt_pairs) with the concept's name
    replaced by cfg.neutral, or when unset by ONE word for every prompt: the first preserved concept's
    name, or with none preserved each concept's anchor (module doc: the target must be a function of
    the prompt). UserError when cfg.neutral names a concept being erased."""
    neutral = _target_word(concepts, cfg)
    if neutral is not None and any(set(n.lower().split()) <= set(neutral.lower().split()) for n in concepts.names):
        raise UserError(f"TRACE option neutral={neutral!r} names a concept being erased ({', '.join(concepts.names)}): "
                        "the target would draw it; give another word")
    return prompt_pairs(concepts, neutral)


def target_words(concepts: ConceptSet, cfg: TRACEConfig) -> list[str]:
    """The word each concept's name is replaced by in its target (target_pairs), for the report."""
    neutral = _target_word(concepts, cfg)
    return [c.anchor if neutral is None else neutral for c in concepts]


def _target_word(concepts: ConceptSet, cfg: TRACEConfig) -> str | None:
    """cfg.neutral, else the first preserved concept; None: each concept's anchor."""
    return cfg.neutral if cfg.neutral is not None or not concepts.preserve else concepts.preserve[0]


def _finetune(model: Denoiser, concepts: ConceptSet, cfg: TRACEConfig, modules: list[str],
              original: dict[str, torch.Tensor], refined: dict[str, torch.Tensor], base: str,
              progress: bool) -> tuple[dict, dict]:
    net = model.network
    prompts = target_pairs(concepts, cfg)
    pairs = _pair_prompts(concepts) if len(concepts) > 1 and cfg.integration and cfg.scorer != "none" else []
    model.encode([t for t, _ in prompts.concept] + prompts.neutral + prompts.preserved + [t for t, _ in pairs] + [""])
    names = [f"{ADAPTER}_{k}" for k in range(len(concepts))] if cfg.separate and len(concepts) > 1 else [ADAPTER]

    @contextlib.contextmanager
    def teacher():  # the original model: refinement and every LoRA off
        put(model, original)
        try:
            with params.lora_off(net, tuple(names)):
                yield
        finally:
            put(model, refined)

    try:
        groups = [params.add_lora(net, modules, cfg.rank, cfg.seed + k, adapter=a) for k, a in enumerate(names)]
        net.requires_grad_(False)
        for group in groups:
            for p in group:
                p.requires_grad_(True)
        trainable = [p for group in groups for p in group]
        traj = Trajectories(model, prompts, pairs, len(concepts), cfg, teacher)
        saved = loop.check_checkpoint(cfg.checkpoint) if cfg.checkpoint else None
        identity = loop.identity("trace", concepts, cfg, base, model.setting(), concepts.preserve)
        if saved is not None and saved.is_file():
            traj.load_state_dict(loop.companion_in(saved, identity))
        elif traj.d is not None:
            with loop.before_training("TRACE's concept scorer training"):
                traj.train_scorer(progress)
        optimizer = engine.adamw(trainable, cfg.lr, cfg.zero)
        loss_fn = trace_loss(model, traj, groups, len(concepts), cfg, teacher)
        net.train()
        try:
            stats = loop.train(loss_fn, trainable, optimizer, cfg.steps, cfg.seed, cfg.checkpoint, progress=progress,
                               checkpoint_every=cfg.checkpoint_every, desc=f"trace {','.join(concepts.names)}",
                               run=identity, max_skipped_steps=cfg.max_skipped_steps, companion=traj, zero=cfg.zero,
                               deepspeed_config=cfg.deepspeed_config, model=model)
        finally:
            net.eval()
        lora = params.lora_state(net, "unet" if model.kind == "sd" else "transformer", tuple(names))
    finally:
        for a in names:
            remove_adapter(net, a)
    return lora, {"loras": len(names), "lora_rank": cfg.rank * len(names), "scorer_accuracy": traj.scorer_accuracy,
                  "target_words": target_words(concepts, cfg), "last_terms": dict(traj.last), **stats}
