"""fasterase plan (fasterase/plan.py): the breakdown on the real configs, option errors, the meta-device
measurement, and the plan against the memory the methods really take on the toy pipelines.

Run as a script, this file is that measurement (one method on one toy model, in a fresh process):
    python tests/test_plan.py MODEL METHOD RESOLUTION OPTIONS_JSON
prints {"delta_bytes": ..., "share": ...}; see test_plan_matches_the_measured_peak.
"""
import ctypes
import dataclasses
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from fasterase import plan as planner
from fasterase.cli import main
from fasterase.errors import UserError
from fasterase.methods import esd
from fasterase.models import meta

ROOT = Path(__file__).resolve().parents[1]
FLUX_DEV_PARAMETERS = 11_901_408_320  # tests/test_real_size.py: the published count


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def check_sums(report: dict) -> None:
    """Each column's parts add up to its total, and the peak is the largest total."""
    for column in report["columns"].values():
        assert sum(column["lines"].values()) == column["total"]
    peak = max(report["columns"], key=lambda c: report["columns"][c]["total"])
    assert report["peak"] == {"column": peak, "bytes": report["columns"][peak]["total"]}
    assert report["left_bytes"] == int(report["gpu_mem_gb"] * 1e9) - report["peak"]["bytes"]
    assert report["fits"] == (report["left_bytes"] >= 0)


@pytest.fixture(scope="module")
def flux_ant():
    # planned for a GPU it fits, then read at 80 GB: a plan that does not fit searches suggestions, each
    # a whole plan again (micro-batches of FLUX.1-dev's passes take minutes on a CI core); the toy tests
    # below cover the search
    return dataclasses.replace(planner.plan("flux-dev", "ant", resolution=512, gpu_mem=10_000), gpu_mem=80)


def test_flux_dev_ant_breakdown(flux_ant):
    """`fasterase plan --model flux-dev --method ant --gpu-mem 80`: the saliency score in bf16 (one value a
    parameter) and one layer's gradient at a time; training holds the compact deltas (10 bytes a selected
    entry), their fp32 gradients and one layer's whole gradient; the text encoders only while encoding. At
    4 prompts a step the activations do not fit; gradient checkpointing does (512 px here: the planner's meta passes at 1024 px take minutes on a CI core)."""
    report = flux_ant.to_json()
    check_sums(report)
    columns = report["columns"]
    saliency, step = columns["saliency"]["lines"], columns["step"]["lines"]
    largest = max(p.numel() for p in planner._Planner("flux-dev", meta.describe("flux-dev"), "bf16", 512)
                  .den.network.parameters())
    assert saliency["transformer weights"] == 2 * FLUX_DEV_PARAMETERS
    assert saliency["saliency sums"] == 2 * FLUX_DEV_PARAMETERS
    assert saliency["gradients"] == largest * (2 + 8)
    selected = step["trainable state"] // 10
    assert abs(selected - planner.ANT_SHARE * FLUX_DEV_PARAMETERS) < 1e-3 * FLUX_DEV_PARAMETERS
    assert step["gradients"] == 4 * selected + largest * (2 + 4)
    assert "text encoders" not in saliency and "text encoders" not in step
    assert columns["encoding"]["lines"]["text encoders"] > 9e9  # T5-XXL and CLIP-L in bf16
    assert (report["height"], report["width"], report["config"]["batch_size"]) == (512, 512, 4)
    assert not flux_ant.fits
    table = flux_ant.table()
    assert table.startswith("ant on flux-dev at 512x512 px, concept type object, 4 prompts a step, bf16, 1 GPU of 80 GB")
    for part in list(saliency) + list(step) + ["total", "with --gradient-checkpointing"]:
        assert f"\n{part} " in table
    peak = report["peak"]["bytes"]
    assert f"does not fit: {report['peak']['column']} needs {peak / 1e9:.2f} GB, {(peak - 80e9) / 1e9:.2f} GB over" \
           in table
    # the "with --gradient-checkpointing" row fits (that it is the checkpointed plan's peak: toy-sd, below)
    assert max(flux_ant.checkpointed_total(c) or flux_ant.columns[c].total for c in columns) <= 80e9


