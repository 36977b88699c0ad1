"""The Denoiser protocol: one interface over SD UNets and FLUX so each method is written once.

Time convention, shared by every model: ``tau`` in [0, 1] is the noise level, 1 = pure noise
(the first, "early" denoising steps) and 0 = clean (the last, "late" steps). A split point
t' is a tau: early steps are tau > t', late steps tau < t'.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from ..errors import UserError
from .micro_batch import chunked
from .shared_rows import shared_rows


@dataclass
class Cond:
    """Text conditioning for a batch: token embeddings and, for FLUX, the pooled embedding."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def __getitem__(self, rows: slice) -> "Cond":
        return Cond(self.embeds[rows], None if self.pooled is None else self.pooled[rows])

    def repeat(self, n: int) -> "Cond":
        """Each row repeated n times in place (row i -> rows i*n .. i*n+n-1)."""
        pooled = None if self.pooled is None else self.pooled.repeat_interleave(n, 0)
        return Cond(self.embeds.repeat_interleave(n, 0), pooled)

    @staticmethod
    def cat(conds: list["Cond"]) -> "Cond":
        pooled = None if conds[0].pooled is None else torch.cat([c.pooled for c in conds])
        return Cond(torch.cat([c.embeds for c in conds]), pooled)


@dataclass
class KVProjection:
    """A linear layer that reads text: ``name`` in the denoiser, the module, and what feeds it."""

    name: str
    module: nn.Linear
    feeds: str


