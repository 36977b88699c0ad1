"""The training methods under DeepSpeed ZeRO-2 / ZeRO-3 (training.engine), on the CPU.

DeepSpeed's CPU accelerator, gloo, one process; run as a subprocess (this file is also the script)
so DeepSpeed's environment, process group and the patches it makes to torch stay out of the test
session. Each case there is compared with the same training in the plain engine:
- with fp32 optimizer states the ZeRO-2 runs must give the plain run's values bit for bit; ZeRO-3 also
  partitions the frozen network, and DeepSpeed's hooks around every layer add nodes to the autograd
  graph, which changes the order in which a tensor's gradient contributions are summed, and two
  processes each run half of every call's rows: the gradients agree to fp32 rounding (about 1e-7 of
  their size), and the edits' changes to ZERO3_RTOL of the change. Calibration: the plain engine run
  with micro_batch=1 instead of whole calls, another summation order and nothing else, moves the change
  by 2.0e-5 (ESD), 6.1e-5 (ANT), 6.3e-5 (FADE); the ZeRO-3 runs move it by 3e-6 to 6e-6 in one process
  and by 1.4e-5 (ESD), 5.6e-6 (ANT), 6.2e-5 (FADE) in two;
- with 8-bit states ZeRO flattens every trainable into one partition, so 8-bit blocks of 256 straddle
  tensors and each state is quantised against another block's absmax: the values agree to 1% (the
  Frobenius norm of the difference against the plain run's change), a bound the fp32 case shows is
  quantisation alone.
"""
import contextlib
import io
import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

from fasterase.errors import UserError
from fasterase.training import engine

ODD_SIZES = [5, 1, 7, 300, 4097]
METHODS = {
    "esd": {"steps": 3, "batch_size": 2, "sample_steps": 4},
    "ant": {"steps": 3, "batch_size": 2, "sample_steps": 4, "saliency_prompts": 2, "saliency_seeds": 1},
    "fade": {"steps": 2, "batch_size": 2, "rollouts": 4, "refresh_every": 2, "sample_steps": 6,
             "d_pretrain_steps": 30, "d_batch": 16, "d_steps": 1, "saliency_samples": 2, "stop_patience": 100},
    "trace": {"steps": 2, "batch_size": 2, "rollouts": 2, "refresh_every": 2, "sample_steps": 8,
              "d_pretrain_steps": 30, "d_batch": 16},
}
# what each run erases, with which method and options: the methods' runs erase circle; TRACE's two-concept run
# trains one LoRA per concept, each isolated from the other's terms by a backward nested in the engine's
RUNS = {**{m: (m, "circle", options) for m, options in METHODS.items()},
        "trace, two concepts": ("trace", ["circle", "square"], {**METHODS["trace"], "preserve": ["triangle"]})}
RESUME_STEPS = 4
# fp32-state runs compared with the plain engine: every method under ZeRO-2 and ZeRO-3 (CompactDelta masters,
# LoRAs, FADE's and TRACE's companions beside the engine, their rollouts through the partitioned network;
# ANT's ZeRO-3 run is _fresh_saliency_under_zero3's, FADE's the two processes' of main_two)
FP32_STAGES = {"esd": (2, 3), "ant": (2,), "fade": (2,), "trace": (2, 3), "trace, two concepts": (2, 3)}
SPLIT_EVERY_PARAMETER = '{"zero_optimization": {"stage3_param_persistence_threshold": 0}}'
ZERO3_RTOL = 2.5e-4  # of the edit's change: 4x what another summation order alone moves it (see above)


# --- the subprocess ----------------------------------------------------------------------------------

def _engine_run(stage: int, states: str, config_file: str | None = None):
    """Four steps of the engine over trainables of odd sizes, the third with a NaN gradient: the values,
    which steps were taken, and the engine's description."""
    from fasterase.optim import SalientAdamW

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in ODD_SIZES]
    stepper = engine.make(params, SalientAdamW(params, lr=1e-2, weight_decay=0.01, state_dtype=states,
                                               min_8bit_size=1), stage, config_file)
    taken = []
    for step in range(4):
        stepper.zero_grad()
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        if step == 2:
            params[3].grad[7] = float("nan")
        taken.append(stepper.step())
    described = stepper.describe()
    stepper.close()
    return [p.detach().clone() for p in params], taken, described


