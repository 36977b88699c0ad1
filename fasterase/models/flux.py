"""FLUX.1 text-to-image (and the toy FLUX): FluxTransformer2DModel, rectified flow, velocity prediction.

Latents are kept packed as the pipeline packs them: (N, tokens, 4 * latent channels).
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from .base import Cond, Denoiser, KVProjection


class FluxDenoiser(Denoiser):
    kind = "flux"

    def __init__(self, pipeline):
        super().__init__(pipeline)
        self.channels = self.network.config.in_channels // 4
        self.max_sequence_length = min(512, pipeline.tokenizer_2.model_max_length)
        self.guidance_embeds = bool(self.network.config.guidance_embeds)
        self._image_ids = None, None  # (size and device, ids): image_ids()
        size = pipeline.vae.config.sample_size  # FLUX.1 defaults to 1024 px
        self.set_size(size, size)

    def set_size(self, height, width):
        super().set_size(height, width)
        scale = self.pipeline.vae_scale_factor
        # latent grid before packing (2x2 patches per token)
        self.lat_h, self.lat_w = 2 * (height // (scale * 2)), 2 * (width // (scale * 2))

    def image_ids(self, device) -> torch.Tensor:
        """The position ids (0, row, column) of the packed tokens, (tokens, 3) float32, as the pipeline's
        _prepare_latent_image_ids makes them, but made on `device`: on the planner's meta device no
        memory is taken at any size."""
        key = (self.lat_h, self.lat_w, torch.device(device))
        if self._image_ids[0] != key:
            rows, cols = self.lat_h // 2, self.lat_w // 2
            ids = torch.zeros(rows, cols, 3, device=device, dtype=torch.float32)
            ids[..., 1] = torch.arange(rows, device=device, dtype=torch.float32)[:, None]
            ids[..., 2] = torch.arange(cols, device=device, dtype=torch.float32)[None, :]
            self._image_ids = key, ids.reshape(rows * cols, 3)
        return self._image_ids[1]

    @property
    def network(self):
        return self.pipeline.transformer

    @property
    def text_tokenizer(self):
        return self.pipeline.tokenizer_2  # T5's: the token embeddings; CLIP gives only the pooled one

    def _encode(self, prompts):
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompts, prompt_2=None, device=self.network.device, max_sequence_length=self.max_sequence_length
        )
        dtype = self.network.dtype  # cached in the network's dtype
        return Cond(embeds.to(dtype), pooled.to(dtype))

    def _predict(self, x, tau, cond, guidance: float | None = None):
        """Velocity at noise level tau (= sigma). A guidance-distilled FLUX (dev) takes the
        guidance scale as an input; it defaults to default_guidance there and is unused otherwise."""
        net = self.network
        dev, dt = x.device, net.dtype
        g = None
        if self.guidance_embeds:
            g = torch.full((len(x),), self.default_guidance if guidance is None else guidance, device=dev)
        txt_ids = torch.zeros(cond.embeds.shape[1], 3, device=dev)
        return net(hidden_states=x.to(dt), timestep=tau.to(dev, dt), guidance=g,
                   pooled_projections=cond.pooled.to(dt), encoder_hidden_states=cond.embeds.to(dt),
                   txt_ids=txt_ids, img_ids=self.image_ids(dev)).sample.float()

    def guided(self, x, tau, cond, guidance):
        if self.guidance_embeds:  # guidance-distilled: one pass with the scale as input
            return self.predict(x, tau, cond, guidance=guidance)
        return super().guided(x, tau, cond, guidance)

    def latent_shape(self, batch):
        return batch, self.lat_h // 2 * (self.lat_w // 2), self.channels * 4

    def noise(self, batch, generator=None):
        n = torch.randn(batch, self.channels, self.lat_h, self.lat_w, generator=generator)
        return FluxPipeline._pack_latents(n, batch, self.channels, self.lat_h, self.lat_w).to(self.network.device)

    def add_noise(self, x0, noise, tau):
        s = tau.view(-1, *[1] * (x0.dim() - 1)).to(x0)
        return (1 - s) * x0 + s * noise

    def target(self, x0, noise, tau):
        return noise - x0

    def latent_image(self, x):
        return FluxPipeline._unpack_latents(x, self.height, self.width, self.pipeline.vae_scale_factor)

    def decode(self, x0):
        vae = self.pipeline.vae
        lat = self.latent_image(x0)
        lat = lat / vae.config.scaling_factor + vae.config.shift_factor
        return (vae.decode(lat.to(vae.dtype)).sample.float() / 2 + 0.5).clamp(0, 1)

    def cross_attention_kv(self):
        net = self.network
        out = [
            KVProjection("context_embedder", net.context_embedder, "T5 token embeddings"),
            KVProjection("time_text_embed.text_embedder.linear_1", net.time_text_embed.text_embedder.linear_1,
                         "pooled CLIP embedding"),
        ]
        for i, block in enumerate(net.transformer_blocks):
            for proj in ("add_k_proj", "add_v_proj"):
                out.append(KVProjection(f"transformer_blocks.{i}.attn.{proj}", getattr(block.attn, proj),
                                        "modulated, normalised text stream of the joint block"))
        return out

    def direct_kv_inputs(self, cond):
        net = self.network
        return {"context_embedder": cond.embeds.to(net.device, net.dtype),
                "time_text_embed.text_embedder.linear_1": cond.pooled.to(net.device, net.dtype)}

    def sampler(self, steps):
        sched = FlowMatchEulerDiscreteScheduler.from_config(self.pipeline.scheduler.config)
        sigmas = np.linspace(1.0, 1 / steps, steps)
        mu = None
        if sched.config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            c = sched.config
            mu = calculate_shift((self.lat_h // 2) * (self.lat_w // 2), c.get("base_image_seq_len", 256),
                                 c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        sched.set_timesteps(sigmas=sigmas, mu=mu)
        return sched

    def _tau_of(self, sched, i):
        return float(sched.sigmas[i])
