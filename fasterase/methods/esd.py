"""ESD: Erased Stable Diffusion (Gandikota et al., ICCV 2023), fine-tuning with negative guidance.

On x_t from the edited model's own sampling trajectory for a concept prompt, the edited
prediction for the concept is pushed to teacher(empty) - eta * (teacher(concept) - teacher(empty)).
The change is a LoRA over the frozen network, so the teacher is the same network with the
adapter switched off.

Parameter sets (ESD Sec. 4: esd-x for styles, esd-u for objects and nudity) partition the
network's weight layers, convolutions included (LoRA covers nn.Linear and nn.Conv2d, so
diffusers' load_lora_weights loads every one):
  esd-x  cross-attention: SD's attn2 to_q / to_k / to_v / to_out.0 in every transformer block;
         FLUX's joint blocks' attention (to_q / to_k / to_v / to_out.0 and add_q_proj / add_k_proj /
         add_v_proj / to_add_out). The joint blocks are where text and image tokens meet through
         weights of their own; a single block projects the concatenated stream with one set of
         weights, text and image alike, as SD's self-attention does, so it belongs to esd-u.
  esd-u  every other linear and convolution layer (SD: self-attention, feed-forward, proj_in /
         proj_out, resnets, time embedding, conv_in / conv_out; FLUX: the feed-forwards, the single
         blocks, the embedders, the modulations). ESD's code also leaves out the time embedding and
         the output layer; the paper's set, "everything but cross-attention", is the one here.
Norm scales and biases do not train (a LoRA cannot hold them).

Time: ESD's code draws a step of a 50-step DDIM grid and feeds the network a timestep jittered
within that step, with x_t still at the grid step. Here tau ~ U(0, 1] and x_t is moved from the
sampler step just above tau to tau itself (training.sampling), so x_t and tau agree.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..concepts import ConceptSet
from ..edit import Edit, fingerprint, remove_adapter
from ..errors import UserError
from ..models import Denoiser
from ..training import engine, loop, params, sampling
from ..training.losses import negative_guidance_loss
from . import ranges

# Cross-attention, whole layer names: esd-x is these layers, esd-u every other linear and conv layer.
CROSS_ATTENTION = {
    "sd": r"(?:(?:down|up)_blocks\.\d+|mid_block)\.attentions\.\d+\.transformer_blocks\.\d+\.attn2"
          r"\.(?:to_q|to_k|to_v|to_out\.0)",
    "flux": r"transformer_blocks\.\d+\.attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj"
            r"|to_add_out)",
}


def parameter_modules(network: torch.nn.Module, kind: str, parameters: str) -> list[str]:
    """The layers a parameter set trains: esd-x the cross-attention, esd-u all the others."""
    return params.layer_names(network, CROSS_ATTENTION[kind], exclude=parameters == "esd-u")


@dataclass
class ESDConfig:
    # esd-x (cross-attention) or esd-u (every other layer); unset, ESD Sec. 4's choice by concept
    # type: esd-x for styles (and celebrities), esd-u for objects and nudity
    parameters: str | None = None
    eta: float = 1.0  # negative guidance scale (ESD Sec. 3, eta = 1)
    steps: int = 400  # ESD trains 1000 steps of full fine-tuning at lr 1e-5; a LoRA needs fewer, larger
    lr: float = 1e-3
    rank: int = 4  # LoRA rank (alpha = rank)
    batch_size: int = 4
    sample_steps: int = 20  # sampler steps of the rollouts that give x_t, moved to tau (ESD: 50 DDIM steps)
    guidance: float = 3.0  # classifier-free guidance of those rollouts (ESD: 3)
    seed: int = 0
    checkpoint: str | None = None  # file to checkpoint to and resume from
    checkpoint_every: int = 50  # steps between checkpoints (several processes save only these)
    max_skipped_steps: int = 10  # steps skipped for non-finite gradients before training stops
    zero: int = 0  # 0: plain PyTorch; 2 or 3: DeepSpeed ZeRO stage (training.engine)
    deepspeed_config: str | None = None  # with zero: a DeepSpeed JSON config for its other settings

    def __post_init__(self):
        if self.parameters not in (None, "esd-x", "esd-u"):
            raise UserError(f"unknown ESD parameter set {self.parameters!r}; valid: esd-x, esd-u")
        ranges.check_common("ESD", self)


def idle_options(cfg: ESDConfig, given: set[str], model: Denoiser, concepts: ConceptSet) -> list[str]:
    """The options the user set (`given`) that cannot act on this run, each with why."""
    return ["preserve: ESD has no preservation term"] if "preserve" in given else []


def parameter_set(cfg: ESDConfig, concepts: ConceptSet) -> str:
    if cfg.parameters:
        return cfg.parameters
    return "esd-x" if all(c.type in ("style", "celebrity") for c in concepts) else "esd-u"


def run(model: Denoiser, concepts: ConceptSet, cfg: ESDConfig, progress: bool = True) -> Edit:
    net = model.network
    parameters = parameter_set(cfg, concepts)
    modules = parameter_modules(net, model.kind, parameters)
    ranges.check_rank("ESD", cfg.rank, net, modules)  # before any work
    base = fingerprint(net, [f"{m}.weight" for m in modules])
    if cfg.checkpoint:
        loop.check_run(cfg.checkpoint, loop.identity("esd", concepts, cfg, base, model.setting()))
    prompts = [p for c in concepts for p in c.prompts()]
    model.encode(prompts + [""])  # fill the prompt cache once
    trainable = params.add_lora(net, modules, cfg.rank, cfg.seed)
    optimizer = engine.adamw(trainable, cfg.lr, cfg.zero)

    def loss_fn(step: int, g: torch.Generator) -> torch.Tensor:
        pick = torch.randint(len(prompts), (cfg.batch_size,), generator=g).tolist()
        cond = model.encode([prompts[i] for i in pick])
        tau = 1.0 - float(torch.rand((), generator=g, dtype=torch.float64))  # U(0, 1]
        (x,) = sampling.states(model, cond, cfg.sample_steps, [tau], cfg.guidance, g)
        t = torch.full((cfg.batch_size,), tau)
        with torch.no_grad(), params.lora_off(net):
            both = model.predict(torch.cat([x, x]), torch.cat([t, t]),
                                 type(cond).cat([cond, model.uncond.repeat(cfg.batch_size)]))
            teacher_cond, teacher_uncond = both.chunk(2)
        return negative_guidance_loss(model.predict(x, t, cond), teacher_cond, teacher_uncond, cfg.eta)

    net.train()
    try:
        stats = loop.train(loss_fn, trainable, optimizer, cfg.steps, cfg.seed, cfg.checkpoint,
                           progress=progress, checkpoint_every=cfg.checkpoint_every,
                           desc=f"esd {','.join(concepts.names)}",
                           run=loop.identity("esd", concepts, cfg, base, model.setting()),
                           max_skipped_steps=cfg.max_skipped_steps,
                           zero=cfg.zero, deepspeed_config=cfg.deepspeed_config, model=model)
        lora = params.lora_state(net, "unet" if model.kind == "sd" else "transformer")
    finally:  # the model leaves as it came; the caller applies the returned Edit
        net.eval()
        remove_adapter(net)
    return Edit(method="esd", model_kind=model.kind, concepts=[c.to_dict() for c in concepts],
                config=vars(cfg).copy(), base_fingerprint=base, lora=lora,
                report={"parameters": parameters, "trained_modules": len(modules),
                        "trainable_parameters": sum(p.numel() for p in trainable),
                        **stats})
