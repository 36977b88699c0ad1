"""Edit: a weight change with its metadata, applied to, saved from and loaded into a model.

Three kinds of change, any of them together:
- `weights`: the new values of some network parameters (closed-form edits). Stored whole, not
  as differences, so apply -> save -> load -> apply is bit-exact.
- `entries`: new values of selected entries only (masked fine-tunes): {name: (int32 indices into
  the flattened parameter, values)}, so an edit of a few entries of a large model stays small (a
  tensor with so many entries selected that this would be larger is stored in `weights`, whole).
- `lora`: a LoRA adapter in diffusers' format (keys "unet." / "transformer."), saved as
  pytorch_lora_weights.safetensors beside the edit so `pipe.load_lora_weights(DIR)` loads it.

Applied, edits stack: a LoRA edit is an adapter of its own, named by its content, beside the active
ones; a weights or entries edit applies where the weights it changes still hold the values it was
made for. An edit the model already carries, or one made for other values of its weights, is
refused and changes nothing (Edit.apply); the network lists the edits it carries (applied_edits),
so the refusal names the one in the way.

On disk an edit is a folder: edit.safetensors (the weights, the metadata as JSON in the header),
for LoRA edits pytorch_lora_weights.safetensors, and with save(pipeline=...) the edited pipeline
in pipeline/. Folders are written under a temporary name and renamed, so a failed save leaves
nothing half-written and removes nothing. Only a folder that holds an edit is ever replaced; an empty
one is filled in place.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import models
from .errors import UserError
from .files import check_outside, check_writable, full_disk_named, set_default_mode
from .models import Denoiser, meta, partitioned
from .notices import dropped, second_adapter

EDIT_FILE = "edit.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"
PIPELINE_DIR = "pipeline"
ADAPTER = "fasterase"  # the adapter a method trains; an applied edit's adapter is named by its content
FORMAT = 2  # 2: fingerprints over each tensor's digest (1: over the values themselves)
INDICES, VALUES = ":indices", ":values"  # keys of `entries` in edit.safetensors
APPLIED = "_fasterase_applied"  # network attribute: the edits applied to it here
FUSED = "_fasterase_edits"  # network config key: the edits fused into a saved pipeline's weights


def base_param(network: torch.nn.Module, name: str) -> torch.Tensor:
    """A parameter of the base model, also when a LoRA layer wraps its module."""
    try:
        return network.get_parameter(name)
    except AttributeError:
        module, _, leaf = name.rpartition(".")
        return network.get_parameter(f"{module}.base_layer.{leaf}")


def base_parameters(network: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The network's own floating-point parameters by their plain names: the LoRA adapters' factors left out,
    a wrapped layer's base_layer named as the layer (as base_param resolves it), so that what a method selects
    and saves does not depend on the adapters the model carries."""
    return {n.replace(".base_layer.", "."): p for n, p in network.named_parameters()
            if ".lora_" not in n and p.is_floating_point()}


