"""Model adapters: the only place that knows model internals.

`load(model)` accepts a diffusers pipeline, a local diffusers folder, or a registered name, and
returns the Denoiser for it. What no adapter handles (SDXL, inpainting, img2img, ...) is refused
from the pipeline's class and configs, before any weights load. Names are registered from above
(`register`; the toy world registers "toy-sd" and "toy-flux"), so models/ imports nothing of it.
"""
from __future__ import annotations

import json
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from ..notices import dropped
from .base import Cond, Denoiser, KVProjection
from .flux import FluxDenoiser
from .unet import UNetDenoiser

__all__ = ["Cond", "Denoiser", "KVProjection", "FluxDenoiser", "UNetDenoiser", "load", "register", "BUILTINS",
           "DTYPES", "resolve_device", "resolve_dtype", "not_a_model", "casting",
           "warn_if_fp16_on_cpu", "SlowRunWarning", "folder_of"]

# pipeline class -> (its network's component name, the network class it must be, the adapter)
ADAPTERS = {"StableDiffusionPipeline": ("unet", "UNet2DConditionModel", UNetDenoiser),
            "FluxPipeline": ("transformer", "FluxTransformer2DModel", FluxDenoiser)}
SUPPORTED = ("Stable Diffusion 1.x / 2.x text-to-image (StableDiffusionPipeline, epsilon or v-prediction) "
             "and FLUX.1 text-to-image (FluxPipeline)")


@dataclass(frozen=True)
class Builtin:
    """A pipeline known by name: how to build it, and the call arguments its images need."""

    build: Callable[[], object]
    sample_kwargs: dict
    owns: Callable[[object], bool]  # recognises the pipeline and its saved copies


BUILTINS: dict[str, Builtin] = {}


def register(name: str, build: Callable[[], object], sample_kwargs: dict, owns: Callable[[object], bool]) -> None:
    """Make `name` loadable; pipelines `owns` recognises are sampled with `sample_kwargs`."""
    BUILTINS[name] = Builtin(build, dict(sample_kwargs), owns)


def _accepted() -> str:
    names = f", or one of {', '.join(BUILTINS)}" if BUILTINS else ""
    return f"supported: {SUPPORTED}, as a pipeline or a local diffusers folder{names}"


def folder_of(model) -> Path | None:
    """The resolved local diffusers folder `model` (a name or path) loads from; None for a registered
    name, a pipeline, or a path that is no such folder."""
    if not isinstance(model, (str, Path)) or str(model) in BUILTINS:
        return None
    path = Path(model).expanduser().resolve()
    return path if (path / "model_index.json").is_file() else None


def not_a_model(name: str, path: Path, known: str) -> UserError:
    """The error for `name`, which is none of the `known` names, naming why `path` is no diffusers folder."""
    if path.name == "model_index.json" and path.is_file():
        return UserError(f"model {name!r} is a diffusers folder's model_index.json; give the folder: {path.parent}")
    why = ("no such file or folder" if not path.exists() else "a file, not a folder" if not path.is_dir()
           else "no model_index.json in it")
    if (path / "edit.safetensors").is_file():  # edit.EDIT_FILE (models do not import edit)
        why += "; it is a fasterase edit folder, which --edit / fasterase.load(model, edit) takes"
        if (path / "pipeline" / "model_index.json").is_file():
            why += f", and its edited pipeline is the model folder {path / 'pipeline'}"
    from .real_configs import NAMES

    plan_only = (f"; {name!r} names the published configuration, which `fasterase plan` plans, but no weights "
                 "come with fasterase: to erase, give the checkpoint's local diffusers folder"
                 if name in NAMES else "")
    return UserError(f"model {name!r} is neither {known} nor a local diffusers folder ({why}){plan_only}; "
                     f"{_accepted()}")


