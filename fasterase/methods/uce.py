"""UCE: Unified Concept Editing (Gandikota et al., WACV 2024), a closed-form edit.

Every projection that reads text is re-solved so that each erased concept's prompts give the
outputs its guide prompts gave (the anchor's, or the empty prompt's), while the preserved
concepts' outputs stay, all over the concept's augmented prompts, under the regulariser
lam |W' - W|^2 (UCE Sec. 3, erasure with preservation). Token positions are aligned: the
prompt "a photo of a circle" is mapped, token by token, onto "a photo of a" followed by the
guide's tokens, padding included.
The preserved prompts also name two preserved concepts together (ConceptSet.preserve_scene_prompts;
our addition, the paper preserves each concept alone): with one-object prompts only, erasing circle
and square lost a kept shape in 34% (toy-sd) and 37% (toy-flux) of the scenes of two kept shapes; a
larger preserve_scale mended toy-sd at the cost of erasure and made toy-flux worse (bench/RESULTS.md).
SD: every cross-attention to_k / to_v. FLUX: context_embedder and the pooled-text embedder
(as the public UCE FLUX variant does) and, with text_kv=True, the joint blocks' add_k / add_v.
Those read the text stream after earlier blocks mixed it with the image tokens and the time
embedding, so (our choice; the paper's SD layers have no such inputs) they are read from one
forward of each prompt on fixed noise at tau = 0.5 and the model's resolution: the solve fits the
text at that noise level, an approximation for the others. Each block's inputs come from the
unedited blocks before it (all are solved at once).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..concepts import ConceptSet
from ..edit import Edit, fingerprint
from ..errors import UserError
from ..models import Denoiser
from ..training.closed_form import uce_weights
from . import ranges


@dataclass
class UCEConfig:
    lam: float = 0.5  # regulariser weight on |W' - W|^2 (UCE Sec. 3; the paper leaves it free)
    erase_scale: float = 1.0  # weight of the erase pairs (UCE Sec. 3)
    preserve_scale: float = 1.0  # weight of the preserved concepts (UCE Sec. 3)
    text_kv: bool = False  # FLUX only: also edit the joint blocks' add_k_proj / add_v_proj

    def __post_init__(self):
        ranges.check("UCE", "lam", self.lam, ranges.MIN_LAM, ranges.MAX_SCALE)
        ranges.check("UCE", "erase_scale", self.erase_scale, 0, ranges.MAX_SCALE, above=True)
        ranges.check("UCE", "preserve_scale", self.preserve_scale, 0, ranges.MAX_SCALE)
        if not isinstance(self.text_kv, bool):
            raise UserError(f"UCE option text_kv must be true or false, got {self.text_kv!r}")


def idle_options(cfg: UCEConfig, given: set[str], model: Denoiser, concepts: ConceptSet) -> list[str]:
    """The options the user set (`given`) that cannot act on this run, each with why."""
    idle = []
    if "text_kv" in given and model.kind != "flux":
        idle.append("text_kv: it selects FLUX's joint-block add_k_proj / add_v_proj, and this is an SD model")
    if "preserve_scale" in given and not concepts.preserve:
        idle.append("preserve_scale: it weighs the preserved concepts, and none are preserved")
    reads_images = model.kind == "flux" and cfg.text_kv  # add_k / add_v inputs: forwards at the model's size
    for option in ("resolution", "gradient_checkpointing", "micro_batch"):  # text_kv's forwards: micro-batched
        if option == "gradient_checkpointing" and option in given and reads_images:
            idle.append(f"{option}: UCE keeps no graph (text_kv's forwards run without one)")
        elif option in given and not reads_images:
            idle.append(f"{option}: UCE runs no image through the network (it reads the encoded prompts)")
    return idle


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def run(model: Denoiser, concepts: ConceptSet, cfg: UCEConfig, progress: bool = True) -> Edit:
    projections = model.cross_attention_kv()
    if model.kind == "flux" and not cfg.text_kv:
        projections = projections[:2]
    erase = [p for c in concepts for p in c.prompts(augment=True)]
    guide = [p for c in concepts for p in c.anchor_prompts(augment=True)]
    preserve = concepts.preserve_prompts() + concepts.preserve_scene_prompts()
    names = [p.name for p in projections]
    inputs = {k: model.kv_inputs(model.encode(prompts), names, f"uce: {k} prompts' text stream" if progress else None)
              if prompts else None for k, prompts in (("erase", erase), ("guide", guide), ("preserve", preserve))}
    # Group the projections that read the very same inputs: they share one solve.
    groups: dict[tuple, list] = {}
    for p in projections:
        x = inputs["erase"][p.name]
        groups.setdefault((x.data_ptr(), tuple(x.shape)), []).append(p)
    weights = {}
    for members in groups.values():
        name = members[0].name
        c, g = _rows(inputs["erase"][name]), _rows(inputs["guide"][name])
        keep = _rows(inputs["preserve"][name]) if inputs["preserve"] else c.new_zeros(0, c.shape[1])
        new = uce_weights([p.module.weight for p in members], c, g, keep, cfg.lam, cfg.erase_scale,
                          cfg.preserve_scale)
        weights.update({f"{p.name}.weight": w for p, w in zip(members, new)})
    return Edit(method="uce", model_kind=model.kind, concepts=[c.to_dict() for c in concepts],
                config=vars(cfg).copy(), base_fingerprint=fingerprint(model.network, list(weights)),
                weights=weights, report={"layers": len(weights), "solves": len(groups)})