def test_concept_type_plans_the_methods_per_type_choices():
    """ESD trains esd-x for a style (the cross-attention projections alone): fewer trainable entries."""
    style = planner.plan("sd15", "esd", resolution=64, concept_type="style")
    plain = planner.plan("sd15", "esd", resolution=64)
    assert style.concept_type == "style" and "concept type style" in style.table().splitlines()[0]
    assert style.columns["step"].lines["trainable state"] < plain.columns["step"].lines["trainable state"]
    assert planner.plan("toy-sd", "esd", concept_type="style").to_json()["concept_type"] == "style"
    with pytest.raises(UserError, match="toy world's concepts are objects .* not 'nudity'"):
        planner.plan("toy-sd", "esd", concept_type="nudity")


def test_flux_dev_uce_fits():
    result = planner.plan("flux-dev", "uce", gpu_mem=80)
    check_sums(result.to_json())
    assert result.fits and f"fits in 80 GB with {80 - result.peak[1] / 1e9:.2f} GB left" in result.table()
    # it runs no image: no size is stated (erase refuses one)
    assert (result.height, result.width) == (None, None) and " px" not in result.table().splitlines()[0]
    solves = result.notes["closed form"].split(" solve")[0].split()[-1]
    assert f" in {solves} solve{'s' if solves != '1' else ''}:" in result.table()


def test_cli_plan_table_and_json(capsys):
    code, out, err = run(capsys, "plan", "--model", "toy-sd", "--method", "esd", "--json")
    assert code == 0
    report = json.loads(out)
    check_sums(report)
    assert set(report["columns"]) == {"encoding", "step"} and report["method"] == "esd"
    code, out, err = run(capsys, "plan", "--model", "toy-sd", "--method", "esd", "--batch-size", "2")
    assert code == 0
    assert out.startswith("esd on toy-sd at 32x48 px, concept type object, 2 prompts a step, fp32, 1 GPU of 80 GB")
    assert "fits in 80 GB" in out


@pytest.mark.parametrize("argv,needles", [
    (["--method", "nope"], ["unknown method", "uce"]),
    (["--method", "esd", "--set", "gamma=1"], ["unknown option", "batch_size"]),
    (["--method", "esd", "--set", "steps=abc"], ["steps", "an integer", "abc"]),
    (["--method", "esd", "--set", "batch_size=0"], ["batch_size must be >= 1"]),
    (["--method", "ant", "--set", "rank=8"], ["cannot use", "rank", "one concept"]),
    (["--method", "uce", "--set", "text_kv=true"], ["cannot use", "text_kv", "SD model"]),
    (["--method", "uce", "--batch-size", "2"], ["no training steps", "esd, ant, fade, trace"]),
    (["--method", "uce", "--gradient-checkpointing"], ["cannot use", "gradient_checkpointing", "no image"]),
    (["--method", "esd", "--batch-size", "2", "--set", "batch_size=3"], ["disagree"]),
    (["--method", "esd", "--batch-size", "x"], ["--batch-size", "invalid int"]),
    (["--method", "esd", "--dtype", "int8"], ["unknown dtype", "bf16, fp16, fp32"]),
    (["--method", "esd", "--resolution", "30"], ["multiples of 8"]),
    (["--method", "esd", "--gpus", "0"], ["--gpus", "from 1"]),
    (["--method", "esd", "--gpu-mem", "-1"], ["--gpu-mem", "positive"]),
    (["--method", "esd", "--micro-batch", "0"], ["--micro-batch", "whole number"]),
    (["--method", "esd", "--salient-share", "0.1"], ["ANT's", "esd trains no saliency map"]),
    (["--method", "fade", "--salient-share", "0.1"], ["saliency_share"]),
    (["--method", "ant", "--salient-share", "2"], ["(0, 1]"]),
    (["--method", "ant", "--salient-share", "0.1", "--set", "saliency=false"], ["saliency=false"]),
])
def test_user_errors(capsys, argv, needles):
    code, out, err = run(capsys, "plan", "--model", "toy-sd", *argv)
    assert code == 2 and not out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith("fasterase")
    for n in needles:
        assert n in lines[0]