def _refusal(pipeline_class: str, parts: dict[str, tuple[str, dict]]) -> str | None:
    """Why no adapter handles a pipeline of this class with these parts (component name ->
    (class name, config)), or None when one does."""
    if pipeline_class not in ADAPTERS:
        return f"{pipeline_class} is not a text-to-image pipeline fasterase handles"
    net_name, net_class, _ = ADAPTERS[pipeline_class]
    got, net = parts.get(net_name, (None, {}))
    if got != net_class:
        return f"{pipeline_class} with {net_name} {got}: the adapter needs a {net_class}"
    latent = parts.get("vae", (None, {}))[1].get("latent_channels", 4)
    if net_name == "unet":
        for key in ("addition_embed_type", "class_embed_type", "encoder_hid_dim_type"):
            if net.get(key) is not None:  # SDXL's "text_time" and other extra conditioning
                return f"the UNet needs extra conditioning ({key}={net[key]!r}; SDXL-style or other)"
        if net.get("in_channels") != latent or net.get("out_channels") != latent:
            return (f"the UNet takes {net.get('in_channels')} input channels and gives {net.get('out_channels')}, "
                    f"not the VAE's {latent} latent channels (an inpainting or image-conditioned UNet)")
        sched_class, sched = parts.get("scheduler", (None, {}))
        if "beta_schedule" not in sched:
            return f"scheduler {sched_class} has no beta schedule (SD needs a DDPM-family scheduler)"
        if sched.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction"):
            return f"prediction_type {sched['prediction_type']!r} (valid: epsilon, v_prediction)"
    else:
        packed = 4 * latent  # FLUX packs 2x2 latent patches into one token
        if net.get("in_channels") != packed or (net.get("out_channels") or packed) != packed:
            return (f"the transformer takes {net.get('in_channels')} input channels, not the {packed} of "
                    f"packed latents (a Fill-style or image-conditioned transformer)")
    return None


def _check(pipeline_class: str, parts: dict[str, tuple[str, dict]]) -> None:
    reason = _refusal(pipeline_class, parts)
    if reason:
        raise UserError(f"unsupported pipeline: {reason}; {_accepted()}")


def _parts(pipeline) -> dict[str, tuple[str, dict]]:
    return {name: (type(c).__name__, dict(c.config)) for name, c in pipeline.components.items()
            if isinstance(getattr(c, "config", None), dict)}


# The configs _refusal reads, each in its component's folder: without one a folder cannot be judged
# (nor loaded), so it is refused by name rather than judged on defaults.
CONFIG_FILES = {"unet": "config.json", "transformer": "config.json", "vae": "config.json",
                "scheduler": "scheduler_config.json"}


def _read_json(file: Path) -> dict:
    try:
        value = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"unreadable {file}: {exc}; a diffusers folder holds it as a JSON object") from None
    if not isinstance(value, dict):
        raise UserError(f"unreadable {file}: it holds a JSON {type(value).__name__}, not an object")
    return value


def _folder_parts(path: Path) -> tuple[str, dict[str, tuple[str, dict]]]:
    """The pipeline class and parts a diffusers folder declares, read from its JSON files only."""
    index = _read_json(path / "model_index.json")
    parts = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2:
            continue
        if name in CONFIG_FILES and spec[1] is not None:
            config = path / name / CONFIG_FILES[name]
            if not config.is_file():
                raise UserError(f"model folder {path} declares a {name} ({spec[1]}) but has no {name}/"
                                f"{CONFIG_FILES[name]}; a diffusers folder saves one for each component")
        else:
            config = next((path / name / f for f in ("config.json", "scheduler_config.json")
                           if (path / name / f).is_file()), None)
        parts[name] = (spec[1], _read_json(config) if config else {})
    return index.get("_class_name", "an unnamed pipeline"), parts