class Denoiser(ABC):
    """A diffusers pipeline seen through what erasure methods need."""

    kind: str  # "sd" or "flux"
    name: str = ""  # how the user named the model (set by models.load)

    def __init__(self, pipeline):
        self.pipeline = pipeline
        # pipeline call arguments for evaluation images (a registered pipeline brings its own)
        self.sample_kwargs: dict = {}
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._cache_where: tuple[torch.dtype, torch.device] | None = None  # the cache's dtype and device

    @property
    def size_multiple(self) -> int:
        """Image sizes (px) must be multiples of this: FLUX's VAE downsampling times its 2x2 latent
        patches; SD's 8 px that StableDiffusionPipeline checks (and the VAE's factor): the UNet takes
        any latent size, passing its skip connections' sizes to its upsamplers."""
        if self.kind == "flux":
            return self.pipeline.vae_scale_factor * 2
        return math.lcm(self.pipeline.vae_scale_factor, 8)

    def set_resolution(self, resolution) -> None:
        """set_size from a user's `resolution`: an int (square) or (height, width), in px, positive
        multiples of size_multiple, whose fp32 latents fit in 2**63 bytes (UserError otherwise, and the
        size is left as it was)."""
        whole = lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)  # noqa: E731  numpy's too
        size = ((resolution, resolution) if whole(resolution)
                else tuple(resolution) if isinstance(resolution, (tuple, list)) else ())
        m = self.size_multiple
        if len(size) != 2 or not all(whole(v) and v > 0 and v % m == 0 for v in size):
            raise UserError(f"resolution {resolution!r} is not valid for this model: give an int or (height, width) "
                            f"in px, positive multiples of {m}")
        was = self.height, self.width
        self.set_size(*map(int, size))
        if math.prod(self.latent_shape(1)) * 4 >= 2**63:  # no tensor of it can be made, on any machine
            self.set_size(*was)
            raise UserError(f"resolution {size[0]}x{size[1]} px is too large: one image's latents would exceed "
                            "2**63 bytes")

    def set_size(self, height: int, width: int) -> None:
        """The image size (px) of training noise, rollouts and generate(): the model's default, or
        what the registered name samples at (the toy world's 32x48)."""
        self.height, self.width = height, width
        self.sample_kwargs.update(height=height, width=width)

    def setting(self) -> dict:
        """What besides the touched weights decides what a run computes: the kind, the network's dtype, the
        image size (px), the noise schedule (the config of the sampler built from the pipeline's scheduler:
        prediction type, betas or shift; whichever scheduler class the pipeline carries for sampling) and the
        text encoders (text_fingerprint). Part of a run's identity (training.loop.identity) and of ANT's saliency-cache key,
        so neither is taken up by a run of another setting."""
        schedule = {k: v for k, v in self.sampler(1).config.items() if not k.startswith("_")}
        return {"kind": self.kind, "dtype": str(self.network.dtype).removeprefix("torch."),
                "size": [self.height, self.width],
                "schedule": json.loads(json.dumps(schedule, default=str)), "text": self.text_fingerprint()}

    def text_fingerprint(self) -> str:
        """sha256 over the tokenizers' vocabulary sizes and the text encoders' tensor names, shapes and 4096
        evenly spaced fp32 values of each: tells one checkpoint's encoders from another's (a fine-tune moves
        nearly every value) in milliseconds, where hashing T5-XXL whole reads 19 GB of fp32 values."""
        h = hashlib.sha256()
        p = self.pipeline
        for tokenizer in (getattr(p, "tokenizer", None), getattr(p, "tokenizer_2", None)):
            if tokenizer is not None:
                h.update(f"tokenizer:{type(tokenizer).__name__}:{len(tokenizer)};".encode())
        for encoder in self.text_encoders:
            for name, t in encoder.state_dict().items():
                flat = t.detach().reshape(-1)
                count = min(flat.numel(), 4096)  # in integers: fp32 positions past 2^24 round up past the end
                picks = torch.arange(count) * (flat.numel() - 1) // max(count - 1, 1)
                h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
                h.update(flat[picks.to(flat.device)].float().cpu().numpy().tobytes())
        return h.hexdigest()

    # --- conditioning -------------------------------------------------------------------------
    @property
    @abstractmethod
    def network(self) -> nn.Module:
        """The trainable denoising network (UNet or transformer)."""

    @abstractmethod
    def _encode(self, prompts: list[str]) -> Cond: ...

    @property
    def text_encoders(self) -> list[nn.Module]:
        """The pipeline's text encoders (CLIP; FLUX's T5 too)."""
        p = self.pipeline
        return [m for m in (getattr(p, "text_encoder", None), getattr(p, "text_encoder_2", None)) if m is not None]

    @contextlib.contextmanager
    def text_encoders_offloaded(self):
        """For the block's duration the text encoders wait on the CPU (FLUX's T5-XXL is about 9.5 GB in
        bf16) and come to the network's device only while encode() runs them; on a CPU-only run
        nothing moves. Training encodes its prompts once, first, so they stay off the GPU while it
        trains."""
        device = self.network.device
        if device.type == "cpu":
            yield
            return
        self._text_device = device
        was = [(m, m.device) for m in self.text_encoders]  # each goes back where it was, not to the network's device
        for m, _ in was:
            m.to("cpu")
        try:
            yield
        finally:
            self._text_device = None
            for m, d in was:
                m.to(d)

    _text_device: torch.device | None = None  # set while the text encoders are offloaded

    @contextlib.contextmanager
    def _encoders_on_device(self):
        if self._text_device is None:
            yield
            return
        for m in self.text_encoders:
            m.to(self._text_device)
        try:
            yield
        finally:
            for m in self.text_encoders:
                m.to("cpu")

    @torch.no_grad()
    def encode(self, prompts: str | list[str]) -> Cond:
        """Text conditioning, cached per prompt (in the network's dtype, on its device) so text
        encoders run once per prompt. A cast or moved pipeline starts a new cache: the old one's
        embeddings are of the old dtype and device."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        where = (self.network.dtype, self.network.device)
        if self._cache_where != where:
            self._cache, self._cache_where = {}, where
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            with self._encoders_on_device():
                cond = self._encode(missing)
            if cond.embeds.device.type != "meta":  # the planner's encoders hold no values
                self._check_finite(missing, cond)
            for i, p in enumerate(missing):
                self._cache[p] = (cond.embeds[i], None if cond.pooled is None else cond.pooled[i])
        rows = [self._cache[p] for p in prompts]
        pooled = None if rows[0][1] is None else torch.stack([r[1] for r in rows])
        return Cond(torch.stack([r[0] for r in rows]), pooled)

    def _check_finite(self, prompts: list[str], cond: Cond) -> None:
        """UserError naming the prompts whose embeddings hold NaN or inf: every method would train on them
        or write them into weights."""
        finite = torch.isfinite(cond.embeds).flatten(1).all(1)
        if cond.pooled is not None:
            finite &= torch.isfinite(cond.pooled).flatten(1).all(1)
        bad = [p for p, ok in zip(prompts, finite.tolist()) if not ok]
        if not bad:
            return
        dtype = str(self.network.dtype).removeprefix("torch.")
        why = ("load the model in bfloat16 or float32 (dtype= in the API, --dtype on the CLI): T5 overflows fp16"
               if dtype == "float16" else "the text encoders' weights may be damaged")
        raise UserError(f"the text encoders gave non-finite (NaN or inf) embeddings in {dtype} for the prompt "
                        f"{bad[0]!r}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}; {why}")

    @property
    def uncond(self) -> Cond:
        """The unconditional branch: the empty prompt's conditioning."""
        return self.encode([""])

    @property
    def text_tokenizer(self):
        """The tokenizer of the token embeddings that encode() returns."""
        return self.pipeline.tokenizer

    def check_known(self, what: str, text: str | None) -> None:
        """UserError when the text tokenizer reads a word of `text` as its unknown token (the toy world's
        word-level vocabulary; T5's for characters it lacks): the model would be trained on <unk>, not on
        the word. `what` names the option in the message. CLIP's byte-level BPE knows every word."""
        tokenizer = self.text_tokenizer
        unk = getattr(tokenizer, "unk_token_id", None)
        if text is None or unk is None:
            return
        unknown = [w for w in text.split() if unk in tokenizer(w, add_special_tokens=False).input_ids]
        if unknown:
            raise UserError(f"{what} {text!r}: the model's tokenizer does not know {', '.join(map(repr, unknown))} "
                            f"(it reads {tokenizer.unk_token}); use words the model knows")

    def word_rows(self, prompts: list[str], words: list[str]) -> list[list[int]]:
        """For each prompt, the rows of encode(prompts).embeds that hold one of `words`: where the
        word's token ids (tokenized alone) run in the prompt's ids as the text encoder reads them."""
        tok = self.text_tokenizer
        length = self.encode(prompts).embeds.shape[1]
        ids = tok(prompts, truncation=True, max_length=length).input_ids
        runs = [tok(w, add_special_tokens=False).input_ids for w in words]
        out = []
        for prompt, seq in zip(prompts, ids):
            rows = sorted({i + k for run in runs if run for i in range(len(seq) - len(run) + 1)
                           if seq[i:i + len(run)] == run for k in range(len(run))})
            if not rows:
                raise UserError(f"none of {words} is among the first {length} tokens of the prompt {prompt!r}; "
                                f"a concept's prompts must contain its name")
            out.append(rows)
        return out

    # --- network ------------------------------------------------------------------------------
    micro_batch: int | None = None  # rows per network call; None: all at once
    _whole_graphs: bool = False  # see whole_graphs()
    _shared: bool = False  # see sharing_rows()

    def predict(self, x: torch.Tensor, tau: torch.Tensor, cond: Cond, **kwargs) -> torch.Tensor:
        """Network output (noise for SD-epsilon, v for SD-v, velocity for FLUX) at noise level tau
        (x: (N, ...) latents, tau: (N,), cond: N rows; fp32 out).

        With `micro_batch` set it runs that many rows at a time, the same outputs. Without a graph
        (rollouts, the frozen teacher) a chunk's activations go once it is done. With one, backward
        runs each chunk again and back-propagates it on its own (models/micro_batch.py): one chunk's
        graph alive at a time, the parameters' gradients accumulated over the chunks to the whole
        batch's, for one more forward pass. Saliency maps, which read each parameter's whole
        gradient as it arrives, run their graphs whole (whole_graphs()). Inside sharing_rows() each
        process of the run computes its share of the rows (models/shared_rows.py)."""
        if self._shared:
            return shared_rows(lambda lo, hi: self._rows(x[lo:hi], tau[lo:hi], cond[lo:hi], **kwargs), len(x))
        return self._rows(x, tau, cond, **kwargs)

    def _rows(self, x: torch.Tensor, tau: torch.Tensor, cond: Cond, **kwargs) -> torch.Tensor:
        """predict() on this process's rows, micro-batched."""
        step = self.micro_batch
        if step is None or len(x) <= step:
            return self._predict(x, tau, cond, **kwargs)
        inputs = [t for t in (x, tau, cond.embeds, cond.pooled) if t is not None]
        graph = torch.is_grad_enabled() and any(t.requires_grad for t in [*inputs, *self.network.parameters()])
        if not graph:
            return torch.cat([self._predict(x[i:i + step], tau[i:i + step], cond[i:i + step], **kwargs)
                              for i in range(0, len(x), step)])
        if self._whole_graphs:
            return self._predict(x, tau, cond, **kwargs)
        return chunked(lambda x, tau, embeds, pooled=None: self._predict(x, tau, Cond(embeds, pooled), **kwargs),
                       step, *inputs)

    @contextlib.contextmanager
    def sharing_rows(self):
        """Every network call inside the block shares its rows out between the processes of the default
        process group (the training loop, when DeepSpeed runs several): each computes its own rows and
        receives the others' outputs (models/shared_rows.py)."""
        was, self._shared = self._shared, True
        try:
            yield
        finally:
            self._shared = was

    @contextlib.contextmanager
    def whole_graphs(self):
        """Passes with a graph run whole inside the block (micro_batch still splits those without):
        a hook that reads a parameter's gradient as autograd delivers it must see the whole batch's."""
        was, self._whole_graphs = self._whole_graphs, True
        try:
            yield
        finally:
            self._whole_graphs = was

    @abstractmethod
    def _predict(self, x: torch.Tensor, tau: torch.Tensor, cond: Cond) -> torch.Tensor:
        """predict() on one batch."""

    @abstractmethod
    def latent_shape(self, batch: int) -> tuple[int, ...]:
        """The shape of the latents predict() takes, at the current size (no tensor is made)."""

    @abstractmethod
    def noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard normal latents of latent_shape(batch), drawn on the CPU (the same for a seed on any
        device) and moved to the network's device."""

    def latent_channels(self) -> int:
        """Channels of latent_image(): what a latent-space discriminator (FADE, TRACE) reads."""
        return self.latent_image(torch.empty(self.latent_shape(1), device="meta")).shape[1]

    @abstractmethod
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """x_tau on the forward process from clean latents x0."""

    @abstractmethod
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Clean latents -> images (N, 3, H, W) in [0, 1]."""

    def latent_image(self, x: torch.Tensor) -> torch.Tensor:
        """Latents as an image-shaped tensor (N, C, h, w) (differentiable): SD's are already; FLUX's
        are unpacked from their 2x2-patch tokens."""
        return x

    @abstractmethod
    def cross_attention_kv(self) -> list[KVProjection]:
        """Every key/value (and text-embedding) projection that reads text tokens."""

    def direct_kv_inputs(self, cond: Cond) -> dict[str, torch.Tensor]:
        """The inputs of the projections fed by the encoded prompt itself, read without running the
        network: {projection name: tensor in the network's dtype}."""
        return {}

    kv_batch: int = 8  # prompts per hooked forward pass of kv_inputs

    def kv_inputs(self, cond: Cond, names: list[str] | None = None, progress: str | None = None
                  ) -> dict[str, torch.Tensor]:
        """What feeds each projection of cross_attention_kv() (or those `names`) for this conditioning.

        Those fed by the encoded prompt itself come from it (direct_kv_inputs: no network run, any
        resolution); the others (FLUX's joint-block add_k / add_v, behind time-modulated norms) from
        forward passes with hooks, `kv_batch` prompts at a time, on noise at tau = 0.5 at the model's
        size, counted on a progress bar named `progress` (None: no bar).
        """
        projections = [p for p in self.cross_attention_kv() if names is None or p.name in names]
        direct = self.direct_kv_inputs(cond)
        inputs = {p.name: direct[p.name] for p in projections if p.name in direct}
        hooked = [p for p in projections if p.name not in inputs]
        if not hooked:
            return inputs
        seen: dict[str, list[torch.Tensor]] = {p.name: [] for p in hooked}
        noise = self.noise(len(cond), torch.Generator().manual_seed(0))
        hooks = [p.module.register_forward_pre_hook(lambda m, a, name=p.name: seen[name].append(a[0].detach()))
                 for p in hooked]
        try:
            with torch.no_grad():
                for start in tqdm(range(0, len(cond), self.kv_batch), desc=progress, disable=progress is None,
                                  leave=False):
                    part = cond[start:start + self.kv_batch]
                    self.predict(noise[start:start + self.kv_batch], torch.full((len(part),), 0.5), part)
        finally:
            for h in hooks:
                h.remove()
        return {**inputs, **{name: torch.cat(parts) for name, parts in seen.items()}}

    # --- sampling -----------------------------------------------------------------------------
    @abstractmethod
    def sampler(self, steps: int):
        """A fresh sampler set for `steps` steps, built from the pipeline scheduler's config: DDIM
        for SD, flow-matching Euler for FLUX. Its latents are the x_t that add_noise and predict
        use, whichever scheduler the pipeline ships (Euler, LMS and DPM work on scaled latents)."""

    @abstractmethod
    def _tau_of(self, sched, i: int) -> float:
        """Noise level of sampler step i."""

    def sampling_taus(self, steps: int) -> list[float]:
        """The noise level of every step of a `steps`-step sampling run, first (noisiest) first."""
        sched = self.sampler(steps)
        return [self._tau_of(sched, i) for i in range(steps)]

    def guided(self, x: torch.Tensor, tau: torch.Tensor, cond: Cond, guidance: float) -> torch.Tensor:
        """Classifier-free guided prediction (one batched call for both branches)."""
        n = len(cond)
        both = Cond.cat([cond, self.uncond.repeat(n)])
        c, u = self.predict(torch.cat([x, x]), torch.cat([tau, tau]), both).chunk(2)
        return u + guidance * (c - u)

    @torch.no_grad()
    def trajectory(self, cond: Cond, steps: int, at: list[int], guidance: float | None = None,
                   generator: torch.Generator | None = None, x: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The latents entering sampler steps `at` (indices in [0, steps]; `steps` = the clean end)
        of one sampling run on the model's own trajectory, from pure noise (or `x`)."""
        if not at or min(at) < 0 or max(at) > steps:
            raise ValueError(f"trajectory steps must lie in [0, {steps}], got {at}")
        guidance = self.default_guidance if guidance is None else guidance
        sched = self.sampler(steps)
        x = self.noise(len(cond), generator) if x is None else x
        last, seen = max(at), {}
        for i in range(last + 1):
            if i in at:
                seen[i] = x
            if i == last:
                break
            t = torch.full((len(cond),), self._tau_of(sched, i))
            out = self.guided(x, t, cond, guidance) if guidance != 1.0 else self.predict(x, t, cond)
            x = sched.step(out, sched.timesteps[i], x).prev_sample
        return [seen[i] for i in at]

    def rollout(self, cond: Cond, steps: int, until: float = 0.0, guidance: float | None = None,
                generator: torch.Generator | None = None, x: torch.Tensor | None = None):
        """Sample along the model's own trajectory from pure noise down to noise level `until`.

        Returns (x, tau): the latents at the first sampler step whose tau <= until, and that tau
        (tau = 0 and clean latents when the sampler runs to the end).
        """
        taus = self.sampling_taus(steps)
        stop = next((i for i, tau in enumerate(taus) if tau <= until), steps)
        (x,) = self.trajectory(cond, steps, [stop], guidance, generator, x)
        return x, (taus[stop] if stop < steps else 0.0)

    default_guidance: float = 3.0

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int, batch_size: int = 256, progress: str | None = None
                 ) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1], fp32 on the CPU, from the diffusers pipeline itself, seeded
        per batch; the images counted on a progress bar named `progress` (None: no bar)."""
        self.pipeline.set_progress_bar_config(disable=True)
        out = []
        with tqdm(total=len(prompts), desc=progress, disable=progress is None, leave=False, unit="image") as bar:
            for start in range(0, len(prompts), batch_size):
                g = torch.Generator().manual_seed(seed + start)
                chunk = prompts[start:start + batch_size]
                out.append(self.pipeline(chunk, generator=g, output_type="pt", **self.sample_kwargs).images)
                bar.update(len(chunk))
        return torch.cat(out).float().clamp(0, 1).cpu()
