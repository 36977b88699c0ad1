"""Train the toy world: autoencoder, detector, toy-sd and toy-flux.

    python scripts/train_toy.py all        # every stage in order; sd and flux side by side
    python scripts/train_toy.py vae        # or one stage: vae, then detector, then sd and flux
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
import subprocess
import sys
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
DEFAULT_STEPS = {"vae": 2000, "detector": 1500, "sd": 7000, "flux": 7000}
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
    """Ground truth (half), autoencoder reconstructions (a quarter), and images with no shape (the
    rest: empty backgrounds and decoded noise). Targets: presence (N, 5), colour index (N, 5; -1 absent)."""
    images, _, scenes = S.sample(n, rng, p_empty=0.0, p_no_shape=0.0)
    x = to_tensor(images)
    present, color = (torch.from_numpy(a) for a in S.labels(scenes))
    n_rec, n_none = n // 4, n // 4
    with torch.no_grad():
        x[:n_rec] = vae.decode(encode(vae, scale, images[:n_rec]) / scale).sample.clamp(-1, 1)
        blank = to_tensor(S.render([[]] * (n_none // 2), rng))
        latent = (4, S.HEIGHT // 4, S.WIDTH // 4)
        garbage = vae.decode(torch.randn(n_none - n_none // 2, *latent, generator=g) / scale).sample
        x[n - n_none:] = torch.cat([blank, garbage.clamp(-1, 1)])
    present[n - n_none:] = 0.0
    color[n - n_none:] = -1
    x = x + 0.03 * torch.rand(n, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
    return x, present, color


def detector_loss(det, x, present, color) -> torch.Tensor:
    p_logits, c_logits = det(x)
    return (F.binary_cross_entropy_with_logits(p_logits, present)
            + F.cross_entropy(c_logits.flatten(0, 1), color.flatten(), ignore_index=-1))


def exact_accuracy(det, images: torch.Tensor, scenes) -> float:
    """Share of images whose every shape (present or not) and every present shape's colour is right."""
    truth = [dict(sc) for sc in scenes]
    return float(np.mean([p == t for p, t in zip(det.classify(images), truth)]))


def train_detector(args) -> None:
    vae, scale = load_vae(args.out)
    det = D.Detector()
    run = Run(args.work, "detector", {"detector": det}, lr=2e-3, ema=None)
    bar = tqdm(range(run.step, args.steps), initial=run.step, total=args.steps, desc="detector")
    for step in bar:
        rng, g = rng_for(args.seed, "detector", step)
        loss = detector_loss(det, *detector_batch(BATCH["detector"], rng, g, vae, scale))
        run.update(loss, warmup=100)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.save_every == 0:
            run.save()
    run.save()
    det.eval()
    rng, g = rng_for(args.seed, "detector", 10**6)  # held out: never a training step
    record = {}
    for name, p_scene in (("single", 0.0), ("scene", 1.0)):
        images, _, scenes = S.sample(2000, rng, p_empty=0.0, p_no_shape=0.0, p_scene=p_scene)
        with torch.no_grad():
            recon = vae.decode(encode(vae, scale, images[:500]) / scale).sample.clamp(-1, 1)
        record[f"heldout_{name}_acc"] = exact_accuracy(det, to_tensor(images), scenes)
        record[f"recon_{name}_acc"] = exact_accuracy(det, recon, scenes[:500])
    record["blank_acc"] = exact_accuracy(det, to_tensor(S.render([[]] * 200, rng)), [[]] * 200)
    run.log(record)
    C.save_weights(det, "detector", args.out)


def tokens(tok, captions: list[str]) -> torch.Tensor:
    return tok(captions, padding="max_length", max_length=C.MAX_TOKENS, truncation=True,
               return_tensors="pt").input_ids