def test_unknown_model_is_one_line(capsys):
    code, out, err = run(capsys, "plan", "--model", "no/such/folder", "--method", "uce")
    assert code == 2 and "neither a built-in name, nor one of sd15, flux-dev" in err


def test_cli_gradient_checkpointing(capsys):
    """--gradient-checkpointing plans the activations measured with diffusers' checkpointing on: what the
    plan without it shows as its hint row."""
    _, out, _ = run(capsys, "plan", "--model", "toy-sd", "--method", "esd", "--resolution", "128", "--json")
    plain = json.loads(out)
    _, out, _ = run(capsys, "plan", "--model", "toy-sd", "--method", "esd", "--resolution", "128", "--json",
                    "--gradient-checkpointing")
    checkpointed = json.loads(out)
    assert (plain["gradient_checkpointing"], checkpointed["gradient_checkpointing"]) == (False, True)
    step, step_gc = plain["columns"]["step"], checkpointed["columns"]["step"]
    assert step_gc["lines"]["activations"] == step["checkpointed_activations"] < step["lines"]["activations"]
    assert step_gc["checkpointed_activations"] is None and step_gc["total"] == step["total_with_checkpointing"]


def test_micro_batch_cuts_every_pass():
    """--micro-batch runs every call in chunks on meta, as Denoiser.predict does: TRACE's scorer rollouts
    (no graph) and its step (graphs, recomputed a chunk at a time) need less (a plan that does not fit
    suggesting it: test_a_suggestion_makes_it_fit). (Fewer D rows than the default: each chunk is a whole
    network call on meta.)"""
    options = {"d_batch": 8, "batch_size": 8}
    whole = planner.plan("toy-sd", "trace", options, resolution=128)
    split = planner.plan("toy-sd", "trace", options, resolution=128, micro_batch=4)
    assert split.to_json()["micro_batch"] == 4 and "micro-batch 4" in split.table().splitlines()[0]
    assert split.columns["scorer"].lines["activations"] < whole.columns["scorer"].lines["activations"] / 4
    assert split.columns["step"].lines["activations"] < whole.columns["step"].lines["activations"] / 2


@pytest.mark.parametrize("guided,grad,prompts", [(True, False, (7, 9)), (False, True, (13, 15))])
def test_a_call_in_many_chunks_is_its_line_through_two_and_four(guided, grad, prompts, monkeypatch):
    """A call cut into more than EXTRAPOLATE_AFTER chunks is extended from 2 and 4 chunks: equal to
    measuring every chunk when they are whole, at most 0.5% above when the last one is short."""
    meter = planner._Planner("toy-sd", meta.describe("toy-sd"), "fp32", 48).every_entry()
    calls = [planner.Pass(rows, guided=guided, grad=grad) for rows in prompts]  # toy-sd's guided: 2 rows each
    assert all(meter._rows(call) > planner.EXTRAPOLATE_AFTER * 3 for call in calls)
    extended = [meter.measure(call, micro_batch=3) for call in calls]
    meter._cache.clear()
    monkeypatch.setattr(planner, "EXTRAPOLATE_AFTER", 100)
    measured = [meter.measure(call, micro_batch=3) for call in calls]
    for call, (kept, peak), (kept_m, peak_m) in zip(calls, extended, measured):
        assert kept == kept_m and peak_m > 0
        assert peak == peak_m if meter._rows(call) % 3 == 0 else peak_m <= peak <= 1.005 * peak_m


@pytest.mark.parametrize("model", ["toy-sd", "toy-flux", "sd15"])
@pytest.mark.parametrize("method", ["uce", "esd", "ant", "fade", "trace"])
def test_every_method_on_every_model(model, method):
    report = planner.plan(model, method, batch_size=None if method == "uce" else 1).to_json()
    check_sums(report)
    assert all(v >= 0 for c in report["columns"].values() for v in c["lines"].values())


