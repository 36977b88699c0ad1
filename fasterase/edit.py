"""Edit: a weight change with its metadata, applied to, saved from and loaded into a model.

Three kinds of change, any of them together:
- `weights`: the new values of some network parameters (closed-form edits). Stored whole, not
  as differences, so apply -> save -> load -> apply is bit-exact.
- `entries`: new values of selected entries only (masked fine-tunes): {name: (int32 indices into
  the flattened parameter, values)}, so an edit of a few entries of a large model stays small.
- `lora`: a LoRA adapter in diffusers' format (keys "unet." / "transformer."), saved as
  pytorch_lora_weights.safetensors beside the edit so `pipe.load_lora_weights(DIR)` loads it.

On disk an edit is a folder: edit.safetensors (the weights, the metadata as JSON in the header)
and, for LoRA edits, pytorch_lora_weights.safetensors. Folders are written under a temporary
name and renamed, so a failed save leaves nothing half-written.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .models import Denoiser

EDIT_FILE = "edit.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"
ADAPTER = "fasterase"
FORMAT = 1
INDICES, VALUES = ":indices", ":values"  # keys of `entries` in edit.safetensors


def _base_param(network: torch.nn.Module, name: str) -> torch.Tensor:
    """A parameter of the base model, also when a LoRA layer wraps its module."""
    try:
        return network.get_parameter(name)
    except AttributeError:
        module, _, leaf = name.rpartition(".")
        return network.get_parameter(f"{module}.base_layer.{leaf}")


def fingerprint(network: torch.nn.Module, names: list[str]) -> str:
    """sha256 over the names, shapes and fp32 values of the base parameters an edit touches."""
    h = hashlib.sha256()
    for name in sorted(names):
        p = _base_param(network, name).detach()
        h.update(f"{name}:{tuple(p.shape)};".encode())
        h.update(p.float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def lora_base_names(lora: dict[str, torch.Tensor]) -> list[str]:
    """Base weight names of the modules a diffusers-format LoRA state dict adapts."""
    names = set()
    for key in lora:
        module = key.split(".", 1)[1].split(".lora_")[0]
        names.add(f"{module}.weight")
    return sorted(names)


def remove_adapter(network: torch.nn.Module) -> None:
    """Take fasterase's LoRA adapter off; with no other adapter left, the LoRA layers are
    unwrapped too, so the network's modules and state_dict keys are the original ones."""
    adapters = getattr(network, "peft_config", {})
    if ADAPTER not in adapters:
        return
    if len(adapters) == 1:
        network.unload_lora()
    else:
        network.delete_adapters(ADAPTER)


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
        self._undo: dict[str, torch.Tensor] = {}
        self._undo_entries: dict[str, torch.Tensor] = {}

    # --- what it touches ------------------------------------------------------------------------
    def touched(self) -> list[str]:
        return sorted(set(self.weights) | set(self.entries) | set(lora_base_names(self.lora)))

    @property
    def metadata(self) -> dict:
        return {"format": FORMAT, "method": self.method, "model_kind": self.model_kind,
                "concepts": self.concepts, "config": self.config, "base_fingerprint": self.base_fingerprint,
                "has_lora": bool(self.lora), "report": self.report, "fasterase_version": self.version}

    def check_fits(self, model: Denoiser) -> None:
        """Raise ValueError unless this edit was made for `model`'s base weights."""
        if model.kind != self.model_kind:
            raise ValueError(f"this edit is for a {self.model_kind} model, not a {model.kind} model")
        net = model.network
        for name, value in self.weights.items():
            try:
                p = _base_param(net, name)
            except AttributeError:
                raise ValueError(f"this edit changes {name!r}, which the model does not have") from None
            if p.shape != value.shape:
                raise ValueError(f"this edit's {name!r} has shape {tuple(value.shape)}, "
                                 f"the model's has {tuple(p.shape)}")
        for name, (idx, values) in self.entries.items():
            try:
                p = _base_param(net, name)
            except AttributeError:
                raise ValueError(f"this edit changes {name!r}, which the model does not have") from None
            if idx.shape != values.shape or idx.dim() != 1 or (idx.numel() and int(idx.max()) >= p.numel()):
                raise ValueError(f"this edit's entries of {name!r} do not fit its {p.numel()} elements")
        try:
            fp = fingerprint(net, self.touched())
        except AttributeError as exc:
            raise ValueError(f"this edit does not fit the model: {exc}") from None
        if fp != self.base_fingerprint:
            raise ValueError("this edit was made for a different base model (the weights it edits differ)")

    # --- apply / remove -------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, model: Denoiser) -> None:
        """Put the change into the model's network (the base values are kept for remove())."""
        self.check_fits(model)
        net = model.network
        try:
            for name, value in self.weights.items():
                p = net.get_parameter(name)
                self._undo[name] = p.detach().clone()
                p.copy_(value.to(p.dtype))
            for name, (idx, values) in self.entries.items():
                flat = net.get_parameter(name).view(-1)
                self._undo_entries[name] = flat[idx.long()].clone()
                flat.index_copy_(0, idx.long(), values.to(flat.dtype))
            if self.lora:
                model.pipeline.load_lora_weights({k: v.clone() for k, v in self.lora.items()}, adapter_name=ADAPTER)
        except Exception:
            self.remove(model)
            raise

    @torch.no_grad()
    def remove(self, model: Denoiser) -> None:
        """Undo apply(): the base weights come back bit-identical."""
        net = model.network
        for name, value in self._undo.items():
            net.get_parameter(name).copy_(value)
        for name, value in self._undo_entries.items():
            net.get_parameter(name).view(-1).index_copy_(0, self.entries[name][0].long(), value)
        self._undo.clear()
        self._undo_entries.clear()
        if self.lora:
            remove_adapter(net)

    # --- files ----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the edit folder atomically (refusing an existing path unless overwrite)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; choose another path or pass overwrite=True")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            weights = {k: v.detach().cpu().contiguous() for k, v in self.weights.items()}
            for name, (idx, values) in self.entries.items():
                weights[f"{name}{INDICES}"] = idx.detach().cpu().to(torch.int32).contiguous()
                weights[f"{name}{VALUES}"] = values.detach().cpu().contiguous()
            save_file(weights, str(tmp / EDIT_FILE), metadata={"fasterase": json.dumps(self.metadata)})
            if self.lora:
                save_file({k: v.detach().cpu().contiguous() for k, v in self.lora.items()}, str(tmp / LORA_FILE))
            if path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Edit":
        path = Path(path)
        file = path / EDIT_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{path} is not a fasterase edit (no {EDIT_FILE} in it)")
        with safe_open(str(file), "pt") as f:
            header = f.metadata() or {}
        if "fasterase" not in header:
            raise ValueError(f"{file} has no fasterase metadata")
        meta = json.loads(header["fasterase"])
        if meta.get("format") != FORMAT:
            raise ValueError(f"{file} is edit format {meta.get('format')}, this fasterase reads format {FORMAT}")
        lora = load_file(str(path / LORA_FILE)) if meta["has_lora"] else {}
        weights = load_file(str(file))
        entries = {k[:-len(INDICES)]: (weights.pop(k), weights.pop(k[:-len(INDICES)] + VALUES))
                   for k in list(weights) if k.endswith(INDICES)}
        return cls(method=meta["method"], model_kind=meta["model_kind"], concepts=meta["concepts"],
                   config=meta["config"], base_fingerprint=meta["base_fingerprint"], weights=weights,
                   entries=entries, lora=lora, report=meta.get("report", {}), version=meta["fasterase_version"])
