"""Train the toy world: autoencoder, detector, toy-sd and toy-flux.

    python scripts/train_toy.py vae        # then detector, then sd and flux (these two may run at once)
    python scripts/train_toy.py sd --threads 1 --steps 8000

Each stage is deterministic for --seed: the data and noise of step k come from (seed, stage, k),
so a run resumed from its checkpoint (in --work) ends with the same weights as one that never
stopped. The final weights are written as fp16 safetensors into --out (fasterase/toy/weights/), and a
learning curve scored by the detector into --work/<stage>_curve.jsonl.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, FluxPipeline
from tqdm import tqdm

from fasterase.toy import components as C
from fasterase.toy import detector as D
from fasterase.toy import shapes as S

STAGES = ("vae", "detector", "sd", "flux")
DEFAULT_STEPS = {"vae": 2000, "detector": 500, "sd": 5000, "flux": 5000}
BATCH = {"vae": 32, "detector": 128, "sd": 32, "flux": 32}


def rng_for(seed: int, stage: str, step: int) -> tuple[np.random.Generator, torch.Generator]:
    key = [seed, STAGES.index(stage), step]
    g = torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))
    return np.random.default_rng(key), g


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images)


class Run:
    """Checkpointed training state of one stage: modules, their EMA, optimizer, step, curve."""

    def __init__(self, work: Path, stage: str, modules: dict, lr: float, ema: float | None):
        self.path = work / f"{stage}.ckpt"
        self.curve_path = work / f"{stage}_curve.jsonl"
        self.modules = modules
        self.ema = {k: copy.deepcopy(m).requires_grad_(False) for k, m in modules.items()} if ema else None
        self.decay = ema
        params = [p for m in modules.values() for p in m.parameters()]
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.lr = lr
        self.step = 0
        if self.path.exists():
            state = torch.load(self.path, weights_only=False)
            for k, m in modules.items():
                m.load_state_dict(state["modules"][k])
            if self.ema:
                for k, m in self.ema.items():
                    m.load_state_dict(state["ema"][k])
            self.opt.load_state_dict(state["opt"])
            self.step = state["step"]
            print(f"resumed {stage} at step {self.step}")

    def update(self, loss: torch.Tensor, warmup: int = 200) -> None:
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()} at step {self.step}; stopping")
        for group in self.opt.param_groups:
            group["lr"] = self.lr * min(1.0, (self.step + 1) / warmup)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], 1.0)
        self.opt.step()
        if self.ema:
            with torch.no_grad():
                for k, m in self.modules.items():
                    for pe, p in zip(self.ema[k].parameters(), m.parameters()):
                        pe.lerp_(p, 1 - self.decay)
        self.step += 1

    def save(self) -> None:
        state = {
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "ema": {k: m.state_dict() for k, m in self.ema.items()} if self.ema else None,
            "opt": self.opt.state_dict(),
            "step": self.step,
        }
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path)

    def log(self, record: dict) -> None:
        record = {"step": self.step, **record}
        with open(self.curve_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        tqdm.write(json.dumps(record))

    def final(self) -> dict:
        return self.ema or self.modules


def load_vae(directory: Path) -> tuple[torch.nn.Module, float]:
    vae = C.trained_vae(directory)
    return vae, vae.config.scaling_factor


@torch.no_grad()
def encode(vae, scale: float, images: np.ndarray) -> torch.Tensor:
    return vae.encode(to_tensor(images)).latent_dist.mean * scale


def train_vae(args) -> None:
    vae = C.vae()
    run = Run(args.work, "vae", {"vae": vae}, lr=1e-3, ema=None)
    bar = tqdm(range(run.step, args.steps), initial=run.step, total=args.steps, desc="vae")
    for step in bar:
        rng, g = rng_for(args.seed, "vae", step)
        x = to_tensor(S.sample(BATCH["vae"], rng)[0])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        rec_loss = F.mse_loss(rec, x) + F.l1_loss(rec, x)
        kl = post.kl().mean() / post.mean[0].numel()
        run.update(rec_loss + 1e-3 * kl)
        bar.set_postfix(rec=f"{rec_loss.item():.4f}", kl=f"{kl.item():.3f}")
        if (step + 1) % args.save_every == 0:
            run.save()
    run.save()
    with torch.no_grad():
        rng, _ = rng_for(args.seed, "vae", 10**6)
        z = vae.encode(to_tensor(S.sample(512, rng)[0])).latent_dist.mean
        scale = 1.0 / z.std().item()
    run.log({"scaling_factor": scale, "latent_mean": z.mean().item()})
    C.save_weights(vae, "vae", args.out, metadata={"scaling_factor": repr(scale)})


def detector_batch(n: int, rng: np.random.Generator, g: torch.Generator, vae, scale: float):
    """Ground truth (half), VAE reconstructions (a quarter), and 'none' images (the rest)."""
    images, _, s_idx, c_idx = S.sample(n, rng, p_no_shape=0.0)
    x = to_tensor(images)
    n_rec, n_none = n // 4, n // 4
    with torch.no_grad():
        x[:n_rec] = vae.decode(encode(vae, scale, images[:n_rec]) / scale).sample.clamp(-1, 1)
        blank = to_tensor(S.render([None] * (n_none // 2), [None] * (n_none // 2), rng))
        garbage = vae.decode(torch.randn(n_none - n_none // 2, 4, 8, 8, generator=g) / scale).sample
        x[n - n_none:] = torch.cat([blank, garbage.clamp(-1, 1)])
    shape = torch.from_numpy(s_idx).long()
    shape[n - n_none:] = D.NONE
    color = torch.from_numpy(c_idx).long()
    color[n - n_none:] = -100  # no colour to learn for 'none'
    x = x + 0.03 * torch.rand(n, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
    return x, shape, color


def train_detector(args) -> None:
    vae, scale = load_vae(args.out)
    det = D.Detector()
    run = Run(args.work, "detector", {"detector": det}, lr=2e-3, ema=None)
    bar = tqdm(range(run.step, args.steps), initial=run.step, total=args.steps, desc="detector")
    for step in bar:
        rng, g = rng_for(args.seed, "detector", step)
        x, shape, color = detector_batch(BATCH["detector"], rng, g, vae, scale)
        s_logits, c_logits = det(x)
        loss = F.cross_entropy(s_logits, shape) + F.cross_entropy(c_logits, color, ignore_index=-100)
        run.update(loss, warmup=100)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.save_every == 0:
            run.save()
    run.save()
    det.eval()
    rng, g = rng_for(args.seed, "detector", 10**6)  # held out: never a training step
    images, _, s_idx, c_idx = S.sample(2000, rng, p_no_shape=0.0)
    with torch.no_grad():
        s_logits, c_logits = det(to_tensor(images))
        recon = vae.decode(encode(vae, scale, images[:500]) / scale).sample.clamp(-1, 1)
        s_rec, _ = det(recon)
    run.log({
        "heldout_shape_acc": (s_logits.argmax(1).numpy() == s_idx).mean().item(),
        "heldout_color_acc": (c_logits.argmax(1).numpy() == c_idx).mean().item(),
        "recon_shape_acc": (s_rec.argmax(1).numpy() == s_idx[:500]).mean().item(),
    })
    C.save_weights(det, "detector", args.out)


def tokens(tok, captions: list[str]) -> torch.Tensor:
    return tok(captions, padding="max_length", max_length=C.MAX_TOKENS, truncation=True,
               return_tensors="pt").input_ids


def eval_prompts() -> list[tuple[str, str, str]]:
    """(prompt, shape, colour) for the learning curve: every shape x colour, and synonyms."""
    out = [(f"a {c} {s}", s, c) for s in S.SHAPES for c in S.COLORS]
    out += [(f"a {c} {w}", s, c) for s, ws in S.SYNONYMS.items() for w in ws for c in S.COLORS]
    return out


@torch.no_grad()
def score(pipe, kind: str, det, seed: int) -> dict:
    items = eval_prompts() * 2
    g = torch.Generator().manual_seed(seed)
    images = pipe([p for p, _, _ in items], generator=g, output_type="pt", **C.SAMPLE_KWARGS[kind]).images
    shapes_, colors_ = det.classify(images * 2 - 1)
    plain = [i for i, (p, s, _) in enumerate(items) if s in p]
    syn = [i for i, (p, s, _) in enumerate(items) if s not in p]
    return {
        "shape_acc": float(np.mean([shapes_[i] == items[i][1] for i in plain])),
        "synonym_acc": float(np.mean([shapes_[i] == items[i][1] for i in syn])),
        "color_acc": float(np.mean([colors_[i] == items[i][2] for i in range(len(items))])),
    }


def train_denoiser(args, kind: str) -> None:
    vae, scale = load_vae(args.out)
    det = None  # loaded at the first evaluation, so the detector may still be training now
    tok = C.tokenizer()
    if kind == "sd":
        modules = {"text_encoder": C.clip_text_encoder(), "unet": C.unet()}
        noise_sched = DDPMScheduler.from_config(C.sd_scheduler().config)
    else:
        modules = {"text_encoder": C.clip_text_encoder(), "text_encoder_2": C.t5_text_encoder(),
                   "transformer": C.flux_transformer()}
    run = Run(args.work, kind, modules, lr=1e-3, ema=0.999)
    ema = run.ema
    if kind == "sd":
        pipe = C.StableDiffusionPipeline(vae=vae, text_encoder=ema["text_encoder"], tokenizer=tok,
                                         unet=ema["unet"], scheduler=C.sd_scheduler(), safety_checker=None,
                                         feature_extractor=None, requires_safety_checker=False)
    else:
        pipe = C.FluxPipeline(scheduler=C.flux_scheduler(), vae=vae, text_encoder=ema["text_encoder"],
                              tokenizer=tok, text_encoder_2=ema["text_encoder_2"], tokenizer_2=tok,
                              transformer=ema["transformer"])
        img_ids = FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)
        txt_ids = torch.zeros(C.MAX_TOKENS, 3)
    pipe.set_progress_bar_config(disable=True)
    bar = tqdm(range(run.step, args.steps), initial=run.step, total=args.steps, desc=kind)
    t0 = time.time()
    for step in bar:
        rng, g = rng_for(args.seed, kind, step)
        images, caps, _, _ = S.sample(BATCH[kind], rng)
        z = encode(vae, scale, images)
        ids = tokens(tok, caps)
        noise = torch.randn(z.shape, generator=g)
        if kind == "sd":
            t = torch.randint(0, 1000, (len(z),), generator=g)
            emb = modules["text_encoder"](ids)[0]
            pred = modules["unet"](noise_sched.add_noise(z, noise, t), t, emb).sample
            loss = F.mse_loss(pred, noise)
        else:
            sigma = torch.sigmoid(torch.randn(len(z), generator=g))
            s = sigma[:, None, None, None]
            x_t = FluxPipeline._pack_latents((1 - s) * z + s * noise, len(z), 4, 8, 8)
            target = FluxPipeline._pack_latents(noise - z, len(z), 4, 8, 8)
            pooled = modules["text_encoder"](ids).pooler_output
            t5 = modules["text_encoder_2"](ids)[0]
            pred = modules["transformer"](hidden_states=x_t, timestep=sigma, pooled_projections=pooled,
                                          encoder_hidden_states=t5, txt_ids=txt_ids, img_ids=img_ids).sample
            loss = F.mse_loss(pred, target)
        run.update(loss)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.save_every == 0:
            run.save()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            det = det or D.load(args.out)
            run.log({"minutes": round((time.time() - t0) / 60, 2), "loss": loss.item(),
                     **score(pipe, f"toy-{kind}", det, args.seed)})
    run.save()
    names = {"sd": {"text_encoder": "sd_text_encoder", "unet": "sd_unet"},
             "flux": {"text_encoder": "flux_text_encoder", "text_encoder_2": "flux_text_encoder_2",
                      "transformer": "flux_transformer"}}[kind]
    for k, m in ema.items():
        C.save_weights(m, names[k], args.out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("toy_runs"), help="checkpoints and learning curves")
    p.add_argument("--out", type=Path, default=C.WEIGHTS, help="where the weights are read and written")
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=1000)
    args = p.parse_args()
    args.steps = args.steps or DEFAULT_STEPS[args.stage]
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    if args.stage == "vae":
        train_vae(args)
    elif args.stage == "detector":
        train_detector(args)
    else:
        train_denoiser(args, args.stage)
    print(f"{args.stage}: {args.steps} steps done in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