def _check_weights(path: Path, parts: dict[str, tuple[str, dict]]) -> None:
    """Every declared component the folder has a model config for also has its weight files, the ones
    diffusers loads without a variant: checked before any loading, which would fail on the first missing
    one only after loading the others."""
    for name, (cls, _) in parts.items():
        if cls is None:
            continue
        folder = path / name
        if not folder.is_dir() or not any(folder.iterdir()):
            raise UserError(f"model folder {path} declares a {name} ({cls}) but has no {name}/ folder or an empty "
                            f"one; a diffusers folder saves one for each component, with its files")
        files = {f.name for f in folder.iterdir()}
        if (folder / "config.json").is_file() and not any(
                f.endswith((".safetensors", ".bin")) and f.count(".") == 1 for f in files):
            raise UserError(f"model folder {path} has no weights for its {name} ({cls}): {folder} holds no "
                            f".safetensors or .bin file (variants such as .fp16. are not loaded)")
        indexes = [f for f in files if f.endswith((".safetensors.index.json", ".bin.index.json")) and f.count(".") == 3]
        for index in indexes:  # a sharded checkpoint's map of shards
            shards = _read_json(folder / index).get("weight_map", {}).values()
            missing = sorted({s for s in shards if not (folder / s).is_file()})
            if missing:
                raise UserError(f"model folder {path}: the {name}'s {index} names shards that are not there: "
                                f"{', '.join(missing)}")
        if not indexes and any(re.search(r"-\d+-of-\d+\.(safetensors|bin)$", f) for f in files):
            raise UserError(f"model folder {path}: the {name}'s weights are in shards, but the index that maps them "
                            f"(*.safetensors.index.json) is not in {folder}")
        for file in sorted(f for f in files if f.endswith(".safetensors") and f.count(".") == 1):
            keys = _safetensors_header(folder / file)  # the header alone: a damaged file named before loading
            wrapped = [k for k in keys if re.search(r"\.(base_layer|lora_[AB]|lora_magnitude_vector)\.", k)]
            if wrapped:  # diffusers would leave the layers' own weights unloaded (meta) or random
                more = f" and {len(wrapped) - 1} more" if len(wrapped) > 1 else ""
                raise UserError(f"model folder {path}: {folder / file} holds LoRA-wrapped layers ({wrapped[0]!r}"
                                f"{more}), not the {name}'s own weights: the pipeline was saved with a LoRA still "
                                f"loaded; save it again after pipe.fuse_lora() and pipe.unload_lora_weights(), or "
                                f"load the base folder and apply the LoRA to it")


def _wrap(pipeline, owner: Builtin | None = None) -> Denoiser:
    """The adapter for a checked pipeline, with the sample kwargs of the name it was loaded by or,
    failing that, of the registered name that recognises it."""
    cls = type(pipeline).__name__
    _check(cls, _parts(pipeline))
    den = ADAPTERS[cls][2](pipeline)
    owner = owner or next((b for b in BUILTINS.values() if b.owns(pipeline)), None)
    if owner:
        den.sample_kwargs = dict(owner.sample_kwargs)
        if "height" in owner.sample_kwargs:
            den.set_size(owner.sample_kwargs["height"], owner.sample_kwargs["width"])
    return den


# The dtypes a model may be loaded in, by the names the CLI and API take.
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_device(device) -> torch.device:
    """The device to run on: `device` (a name such as "cpu", "cuda", "cuda:1", or a torch.device)
    checked against what this machine has; None: the GPU if there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"device {device!r} is not a device name; valid: cpu, cuda, cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise UserError(f"device {device!r}: fasterase runs on cpu or cuda, not {dev.type}")
    if not torch.cuda.is_available():
        raise UserError(f"device {device!r}: this torch sees no CUDA GPU (torch {torch.__version__}); valid here: cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device {device!r}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 .. "
                        f"cuda:{torch.cuda.device_count() - 1}")
    return dev


def resolve_dtype(dtype) -> torch.dtype | None:
    """`dtype` as a torch dtype ("fp32", "bf16", "fp16", their long names, or a torch dtype); None
    stays None: the checkpoint's own dtype."""
    if dtype is None or dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise UserError(f"dtype {dtype!r} is not one fasterase loads models in; valid: fp32, bf16, fp16")


def folder_dtype(path: Path, network: str) -> torch.dtype:
    """The dtype the folder's denoising network is saved in, read from its weight files' headers
    (nothing is loaded): what the folder loads as when no dtype is asked for."""
    # the files diffusers loads: not variants (".fp16.", ".non_ema.") beside them
    files = sorted(f for f in (path / network).glob("*.safetensors") if f.name.count(".") == 1)
    for file in files:
        for dtype in _safetensors_header(file).values():
            if dtype in ("F32", "BF16", "F16"):
                return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[dtype]
    for file in sorted(f for f in (path / network).glob("*.bin") if f.name.count(".") == 1):
        return _bin_dtype(file)
    raise UserError(f"model folder {path} has no weights for its {network} ({path / network} holds no "
                    f".safetensors or .bin file)")