def eval_prompts() -> list[tuple[str, list[tuple[str, str]]]]:
    """(prompt, objects named) for the learning curve: every shape x colour, the synonyms, and one
    scene per ordered pair of shapes (colours cycling)."""
    out = [(f"a {c} {s}", [(s, c)]) for s in S.SHAPES for c in S.COLORS]
    out += [(f"a {c} {w}", [(s, c)]) for s, ws in S.SYNONYMS.items() for w in ws for c in S.COLORS]
    pairs = [(a, b) for a in S.SHAPES for b in S.SHAPES if a != b]
    for k, (a, b) in enumerate(pairs):
        ca, cb = S.COLORS[k % len(S.COLORS)], S.COLORS[(k // len(S.COLORS) + k + 1) % len(S.COLORS)]
        out.append((f"a {ca} {a} and a {cb} {b}", [(a, ca), (b, cb)]))
    return out


@torch.no_grad()
def score(pipe, kind: str, det, seed: int) -> dict:
    items = eval_prompts() * 2
    g = torch.Generator().manual_seed(seed)
    images = pipe([p for p, _ in items], generator=g, output_type="pt", **C.SAMPLE_KWARGS[kind]).images
    found = det.classify(images * 2 - 1)
    single = [i for i, (_, objs) in enumerate(items) if len(objs) == 1]
    plain = [i for i in single if items[i][1][0][0] in items[i][0]]
    syn = [i for i in single if i not in plain]
    scene = [i for i, (_, objs) in enumerate(items) if len(objs) == 2]
    return {
        "shape_acc": float(np.mean([items[i][1][0][0] in found[i] for i in plain])),
        "synonym_acc": float(np.mean([items[i][1][0][0] in found[i] for i in syn])),
        "color_acc": float(np.mean([found[i].get(items[i][1][0][0]) == items[i][1][0][1] for i in single])),
        "scene_both": float(np.mean([all(s in found[i] for s, _ in items[i][1]) for i in scene])),
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
        lat_h, lat_w = S.HEIGHT // 4, S.WIDTH // 4
        img_ids = FluxPipeline._prepare_latent_image_ids(1, lat_h // 2, lat_w // 2, "cpu", torch.float32)
        txt_ids = torch.zeros(C.MAX_TOKENS, 3)
    pipe.set_progress_bar_config(disable=True)
    bar = tqdm(range(run.step, args.steps), initial=run.step, total=args.steps, desc=kind)
    t0 = time.time()
    for step in bar:
        rng, g = rng_for(args.seed, kind, step)
        images, caps, _ = S.sample(BATCH[kind], rng)
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
            x_t = FluxPipeline._pack_latents((1 - s) * z + s * noise, len(z), 4, lat_h, lat_w)
            target = FluxPipeline._pack_latents(noise - z, len(z), 4, lat_h, lat_w)
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


def train_all(args) -> None:
    """Every stage (at its default steps, or --steps each), each resuming from its own checkpoint: the
    autoencoder and the detector with --threads, then toy-sd and toy-flux side by side with one thread each."""
    t0 = time.time()
    common = [*([f"--steps={args.steps}"] if args.steps else []), f"--seed={args.seed}", f"--work={args.work}", f"--out={args.out}", f"--save-every={args.save_every}",
              f"--eval-every={args.eval_every}"]

    def stage(name, threads):
        return subprocess.Popen([sys.executable, __file__, name, f"--threads={threads}", *common])

    for name in ("vae", "detector"):
        if stage(name, args.threads).wait():
            raise SystemExit(f"stage {name} failed")
    runs = {name: stage(name, 1) for name in ("sd", "flux")}
    failed = [name for name, proc in runs.items() if proc.wait()]
    if failed:
        raise SystemExit(f"stage(s) {failed} failed")
    print(f"all stages done in {(time.time() - t0) / 60:.1f} min")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=STAGES + ("all",))
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("toy_runs"), help="checkpoints and learning curves")
    p.add_argument("--out", type=Path, default=C.WEIGHTS, help="where the weights are read and written")
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=1000)
    args = p.parse_args()
    if args.stage == "all":
        return train_all(args)
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
