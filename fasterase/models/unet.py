"""Stable Diffusion 1.x / 2.x text-to-image (and the toy SD): UNet2DConditionModel, epsilon or
v-prediction. Rollouts use DDIM on the pipeline scheduler's training schedule."""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from .base import Cond, Denoiser, KVProjection


class UNetDenoiser(Denoiser):
    kind = "sd"

    def __init__(self, pipeline):
        super().__init__(pipeline)
        cfg = pipeline.scheduler.config
        self.num_train_timesteps = cfg.num_train_timesteps
        self.prediction_type = cfg.get("prediction_type", "epsilon")  # models.load refuses the others
        # alphas_cumprod of the training schedule, whichever scheduler the pipeline carries
        self.alphas_cumprod = self.sampler(1).alphas_cumprod.float()
        side = self.network.config.sample_size * pipeline.vae_scale_factor  # the pipeline's default (SD1.5: 512)
        self.set_size(side, side)

    @property
    def network(self):
        return self.pipeline.unet

    def _encode(self, prompts):
        embeds, _ = self.pipeline.encode_prompt(prompts, self.network.device, 1, False)
        return Cond(embeds.to(self.network.dtype))  # cached in the network's dtype

    def timestep(self, tau: torch.Tensor) -> torch.Tensor:
        """Integer training timestep of noise level tau (t = tau * T, within [0, T-1])."""
        return (tau * self.num_train_timesteps).round().long().clamp(0, self.num_train_timesteps - 1)

    def _predict(self, x, tau, cond):
        unet = self.network
        return unet(x.to(unet.dtype), self.timestep(tau).to(x.device), cond.embeds.to(unet.dtype)).sample.float()

    def latent_shape(self, batch):
        f = self.pipeline.vae_scale_factor
        return batch, self.network.config.in_channels, self.height // f, self.width // f

    def noise(self, batch, generator=None):
        return torch.randn(self.latent_shape(batch), generator=generator).to(self.network.device)

    def add_noise(self, x0, noise, tau):
        a = self.alphas_cumprod.to(x0.device)[self.timestep(tau)].view(-1, *[1] * (x0.dim() - 1))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0, noise, tau):
        """The regression target of this prediction type."""
        if self.prediction_type == "epsilon":
            return noise
        a = self.alphas_cumprod.to(x0.device)[self.timestep(tau)].view(-1, *[1] * (x0.dim() - 1))
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def decode(self, x0):
        vae = self.pipeline.vae
        return (vae.decode(x0.to(vae.dtype) / vae.config.scaling_factor).sample.float() / 2 + 0.5).clamp(0, 1)

    def cross_attention_kv(self):
        out = []
        for name, module in self.network.named_modules():
            if name.endswith("attn2"):
                for proj in ("to_k", "to_v"):
                    out.append(KVProjection(f"{name}.{proj}", getattr(module, proj), "text encoder hidden states"))
        return out

    def direct_kv_inputs(self, cond):
        # every attn2 to_k / to_v reads the text encoder's hidden states, unless the block normalises
        # them first (norm_cross; not in SD 1.x / 2.x)
        text = cond.embeds.to(self.network.device, self.network.dtype)
        return {p.name: text for p in self.cross_attention_kv()
                if self.network.get_submodule(p.name.rsplit(".", 1)[0]).norm_cross is None}

    def sampler(self, steps):
        # clip_sample is for pixel-space models; SD pipelines switch it off (absent from Euler configs)
        sched = DDIMScheduler.from_config(self.pipeline.scheduler.config, clip_sample=False)
        sched.set_timesteps(steps)
        return sched

    def _tau_of(self, sched, i):
        return float(sched.timesteps[i]) / self.num_train_timesteps
