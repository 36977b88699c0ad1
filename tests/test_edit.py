"""Edits on models and on disk: applying (twice, stacked, rolled back), the overwrite rule, and
saving the edited pipeline with its LoRA fused."""
import json
import os
import re
import warnings

import pytest
import torch
from diffusers import DiffusionPipeline

import fasterase
from fasterase import api, models
from fasterase.cli import main
from fasterase.edit import Edit, applied_edits, fingerprint
from fasterase.errors import UserError

FAST_ESD = {"steps": 2, "batch_size": 1, "sample_steps": 2}


def state(model):
    return {k: v.detach().clone() for k, v in models.load(model).network.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def prediction(model, prompt="a red circle"):
    model = models.load(model)
    x = model.noise(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.predict(x, torch.tensor([0.8, 0.3]), model.encode([prompt] * 2))


def files(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# --- apply: twice, stacked, rolled back ---------------------------------------------------------

def test_applying_a_lora_edit_twice_is_refused_and_keeps_the_first(tmp_path):
    """diffusers refused the adapter name and the rollback deleted the adapter that was there."""
    result = fasterase.erase("toy-sd", "circle", method="esd", progress=False, **FAST_ESD)
    before, expected = state(result.model), prediction(result.model)
    with pytest.raises(UserError, match="already applied"):
        result.edit.apply(result.model)
    assert same(state(result.model), before) and torch.equal(prediction(result.model), expected)
    with pytest.raises(UserError, match="already applied"):  # the same edit from disk, too
        Edit.load(result.edit.save(tmp_path / "e")).apply(result.model)
    assert same(state(result.model), before)


def test_applying_a_weights_or_entries_edit_twice_is_refused():
    model = models.load("toy-sd")
    uce = fasterase.erase(model, "circle", method="uce", progress=False).edit
    before = state(model)
    with pytest.raises(UserError, match="already applied"):
        uce.apply(model)
    assert same(state(model), before)
    name = "conv_in.weight"
    idx = torch.tensor([0, 5, 7], dtype=torch.int32)
    entries = Edit(method="ant", model_kind="sd", concepts=[], config={}, base_fingerprint=fingerprint(
        model.network, [name]), entries={name: (idx, torch.ones(3))})
    entries.apply(model)  # stacks: it changes other weights than the UCE edit
    before = state(model)
    with pytest.raises(UserError, match="already applied"):
        entries.apply(model)
    assert same(state(model), before)
    entries.remove(model)
    uce.remove(model)
    assert same(state(model), state("toy-sd"))


@pytest.mark.gpu
def test_an_entries_edit_from_disk_applies_to_a_model_on_the_gpu(tmp_path):
    """Edit.load holds its indices and values on the CPU: apply and remove move them to the weights' device."""
    model = models.load("toy-sd", device="cuda")
    name = "conv_in.weight"
    idx = torch.tensor([0, 5, 7], dtype=torch.int32)
    edit = Edit(method="ant", model_kind="sd", concepts=[], config={}, base_fingerprint=fingerprint(
        model.network, [name]), entries={name: (idx, torch.ones(3))})
    loaded = Edit.load(edit.save(tmp_path / "e"))
    loaded.apply(model)
    assert torch.equal(model.network.conv_in.weight.view(-1)[idx.long().cuda()], torch.ones(3, device="cuda"))
    loaded.remove(model)
    assert same(state(model), state(models.load("toy-sd", device="cuda")))


def test_an_edit_and_a_result_print_as_a_summary_not_their_tensors():
    result = fasterase.erase("toy-sd", "circle", method="esd", progress=False, **FAST_ESD)
    n = len(result.edit.lora)
    assert repr(result.edit) == f"Edit(esd of circle on an SD model: {n} LoRA tensors)"
    assert repr(result) == f"EraseResult(edit=Edit(esd of circle on an SD model: {n} LoRA tensors))"


def test_a_fingerprint_names_the_base_values_in_a_dtype():
    """One changed entry changes it; the order of the names does not; with a dtype it is the network's once
    cast (not changed by it), and a bf16 network's fp32 copy has the bf16 network's fingerprint."""
    net = models.load("toy-sd").network
    names = [n for n, p in net.named_parameters()][:40]
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    fp = fingerprint(net, names)
    assert fingerprint(net, names[::-1]) == fp and len(fp) == 64
    w = net.get_parameter(names[7])
    with torch.no_grad():
        w.view(-1)[3] = torch.nextafter(w.view(-1)[3], torch.tensor(float("inf")))
        assert fingerprint(net, names) != fp
        w.view(-1)[3] = before[names[7]].view(-1)[3]
    assert fingerprint(net, names) == fp
    as_bf16 = fingerprint(net, names, torch.bfloat16)
    assert as_bf16 != fp and all(torch.equal(p, before[n]) for n, p in net.named_parameters())
    net.to(torch.bfloat16)
    assert fingerprint(net, names) == as_bf16
    net.to(torch.float32)  # the bf16 values, upcast
    assert fingerprint(net, names) == as_bf16


def test_different_lora_edits_stack_and_come_off_one_by_one():
    model = models.load("toy-sd")
    base = state(model)
    first = fasterase.erase(model, "circle", method="esd", progress=False, **FAST_ESD).edit
    only_first = prediction(model)
    second = fasterase.erase(model, "square", method="esd", progress=False, seed=1, **FAST_ESD).edit
    net = model.network
    assert first.adapter != second.adapter
    assert set(net.active_adapters()) == {first.adapter, second.adapter}  # the first was switched off
    assert not torch.allclose(prediction(model), only_first)
    second.remove(model)
    assert net.active_adapters() == [first.adapter] and torch.allclose(prediction(model), only_first, atol=1e-6)
    first.remove(model)
    assert same(state(model), base)


def test_a_failed_lora_apply_removes_only_what_it_added(monkeypatch):
    model = models.load("toy-flux")
    first = fasterase.erase(model, "circle", method="esd", progress=False, **FAST_ESD).edit
    expected = prediction(model)
    broken = fasterase.erase("toy-flux", "square", method="esd", progress=False, **FAST_ESD).edit
    broken.lora = {"transformer.x.lora_A.weight": torch.zeros(1)}
    monkeypatch.setattr(Edit, "check_fits", lambda self, m: None)
    with pytest.raises(Exception):
        broken.apply(model)
    assert list(model.network.peft_config) == [first.adapter] and model.network.active_adapters() == [first.adapter]
    assert torch.equal(prediction(model), expected)


# --- saving: the overwrite rule, failures, the pipeline ------------------------------------------

def erase_cli(capsys, model, out, *extra):
    code = main(["erase", "--model", str(model), "--concept", "circle", "--method", "uce", "--out", str(out),
                 *extra])
    return code, capsys.readouterr().err


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "models" / "sd"
    models.load("toy-sd").pipeline.save_pretrained(folder)
    return folder


def test_overwrite_never_replaces_a_model_or_other_folder(capsys, tmp_path, model_folder, monkeypatch):
    """--overwrite removed whatever --out named; now only an edit folder is replaced, and the check
    comes before training."""
    monkeypatch.setattr(fasterase, "erase", lambda *a, **k: pytest.fail("trained before checking --out"))
    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.txt").write_text("keep me")
    snapshot = {p: files(p) for p in (model_folder, other)}
    for out, needle in [(model_folder, "the model's own folder"), (model_folder.parent, "contains the model's folder"),
                        (other, "holds no fasterase edit (it holds a.txt); choose a new or empty folder (only a folder "
                                "holding an edit alone is replaced)"), (tmp_path / "notes" / "a.txt", "is a file")]:
        code, err = erase_cli(capsys, model_folder, out, "--overwrite")
        assert code == 2 and needle in err, err
    assert {p: files(p) for p in snapshot} == snapshot
    code, err = erase_cli(capsys, model_folder, other)  # --overwrite is not suggested where it would be refused
    assert code == 2 and "exists and holds no fasterase edit" in err and "--overwrite" not in err
    for out in (model_folder, model_folder / "edit", model_folder / "unet" / "edit"):  # nothing is written into it
        code, err = erase_cli(capsys, model_folder, out)
        assert code == 2 and "is or lies in the model's own folder" in err and "--overwrite" not in err
    assert {p: files(p) for p in snapshot} == snapshot
    with pytest.raises(UserError, match="checkpoint: .* is or lies in the model's own folder"):
        api.erase(str(model_folder), "circle", method="esd", checkpoint=str(model_folder / "run.ckpt"))  # unpatched


def test_a_damaged_weight_file_is_named(tmp_path, model_folder):
    """Random bytes for the UNet's weights: safetensors' "header too large" traceback from our dtype check."""
    weights = next((model_folder / "unet").glob("*.safetensors"))
    weights.write_bytes(os.urandom(1000))
    with pytest.raises(UserError, match=f"{weights.name} is not a readable safetensors file .* damaged"):
        fasterase.erase(str(model_folder), "circle", method="uce", progress=False)


def test_an_empty_folder_is_filled_in_place_and_left_empty_when_the_save_fails(tmp_path, monkeypatch):
    """A mount point (or `.`) cannot be renamed away: an empty --out gets the files moved into it."""
    edit = fasterase.erase("toy-sd", "circle", method="esd", progress=False, **FAST_ESD).edit
    out = tmp_path / "out"
    out.mkdir()
    inode = out.stat().st_ino
    real, calls = os.replace, []

    def fails_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(os, "replace", fails_second)
    with pytest.raises(OSError, match="disk full"):
        edit.save(out)
    assert list(out.iterdir()) == []
    monkeypatch.setattr(os, "replace", real)
    assert edit.save(out) == out and out.stat().st_ino == inode
    assert sorted(p.name for p in out.iterdir()) == ["edit.safetensors", "pytorch_lora_weights.safetensors"]
    assert Edit.load(out).lora.keys() == edit.lora.keys()


@pytest.mark.parametrize("damage", ["half edit", "empty edit", "half lora", "no lora"])
def test_a_damaged_edit_folder_is_named(tmp_path, damage):
    """A truncated edit.safetensors or LoRA file was safetensors' traceback (exit 1)."""
    path = fasterase.erase("toy-sd", "circle", method="esd", progress=False, **FAST_ESD).edit.save(tmp_path / "e")
    file = path / ("edit.safetensors" if "edit" in damage else "pytorch_lora_weights.safetensors")
    if damage == "no lora":
        file.unlink()
    else:
        data = file.read_bytes()
        file.write_bytes(data[:len(data) // 2] if "half" in damage else b"")
    with pytest.raises(UserError, match=f"{file.name} cannot be read as an edit's safetensors file"):
        fasterase.load("toy-sd", path)


@pytest.mark.parametrize("metadata, needle", [
    ("{not json", "its fasterase metadata is damaged"),
    ('{"format": %d}', "its fasterase metadata is damaged \\(no has_lora; no method"),
    ("[1, 2]", "its fasterase metadata is damaged \\(not a JSON object"),
    ('{"format": %d, "has_lora": false, "method": "ant", "model_kind": "sd", "concepts": "circle", "config": null, '
     '"base_fingerprint": "x", "fasterase_version": "0", "report": "x"}',
     "concepts is str, not list; config is NoneType, not dict; report is str, not dict"),
    ('{"format": %d, "has_lora": false, "method": "ant", "model_kind": "sdxl", "concepts": [{"nme": "c"}], '
     '"config": {}, "base_fingerprint": "x", "fasterase_version": "0"}',
     "a concept is not a record with a name; model_kind 'sdxl' is neither sd nor flux"),
    (None, "down.weight:indices has no :values beside it"),
    ("values alone", "down.weight:values has no :indices beside it"),
])
def test_damaged_metadata_or_entries_are_named(tmp_path, metadata, needle):
    """Metadata that is not the JSON an edit writes, or an entry's indices without its values, was a
    JSONDecodeError or KeyError traceback."""
    from safetensors.torch import save_file

    from fasterase.edit import FORMAT

    path = tmp_path / "e"
    path.mkdir()
    tensors = {"w": torch.zeros(2)}
    if metadata is None or metadata == "values alone":
        tensors = ({"down.weight:indices": torch.zeros(2, dtype=torch.int32)} if metadata is None
                   else {"down.weight:values": torch.zeros(2)})
        metadata = json.dumps({"format": FORMAT, "has_lora": False, "method": "ant", "model_kind": "sd",
                               "concepts": [], "config": {}, "base_fingerprint": "x", "fasterase_version": "0"})
    save_file(tensors, str(path / "edit.safetensors"),
              metadata={"fasterase": metadata % FORMAT if "%d" in metadata else metadata})
    with pytest.raises(UserError, match=needle):
        Edit.load(path)


def test_an_edit_for_another_kind_of_model_is_refused_before_the_folder_loads(tmp_path, monkeypatch, capsys):
    path = fasterase.erase("toy-sd", "circle", method="uce", progress=False).edit.save(tmp_path / "e")
    models.load("toy-flux").pipeline.save_pretrained(tmp_path / "flux")
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the folder's weights were loaded"))
    with pytest.raises(UserError, match=f"this edit is for an SD model, and {tmp_path / 'flux'} is a FLUX model; it "
                                        "was made on toy-sd"):
        fasterase.load(tmp_path / "flux", path)
    assert main(["eval", "--model", str(tmp_path / "flux"), "--edit", str(path), "--grid", str(tmp_path / "g.png")]) == 2
    assert "is a FLUX model" in capsys.readouterr().err


def test_an_edit_of_another_architecture_names_a_layer_the_model_lacks(tmp_path):
    """It said "ModuleList has no attribute `7`" (an SD1.5 edit on toy-sd)."""
    edit = fasterase.erase("toy-sd", "circle", method="esd", progress=False, **FAST_ESD).edit
    edit.lora = {k.replace("down_blocks.0.", "down_blocks.7."): v for k, v in edit.lora.items()}
    with pytest.raises(UserError, match=r"changes 'down_blocks\.7\..*which the model does not have: it was made on "
                                        r"another architecture \(toy-sd\)"):
        edit.apply(models.load("toy-sd"))


def test_the_model_inside_an_edit_folder_is_protected(capsys, tmp_path):
    out = tmp_path / "edit"
    code, err = erase_cli(capsys, "toy-sd", out, "--save-pipeline")
    assert code == 0, err
    snapshot = files(out)
    code, err = erase_cli(capsys, out / "pipeline", out, "--overwrite")
    assert code == 2 and "contains the model's folder" in err
    assert files(out) == snapshot
    result = fasterase.erase(str(out / "pipeline"), "square", method="uce", progress=False)
    with pytest.raises(UserError, match="contains the model's folder"):  # the API's save too
        result.edit.save(out, overwrite=True)
    assert files(out) == snapshot


def test_a_failed_overwrite_keeps_the_old_edit(tmp_path, monkeypatch):
    """The old edit was deleted before the new one was in place; a failure then lost both."""
    old = fasterase.erase("toy-sd", "circle", method="uce", progress=False).edit
    path = old.save(tmp_path / "e")
    new = fasterase.erase("toy-sd", "square", method="uce", progress=False).edit
    real = os.replace

    def replace(src, dst):  # the step that puts the new folder in place fails
        if str(dst) == str(path) and not str(src).endswith(".old"):
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        new.save(path, overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["e"] and Edit.load(path).concepts == old.concepts
    new.save(path, overwrite=True)
    assert Edit.load(path).concepts == new.concepts and sorted(os.listdir(tmp_path)) == ["e"]


@pytest.mark.parametrize("name", ["toy-sd", "toy-flux"])
def test_saved_pipeline_holds_the_fused_lora(name, tmp_path):
    """The saved pipeline loads with plain diffusers, with no unused or missing keys, and draws what
    the edited pipeline in memory draws; the pipeline in memory is not changed by saving."""
    result = fasterase.erase(name, "circle", method="esd", progress=False, **FAST_ESD)
    before = state(result.model)
    path = result.edit.save(tmp_path / "e", pipeline=result.model)
    assert same(state(result.model), before)
    sub = "unet" if name == "toy-sd" else "transformer"
    _, info = type(result.model.network).from_pretrained(str(path / "pipeline" / sub), output_loading_info=True)
    assert not any(info.values()), info
    loaded = models.load(DiffusionPipeline.from_pretrained(str(path / "pipeline")))
    edited = prediction(result.model)
    assert torch.allclose(prediction(loaded), edited, atol=1e-5)
    assert (prediction(name) - edited).abs().max() > 1e-3  # the edit is in it
    images = result.model.generate(["a red circle", "a blue square"], seed=0)
    assert torch.allclose(loaded.generate(["a red circle", "a blue square"], seed=0), images, atol=1e-4)


# --- the model an edit records; the folders it may be written to ---------------------------------

def test_an_edit_records_the_folder_its_pipeline_came_from(tmp_path):
    """report["model"] was the class name, so saving over the folder holding the model deleted it."""
    first = fasterase.erase("toy-sd", "circle", method="uce", progress=False)
    folder = first.edit.save(tmp_path / "e", pipeline=first.model)
    snapshot = files(folder)
    pipe = DiffusionPipeline.from_pretrained(str(folder / "pipeline"))
    result = fasterase.erase(pipe, "square", method="uce", progress=False)
    assert result.report["model"] == str(folder / "pipeline")
    with pytest.raises(UserError, match="contains the model's folder"):
        result.edit.save(folder, overwrite=True)
    assert files(folder) == snapshot


def test_a_relative_model_is_recorded_absolute(capsys, tmp_path, model_folder, monkeypatch):
    monkeypatch.chdir(model_folder.parent)
    code, err = erase_cli(capsys, "sd", tmp_path / "e")
    assert code == 0, err
    assert Edit.load(tmp_path / "e").report["model"] == str(model_folder)


def test_eval_of_an_edit_that_records_no_model(capsys, tmp_path):
    result = fasterase.erase(models.load("toy-sd").pipeline, "circle", method="uce", progress=False)
    result.edit.report["model"] = "StableDiffusionPipeline"  # a pipeline built in memory has no folder
    result.edit.save(tmp_path / "e")
    assert main(["eval", "--edit", str(tmp_path / "e")]) == 2
    assert "this edit does not record its model; pass --model" in capsys.readouterr().err


def test_out_below_a_file_is_refused_before_training(capsys, tmp_path, monkeypatch):
    (tmp_path / "f").write_text("a file")
    monkeypatch.setattr(fasterase, "erase", lambda *a, **k: pytest.fail("trained before checking --out"))
    code, err = erase_cli(capsys, "toy-sd", tmp_path / "f" / "e")
    assert code == 2 and "is a file" in err
    code, err = erase_cli(capsys, "toy-sd", tmp_path / "f" / "a" / "e")
    assert code == 2 and "is a file" in err


def test_an_existing_file_as_out_is_refused_with_or_without_overwrite(capsys, tmp_path):
    (tmp_path / "f").write_text("a file")
    for extra in ((), ("--overwrite",)):
        code, err = erase_cli(capsys, "toy-sd", tmp_path / "f", *extra)
        assert code == 2 and "is a file, and an edit is a folder" in err
    assert (tmp_path / "f").read_text() == "a file"


def test_a_folder_that_cannot_be_written_is_refused_before_any_work(capsys, monkeypatch):
    """/proc takes no new files (as a read-only file system takes none, whoever runs): --out, a grid, a
    checkpoint and the demo's --out there are one-line errors before anything runs."""
    from fasterase.eval import check_grid_path
    from fasterase.training import loop

    monkeypatch.setattr(fasterase, "erase", lambda *a, **k: pytest.fail("erased before checking --out"))
    code, err = erase_cli(capsys, "toy-sd", "/proc/fasterase-edit/e")
    assert code == 2 and "cannot write in /proc" in err
    assert main(["demo", "--out", "/proc/fasterase-demo"]) == 2
    assert "cannot write in /proc" in capsys.readouterr().err
    with pytest.raises(UserError, match="cannot write in /proc"):
        check_grid_path("/proc/grid.png")
    with pytest.raises(UserError, match="cannot write in /proc"):
        loop.check_checkpoint("/proc/run.ckpt")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_saved_edit_folder_follows_the_umask(tmp_path, umask):
    """mkdtemp's 0700 became the edit folder's mode, and safetensors writes its files 0600: the folder,
    its files and the saved pipeline's have the modes the umask gives."""
    result = fasterase.erase("toy-sd", "circle", method="esd", progress=False, **FAST_ESD)
    old = os.umask(umask)
    try:
        path = result.edit.save(tmp_path / "e", pipeline=result.model)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o777 & ~umask
    modes = {p.stat().st_mode & 0o777 for p in path.rglob("*") if p.is_file()}
    assert modes == {0o666 & ~umask}
    assert {p.stat().st_mode & 0o777 for p in path.rglob("*") if p.is_dir()} == {0o777 & ~umask}


def test_an_edit_loads_in_the_dtype_it_was_made_in(tmp_path):
    """The fingerprint holds the base values in the edit's dtype: a name loads in it by default, and a
    model in another dtype is told which to load, not that it is another model."""
    path = fasterase.erase("toy-sd", "circle", method="uce", dtype="bf16", progress=False).edit.save(tmp_path / "e")
    pipe = fasterase.load("toy-sd", path)
    assert pipe.unet.dtype == torch.bfloat16
    with pytest.raises(UserError, match="made on the model in bfloat16.*load the model in bfloat16"):
        fasterase.load("toy-sd", path, dtype="fp32")


# --- remove, stacking refusals, a user's fused LoRA ----------------------------------------------

def test_an_edit_loaded_from_disk_cannot_remove_weights_it_did_not_apply(tmp_path):
    """remove() returned silently with the weights still edited; a LoRA edit is removed by name."""
    model = models.load("toy-sd")
    uce = fasterase.erase(model, "circle", method="uce", progress=False).edit
    edited = state(model)
    with pytest.raises(UserError, match="did not apply"):
        Edit.load(uce.save(tmp_path / "u")).remove(model)
    assert same(state(model), edited)
    uce.remove(model)
    with pytest.raises(UserError, match="removed it already"):
        uce.remove(model)
    result = fasterase.erase("toy-sd", "circle", method="esd", progress=False, **FAST_ESD)
    Edit.load(result.edit.save(tmp_path / "l")).remove(result.model)
    assert same(state(result.model), state("toy-sd"))


def test_stacking_refusals_name_the_edit_in_the_way(tmp_path):
    """UCE over UCE and an edit over its own saved pipeline said "made for a different base model"."""
    model = models.load("toy-sd")
    first = fasterase.erase(model, "circle", method="uce", progress=False).edit
    second = fasterase.erase("toy-sd", "square", method="uce", progress=False).edit
    before = state(model)
    with pytest.raises(UserError, match=r"another edit already changed these weights \(uce of circle\)"):
        second.apply(model)
    assert same(state(model), before)
    first.remove(model)
    second.apply(model)  # with the first removed, it fits
    result = fasterase.erase("toy-sd", "circle", method="esd", progress=False, **FAST_ESD)
    path = result.edit.save(tmp_path / "e", pipeline=result.model)
    with pytest.raises(UserError, match="already in the model's weights"):
        Edit.load(path).apply(models.load(str(path / "pipeline")))
    uce = fasterase.erase("toy-sd", "circle", method="uce", progress=False)
    fused = uce.edit.save(tmp_path / "u", pipeline=uce.model) / "pipeline"
    with pytest.raises(UserError, match=r"another edit \(uce of circle\) is fused into the weights of the saved "
                                        r"pipeline this model was loaded from; apply this edit to the model it was "
                                        r"made for; it was made on toy-sd"):
        second.apply(models.load(str(fused)))
    other = models.load("toy-sd")
    with torch.no_grad():
        other.network.get_parameter(next(iter(second.weights))).add_(1.0)
    with pytest.raises(UserError, match="different base model"):  # no edit explains it
        second.apply(other)


def test_a_fused_user_lora_is_refused_and_left_fused(tmp_path):
    """peft unmerged the user's fused LoRA, trained, then refused the edit: the pipeline was changed."""
    lora = fasterase.erase("toy-sd", "square", method="esd", progress=False, **FAST_ESD).edit.save(tmp_path / "l")
    pipe = models.load("toy-sd").pipeline
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora()
    before, expected = state(pipe), prediction(pipe)
    with pytest.raises(UserError, match="fused LoRA layers that are still wrapped"):
        fasterase.erase(pipe, "circle", method="esd", progress=False, **FAST_ESD)
    with pytest.raises(UserError, match="fused LoRA layers"):
        Edit.load(lora).apply(models.load(pipe))
    layers = [m for m in pipe.unet.modules() if hasattr(m, "merged")]
    assert layers and all(m.merged for m in layers)
    assert same(state(pipe), before) and torch.equal(prediction(pipe), expected)


def test_an_edit_under_a_later_one_is_not_removed():
    """Two UCE edits of the same projections: removing the first while the second is on put the base
    back under it and left the model with the first concept erased and no edit recorded."""
    model = models.load("toy-sd")
    base = state(model)
    first = fasterase.erase(model, "circle", method="uce", progress=False).edit
    second = fasterase.erase(model, "square", method="uce", progress=False).edit
    both = state(model)
    with pytest.raises(UserError, match="uce of square changed them since"):
        first.remove(model)
    assert same(state(model), both)
    second.remove(model)
    first.remove(model)
    assert same(state(model), base)


def test_a_lora_edit_not_applied_is_not_removed(tmp_path):
    result = fasterase.erase("toy-sd", "circle", method="esd", progress=False, **FAST_ESD)
    fresh = models.load("toy-sd")
    with pytest.raises(UserError, match="not applied to this model"):
        Edit.load(result.edit.save(tmp_path / "l")).remove(fresh)
    assert same(state(fresh), state("toy-sd"))


# --- a user's own LoRA layers, pipelines in memory ---------------------------------------------

def test_switched_off_lora_layers_are_refused_where_a_lora_is_added(tmp_path):
    """ESD trained an adapter that took no part (RuntimeError deep in backward), and a LoRA edit loaded over
    switched-off layers reported success with the images unchanged; edits without a LoRA still apply."""
    mine = fasterase.erase("toy-sd", "square", method="esd", progress=False, **FAST_ESD).edit.save(tmp_path / "m")
    circle = fasterase.erase("toy-sd", "circle", method="esd", progress=False, **FAST_ESD).edit.save(tmp_path / "c")
    uce = fasterase.erase("toy-sd", "circle", method="uce", progress=False).edit.save(tmp_path / "u")
    pipe = models.load("toy-sd").pipeline
    pipe.load_lora_weights(str(mine), adapter_name="mine")
    pipe.disable_lora()
    before = state(pipe)
    with pytest.raises(UserError, match=r"LoRA layers are switched off \(disable_lora\(\)\)"):
        fasterase.erase(pipe, "circle", method="esd", progress=False, **FAST_ESD)
    with pytest.raises(UserError, match="switched off"):
        fasterase.load(pipe, circle)
    assert same(state(pipe), before) and pipe.unet.active_adapters() == ["mine"]
    fasterase.erase(pipe, "circle", method="uce", progress=False, copy=True)
    fasterase.load(pipe, uce)


def test_a_lora_edit_loaded_by_diffusers_is_not_applied_again(tmp_path):
    """The check knew only the adapter name fasterase gives: load_lora_weights' default_0 was let through
    and the edit acted twice."""
    path = fasterase.erase("toy-sd", "circle", method="esd", progress=False, **FAST_ESD).edit.save(tmp_path / "e")
    pipe = models.load("toy-sd").pipeline
    pipe.load_lora_weights(str(path))
    with pytest.raises(UserError, match="already applied to the model \\(LoRA adapter 'default_0' holds"):
        fasterase.load(pipe, path)
    assert pipe.unet.active_adapters() == ["default_0"]
    edit = Edit.load(path)
    edit.save(tmp_path / "with-pipeline", pipeline=pipe)  # the pipeline carries it, loaded by diffusers
    with pytest.raises(UserError, match="as adapter 'default_0', which fasterase did not add.*delete_adapters"):
        edit.remove(pipe)
    other = fasterase.erase("toy-sd", "square", method="esd", progress=False, **FAST_ESD).edit.save(tmp_path / "o")
    pipe.load_lora_weights(str(other), adapter_name="other")
    pipe.set_adapters(["other"])  # default_0 inactive: it does not act, so the edit may be applied
    fasterase.load(pipe, path)


def test_a_failed_apply_keeps_an_equal_edits_record(tmp_path, monkeypatch):
    """The rollback of a failed apply removed the record of another edit of the same method, concepts and
    weights (a second ESD of the same concept), which save(pipeline=) then found missing."""
    first = fasterase.erase("toy-sd", "circle", method="esd", progress=False, **FAST_ESD)
    second = fasterase.erase("toy-sd", "circle", method="esd", progress=False, **{**FAST_ESD, "seed": 1}).edit

    def fail(*args, **kwargs):
        raise RuntimeError("the load failed")

    monkeypatch.setattr(type(first.pipeline), "load_lora_weights", fail)
    with pytest.raises(RuntimeError, match="the load failed"):
        second.apply(first.pipeline)
    assert len(applied_edits(first.model.network)) == 1


def test_entries_over_a_carried_lora_are_base_weights_by_their_plain_names(tmp_path):
    """ANT over an ESD edit selected the ESD adapter's factors and the wrapped layers' base_layer names: it
    trained the other edit, and its own loaded only onto a model carrying that adapter."""
    esd = fasterase.erase("toy-sd", "circle", method="esd", progress=False, **FAST_ESD)
    adapter = {n: p.detach().clone() for n, p in esd.model.network.named_parameters() if ".lora_" in n}
    ant = fasterase.erase(esd.pipeline, "square", method="ant", progress=False,
                          **{**FAST_ESD, "saliency_prompts": 1, "saliency_seeds": 1}).edit
    assert ant.entries and not [n for n in ant.entries if ".lora_" in n or "base_layer" in n]
    assert any(n.replace(".base_layer.", ".") != n and ".lora_" not in n
               for n, _ in esd.model.network.named_parameters())  # the wrapped layers were candidates too
    assert all(torch.equal(p, adapter[n]) for n, p in esd.model.network.named_parameters() if ".lora_" in n)
    base = models.load("toy-sd")
    fasterase.load(base.pipeline, ant.save(tmp_path / "ant"))  # onto the model without the ESD edit


def test_edits_take_pipelines_in_memory_and_refuse_names(tmp_path):
    result = fasterase.erase("toy-sd", "circle", method="uce", progress=False)
    result.edit.remove(result.pipeline)
    assert same(state(result.pipeline), state("toy-sd"))
    result.edit.apply(result.pipeline)
    with pytest.raises(UserError, match="applies to a pipeline in memory, not to 'toy-sd'; fasterase.load"):
        result.edit.apply("toy-sd")
    with pytest.raises(UserError, match="does not carry this edit"):
        result.edit.save(tmp_path / "e", pipeline=models.load("toy-sd").pipeline)
    assert not (tmp_path / "e").exists()


def test_edit_folders_are_paths_with_the_user_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    edit = fasterase.erase("toy-sd", "circle", method="uce", progress=False).edit
    edit.save("~/e")
    assert fasterase.load("toy-sd", "~/e") is not None
    with pytest.raises(UserError, match="is an edit's file; give its folder"):
        fasterase.load("toy-sd", tmp_path / "e" / "edit.safetensors")
    with pytest.raises(UserError, match="loaded from its folder .a path., got NoneType"):
        fasterase.load("toy-sd", None)


def test_an_edit_folder_with_a_users_files_in_it_is_named_as_such(tmp_path):
    """It said "holds no fasterase edit" of a folder that holds one, beside a user's notes."""
    edit = fasterase.erase("toy-sd", "circle", method="uce", progress=False).edit
    path = edit.save(tmp_path / "e")
    (path / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(UserError, match=r"holds an edit and other files \(notes.txt\), which are never removed"):
            edit.save(path, overwrite=overwrite)
    assert (path / "notes.txt").read_text() == "keep me"


def test_a_refused_load_leaves_a_pipeline_in_memory_in_its_dtype(tmp_path):
    """The pipeline was cast to the dtype asked for, then the edit refused: it stayed cast."""
    uce = fasterase.erase("toy-sd", "circle", method="uce", progress=False).edit.save(tmp_path / "u")
    pipe = models.load("toy-sd").pipeline
    with pytest.raises(UserError, match="made on the model in float32 .* here they were checked in bfloat16"):
        fasterase.load(pipe, uce, dtype="bf16")
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.float32
    with torch.no_grad():
        pipe.unet.get_parameter(Edit.load(uce).touched()[0]).add_(1.0)  # another base model
    with pytest.raises(UserError, match="different base model"):
        fasterase.load(pipe, uce, dtype="fp32")
    assert fasterase.load(models.load("toy-sd").pipeline, uce, dtype="fp32").unet.dtype == torch.float32


def test_removing_one_of_two_equal_stacked_edits_keeps_the_other_recorded():
    model = models.load("toy-sd")
    fasterase.erase(model, "circle", method="uce", progress=False)
    second = fasterase.erase(model, "circle", method="uce", progress=False).edit
    second.remove(model)
    assert len(applied_edits(model.network)) == 1


def test_a_full_disk_is_named_when_an_edit_is_saved(tmp_path, monkeypatch):
    from fasterase import edit as edit_module

    edit = fasterase.erase("toy-sd", "circle", method="uce", progress=False).edit

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(edit_module, "save_file", full)
    with pytest.raises(UserError, match=f"edit {tmp_path / 'e'}: could not be written in {tmp_path}, the disk has no"):
        edit.save(tmp_path / "e")
    assert list(tmp_path.iterdir()) == []


def _rewrite_lora(path, change):
    from safetensors.torch import load_file, save_file

    file = path / "pytorch_lora_weights.safetensors"
    lora = load_file(str(file))
    change(lora)
    save_file(lora, str(file))


KEY_A = "unet.conv_in.lora_A.weight"


@pytest.mark.parametrize("damage, needle", [
    (lambda lora: lora.update({KEY_A: lora[KEY_A][:-1].clone()}), "unet.conv_in.lora_[AB].weight has no factor of its rank"),
    (lambda lora: lora.pop(KEY_A.replace("lora_A", "lora_B")), "unet.conv_in.lora_A.weight has no factor of its rank"),
    (lambda lora: lora.update({KEY_A: lora[KEY_A].flatten()}), "unet.conv_in.lora_[AB].weight has no factor of its rank"),
    (lambda lora: lora.update({"unet.conv_in.alpha": torch.ones(1)}), "unet.conv_in.alpha is neither a lora_A nor"),
])
def test_lora_factors_that_do_not_pair_are_named(tmp_path, damage, needle):
    """A lora_A of another rank than its lora_B was peft's size-mismatch traceback (exit 1)."""
    path = fasterase.erase("toy-sd", "circle", method="esd", progress=False, **FAST_ESD).edit.save(tmp_path / "e")
    _rewrite_lora(path, damage)
    with pytest.raises(UserError, match=f"pytorch_lora_weights.safetensors is damaged: {needle}"):
        Edit.load(path)


@pytest.mark.parametrize("factor, shape, want", [("A", "(4, 5, 3, 3)", "(4, 4, 3, 3)"),
                                                  ("B", "(33, 4, 1, 1)", "(32, 4, 1, 1)")])
def test_a_lora_factor_that_does_not_fit_the_model_is_named_before_anything_changes(tmp_path, factor, shape, want):
    """conv_in is (32, 4, 3, 3): A (r, 4, 3, 3) given one more input channel, or B (32, r, 1, 1) one more output."""
    path = fasterase.erase("toy-sd", "circle", method="esd", progress=False, **FAST_ESD).edit.save(tmp_path / "e")
    key = f"unet.conv_in.lora_{factor}.weight"
    dim = 1 if factor == "A" else 0
    _rewrite_lora(path, lambda lora: lora.update({key: torch.cat([lora[key], lora[key].narrow(dim, 0, 1)], dim)}))
    model = models.load("toy-sd")
    before = state(model)
    with pytest.raises(UserError, match=rf"LoRA factor '{key}' has shape {re.escape(shape)}, which does not fit the "
                                        rf"model's \(32, 4, 3, 3\) weight \(a LoRA factor of it is {re.escape(want)}"):
        fasterase.load(model, path)
    assert same(state(model), before) and not getattr(model.network, "peft_config", {})


def test_an_edit_given_as_the_model_and_a_model_given_as_the_edit_are_named(capsys, tmp_path, model_folder):
    result = fasterase.erase("toy-sd", "circle", method="uce", progress=False)
    path = result.edit.save(tmp_path / "e", pipeline=result.model)
    assert main(["eval", "--model", str(path)]) == 2
    assert (f"it is a fasterase edit folder, which --edit / fasterase.load(model, edit) takes, and its edited "
            f"pipeline is the model folder {path / 'pipeline'}") in capsys.readouterr().err
    assert main(["eval", "--edit", str(model_folder)]) == 2
    assert (f"{model_folder} is not a fasterase edit (no edit.safetensors in it); it is a diffusers model folder, "
            "which --model / the model argument takes") in capsys.readouterr().err
    with pytest.raises(UserError, match="edit folder .*nothing: no such folder"):
        Edit.load(tmp_path / "nothing")


def test_a_trace_edit_whose_lora_alone_diffusers_loaded_is_named_as_half_applied(tmp_path):
    """It was called "already applied" while its refined weights were not on the model."""
    result = fasterase.erase("toy-sd", "circle", method="trace", progress=False, steps=2, batch_size=1, rollouts=2,
                             sample_steps=4, t0=0.6, scorer="none")
    path = result.edit.save(tmp_path / "e")
    pipe = models.load("toy-sd").pipeline
    pipe.load_lora_weights(str(path))
    with pytest.raises(UserError, match=r"LoRA is on the model \(adapter 'default_0'\) but the weights it also "
                                        r"changes \(edit.safetensors\) are not"):
        fasterase.load(pipe, path)
    after = fasterase.erase(result.model, "square", method="uce", progress=False)  # changes the refined weights
    with pytest.raises(UserError, match="already applied"):  # the edit is whole on it: not half-applied
        result.edit.apply(after.model)
    whole = models.load("toy-sd").pipeline  # the README's order: the refined weights, then the LoRA
    from safetensors.torch import load_file

    whole.unet.load_state_dict(load_file(str(path / "edit.safetensors")), strict=False)
    whole.load_lora_weights(str(path))
    with pytest.raises(UserError, match="already applied"):
        fasterase.load(whole, path)


def test_a_folder_saved_with_a_lora_still_loaded_is_refused_before_it_loads(tmp_path):
    """diffusers left the wrapped layers' own weights on the meta device: a traceback (exit 1)."""
    path = fasterase.erase("toy-sd", "circle", method="esd", progress=False, **FAST_ESD).edit.save(tmp_path / "e")
    pipe = models.load("toy-sd").pipeline
    pipe.load_lora_weights(str(path))
    pipe.save_pretrained(tmp_path / "saved")
    with pytest.raises(UserError, match=r"unet/diffusion_pytorch_model.safetensors holds LoRA-wrapped layers "
                                        r"\('conv_in.base_layer.bias' and \d+ more\).*pipe.fuse_lora\(\)"):
        models.load(str(tmp_path / "saved"))


def test_the_hidden_folder_a_killed_save_leaves_is_named(capsys, tmp_path, model_folder, monkeypatch):
    """A folder that looked empty (`ls`) was refused as holding no edit, naming nothing."""
    monkeypatch.setattr(fasterase, "erase", lambda *a, **k: pytest.fail("trained before checking --out"))
    out = tmp_path / "k"
    (out / ".k.i3hbddbt").mkdir(parents=True)  # save() fills an empty folder through one like it
    for extra in [(), ("--overwrite",)]:
        code, err = erase_cli(capsys, model_folder, out, *extra)
        assert code == 2 and ("holds no fasterase edit (it holds .k.i3hbddbt); .k.i3hbddbt is what a save that was "
                              "killed leaves: remove it, and the folder is empty again; choose") in err, err
    (out / "notes.txt").write_text("keep me")
    code, err = erase_cli(capsys, model_folder, out)
    assert code == 2 and ("(it holds .k.i3hbddbt, notes.txt); .k.i3hbddbt is what a save that was killed leaves: "
                          "remove it; choose") in err, err
    assert files(out) == [".k.i3hbddbt", "notes.txt"]
    lora_only = tmp_path / "lora"  # a LoRA that diffusers saved, no edit: the message named nothing it holds
    lora_only.mkdir()
    (lora_only / "pytorch_lora_weights.safetensors").write_bytes(b"")
    code, err = erase_cli(capsys, model_folder, lora_only)
    assert code == 2 and "holds no fasterase edit (it holds pytorch_lora_weights.safetensors); choose" in err, err


def test_adding_an_edit_beside_a_lora_edit_warns_nothing():
    """peft warned that a second adapter is unusual, in training and in apply."""
    first = fasterase.erase("toy-sd", "circle", method="esd", progress=False, **FAST_ESD)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fasterase.erase(first.model, "square", method="esd", progress=False, **FAST_ESD)