def test_gpus_run_the_methods_under_zero_splitting_the_optimizer_states_and_the_rows():
    """--gpus 2 plans ZeRO-2 (training.engine): every GPU runs half of each call's rows (models/shared_rows.py)
    with the whole values and gradients; the 8-bit states over half the entries and DeepSpeed's buffers
    are added."""
    one = planner.plan("toy-sd", "esd", resolution=64)
    two = planner.plan("toy-sd", "esd", resolution=64, gpus=2)
    three = planner.plan("toy-sd", "esd", {"zero": 3}, resolution=64, gpus=2)
    assert two.config["zero"] == 2 and three.config["zero"] == 3
    lora = planner._Planner("toy-sd", planner.meta.describe("toy-sd"), "fp32", 64).lora(
        lambda den: esd.parameter_modules(den.network, den.kind, "esd-u"), 4, 0)
    k = sum(p.numel() for p in lora.trainable)
    half = -(-k // 2)
    a, b, c = (plan.columns["step"].lines for plan in (one, two, three))
    for part in ("trainable state", "gradients"):
        assert a[part] == b[part] == c[part]
    rows = one.config["batch_size"]
    calls = [planner.Pass(rows, guided=True), planner.Pass(2 * rows), planner.Pass(rows, grad=True)]
    shared = [lora.shared(call, 2) for call in calls]
    assert [call.rows for call in shared] == [rows, rows, rows // 2] and not any(call.guided for call in shared)
    assert b["activations"] == c["activations"] == lora.activations(shared) < a["activations"]
    odd = lora.shared(planner.Pass(3, grad=True), 2)  # odd rows: a block of 2 each, the other's 2 received
    assert odd.rows == 2 and odd.extra == 2 * math.prod(lora.latent) * 4
    assert b["optimizer states"] == 2 * half + 8 * -(-half // 256) + 4 < a["optimizer states"] == 8 * k
    assert b["ZeRO buffers"] == 8 * half + 4 * k and c["ZeRO buffers"] == b["ZeRO buffers"] + 4 * half + 4 * k
    assert "DeepSpeed ZeRO-2" in two.table() and "ZeRO buffers" not in a
    with pytest.raises(UserError, match="zero=0 is one process"):
        planner.plan("toy-sd", "esd", {"zero": 0}, resolution=64, gpus=2)


def test_zero3_partitions_the_network_for_the_whole_run():
    """Under ZeRO-3 every column holds a 1/gpus slice of every parameter, the small ones also whole, and
    while the network runs at most DeepSpeed's live limit gathered (training.engine.partitioned); the
    encoding none gathered; ZeRO-2 leaves it whole."""
    three = planner.plan("toy-sd", "ant", {"zero": 3}, resolution=64, gpus=2)
    two = planner.plan("toy-sd", "ant", resolution=64, gpus=2)
    name = "unet weights"
    whole = two.columns["step"].lines[name]
    assert two.columns["saliency"].lines[name] == two.columns["encoding"].lines[name] == whole
    p = planner._Planner("toy-sd", planner.meta.describe("toy-sd"), "fp32", 64)
    small = sum(n for n in p.entries if n <= planner.ZERO3_PERSISTENCE_THRESHOLD)
    slices = sum(-(-n // 2) for n in p.entries)
    gathered = min(sum(p.entries) - small, planner.ZERO3_LIVE_PARAMETERS)
    held = whole + 4 * (slices + small - sum(p.entries))
    assert three.columns["step"].lines[name] == three.columns["saliency"].lines[name] == held + 4 * gathered
    assert three.columns["encoding"].lines[name] == held
    assert "ZeRO-3 over 2 GPUs for the whole run: a 1/2 slice" in three.notes[name]


def test_zero3_saves_most_of_flux_weights_on_eight_gpus():
    p = planner._Planner("flux-dev", planner.meta.describe("flux-dev"), "bf16", 256)
    lines, notes = p.resident(1)
    name = "transformer weights"
    assert p.partitioned(lines, notes, 8, 2) is lines
    eight = p.partitioned(lines, notes, 8, 3)[name]
    assert lines[name] / 8 < eight < lines[name] / 8 + 2 * planner.ZERO3_LIVE_PARAMETERS + 0.01 * lines[name]
    assert lines[name] / 8 <= p.network_bytes(8, 3, passes=False) < lines[name] / 8 + 0.01 * lines[name]


def test_a_suggestion_makes_it_fit(capsys, monkeypatch):
    """A plan that does not fit as asked is planned again with erase's memory options (the same result):
    the largest micro-batch that fits, else gradient checkpointing, else both; the table shows that plan
    under the verdict as asked. Each suggested change of the method's options, planned with it, fits; the
    suggestion says its peak. The progress bar counts the plans the search made."""
    base = planner.plan("toy-sd", "esd", resolution=128)
    limit = (base.peak[1] - 0.4 * base.columns["step"].lines["activations"]) / 1e9
    made = []
    monkeypatch.setattr(planner, "_plan", lambda *a, _plan=planner._plan: made.append(1) or _plan(*a))
    capsys.readouterr()
    result = planner.plan("toy-sd", "esd", resolution=128, gpu_mem=limit, progress=True)
    bar = capsys.readouterr().err.split("\r")
    assert bar[1].startswith("planning esd on toy-sd: 0 plans")
    assert any(b.startswith(f"planning esd on toy-sd, searching options that fit: {len(made)} plans") for b in bar)
    assert len(made) > 2 and not result.fits
    fitted = result.fitted
    assert fitted.fits and fitted.micro_batch == 2 and not fitted.gradient_checkpointing  # 4 rows a pass
    assert fitted.to_json() == planner.plan("toy-sd", "esd", resolution=128, gpu_mem=limit, micro_batch=2).to_json()
    table = result.table()
    peak = result.peak[1]
    assert table.startswith(f"does not fit as asked: step needs {peak / 1e9:.2f} GB, {(peak - limit * 1e9) / 1e9:.2f} "
                            f"GB over {limit:g} GB; with --micro-batch 2 (erase's memory options")
    assert fitted.table() in table
    report = result.to_json()
    assert report["fitted_options"] == "--micro-batch 2" and report["fitted"] == fitted.to_json()
    suggested = dict(result.suggestions)
    assert "--set batch_size=2" in suggested
    fixed = planner.plan("toy-sd", "esd", {"batch_size": 2}, resolution=128, gpu_mem=limit)
    assert fixed.fits and fixed.peak[1] == suggested["--set batch_size=2"]
    assert f"or, changing the method's options or the dtype: --set batch_size=2 ({fixed.peak[1] / 1e9:.2f} GB)" in table


@pytest.mark.parametrize("fitting,chosen", [
    ({(False, 1), (False, 2), (False, 4)}, (False, 4)),  # the largest micro-batch that fits
    ({(True, None), (True, 1), (True, 2)}, (True, None)),  # no micro-batch fits: checkpointing alone
    ({(True, 1), (True, 2)}, (True, 2)),  # nor checkpointing alone: both, the largest micro-batch with it
    (set(), None),
])
def test_memory_options_order(fitting, chosen, monkeypatch):
    """The memory options tried when a plan does not fit (plan._memory_fit): micro-batches from 16 rows down,
    gradient checkpointing, then both; one row not fitting ends a micro-batch search (peaks only fall with
    chunks)."""
    tried = []

    def with_memory(p, m, cfg, result, share, checkpointing, micro_batch):
        tried.append((checkpointing, micro_batch))
        return dataclasses.replace(result, gradient_checkpointing=checkpointing, micro_batch=micro_batch,
                                   columns={"step": planner.Column({"activations": 1 if (checkpointing, micro_batch)
                                                                                   in fitting else 10 ** 12})})

    monkeypatch.setattr(planner, "_with_memory", with_memory)
    asked = planner.Plan("toy-sd", "esd", {}, 32, 48, "fp32", 1, 1e-6, False, None, {}, {})
    p = type("P", (), {"checkpointing": False, "micro_batch": None})()
    fitted = planner._memory_fit(p, None, None, asked, 0.15)
    assert (fitted and (fitted.gradient_checkpointing, fitted.micro_batch)) == chosen
    assert tried[0] == (False, 1)  # the one-row plan first
    if (False, 1) not in fitting:
        assert not any(c is False and r not in (1, None) for c, r in tried)


def test_checkpointing_with_a_smaller_option_when_no_single_one_fits(monkeypatch):
    """When no single option fits and no memory option either, gradient checkpointing together with each
    smaller option is tried; when a memory option fits, not (the fitted plan is the answer)."""
    def peak(**kw):
        return planner.plan("toy-sd", "esd", resolution=128, **kw).peak[1]

    both = peak(batch_size=1, gradient_checkpointing=True)
    alone = min(peak(batch_size=1), peak(gradient_checkpointing=True))
    assert both < alone
    limit = (both + alone) / 2 / 1e9
    monkeypatch.setattr(planner, "_memory_fit", lambda *args: None)  # as when no memory option fits
    result = planner.plan("toy-sd", "esd", resolution=128, gpu_mem=limit)
    assert result.suggestions == [("--gradient-checkpointing --set batch_size=1", both)]
    assert "erase's memory options alone do not make it fit; try --gradient-checkpointing --set batch_size=1" \
        in result.table()
    fitted = dataclasses.replace(result, gpu_mem=1e4, suggestions=[])  # a stand-in for a memory option that fits
    monkeypatch.setattr(planner, "_memory_fit", lambda *args: fitted)
    result = planner.plan("toy-sd", "esd", resolution=128, gpu_mem=limit)
    assert result.fitted is fitted and result.suggestions == []


def test_a_folder_plans_like_its_name(tmp_path):
    """--model DIR reads the folder's configs: a saved toy-sd plans as toy-sd does, and by default in
    the dtype erase would load each in (the toy pipeline's fp32, the folder's stored dtype)."""
    from fasterase import models

    pipe = models.load("toy-sd").pipeline
    pipe.save_pretrained(tmp_path / "toy")
    by_name = planner.plan("toy-sd", "esd", resolution=64).to_json()
    by_folder = planner.plan(str(tmp_path / "toy"), "esd", resolution=64).to_json()
    assert by_folder["columns"] == by_name["columns"] and by_name["dtype"] == "fp32"
    pipe.to(torch.bfloat16).save_pretrained(tmp_path / "toy-bf16")
    stored = planner.plan(str(tmp_path / "toy-bf16"), "esd", resolution=64).to_json()
    assert stored["dtype"] == "bf16"
    assert stored["columns"] == planner.plan("toy-sd", "esd", resolution=64, dtype="bf16").to_json()["columns"]
    assert planner.plan("sd15", "esd", resolution=64).to_json()["dtype"] == "bf16"  # configs: no stored dtype
    for weights in (tmp_path / "toy-bf16" / "unet").glob("*.safetensors"):  # configs alone plan with a --dtype
        weights.unlink()
    with pytest.raises(UserError, match="has no weights for its unet"):
        planner.plan(str(tmp_path / "toy-bf16"), "esd", resolution=64)
    assert planner.plan(str(tmp_path / "toy-bf16"), "esd", resolution=64, dtype="bf16").to_json()["columns"] == \
        stored["columns"]


@pytest.mark.parametrize("model", ["toy-sd", "toy-flux"])
def test_kept_bytes_are_the_saved_tensors(model):
    """A call's kept bytes (live after its forward) are the tensors autograd saved for backward
    (saved_tensors_hooks, by storage, parameters left out), plus the call's inputs and output."""
    p = planner._Planner(model, meta.describe(model), "fp32", 64)
    meter = p.every_entry()
    kept, peak = meter.measure(planner.Pass(4, grad=True))
    den = meter.den
    parameters = {t.untyped_storage()._cdata for t in den.network.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage()._cdata not in parameters:
            saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with planner._fused_attention(), saved_tensors_hooks(pack, lambda t: t):
        x = torch.empty(4, *meter.latent, device="meta")
        cond = den.encode([planner.PROMPT] * 4)
        out = den.predict(x, torch.full((4,), 0.5), cond)
    io = sum(t.numel() * 4 for t in (x, cond.embeds, out) + ((cond.pooled,) if cond.pooled is not None else ()))
    assert sum(saved.values()) <= kept <= sum(saved.values()) + io <= peak + io


def test_checkpointing_recomputes_on_meta():
    """With diffusers' gradient checkpointing the backward recomputes each block on meta: far less is kept
    after the forward, and the backward still runs."""
    p = planner._Planner("toy-sd", meta.describe("toy-sd"), "fp32", 64)
    meter = p.every_entry()
    kept, peak = meter.measure(planner.Pass(4, grad=True))
    kept_gc, peak_gc = meter.measure(planner.Pass(4, grad=True), checkpointing=True)
    assert kept_gc < kept / 2 and kept_gc < peak_gc < peak


def _measure(model: str, method: str, resolution: int, options: dict, micro_batch: int | None = None) -> dict:
    """Peak RSS of `method` run on `model` at resolution x resolution px, beyond the RSS just before it
    starts (model loaded, a warm-up run at the model's own size done, freed heap returned): VmHWM after
    resetting it (/proc/self/clear_refs), minus VmRSS then. With share: ANT's saliency map's share."""
    from fasterase import api, models
    from fasterase.methods import get

    def status(field: str) -> int:
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))

    m = get(method)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FASTERASE_CACHE"] = f"{tmp}/warm"  # saliency maps are computed in both runs, never read
        warm = models.load(model)
        m.run(warm, api._resolve_concepts(warm, "circle", None), api._options(m, {**options, "steps": 1}),
              progress=False)
        del warm
        den = models.load(model)
        den.set_size(resolution, resolution)
        den.micro_batch = micro_batch
        concepts, cfg = api._resolve_concepts(den, "circle", None), api._options(m, options)
        os.environ["FASTERASE_CACHE"] = f"{tmp}/measured"
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        before = status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        edit = m.run(den, concepts, cfg, progress=False)
        peak = status("VmHWM")
    report = edit.report
    share = report["saliency_selected"] / report["saliency_candidates"] if "saliency_selected" in report else None
    return {"delta_bytes": peak - before, "share": share}


@pytest.mark.slow
@pytest.mark.parametrize("method,options,micro_batch", [
    ("esd", {"steps": 2, "sample_steps": 4}, None),
    ("ant", {"steps": 2, "sample_steps": 4, "saliency_prompts": 1, "saliency_seeds": 2}, 2),
    ("fade", {"steps": 2, "sample_steps": 4, "d_pretrain_steps": 20, "saliency_samples": 2, "rollouts": 8,
              "d_batch": 16}, None),
])
def test_plan_matches_the_measured_peak(method, options, micro_batch):
    """The plan's peak, less what is resident before the method starts (the pipeline's weights: network,
    VAE, text encoders), within 20% of the memory the method really adds at its peak on toy-sd.

    Measured on the CPU (no max_memory_allocated there): a fresh process's peak RSS during the method minus
    its RSS just before (_measure), in fp32 as the toy pipelines load, at 128 px so that activations (about
    0.1 to 0.45 GB) outweigh what a process's RSS also moves by (code pages, Python objects). glibc keeps
    freed blocks under its mmap threshold (which grows to 32 MB as blocks are freed) in its heap, so RSS
    would follow the heap's high-water mark, not what the tensors hold (ESD: 0.28 GB against 0.12); the
    subprocess fixes the threshold at 64 KiB (MALLOC_MMAP_THRESHOLD_), so every tensor above it is a mapping
    of its own, unmapped when freed: RSS then counts live tensors, as a GPU's max_memory_allocated does.
    The CPU runs attention with a flash kernel that keeps what the plan's fused kernel keeps. The options
    shorten the runs without changing any call's size; ANT is planned at the share its saliency map kept.
    With micro_batch every pass runs in chunks, the graphs' recomputed one at a time in backward."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, __file__, "toy-sd", method, "128", json.dumps(options),
                           json.dumps(micro_batch)], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    share = measured["share"] if method == "ant" else None  # FADE's is its option saliency_share
    result = planner.plan("toy-sd", method, options, resolution=128, dtype="fp32", salient_share=share,
                          micro_batch=micro_batch)
    column = result.columns[result.peak[0]]
    resident = sum(column.lines.get(k, 0) for k in ("unet weights", "VAE", "text encoders"))
    planned = result.peak[1] - resident
    assert abs(measured["delta_bytes"] - planned) <= 0.2 * planned, (measured, planned)


@pytest.mark.parametrize("model, resolution, valid", [("toy-sd", 40, True), ("toy-sd", 36, False),
                                                     ("toy-flux", 36, False), ("toy-flux", 40, True),
                                                     ("sd15", 520, True), ("sd15", 516, False)])
def test_plan_takes_the_resolutions_erase_takes(model, resolution, valid):
    """The planner checks --resolution by the denoiser's own rule (SD: 8 px as the pipeline checks, not
    the UNet's 64; FLUX: twice the VAE's factor)."""
    den = meta.describe(model).denoiser(torch.float32)
    if valid:
        den.set_resolution(resolution)
        assert planner.plan(model, "esd", resolution=resolution).columns["step"]
        return
    for check in (den.set_resolution, lambda r: planner.plan(model, "esd", resolution=r)):
        with pytest.raises(UserError, match="multiples of"):
            check(resolution)



@pytest.mark.parametrize("model", ["toy-sd", "toy-flux"])
def test_a_huge_resolution_is_planned_without_allocating(model):
    """The planner takes the latents' shape, not a tensor of it, and FLUX's position ids are made on the
    meta device: 1e7 x 1e7 px (a 25 TB noise tensor; 5 TB of FLUX position ids) is planned, with activations
    that grow with the pixels (four times the pixels: about four times the bytes); a size whose tensors could
    not exist anywhere is one line, as is one whose latents alone could not (erase's own rule)."""
    peaks = [planner.plan(model, "esd", resolution=side, gpu_mem=1e30).peak for side in (10**7, 2 * 10**7)]
    assert [column for column, _ in peaks] == ["step", "step"] and peaks[0][1] > 1e17
    assert 3.9 < peaks[1][1] / peaks[0][1] < 4.1
    with pytest.raises(UserError, match="200000000x200000000 px is too large to plan: a tensor of the run would "
                                        r"exceed 2\*\*63 bytes"):
        planner.plan(model, "esd", resolution=2 * 10**8)
    with pytest.raises(UserError, match=r"too large: one image's latents would exceed 2\*\*63 bytes"):
        planner.plan(model, "esd", resolution=9999999999999999999992)



def test_a_local_folder_named_like_a_published_config_is_planned_as_erase_loads_it(tmp_path, monkeypatch):
    """`plan --model sd15` plans ./sd15 when that folder is there, as `erase --model sd15` loads it; without
    it, the published config (and erase says that name is plan's only)."""
    from fasterase import models

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="'sd15' names the published configuration, which `fasterase plan` plans"):
        models.load("sd15")
    published = planner.plan("sd15", "esd", resolution=64).to_json()
    models.load("toy-sd").pipeline.save_pretrained(tmp_path / "sd15")
    local = planner.plan("sd15", "esd", resolution=64).to_json()
    assert local["model"] == str(tmp_path / "sd15") and published["model"] == "sd15"  # the plan says which
    assert local["columns"] == planner.plan("toy-sd", "esd", resolution=64).to_json()["columns"] != published["columns"]


if __name__ == "__main__":
    model_name, method_name, side, settings, rows = sys.argv[1:]
    print(json.dumps(_measure(model_name, method_name, int(side), json.loads(settings), json.loads(rows))))
