"""ESD: Erased Stable Diffusion (Gandikota et al., ICCV 2023), fine-tuning with negative guidance.

On x_t from the edited model's own sampling trajectory for a concept prompt, the edited
prediction for the concept is pushed to teacher(empty) - eta * (teacher(concept) - teacher(empty)).
The change is a LoRA over the frozen network, so the teacher is the same network with the
adapter switched off. esd-x trains the attention that reads text, esd-u the rest (ESD Sec. 4:
esd-x for styles, esd-u for objects and nudity).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..concepts import ConceptSet
from ..edit import Edit, fingerprint, remove_adapter
from ..models import Denoiser
from ..training import loop, params
from ..training.losses import negative_guidance_loss

# Which linear layers each parameter set trains, per model kind.
PARAMETER_SETS = {
    ("sd", "esd-x"): r"attn2\.(to_q|to_k|to_v|to_out\.0)$",
    ("sd", "esd-u"): r"^(?!.*attn2\.).*(attn1\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out)$",
    ("flux", "esd-x"): r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj"
                       r"|to_add_out)$",
    ("flux", "esd-u"): r"(transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)|single_transformer_blocks\.\d+"
                       r"\.(proj_mlp|proj_out))$",
}


@dataclass
class ESDConfig:
    # esd-x (attention reading text) or esd-u (the rest); unset, ESD Sec. 4's choice by concept
    # type: esd-x for styles (and celebrities), esd-u for objects and nudity
    parameters: str | None = None
    eta: float = 1.0  # negative guidance scale (ESD Sec. 3, eta = 1)
    steps: int = 400  # ESD trains 1000 steps of full fine-tuning at lr 1e-5; a LoRA needs fewer, larger
    lr: float = 1e-3
    rank: int = 4  # LoRA rank (alpha = rank)
    batch_size: int = 4
    sample_steps: int = 20  # sampler steps of the rollouts that give x_t (ESD: 50 DDIM steps)
    guidance: float = 3.0  # classifier-free guidance of those rollouts (ESD: 3)
    seed: int = 0
    checkpoint: str | None = None  # file to checkpoint to and resume from

    def __post_init__(self):
        if self.parameters not in (None, "esd-x", "esd-u"):
            raise ValueError(f"unknown ESD parameter set {self.parameters!r}; valid: esd-x, esd-u")
        for k in ("steps", "rank", "batch_size", "sample_steps"):
            if getattr(self, k) < 1:
                raise ValueError(f"ESD option {k} must be >= 1, got {getattr(self, k)}")
        if self.lr <= 0 or self.eta <= 0:
            raise ValueError("ESD needs lr > 0 and eta > 0")


def parameter_set(cfg: ESDConfig, concepts: ConceptSet) -> str:
    if cfg.parameters:
        return cfg.parameters
    return "esd-x" if all(c.type in ("style", "celebrity") for c in concepts) else "esd-u"


def run(model: Denoiser, concepts: ConceptSet, cfg: ESDConfig, progress: bool = True) -> Edit:
    net = model.network
    parameters = parameter_set(cfg, concepts)
    modules = params.linear_names(net, PARAMETER_SETS[(model.kind, parameters)])
    base = fingerprint(net, [f"{m}.weight" for m in modules])
    prompts = [p for c in concepts for p in c.prompts()]
    taus = model.sampling_taus(cfg.sample_steps)
    model.encode(prompts + [""])  # fill the prompt cache once
    trainable = params.add_lora(net, modules, cfg.rank, cfg.seed)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)

    def loss_fn(step: int, g: torch.Generator) -> torch.Tensor:
        pick = torch.randint(len(prompts), (cfg.batch_size,), generator=g).tolist()
        cond = model.encode([prompts[i] for i in pick])
        stop = taus[int(torch.randint(cfg.sample_steps, (1,), generator=g))]
        x, tau = model.rollout(cond, cfg.sample_steps, until=stop, guidance=cfg.guidance, generator=g)
        t = torch.full((cfg.batch_size,), tau)
        with torch.no_grad(), params.lora_off(net):
            both = model.predict(torch.cat([x, x]), torch.cat([t, t]),
                                 type(cond).cat([cond, model.uncond.repeat(cfg.batch_size)]))
            teacher_cond, teacher_uncond = both.chunk(2)
        return negative_guidance_loss(model.predict(x, t, cond), teacher_cond, teacher_uncond, cfg.eta)

    net.train()
    try:
        stats = loop.train(loss_fn, trainable, optimizer, cfg.steps, cfg.seed, cfg.checkpoint,
                           progress=progress, desc=f"esd {','.join(concepts.names)}")
        lora = params.lora_state(net, "unet" if model.kind == "sd" else "transformer")
    finally:  # the model leaves as it came; the caller applies the returned Edit
        net.eval()
        remove_adapter(net)
    return Edit(method="esd", model_kind=model.kind, concepts=[c.to_dict() for c in concepts],
                config=vars(cfg).copy(), base_fingerprint=base, lora=lora,
                report={"parameters": parameters, "trained_modules": len(modules),
                        "trainable_parameters": sum(p.numel() for p in trainable),
                        **stats})