def fingerprint(network: torch.nn.Module, names: list[str], dtype: torch.dtype | None = None) -> str:
    """sha256 over the names, shapes and sha256 digests of the fp32 values of the base parameters an
    edit touches (each gathered in turn while DeepSpeed ZeRO-3 partitions the network); with `dtype`, of
    the values the network would hold once cast to it (the network is not changed). fp32 values: a
    checkpoint's bf16 weights loaded in fp32 have the bf16 fingerprint. The tensors' digests are computed
    in threads (hashlib and torch's casts release the GIL) while the next tensor comes off the device: the
    whole of FLUX.1-dev is 48 GB of fp32 values, about 40 s of one core's sha256."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = max(1, min(8, cores))
    h = hashlib.sha256()
    with ThreadPoolExecutor(workers) as pool:
        pending = []
        for name in sorted(names):
            p = base_param(network, name)
            with partitioned.gathered([p]):  # a copy of a gathered weight: ZeRO-3 frees it after the block
                head = f"{name}:{tuple(p.shape)};".encode()
                values = p.detach().to(dtype or p.dtype).to("cpu", copy=partitioned.is_partitioned(p))
            pending.append((head, pool.submit(_digest, values)))
            if len(pending) > 2 * workers:  # at most this many host copies wait for their digest
                pending[-2 * workers - 1][1].result()
        for head, digest in pending:
            h.update(head)
            h.update(digest.result())
    return h.hexdigest()


def _digest(values: torch.Tensor) -> bytes:
    return hashlib.sha256(values.float().contiguous().numpy()).digest()


def lora_base_names(lora: dict[str, torch.Tensor]) -> list[str]:
    """Base weight names of the modules a diffusers-format LoRA state dict adapts."""
    names = set()
    for key in lora:
        module = key.split(".", 1)[1].split(".lora_")[0]
        names.add(f"{module}.weight")
    return sorted(names)


def remove_adapter(network: torch.nn.Module, name: str = ADAPTER) -> None:
    """Take one LoRA adapter off; the adapters active with it stay active, and with no adapter
    left the LoRA layers are unwrapped too, so the modules and state_dict keys are the original ones."""
    adapters = getattr(network, "peft_config", {})
    if name in adapters:
        active = [a for a in network.active_adapters() if a != name]
        if len(adapters) > 1:
            network.delete_adapters(name)
            if active:
                network.set_adapter(active)
            return
    if not any(a != name for a in adapters) and any(isinstance(m, BaseTunerLayer) for m in network.modules()):
        network.unload_lora()  # also after a load that failed half-way


def applied_edits(network: torch.nn.Module) -> list[dict]:
    """The fasterase edits the network carries ({method, concepts, touched}): those applied to it here,
    and those fused into the weights of the pipeline it was loaded from (save_pipeline records them)."""
    return list(getattr(network, "config", {}).get(FUSED, [])) + list(getattr(network, APPLIED, []))


def edited(model) -> Denoiser:
    """The Denoiser of the model in memory an edit acts on: a Denoiser or a diffusers pipeline (a name or
    folder would load a copy that nobody holds; fasterase.load loads one with the edit applied)."""
    if isinstance(model, (str, os.PathLike)):
        raise UserError(f"an edit applies to a pipeline in memory, not to {str(model)!r}; "
                        "fasterase.load(model, edit_folder) loads a model with an edit applied")
    return model if isinstance(model, Denoiser) else models.load(model)


def check_lora_layers(network: torch.nn.Module, adds_lora: bool = False) -> None:
    """Refuse a network whose LoRA layers would make an edit act otherwise than it says: layers fused but
    still wrapped (fuse_lora without unload_lora_weights: peft unmerges them as soon as an adapter is set,
    which would change the user's pipeline), or, when a LoRA is to be added (`adds_lora`), switched off
    (disable_lora: a LoRA edit would not act, and a LoRA being trained would get no gradient)."""
    layers = [m for m in network.modules() if isinstance(m, BaseTunerLayer)]
    if any(m.merged for m in layers):
        raise UserError("the pipeline has fused LoRA layers that are still wrapped (fuse_lora() without "
                        "unload_lora_weights()); call pipe.unload_lora_weights() after fuse_lora() to keep the "
                        "fused weights, or pipe.unfuse_lora() to go back to the adapter, then erase or apply the edit")
    if adds_lora and any(m.disable_adapters for m in layers):
        raise UserError("the pipeline's LoRA layers are switched off (disable_lora()), so a LoRA added to them "
                        "would not act; call pipe.enable_lora(), or pipe.unload_lora_weights() to remove them, "
                        "then erase or apply the edit")


def target_folder(path: str | os.PathLike, overwrite: bool = False, model: str | os.PathLike | None = None) -> Path:
    """The resolved folder an edit may be written to: a new path or an empty folder, or with overwrite
    one that holds a fasterase edit; never the folder of `model` (a path), one inside it or one
    containing it."""
    if not str(path).strip():
        raise UserError("the edit folder is empty text; name a folder (`.` for the current one, if it is empty)")
    path = Path(path).expanduser().resolve()
    folder = models.folder_of(model) if model is not None else None
    check_outside(path, folder, "edit folder")
    if folder and path in folder.parents:
        raise UserError(f"{path} contains the model's folder {folder}; write the edit elsewhere")
    if not path.exists():
        above = next(p for p in path.parents if p.exists())
        if not above.is_dir():
            raise UserError(f"{path} cannot be a folder: {above} is a file; choose another folder")
        check_writable(above, f"edit folder {path}")
        return path
    if not path.is_dir():
        raise UserError(f"{path} is a file, and an edit is a folder; choose a new folder")
    if not any(path.iterdir()):  # an empty folder holds nothing to lose: save() fills it in place
        check_writable(path, f"edit folder {path}")
        return path
    if not overwrite:
        if is_edit_folder(path):
            raise UserError(f"{path} holds an edit; choose another folder or pass overwrite=True (--overwrite) to "
                            "replace it")
        raise UserError(_not_only_an_edit(path))
    check_writable(path.parent, f"edit folder {path}")
    if not is_edit_folder(path):
        raise UserError(_not_only_an_edit(path) + " (only a folder holding an edit alone is replaced)")
    return path


def _not_only_an_edit(path: Path) -> str:
    names = sorted(p.name for p in path.iterdir())
    others = [n for n in names if n not in (EDIT_FILE, LORA_FILE, PIPELINE_DIR)]
    if (path / EDIT_FILE).is_file() and others:
        return (f"{path} holds an edit and other files ({_listed(others)}), which are never removed; move them, or "
                "choose a new or empty folder")
    leftover = [n for n in names if n.startswith(f".{path.name}.")]  # save()'s hidden folder, after a kill
    why = (f"; {leftover[0]} is what a save that was killed leaves: remove it"
           + (", and the folder is empty again" if names == leftover else "") if leftover else "")
    return f"{path} exists and holds no fasterase edit (it holds {_listed(names)}){why}; choose a new or empty folder"


def _listed(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


@contextlib.contextmanager
def _damaged_named(file: Path):
    """A file of an edit that safetensors cannot read (truncated, damaged, missing) is named: a UserError."""
    try:
        yield
    except PermissionError as exc:
        raise UserError(f"{file}: cannot read it ({exc.strerror})") from None
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{file} cannot be read as an edit's safetensors file ({exc}); the edit folder is damaged: "
                        "save the edit again") from None


def _damaged_fields(meta: dict) -> list[str]:
    """What in an edit's metadata is missing or not of the type Edit.save writes."""
    kinds = {"has_lora": bool, "method": str, "model_kind": str, "concepts": list, "config": dict,
             "base_fingerprint": str, "fasterase_version": str}
    wrong = [f"no {k}" if k not in meta else f"{k} is {type(meta[k]).__name__}, not {t.__name__}"
             for k, t in kinds.items() if not isinstance(meta.get(k), t)]
    if not isinstance(meta.get("report", {}), dict):
        wrong.append(f"report is {type(meta['report']).__name__}, not dict")
    if isinstance(meta.get("concepts"), list) and not all(isinstance(c, dict) and isinstance(c.get("name"), str)
                                                         for c in meta["concepts"]):
        wrong.append("a concept is not a record with a name")
    if isinstance(meta.get("model_kind"), str) and meta["model_kind"] not in ("sd", "flux"):
        wrong.append(f"model_kind {meta['model_kind']!r} is neither sd nor flux")
    return wrong


def _a_kind(kind: str) -> str:
    """"an SD" / "a FLUX": a model kind as a message names it."""
    return {"sd": "an SD", "flux": "a FLUX"}.get(kind, f"a {kind}")


def _unpaired_factor(lora: dict[str, torch.Tensor]) -> str | None:
    """What keeps a diffusers-format LoRA state dict from being pairs of lora_A (r, in, ...) and lora_B
    (out, r, ...) of one rank per module, or None."""
    for key in lora:
        if ".lora_A." not in key and ".lora_B." not in key:
            return f"{key} is neither a lora_A nor a lora_B factor"
        a = lora.get(key.replace(".lora_B.", ".lora_A."))
        b = lora.get(key.replace(".lora_A.", ".lora_B."))
        if a is None or b is None or a.dim() < 2 or b.dim() < 2 or a.shape[0] != b.shape[1]:
            return f"{key} has no factor of its rank beside it (each lora_A with its lora_B)"
    return None


def is_edit_folder(path: Path) -> bool:
    """A folder with an edit.safetensors carrying fasterase metadata and nothing an edit does not write."""
    if not path.is_dir() or not (path / EDIT_FILE).is_file():
        return False
    if any(p.name not in (EDIT_FILE, LORA_FILE, PIPELINE_DIR) for p in path.iterdir()):
        return False
    try:
        with safe_open(str(path / EDIT_FILE), "pt") as f:
            return "fasterase" in (f.metadata() or {})
    except Exception:  # not a safetensors file: not ours
        return False


@torch.no_grad()
def _fused_weight(layer: BaseTunerLayer) -> torch.Tensor:
    """The layer's weight with its active LoRA adapters added, as it computes now, on the CPU."""
    base = layer.get_base_layer().weight
    w = base.detach().to("cpu", torch.float32, copy=True)
    if not layer.merged and not layer.disable_adapters:
        for a in layer.active_adapters:
            if a in layer.lora_A:
                w += layer.get_delta_weight(a).to("cpu", torch.float32)
    return w.to(base.dtype)


def save_pipeline(model, path: str | os.PathLike) -> None:
    """Save the pipeline as it draws now, with its LoRA adapters fused into plain weights, so
    diffusers loads it with no LoRA and no unused keys. The pipeline in memory is not changed:
    while it is saved, its network's state_dict gives the fused weights instead, made on the CPU
    (a copy of the LoRA-targeted weights there, none on the accelerator)."""
    model = models.load(model)
    layers = {n: m for n, m in model.network.named_modules() if isinstance(m, BaseTunerLayer)}

    def fuse(module, state, prefix, local_metadata):
        for name, layer in layers.items():
            for key in layer.state_dict():
                value = state.pop(f"{prefix}{name}.{key}")
                if key.startswith("base_layer."):
                    state[f"{prefix}{name}.{key[len('base_layer.'):]}"] = value
            state[f"{prefix}{name}.weight"] = _fused_weight(layer)

    handle = model.network.register_state_dict_post_hook(fuse)
    try:
        model.pipeline.save_pretrained(str(path))
    finally:
        handle.remove()
    component = next(n for n, c in model.pipeline.components.items() if c is model.network)
    config = Path(path) / component / "config.json"  # the fused edits, named for a later refusal
    config.write_text(json.dumps({**json.loads(config.read_text()), FUSED: applied_edits(model.network)},
                                 indent=2, sort_keys=True) + "\n")


@dataclass
class Edit:
    method: str
    model_kind: str  # "sd" or "flux"
    concepts: list[dict]
    config: dict
    base_fingerprint: str
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    lora: dict[str, torch.Tensor] = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    version: str = ""

    def __post_init__(self):
        if not self.version:
            from . import __version__

            self.version = __version__
        # per network the edit is applied to: the base values of its weights and entries, for remove()
        self._undo: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        kinds = [text.format(len(v)) for text, v in (("{} weights", self.weights), ("entries of {} weights", self.entries),
                                                       ("{} LoRA tensors", self.lora)) if v]
        names = ", ".join(c["name"] for c in self.concepts)
        return (f"Edit({self.method} of {names or 'nothing'} on {_a_kind(self.model_kind)} model: "
                f"{', '.join(kinds) or 'empty'})")

    # --- what it touches ------------------------------------------------------------------------
    def touched(self) -> list[str]:
        return sorted(set(self.weights) | set(self.entries) | set(lora_base_names(self.lora)))

    @property
    def adapter(self) -> str:
        """The name of the LoRA adapter this edit applies: from its content, so that different edits
        stack and the same edit is recognised on a model that carries it."""
        h = hashlib.sha256()
        for key in sorted(self.lora):
            h.update(key.encode())
            h.update(self.lora[key].detach().float().cpu().contiguous().numpy().tobytes())
        return f"{ADAPTER}_{h.hexdigest()[:12]}"

    @property
    def metadata(self) -> dict:
        return {"format": FORMAT, "method": self.method, "model_kind": self.model_kind,
                "concepts": self.concepts, "config": self.config, "base_fingerprint": self.base_fingerprint,
                "has_lora": bool(self.lora), "report": self.report, "fasterase_version": self.version}

    def _holds_values(self, net: torch.nn.Module) -> bool:
        """Whether the network's weights and entries already hold this edit's values."""
        if not self.weights and not self.entries:
            return False
        for name, value in self.weights.items():
            p = base_param(net, name)
            if not torch.equal(p.detach(), value.to(p.device, p.dtype)):
                return False
        for name, (idx, values) in self.entries.items():
            flat = base_param(net, name).detach().view(-1)
            if not torch.equal(flat[idx.to(flat.device).long()], values.to(flat.device, flat.dtype)):
                return False
        return True

    def _held_as(self, net: torch.nn.Module) -> str | None:
        """The adapter of `net` that holds this LoRA edit's factors (as fasterase names it, or an active one
        loaded under another name by diffusers' load_lora_weights), or None."""
        adapters = getattr(net, "peft_config", {}) if self.lora else {}
        if not adapters:  # (most edits, on most models: no parameter is read)
            return None
        params, active = dict(net.named_parameters()), set(net.active_adapters())
        for adapter in adapters:
            if adapter == self.adapter:
                return adapter
            if adapter not in active:  # an inactive copy does not act: applying this edit is no second one
                continue
            for key, value in self.lora.items():  # "unet.<module>.lora_A.weight" -> "<module>.lora_A.<adapter>.weight"
                module, _, leaf = key.split(".", 1)[1].rpartition(".lora_")
                factor, _, rest = leaf.partition(".")
                p = params.get(f"{module}.lora_{factor}.{adapter}.{rest}")
                if p is None or p.shape != value.shape or not torch.equal(p.detach(), value.to(p.device, p.dtype)):
                    break
            else:
                return adapter
        return None

    def _made_on(self) -> str:
        """"; it was made on MODEL" where the report names the model, for a refusal's message."""
        made_on = self.report.get("model")
        return f"; it was made on {made_on}" if made_on else ""

    def check_kind_of(self, model: str | os.PathLike) -> None:
        """Before a name or folder loads: UserError when its configs say it is another kind of model than
        this edit's (a FLUX folder's weights would load, tens of GB, only to be refused)."""
        if models.folder_of(model) is None:  # a registered name: built once, by the load that checks it
            return
        kind = meta.describe(str(model), torch.float32).kind
        if kind != self.model_kind:
            raise UserError(f"this edit is for {_a_kind(self.model_kind)} model, and {model} is {_a_kind(kind)} model"
                            f"{self._made_on()}")

    def check_fits(self, model: Denoiser, dtype: torch.dtype | None = None) -> None:
        """Raise UserError unless this edit was made for `model`'s base weights and is not on it already;
        with `dtype`, for the weights as they will be once the model is cast to it."""
        if model.kind != self.model_kind:
            raise UserError(f"this edit is for {_a_kind(self.model_kind)} model, not {_a_kind(model.kind)} model"
                            f"{self._made_on()}")
        net = model.network
        held = self._held_as(net)
        if held and (self.weights or self.entries) and self._record() not in applied_edits(net) \
                and not self._holds_values(net):
            raise UserError(f"this edit's LoRA is on the model (adapter {held!r}) but the weights it also changes "
                            f"({EDIT_FILE}) are not; take the adapter off (pipe.delete_adapters({held!r})), then "
                            f"apply the whole edit, or load {EDIT_FILE} into the network before load_lora_weights "
                            f"(a LoRA-wrapped network ignores its keys)")
        if held:
            raise UserError(f"this edit is already applied to the model (LoRA adapter {held!r} holds its "
                            "weights); applying it twice is refused")
        made_on = self.report.get("model")
        for name in self.touched():
            try:
                base_param(net, name)
            except AttributeError:
                raise UserError(f"this edit changes {name!r}, which the model does not have: it was made on another "
                                f"architecture" + (f" ({made_on})" if made_on else "")) from None
        for name, value in self.weights.items():
            p = base_param(net, name)
            if p.shape != value.shape:
                raise UserError(f"this edit's {name!r} has shape {tuple(value.shape)}, "
                                f"the model's has {tuple(p.shape)}")
        for key, factor in self.lora.items():  # "unet.<module>.lora_A.weight": A (r, in, *kernel), B (out, r, 1, ..)
            p = base_param(net, lora_base_names({key: factor})[0])
            want = ((factor.shape[0], *p.shape[1:]) if ".lora_A." in key
                    else (p.shape[0], factor.shape[1], *[1] * (p.dim() - 2)))
            if factor.dim() != p.dim() or tuple(factor.shape) != want:
                raise UserError(f"this edit's LoRA factor {key!r} has shape {tuple(factor.shape)}, which does not fit "
                                f"the model's {tuple(p.shape)} weight (a LoRA factor of it is {want}, r its rank); "
                                f"the edit folder is damaged or was made on another architecture")
        for name, (idx, values) in self.entries.items():
            p = base_param(net, name)
            if idx.shape != values.shape or idx.dim() != 1 or (idx.numel() and int(idx.max()) >= p.numel()):
                raise UserError(f"this edit's entries of {name!r} do not fit its {p.numel()} elements")
        fp = fingerprint(net, self.touched(), dtype)
        if fp != self.base_fingerprint:
            if self._holds_values(net):
                raise UserError("this edit is already applied to the model (its weights hold the edit's values); "
                                "applying it twice is refused")
            mine = set(self.touched())
            others = [e for e in applied_edits(net) if mine & set(e["touched"])]
            if self._record() in others:
                raise UserError("this edit is already in the model's weights (applied, or fused into the saved "
                                "pipeline the model was loaded from); applying it twice is refused")
            if others:
                named = "; ".join(f"{e['method']} of {', '.join(e['concepts'])}" for e in others)
                if all(e in getattr(net, "config", {}).get(FUSED, []) for e in others):
                    raise UserError(f"another edit ({named}) is fused into the weights of the saved pipeline this "
                                    f"model was loaded from; apply this edit to the model it was made for"
                                    f"{self._made_on()}")
                raise UserError(f"another edit already changed these weights ({named}); remove it first, or apply "
                                "this edit to the model it was made for")
            made_in, now = self.report.get("dtype"), str(dtype or net.dtype).removeprefix("torch.")
            if made_in and made_in != now:
                raise UserError(f"this edit was made on the model in {made_in} and checks its base weights in it; "
                                f"here they were checked in {now}: load the model in {made_in} "
                                f"(fasterase.load(model, edit, dtype={made_in!r}))")
            raise UserError("this edit was made for a different base model (the weights it edits differ; an edit "
                            "made over another edit applies only after that one)")

    # --- apply / remove -------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, model) -> None:
        """Put the change into the model's network (the base values are kept for remove()). model: a
        Denoiser or a diffusers pipeline in memory (a name or folder: UserError).

        Edits stack: a LoRA edit adds its own adapter (named by its content) beside the active ones,
        and a weights or entries edit applies where the weights it changes are still those it was
        made for. Applying an edit the model already carries, or one made for other values of the
        weights it changes (e.g. over another edit of the same weights), is refused (UserError). A
        refused or failed apply changes nothing: the rollback removes only what this apply added.
        """
        model = edited(model)
        check_lora_layers(model.network, adds_lora=bool(self.lora))
        self.check_fits(model)
        net = model.network
        weights, entries = {}, {}
        self._undo[net] = (weights, entries)
        try:
            for name, value in self.weights.items():
                p = base_param(net, name)
                weights[name] = p.detach().clone()
                p.copy_(value.to(p.dtype))
            for name, (idx, values) in self.entries.items():
                flat = base_param(net, name).view(-1)
                idx = idx.to(flat.device, torch.long)  # a loaded edit is on the CPU, the model maybe on a GPU
                entries[name] = flat[idx].clone()
                flat.index_copy_(0, idx, values.to(flat.device, flat.dtype))
            if self.lora:
                active = net.active_adapters() if getattr(net, "peft_config", {}) else []
                # the edit holds no text-encoder factors, and diffusers says so for each text encoder
                with dropped("diffusers.loaders.lora_base", "found with the prefix='text_encoder"), second_adapter():
                    model.pipeline.load_lora_weights({k: v.clone() for k, v in self.lora.items()},
                                                     adapter_name=self.adapter)
                net.set_adapter(active + [self.adapter])  # loading activates only the new adapter
        except Exception:
            self._take_off(net, recorded=False)
            raise
        setattr(net, APPLIED, getattr(net, APPLIED, []) + [self._record()])

    def _holds_its_values(self, net: torch.nn.Module) -> bool:
        """Whether the weights and entries this edit changed still hold the values it put there."""
        for name, value in self.weights.items():
            p = base_param(net, name)
            if not torch.equal(p, value.to(p.device, p.dtype)):
                return False
        for name, (idx, values) in self.entries.items():
            flat = base_param(net, name).view(-1)
            if not torch.equal(flat[idx.long().to(flat.device)], values.to(flat.device, flat.dtype)):
                return False
        return True

    def _record(self) -> dict:
        """How applied_edits() names this edit on a network that carries it."""
        return {"method": self.method, "concepts": [c["name"] for c in self.concepts], "touched": self.touched()}

    @torch.no_grad()
    def remove(self, model) -> None:
        """Undo apply() (model: as apply takes it): the base weights come back bit-identical; other edits'
        adapters stay. A weights or entries edit is removed only by the Edit object that applied it, which
        kept the base values (one loaded from disk has none to put back)."""
        net = edited(model).network
        if (self.weights or self.entries) and net not in self._undo:
            raise UserError("this Edit object did not apply the edit to this model (or removed it already), so it "
                            "holds no base values to put back; remove it with the Edit object that applied it, "
                            "or load the model afresh")
        if self.lora and self.adapter not in getattr(net, "peft_config", {}):
            held = self._held_as(net)
            if held:
                raise UserError(f"this LoRA edit is on the model as adapter {held!r}, which fasterase did not add; "
                                f"remove it with pipe.delete_adapters({held!r})")
            raise UserError(f"this LoRA edit (adapter {self.adapter!r}) is not applied to this model; nothing to remove")
        if net in self._undo and not self._holds_its_values(net):
            later = [e for e in applied_edits(net) if e != self._record() and set(e["touched"]) & set(self.touched())]
            named = "; ".join(f"{e['method']} of {', '.join(e['concepts'])}" for e in later)
            why = f"{named} changed them since" if named else "they were changed after it was applied"
            raise UserError(f"the weights this edit changed no longer hold its values ({why}); remove the later "
                            "edit first")
        self._take_off(net)

    def _take_off(self, net: torch.nn.Module, recorded: bool = True) -> None:
        """Put back what apply() changed in `net` (also after an apply that failed half-way, which had
        not `recorded` the edit yet: an equal record there is another edit's)."""
        weights, entries = self._undo.pop(net, ({}, {}))
        for name, value in weights.items():
            base_param(net, name).copy_(value)
        for name, value in entries.items():
            flat = base_param(net, name).view(-1)
            flat.index_copy_(0, self.entries[name][0].to(flat.device, torch.long), value)
        if self.lora:
            remove_adapter(net, self.adapter)
        applied, record = list(getattr(net, APPLIED, [])), self._record()
        if recorded and record in applied:  # the latest of equal records: an equal edit stacked under it stays
            del applied[len(applied) - 1 - applied[::-1].index(record)]
        setattr(net, APPLIED, applied)

    # --- files ----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, overwrite: bool = False, pipeline=None) -> Path:
        """Write the edit folder atomically; with `pipeline` (the edited pipeline or Denoiser, which must carry
        this edit) also the pipeline as it draws, LoRA fused (save_pipeline), in pipeline/. An existing empty
        folder is filled in place (its files written beside, in a hidden folder, then moved in); a folder that
        holds an edit is replaced only with overwrite (target_folder), and only once the new folder is
        complete: a save that fails leaves either as it was."""
        path = target_folder(path, overwrite, model=self.report.get("model"))
        if pipeline is not None:
            pipeline = edited(pipeline)
            if self._record() not in applied_edits(pipeline.network) and not self._held_as(pipeline.network):
                raise UserError("the pipeline given to save does not carry this edit (apply it first, or save the "
                                "edit alone)")
        empty = path.is_dir() and not any(path.iterdir())  # filled in place: a mount point or `.` stays
        if not empty:
            path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path if empty else path.parent))
        old, moved = tmp.with_name(tmp.name + ".old"), []
        try:
            weights = {k: v.detach().cpu().contiguous() for k, v in self.weights.items()}
            for name, (idx, values) in self.entries.items():
                weights[f"{name}{INDICES}"] = idx.detach().cpu().to(torch.int32).contiguous()
                weights[f"{name}{VALUES}"] = values.detach().cpu().contiguous()
            with full_disk_named(tmp.parent, f"edit {path}"):
                save_file(weights, str(tmp / EDIT_FILE), metadata={"fasterase": json.dumps(self.metadata)})
                if self.lora:
                    save_file({k: v.detach().cpu().contiguous() for k, v in self.lora.items()}, str(tmp / LORA_FILE))
                if pipeline is not None:
                    save_pipeline(pipeline, tmp / PIPELINE_DIR)
            set_default_mode(tmp)  # mkdtemp's 0700 and safetensors' 0600: the folder follows the umask
            if empty:
                for entry in sorted(tmp.iterdir()):
                    moved.append(path / entry.name)  # first: an interrupt after the move finds it listed
                    os.replace(entry, path / entry.name)
                tmp.rmdir()
            else:
                if path.exists():
                    os.replace(path, old)
                os.replace(tmp, path)
        except BaseException:
            for entry in moved:  # the empty folder is left empty
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink(missing_ok=True)
            if old.exists() and not path.exists():
                os.replace(old, path)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Edit":
        """The edit saved in folder `path` (Edit.save); UserError when it holds none."""
        if not isinstance(path, (str, os.PathLike)):
            raise UserError(f"an edit is loaded from its folder (a path), got {type(path).__name__}")
        path = Path(path).expanduser()
        if path.name == EDIT_FILE and path.is_file():
            raise UserError(f"{path} is an edit's file; give its folder, {path.parent}")
        file = path / EDIT_FILE
        if not path.exists():
            raise UserError(f"edit folder {path}: no such folder")
        if not file.is_file():
            why = "a file, not a folder" if not path.is_dir() else f"no {EDIT_FILE} in it"
            looks = "; it is a diffusers model folder, which --model / the model argument takes" if (
                path / "model_index.json").is_file() else ""
            raise UserError(f"{path} is not a fasterase edit ({why}){looks}")
        with _damaged_named(file):
            with safe_open(str(file), "pt") as f:
                header = f.metadata() or {}
        if "fasterase" not in header:
            raise UserError(f"{file} has no fasterase metadata")
        try:
            meta = json.loads(header["fasterase"])
        except json.JSONDecodeError as exc:
            raise UserError(f"{file}: its fasterase metadata is damaged ({exc}); save the edit again") from None
        if not isinstance(meta, dict):
            raise UserError(f"{file}: its fasterase metadata is damaged (not a JSON object); save the edit again")
        if meta.get("format") != FORMAT:
            raise UserError(f"{file} is edit format {meta.get('format')}, this fasterase reads format {FORMAT}")
        wrong = _damaged_fields(meta)
        if wrong:
            raise UserError(f"{file}: its fasterase metadata is damaged ({'; '.join(wrong)}); save the edit again")
        lora = {}
        if meta["has_lora"]:
            with _damaged_named(path / LORA_FILE):
                lora = load_file(str(path / LORA_FILE))
        with _damaged_named(file):
            weights = load_file(str(file))
        pairs = ((INDICES, VALUES), (VALUES, INDICES))
        unpaired = [(k, other) for k in weights for mine, other in pairs
                    if k.endswith(mine) and k[:-len(mine)] + other not in weights]
        if unpaired:
            raise UserError(f"{file} is damaged: {unpaired[0][0]} has no {unpaired[0][1]} beside it; save the edit "
                            "again")
        bad = _unpaired_factor(lora)
        if bad:
            raise UserError(f"{path / LORA_FILE} is damaged: {bad}; save the edit again")
        entries = {k[:-len(INDICES)]: (weights.pop(k), weights.pop(k[:-len(INDICES)] + VALUES))
                   for k in list(weights) if k.endswith(INDICES)}
        return cls(method=meta["method"], model_kind=meta["model_kind"], concepts=meta["concepts"],
                   config=meta["config"], base_fingerprint=meta["base_fingerprint"], weights=weights,
                   entries=entries, lora=lora, report=meta.get("report", {}), version=meta["fasterase_version"])