def _values(edit) -> dict[str, torch.Tensor]:
    return dict(edit.lora) if edit.lora else {k: v for k, (_, v) in edit.entries.items()}


def _change(edit) -> dict[str, torch.Tensor]:
    """What an edit changes: each LoRA's B @ A (B starts at zero), or the entries' new values less the
    toy model's, in fp64."""
    from fasterase import models

    if edit.lora:
        return {k: b.double().flatten(1) @ edit.lora[k.replace("lora_B", "lora_A")].double().flatten(1)
                for k, b in edit.lora.items() if "lora_B" in k}
    net = models.load("toy-sd").network
    return {k: v.double() - net.get_parameter(k).detach().reshape(-1)[i.long()].double()
            for k, (i, v) in edit.entries.items()}


def _network_state(network) -> dict:
    """What DeepSpeed could have left on a network: its attributes, hooks, parameter dicts."""
    return {"attributes": sorted({k for o in (*network.modules(), *network.parameters()) for k in vars(o)
                                  if k.startswith(("ds_", "_external", "_original", "all_parameters"))}),
            "hooks": sum(len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks)
                         for m in network.modules()),
            "parameter dicts": sorted({type(m._parameters).__name__ for m in network.modules()})}


def _erase(run: str, zero: int, **extra):
    import fasterase

    method, concepts, options = RUNS[run]
    return fasterase.erase("toy-sd", concepts, method=method, zero=zero, progress=False,
                           **{**options, **extra}).edit


def _resume(method: str, zero: int, ckpt: str, checkpoint_every: int = 50, **extra) -> dict:
    """`method` stopped by an interrupt in its third step and resumed, beside an uninterrupted run."""
    from fasterase.methods import ant, esd

    module, name = {"ant": (ant, "ant_loss"), "esd": (esd, "negative_guidance_loss")}[method]
    full = _values(_erase(method, zero, steps=RESUME_STEPS, **extra))
    real, calls = getattr(module, name), []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    setattr(module, name, interrupted)
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            _erase(method, zero, steps=RESUME_STEPS, checkpoint=ckpt, checkpoint_every=checkpoint_every, **extra)
    except KeyboardInterrupt:
        pass
    finally:
        setattr(module, name, real)
    resumed = _values(_erase(method, zero, steps=RESUME_STEPS, checkpoint=ckpt, checkpoint_every=checkpoint_every,
                             **extra))
    return {"full": full, "resumed": resumed, "said": said.getvalue()}


def _fresh_saliency_under_zero3(cache: str, zero3: dict) -> dict:
    """ANT under ZeRO-3 with its saliency map computed afresh (another cache): whether the network was
    partitioned when the run encoded its prompts (its first encode), the map, the edit, and what DeepSpeed
    left on the network."""
    import fasterase
    from fasterase.models import base, partitioned

    encode, seen = base.Denoiser.encode, []

    def recording(self, prompts):
        seen.append(all(partitioned.is_partitioned(p) and p.numel() < partitioned.numel(p)
                        for p in self.network.parameters()))
        return encode(self, prompts)

    base.Denoiser.encode, was = recording, os.environ["FASTERASE_CACHE"]
    os.environ["FASTERASE_CACHE"] = cache
    try:
        result = fasterase.erase("toy-sd", "circle", method="ant", zero=3, progress=False, **METHODS["ant"], **zero3)
    finally:
        base.Denoiser.encode, os.environ["FASTERASE_CACHE"] = encode, was
    edit = result.edit
    return {"partitioned_at_encoding": seen[0], "cached": edit.report["saliency_cached"],
            "indices": {n: i for n, (i, _) in edit.entries.items()}, "edit": edit, "engine": edit.report["engine"],
            "network_after": _network_state(result.model.network)}


def _shared_memory_left() -> list[str]:
    """DeepSpeed's CPU all-reduce buffers of this run (its MASTER_PORT) still named in /dev/shm."""
    port = os.environ["MASTER_PORT"]
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer_") and f"_{port}_" in n)