def _safetensors_header(file: Path) -> dict[str, str]:
    """The safetensors file's tensor dtypes by name ("F32", "BF16", ...; its header read, no weights);
    UserError when it is damaged."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), "pt") as f:
            return {key: f.get_slice(key).get_dtype() for key in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{file} is not a readable safetensors file ({exc}); the model folder is damaged") from None


def _bin_dtype(file: Path) -> torch.dtype:
    """The dtype of a pickled checkpoint's first floating tensor: memory-mapped, not read whole, where its
    format allows (torch.save's zip format; the legacy one is read whole)."""
    for mmap in (True, False):
        try:
            state = torch.load(file, map_location="cpu", mmap=mmap, weights_only=True)
            break
        except RuntimeError as exc:
            if mmap and "_use_new_zipfile_serialization" in str(exc):  # the legacy format cannot be mapped
                continue
            raise UserError(f"{file} is not a readable torch checkpoint ({exc}); the model folder is damaged") from None
        except (pickle.UnpicklingError, EOFError, ValueError, OSError) as exc:
            raise UserError(f"{file} cannot be read as weights alone ({type(exc).__name__}: {exc}): damaged, or a "
                            "pickle that would run code, which fasterase does not load") from None
    floats = [v.dtype for v in (state.values() if isinstance(state, dict) else ()) if torch.is_tensor(v)
              and v.is_floating_point()]
    if not floats:
        raise UserError(f"{file} holds no floating-point weights; the model folder is damaged")
    return floats[0]


def casting():
    """A block in which diffusers' (0.42) warning that a cast model has modules to keep in fp32 is
    dropped when it lists none: it comes with every cast; one naming modules still shows."""
    return dropped("diffusers.models.modeling_utils", "should be kept in float32: []")


def load(model, device=None, dtype=None, keep_network: bool = False) -> Denoiser:
    """The Denoiser for `model` (see module docstring); anything else is a UserError.

    device: where the pipeline runs (see resolve_device); a pipeline given is moved there in place.
    Default: a name or folder loads on the GPU if there is one, else the CPU; a pipeline given stays
    where it is. dtype: every component's dtype (see resolve_dtype); default: a folder's own (its
    network's saved dtype, for every component, never part-upcast), a pipeline's own, the toy
    pipelines' fp32. Both are checked before any weights load. keep_network: the network is cast but
    stays where it is (DeepSpeed ZeRO-3 partitions it onto the device: training.engine.partitioned).
    """
    fresh = isinstance(model, (str, Path))
    dev = resolve_device(device) if device is not None or fresh else None
    dt = resolve_dtype(dtype)
    if isinstance(model, Denoiser):
        denoiser = model
    else:
        denoiser = _load(model, dt)
        denoiser.name = str(model) if fresh else type(denoiser.pipeline).__name__
    pipe = denoiser.pipeline
    if dt is not None and dt != denoiser.network.dtype:
        with casting():
            pipe.to(dtype=dt)
    if dev is not None and not keep_network:
        if denoiser.network.device != dev:
            pipe.to(dev)
    elif dev is not None:
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module) and module is not denoiser.network:
                module.to(dev)
    return denoiser


class SlowRunWarning(UserWarning):
    """A run set up to be far slower than it need be."""


def warn_if_fp16_on_cpu(denoiser: Denoiser, device: torch.device, advice: str) -> None:
    """A SlowRunWarning, with `advice`, when the network is to run in fp16 on the CPU (`device`: where it
    runs): torch's fp16 matrix products there are hundreds of times slower than bf16's (bench/RESULTS.md,
    "fp16 on the CPU"). Attributed to the caller's caller: the user's call of erase or load."""
    if device.type == "cpu" and denoiser.network.dtype == torch.float16:
        warnings.warn(f"the model runs in fp16 on the CPU, where torch's fp16 matrix products are hundreds of times "
                      f"slower than bf16's; {advice}", SlowRunWarning, stacklevel=3)


def _load(model, dtype: torch.dtype | None) -> Denoiser:
    if isinstance(model, (str, Path)):
        name = str(model)
        if name in BUILTINS:
            return _wrap(BUILTINS[name].build(), BUILTINS[name])
        path = Path(name).expanduser()
        if not (path / "model_index.json").is_file():
            raise not_a_model(name, path, "a built-in name")
        pipeline_class, parts = _folder_parts(path)
        _check(pipeline_class, parts)
        _check_weights(path, parts)
        from diffusers import DiffusionPipeline

        dtype = dtype or folder_dtype(path, ADAPTERS[pipeline_class][0])
        try:
            pipeline = DiffusionPipeline.from_pretrained(str(path), dtype=dtype)
        except OSError as exc:  # a file the checks above cannot judge without loading it (a damaged .bin)
            raise UserError(f"model folder {path} could not be loaded: {exc}") from None
        return _wrap(pipeline)
    if hasattr(model, "components") and hasattr(model, "scheduler"):
        return _wrap(model)
    raise UserError(f"model of type {type(model).__name__} is not accepted; {_accepted()}")