def main(out_path: str, work: str) -> None:
    import deepspeed  # noqa: F401  (imported on the CPU accelerator: DS_ACCELERATOR=cpu)
    from deepspeed.accelerator import get_accelerator

    from fasterase.optim import SalientAdamW

    if get_accelerator().device_name() != "cpu":
        raise SystemExit(f"DeepSpeed picked accelerator {get_accelerator().device_name()!r}, not cpu")
    os.environ["FASTERASE_CACHE"] = work
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    defaults = DeepSpeedZeroConfig()
    zero3_defaults = (defaults.param_persistence_threshold,
                      defaults.max_live_parameters + defaults.prefetch_bucket_size)
    results = {"zero3_defaults": zero3_defaults,
               "engine": {(z, s): _engine_run(z, s) for z in (0, 2, 3) for s in ("fp32", "8bit")}}
    offload = os.path.join(work, "offload.json")
    with open(offload, "w") as f:
        f.write('{"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}')
    results["offload"] = _engine_run(2, "8bit", offload)
    # ZeRO-3 runs partition every parameter of the network (DeepSpeed keeps those under 1e5 entries whole by
    # default: most of the toy's), so that every layer is gathered for its passes and released after
    split = os.path.join(work, "split.json")
    with open(split, "w") as f:
        f.write(SPLIT_EVERY_PARAMETER)
    zero3 = {"deepspeed_config": split}

    # what steps under ZeRO: record the client optimizer DeepSpeed holds and its states' dtypes
    seen = []
    close = engine.Zero.close

    def record(self):
        opt = self.engine.basic_optimizer
        seen.append((type(opt).__name__, sorted({str(t.dtype) for s in opt.state.values()
                                                for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")})))
        close(self)

    engine.Zero.close = record
    edit = _erase("ant", 2, steps=2)
    results["ant_8bit_report"] = {"engine": edit.report["engine"], "stepped_by": seen[-1]}

    results["8bit"] = {(m, z): _values(_erase(m, z)) for m in ("esd", "ant") for z in (0, 2)}
    results["resume"] = {(m, z): _resume(m, z, os.path.join(work, f"{m}{z}.ckpt"), **(zero3 if z == 3 else {}))
                         for m, z in [("ant", 2), ("ant", 3), ("esd", 2)]}  # ESD under ZeRO-3: main_two
    # the ant ZeRO-2 checkpoint (finished), as if another number of processes had written it: its values
    # are read all the same; unfinished, it is refused
    ckpt = os.path.join(work, "ant2.ckpt")
    state = torch.load(ckpt, weights_only=True)
    state["optimizer"]["engine"]["world_size"] = 2
    torch.save(state, ckpt)
    results["finished_other_world_size"] = _values(_erase("ant", 2, steps=RESUME_STEPS, checkpoint=ckpt))
    torch.save({**state, "finished": False}, ckpt)
    try:
        _erase("ant", 2, steps=RESUME_STEPS, checkpoint=ckpt)
        results["other_world_size"] = None
    except UserError as e:
        results["other_world_size"] = str(e)
    # a file of the user's where a launched run's second process would write is refused before any work
    foreign = os.path.join(work, "foreign.ckpt")
    with open(foreign + ".rank1", "w") as f:
        f.write("my notes")
    os.environ["WORLD_SIZE"] = "2"
    try:
        _erase("esd", 2, checkpoint=foreign)
        results["foreign_rank_file"] = None
    except UserError as e:
        results["foreign_rank_file"] = str(e)
    finally:
        os.environ["WORLD_SIZE"] = "1"
    with open(foreign + ".rank1") as f:
        results["foreign_rank_file_kept"] = f.read() == "my notes"

    # fp32 states everywhere (the LoRA methods' plain AdamW too): the engines must agree exactly
    SalientAdamW.__init__.__kwdefaults__["state_dtype"] = "fp32"
    engine.adamw = lambda params, lr, zero: SalientAdamW(params, lr=lr, weight_decay=0.0)
    linear = torch.nn.functional.linear
    edits = {(m, z): _erase(m, z, **(zero3 if z == 3 else {}))
             for m, stages in FP32_STAGES.items() for z in (0, *stages)}
    results["fp32"] = {k: _values(e) for k, e in edits.items()}
    results["fp32_change"] = {k: _change(e) for k, e in edits.items()}
    results["fp32_engine"] = {k: e.report["engine"] for k, e in edits.items()}
    results["fresh_saliency"] = _fresh_saliency_under_zero3(os.path.join(work, "fresh"), zero3)
    results["plain_ant_indices"] = {n: i for n, (i, _) in edits[("ant", 0)].entries.items()}
    results["fresh_saliency"]["change"] = _relative(_change(results["fresh_saliency"].pop("edit")),
                                                    results["fp32_change"][("ant", 0)])
    import fasterase

    from fasterase import models

    results["network_after"] = {"zero3": results["fresh_saliency"].pop("network_after"),
                                "loaded": _network_state(models.load("toy-sd").network)}
    # a run that fails under ZeRO-3 (ANT's saliency map empty at this threshold) leaves the pipeline as it was
    failing = models.load("toy-sd")
    try:
        fasterase.erase(failing.pipeline, "circle", method="ant", zero=3, progress=False,
                        **{**METHODS["ant"], "saliency_threshold": 1e6}, **zero3)
        results["failed_run"] = None
    except UserError as e:
        fresh = models.load("toy-sd").network.state_dict()
        results["failed_run"] = {"message": str(e), "network": _network_state(failing.network),
                                 "unchanged": all(torch.equal(v, fresh[k])
                                                  for k, v in failing.network.state_dict().items())}
    results["linear_untouched"] = torch.nn.functional.linear is linear
    results["shared_memory_left"] = _shared_memory_left()
    torch.save(results, out_path)


def _summed_engine_run(stage: int) -> tuple:
    """Three steps of the engine in this process, whose gradients differ from the other's (seeded by
    rank), the second a NaN on rank 1 only; and the plain engine on both ranks' gradients summed. eps=1
    makes AdamW's step depend on the gradient's size (with the usual eps it barely does)."""
    from fasterase.optim import SalientAdamW

    def grads(step: int, rank: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(100 * step + rank)
        out = [torch.randn(n, generator=g) for n in ODD_SIZES]
        if step == 1 and rank == 1:
            out[2][3] = float("nan")
        return out

    runs = []
    for zero in (stage, 0):
        params = [torch.nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(n))) for n in ODD_SIZES]
        stepper = engine.make(params, SalientAdamW(params, lr=0.1, eps=1.0, weight_decay=0.0, state_dtype="fp32"),
                              zero)
        taken = []
        for step in range(3):
            mine = grads(step, int(os.environ["RANK"]))
            both = [a + b for a, b in zip(grads(step, 0), grads(step, 1))]
            for p, g in zip(params, mine if zero else both):
                p.grad = g
            taken.append(stepper.step())
        stepper.close()
        runs.append(([p.detach().clone() for p in params], taken))
    return runs


def _shared_rows_call(rows: int) -> dict:
    """toy-sd's prediction on `rows` rows and the LoRA's gradients of a loss on it, whole in this process
    and shared out between the two (the gradients summed over them)."""
    from fasterase import models
    from fasterase.training import params

    den = models.load("toy-sd")
    lora = params.add_lora(den.network, ["conv_in", "conv_out"], 2, 0)
    with torch.no_grad():  # B = 0 would leave A without gradient
        for p in lora:
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    g = torch.Generator().manual_seed(rows)
    x, tau = den.noise(rows, g), torch.rand(rows, generator=g)
    cond = den.encode(["a photo of a circle"] * rows)
    out = {}
    for name, shared in (("whole", False), ("shared", True)):
        for p in lora:
            p.grad = None
        with den.sharing_rows() if shared else contextlib.nullcontext():
            pred = den.predict(x, tau, cond)
        (pred.square() * torch.arange(1, rows + 1).view(-1, 1, 1, 1)).mean().backward()
        grads = [p.grad.clone() for p in lora]
        if shared:
            for gr in grads:
                torch.distributed.all_reduce(gr)
        out[name] = (pred.detach(), grads)
    return out


def main_two(out_path: str, work: str) -> None:
    """In each of two processes (torchrun): the engine's reduction, shared rows, a resumed run, and ESD, ANT
    and FADE under ZeRO-3 with every parameter of the network split between the two, fp32 states (their
    plain runs are main's); rank 0 saves the results."""
    from fasterase.optim import SalientAdamW
    from fasterase.training import engine as engines

    os.environ["FASTERASE_CACHE"] = os.path.join(work, f"cache{os.environ['RANK']}")
    engines._start_deepspeed(torch.device("cpu"))
    results = {"summed": {z: _summed_engine_run(z) for z in (2, 3)},
               "rows": {n: _shared_rows_call(n) for n in (1, 4, 5)}}
    split = os.path.join(work, f"split{os.environ['RANK']}.json")  # one each: the other may be reading its own
    with open(split, "w") as f:
        f.write(SPLIT_EVERY_PARAMETER)
    # stopped in its third step (both processes), resumed from the checkpoint every process wrote at step 2
    results["resume"] = _resume("esd", 3, os.path.join(work, "esd3.ckpt"), deepspeed_config=split, checkpoint_every=2)
    results["checkpoint files"] = sorted(n for n in os.listdir(work) if ".ckpt" in n)
    SalientAdamW.__init__.__kwdefaults__["state_dtype"] = "fp32"
    engine.adamw = lambda params, lr, zero: SalientAdamW(params, lr=lr, weight_decay=0.0)
    edits = {m: _erase(m, 3, deepspeed_config=split) for m in ("esd", "ant", "fade")}  # the plain runs: main's
    results["change"] = {k: _change(e) for k, e in edits.items()}
    results["engine"] = {k: e.report["engine"] for k, e in edits.items()}
    results["lora_entries"] = edits["esd"].report["trainable_parameters"]
    from fasterase import models

    results["network_entries"] = sum(p.numel() for p in models.load("toy-sd").network.parameters())
    torch.distributed.barrier()  # both processes' starts are done
    results["shared_memory_left"] = _shared_memory_left()
    if os.environ["RANK"] == "0":
        torch.save(results, out_path)


# --- the tests ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed not installed")
    work = tmp_path_factory.mktemp("zero")
    out = work / "results.pt"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")  # as main_two's processes: the same saliency
    for k in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    result = subprocess.run([sys.executable, __file__, str(out), str(work)], env=env, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stderr[-6000:]
    return torch.load(out, weights_only=False)


def _relative(a: dict, b: dict, base: dict | None = None) -> float:
    """|a - b| / |b - base| over every tensor (Frobenius); base None: |a - b| / |b|."""
    num = sum((a[k].double() - b[k].double()).square().sum() for k in b)
    den = sum((b[k].double() - (0 if base is None else base[k].double())).square().sum() for k in b)
    return float((num / den).sqrt())


@pytest.mark.parametrize("stage", [2, 3])
def test_engine_steps_like_the_plain_one_on_odd_sizes(zero_runs, stage):
    """fp32 states: the same values after every step, the NaN step skipped by both."""
    plain, plain_taken, _ = zero_runs["engine"][(0, "fp32")]
    values, taken, _ = zero_runs["engine"][(stage, "fp32")]
    assert taken == plain_taken == [True, True, False, True]
    for a, b in zip(values, plain):
        assert torch.equal(a, b)


@pytest.mark.parametrize("stage", [2, 3])
def test_engine_8bit_states_track_the_plain_engine(zero_runs, stage):
    plain, _, _ = zero_runs["engine"][(0, "8bit")]
    values, taken, _ = zero_runs["engine"][(stage, "8bit")]
    assert taken == [True, True, False, True]
    g = torch.Generator().manual_seed(0)
    start = {str(i): torch.randn(n, generator=g) for i, n in enumerate(ODD_SIZES)}
    a, b = ({str(i): v for i, v in enumerate(vs)} for vs in (values, plain))
    assert _relative(a, b, start) <= 0.01


@pytest.mark.parametrize("method", FP32_STAGES)
def test_every_training_method_under_zero2_ends_with_the_plain_edit(zero_runs, method):
    plain = zero_runs["fp32"][(method, 0)]
    values = zero_runs["fp32"][(method, 2)]
    assert values.keys() == plain.keys()
    assert any(v.abs().max() > 0 for v in plain.values())
    assert all(torch.equal(values[k], plain[k]) for k in plain)


@pytest.mark.parametrize("method", [m for m, stages in FP32_STAGES.items() if 3 in stages])
def test_every_training_method_under_zero3_with_the_network_partitioned_ends_with_the_plain_edit(zero_runs, method):
    plain, change = zero_runs["fp32_change"][(method, 0)], zero_runs["fp32_change"][(method, 3)]
    assert change.keys() == plain.keys() and any(v.abs().max() > 0 for v in plain.values())
    assert _relative(change, plain) <= ZERO3_RTOL
    engine3 = zero_runs["fp32_engine"][(method, 3)]
    assert engine3["engine"] == "deepspeed-zero3" and engine3["network_held"] == 1.0  # one process: all of it
    assert "network_held" not in zero_runs["fp32_engine"][(method, 2)]


def test_zero3_partitions_the_network_for_the_whole_run(zero_runs):
    """From the prompts' encoding on (the network never whole on the device), through ANT's saliency map
    (computed afresh, each forward run again for its second backward): the plain run's map, and its edit."""
    fresh = zero_runs["fresh_saliency"]
    assert fresh["partitioned_at_encoding"] and fresh["cached"] is False
    plain = zero_runs["plain_ant_indices"]
    assert fresh["indices"].keys() == plain.keys() and all(torch.equal(fresh["indices"][n], plain[n]) for n in plain)
    assert fresh["change"] <= ZERO3_RTOL and fresh["engine"]["network_held"] == 1.0  # one process: all of it


def test_zero3_gives_the_network_back_as_it_was(zero_runs):
    """Gathered whole, without DeepSpeed's attributes, hooks or parameter dicts: as after a plain run; also
    after a run that fails, with every weight as it was."""
    after = zero_runs["network_after"]
    assert after["zero3"] == after["loaded"] and after["loaded"]["attributes"] == []
    assert after["loaded"]["parameter dicts"] == ["dict"]
    failed = zero_runs["failed_run"]
    assert "saliency_threshold=1e+06 leaves the saliency map M* empty" in failed["message"]
    assert failed["network"] == after["loaded"] and failed["unchanged"]


def test_the_planner_counts_deepspeeds_zero3_defaults(zero_runs):
    from fasterase import plan

    assert zero_runs["zero3_defaults"] == (plan.ZERO3_PERSISTENCE_THRESHOLD, plan.ZERO3_LIVE_PARAMETERS)


def test_deepspeed_leaves_no_shared_memory_behind(zero_runs, two_processes):
    """DeepSpeed's CPU accelerator maps a 67 MB all-reduce buffer a process and never unlinks it: the
    engine unlinks the names once every process has mapped them, so a run leaves none in /dev/shm."""
    assert zero_runs["shared_memory_left"] == [] and two_processes["shared_memory_left"] == []


def test_zero3_leaves_torch_as_it_was(zero_runs):
    """DeepSpeed's ZeRO-3 replaces torch.nn.functional.linear for good unless told not to."""
    assert zero_runs["linear_untouched"]


@pytest.mark.parametrize("method", ["esd", "ant"])
def test_zero2_with_8bit_states_tracks_the_plain_run(zero_runs, method):
    plain, zero = zero_runs["8bit"][(method, 0)], zero_runs["8bit"][(method, 2)]
    assert _relative(zero, plain) <= 0.01


def test_optimizer_offload_keeps_our_8bit_optimizer(zero_runs):
    """ZeRO-Offload (optimizer on the CPU): DeepSpeed steps SalientAdamW, not its CPU Adam, with the
    same values as without offload (on the CPU accelerator the offload moves nothing)."""
    values, taken, described = zero_runs["offload"]
    assert described["optimizer"] == "SalientAdamW" and described["optimizer_states"] == "8bit"
    assert taken == [True, True, False, True]
    assert all(torch.equal(a, b) for a, b in zip(values, zero_runs["engine"][(2, "8bit")][0]))


def test_under_zero_the_optimizer_stepping_is_ours_with_8bit_states(zero_runs):
    report = zero_runs["ant_8bit_report"]
    assert report["stepped_by"] == ("SalientAdamW", ["torch.uint8"])
    assert report["engine"] == {"engine": "deepspeed-zero2", "world_size": 1, "optimizer": "SalientAdamW",
                                "optimizer_states": "8bit", "trainable_dtype": "float32"}


@pytest.mark.parametrize("case", [("ant", 2), ("ant", 3), ("esd", 2)])
def test_a_run_resumed_under_zero_matches_the_uninterrupted_one(zero_runs, case):
    run = zero_runs["resume"][case]
    assert run["full"].keys() == run["resumed"].keys()
    assert all(torch.equal(run["full"][k], run["resumed"][k]) for k in run["full"])


def test_a_checkpoint_of_another_world_size_is_refused_by_name(zero_runs):
    message = zero_runs["other_world_size"]
    assert message is not None and "ant2.ckpt was written by 2 processes" in message and "this run has 1" in message


def test_a_finished_checkpoint_gives_its_values_to_any_number_of_processes(zero_runs):
    finished, resumed = zero_runs["finished_other_world_size"], zero_runs["resume"][("ant", 2)]["resumed"]
    assert all(torch.equal(finished[k], resumed[k]) for k in resumed)


def test_a_users_file_where_another_process_would_checkpoint_is_refused_and_kept(zero_runs):
    message = zero_runs["foreign_rank_file"]
    assert message is not None and "foreign.ckpt.rank1 exists and is not a fasterase training checkpoint" in message
    assert zero_runs["foreign_rank_file_kept"]


# --- two processes, started as a launcher starts them --------------------------------------------------

@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """ESD on toy-sd from the CLI in two processes started by the deepspeed launcher (`deepspeed --num_gpus 2
    --module fasterase erase ...`, on its CPU accelerator), and in one process with zero=2."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed not installed")
    work = tmp_path_factory.mktemp("launched")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", FASTERASE_CACHE=str(work / "cache"))
    for k in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    args = ["-m", "fasterase", "erase", "--model", "toy-sd", "--concept", "circle", "--method", "esd"]
    args += [f"--set={k}={v}" for k, v in METHODS["esd"].items()]
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                str(_free_port()), "--module"]
    two = subprocess.run([*launcher, *args[1:], "--out", str(work / "two")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-4000:]
    one = subprocess.run([sys.executable, *args, "--set", "zero=2", "--out", str(work / "one")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-4000:]
    return work, two.stdout


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """main_two in two processes started by torchrun (DeepSpeed's CPU accelerator, gloo)."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed not installed")
    work = tmp_path_factory.mktemp("two")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for k in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(_free_port()), __file__, "two", str(work / "results.pt"), str(work)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    return torch.load(work / "results.pt", weights_only=False)


@pytest.mark.parametrize("stage", [2, 3])
def test_two_processes_step_with_the_sum_of_their_gradients(two_processes, stage):
    """Each process's gradients are its rows' part: DeepSpeed averages, the engine hands them in times two,
    so the step is the plain engine's on the sum; a NaN on one process skips the step on both."""
    (values, taken), (plain, plain_taken) = two_processes["summed"][stage]
    assert taken == plain_taken == [True, False, True]
    for a, b in zip(values, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_shared_row_blocks_are_equal_and_owned_once():
    """Every process runs as many rows, inside the call, and each row is owned by exactly one process."""
    from fasterase.models.shared_rows import blocks

    for rows in range(1, 12):
        for world in range(1, 10):
            where = blocks(rows, world)
            per = -(-rows // world)
            assert all(0 <= s <= lo <= hi <= s + per <= rows for s, lo, hi in where), (rows, world)
            assert [i for _, lo, hi in where for i in range(lo, hi)] == list(range(rows)), (rows, world)


@pytest.mark.parametrize("rows", [1, 4, 5])
def test_shared_rows_give_the_whole_output_and_gradient(two_processes, rows):
    """Each process runs a block of ceil(rows / 2) rows and owns its part (5 rows: 3 and 2, the second
    block reaching back over row 2; 1 row: the second process owns none but runs it and its backward):
    every process has the whole output, and the gradients summed over the two are the whole call's."""
    (whole, whole_grads), (shared, shared_grads) = (two_processes["rows"][rows][k] for k in ("whole", "shared"))
    torch.testing.assert_close(shared, whole, rtol=1e-5, atol=1e-6)
    for a, b in zip(shared_grads, whole_grads):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_two_processes_resume_from_their_checkpoint_files_to_the_uninterrupted_run(two_processes):
    """Each process writes its optimizer partition (8-bit states, ZeRO-3) to a file of its own beside the run's,
    every checkpoint_every steps; the interrupt saves nothing and says which checkpoint stands."""
    run = two_processes["resume"]
    assert "interrupted in step 3: with 2 processes an interrupt saves nothing; " in run["said"]
    assert "esd3.ckpt holds step 2 (checkpoint_every=2)" in run["said"]
    assert run["full"].keys() == run["resumed"].keys()
    assert all(torch.equal(run["full"][k], run["resumed"][k]) for k in run["full"])
    assert {"esd3.ckpt", "esd3.ckpt.rank1"} <= set(two_processes["checkpoint files"])


@pytest.mark.parametrize("method", ["esd", "ant", "fade"])
def test_zero3_splits_the_network_between_two_processes_and_ends_with_the_plain_edit(two_processes, zero_runs,
                                                                                     method):
    """Each process holds half of every weight (CompactDelta's entries written into its half; ESD's LoRA
    factors, added once the network was partitioned, whole beside it) and computes half of every call's
    rows; FADE's discriminator and buffers stay the same on both; the edit is the plain run's, to fp32
    rounding in another summation order."""
    plain, change = zero_runs["fp32_change"][(method, 0)], two_processes["change"][method]
    assert change.keys() == plain.keys() and any(v.abs().max() > 0 for v in plain.values())
    assert _relative(change, plain) <= ZERO3_RTOL
    described = two_processes["engine"][method]
    network, lora = two_processes["network_entries"], two_processes["lora_entries"] if method == "esd" else 0
    half = (network / 2 + lora) / (network + lora)
    assert described["world_size"] == 2 and half <= described["network_held"] <= half + 0.001


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_launched_processes_train_under_zero2_and_one_writes_the_edit(launched):
    from fasterase.edit import Edit

    work, stdout = launched
    assert stdout.count("edit saved to") == 1
    assert sorted(p.name for p in (work / "two").iterdir()) == ["edit.safetensors", "pytorch_lora_weights.safetensors"]
    two, one = Edit.load(work / "two"), Edit.load(work / "one")
    assert two.report["engine"]["engine"] == "deepspeed-zero2" and two.report["engine"]["world_size"] == 2
    assert two.report["config"]["zero"] == 2  # the launcher's default stage
    # each process's 8-bit states cover its half of the flat partition: blocks differ from one process's
    assert _relative(two.lora, one.lora) <= 0.01


# --- options, checked before any work (no DeepSpeed needed) ------------------------------------------

@pytest.mark.parametrize("zero", [1, True, "2", 4])
def test_bad_zero_stage_is_refused(zero):
    with pytest.raises(UserError, match=re.escape("must be 0 (plain PyTorch), 2 or 3 (DeepSpeed ZeRO stage)")):
        engine.check_options("ESD", zero, None)


def test_deepspeed_config_needs_zero_and_is_checked(tmp_path):
    good = tmp_path / "ds.json"
    good.write_text('{"zero_optimization": {"contiguous_gradients": true}}')
    with pytest.raises(UserError, match="needs zero=2 or zero=3"):
        engine.check_options("ESD", 0, str(good))
    engine.check_options("ESD", 2, str(good))
    with pytest.raises(UserError, match="cannot read it"):
        engine.check_options("ESD", 2, str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="is not JSON"):
        engine.check_options("ESD", 2, str(bad))
    scalar = tmp_path / "scalar.json"
    scalar.write_text('{"zero_optimization": "yes"}')
    with pytest.raises(UserError, match="zero_optimization must be a JSON object, got str"):
        engine.check_options("ESD", 2, str(scalar))
    ours = tmp_path / "ours.json"
    ours.write_text('{"optimizer": {"type": "Adam"}, "zero_optimization": {"stage": 1}}')
    with pytest.raises(UserError, match="optimizer, zero_optimization.stage, which fasterase sets itself"):
        engine.check_options("ESD", 2, str(ours))


def test_a_method_refuses_a_bad_zero_before_any_work(monkeypatch):
    import fasterase
    from fasterase import models

    monkeypatch.setattr(models, "_load", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(UserError, match="option zero must be"):
        fasterase.erase("toy-sd", "circle", method="ant", zero=4)


def test_zero_needs_salient_adamw_over_unmasked_trainables():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(UserError, match="SalientAdamW as its client optimizer, got AdamW"):
        engine.Zero([p], torch.optim.AdamW([p]), 2)


if __name__ == "__main__":
    main_two(*sys.argv[2:]) if sys.argv[1] == "two" else main(sys.argv[1], sys.argv[2])
