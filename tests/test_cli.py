"""The command line: success paths, every user-error path (one line, exit 2), and bugs (traceback)."""
import json

import pytest
import torch

import fasterase
from fasterase.cli import main
from fasterase.edit import Edit
from fasterase.errors import UserError
from fasterase.training.loop import NonFiniteLoss


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith("fasterase")
    for n in needles:
        assert n in lines[0]


@pytest.mark.parametrize("argv,needles", [
    (["erase", "--model", "toy-sd", "--concept", "circle", "--method", "nope", "--out", "X"], ["unknown method", "uce"]),
    (["erase", "--model", "toy-nope", "--concept", "circle", "--method", "uce", "--out", "X"], ["toy-sd"]),
    (["erase", "--model", "toy-sd", "--concept", "", "--method", "uce", "--out", "X"], ["empty"]),
    (["erase", "--model", "toy-sd", "--concept", "zebra", "--method", "uce", "--out", "X"], ["name no toy shape or colour"]),
    (["erase", "--model", "toy-sd", "--concept", "a photo of a circle", "--method", "uce", "--out", "X"],
     ["hold words that are no toy shape or colour (a, photo, of, a)", "red circle"]),
    (["erase", "--model", "toy-sd", "--concept", "circle xyzzy", "--method", "uce", "--out", "X"],
     ["hold words that are no toy shape or colour (xyzzy)"]),
    (["erase", "--model", "toy-sd", "--concept", "red", "--concept", "star", "--method", "uce", "--out", "X"],
     ["mix shapes and colours", "separate edits"]),
    (["erase", "--model", "toy-sd", "--concept", "circle", "--preserve", "red circle", "--method", "uce", "--out",
      "X"], ["both erased and preserved", "red circle"]),
    (["erase", "--model", "toy-sd", "--concept", "circle", "--method", "esd", "--set", "seed=-1", "--out", "X"],
     ["seed must be >= 0"]),
    (["erase", "--model", "toy-sd", "--concept", "circle", "--method", "esd", "--set", "rank=100000", "--set",
      "steps=1", "--out", "X"], ["rank=100000 exceeds", "at most 128"]),
    (["erase", "--model", "toy-sd", "--concept", "circle,", "--method", "uce", "--out", "X"], ["empty", "commas"]),
    (["erase", "--model", "toy-sd", "--concept", "circle", "--method", "esd", "--set", "steps=abc", "--out", "X"],
     ["steps", "an integer", "abc"]),
    (["erase", "--model", "toy-sd", "--concept", "circle", "--method", "esd", "--set", "lr=NaN", "--out", "X"],
     ["lr", "a number"]),
    (["erase", "--model", "toy-sd", "--concept", "circle", "--method", "ant", "--set", "rank=8", "--out", "X"],
     ["cannot use", "rank", "one concept"]),
    (["erase", "--model", "toy-sd", "--concept", "circle", "--method", "esd", "--preserve", "star", "--out", "X"],
     ["cannot use", "preserve"]),
    (["erase", "--model", "toy-sd", "--concept", "circle", "--method", "esd", "--set", "checkpoint_every=5", "--out",
      "X"], ["cannot use", "checkpoint_every: no checkpoint file is set"]),
    (["erase", "--model", "toy-sd", "--concept", "red circle", "--preserve", "circle", "--method", "uce", "--out", "X"],
     ["both erased and preserved", "circle"]),
    (["erase", "--model", "toy-sd", "--concept", "circle", "--method", "uce", "--set", "lam", "--out", "X"],
     ["bad --set", "key=value"]),
    (["erase", "--model", "toy-sd", "--concept", "circle", "--method", "uce", "--set", "gamma=1", "--out", "X"],
     ["unknown option", "lam"]),
    (["erase", "--model", "toy-sd", "--concept", "circle", "--method", "esd", "--set", "method=esd-u", "--out", "X"],
     ["unknown option", "'method'", "--set takes the method's options", "parameters"]),
    (["erase", "--model", "toy-sd", "--concept", "circle", "--method", "esd", "--set", "device=cpu", "--out", "X"],
     ["unknown option", "'device'", "steps"]),
    (["erase", "--model", "toy-sd", "--concept", "circle", "--method", "uce", "--set", "lam=0.5", "--set", "lam=0.7",
      "--out", "X"], ["--set lam is given twice"]),
    (["erase", "--model", "toy-sd", "--method", "uce", "--out", "X"], ["--concept"]),
    (["eval"], ["--model"]),
    (["eval", "--model", "toy-sd", "--erased", "hexagon"], ["hexagon", "name no toy shape or colour", "circle"]),
    (["eval", "--model", "toy-sd", "--erased", "circle,"], ["empty"]),
    (["eval", "--model", "no/such/folder"], ["neither a built-in name nor a local diffusers folder (no such file or folder)"]),
    (["eval", "--edit", "no/such/folder"], ["edit folder no/such/folder: no such folder"]),
    (["eval", "--model", "toy-sd", "--repeats", "0"], ["repeats", ">= 1"]),
    (["frobnicate"], ["invalid choice"]),
    (["erase", "--model", "toy-sd", "--concept", "red", "--concept-type", "object", "--method", "esd", "--out", "X"],
     ["'red' is of type 'style' in the toy world"]),
    (["erase", "--model", "toy-sd", "--concept", "red", "--concept-type", "painting", "--method", "esd", "--out", "X"],
     ["invalid choice", "choose from", "celebrity"]),
    (["erase", "--resolution", "abc"], ["fasterase erase: error: argument --resolution: expected N or HxW"]),
    (["methods", "--bogus"], ["fasterase methods: error: unrecognized arguments: --bogus"]),
    (["--bogus", "methods"], ["fasterase: error: unrecognized arguments: --bogus"]),
    (["eval", "--model", "toy-sd", "--grid", ""], ["must be a .png"]),
    (["erase", "--model", "toy-sd", "--concept", "circle", "--preserve", "disk", "--method", "uce", "--out", "X"],
     ["'disk'", "erased"]),
    (["erase", "--model", "toy-sd", "--concept", "circle", "--preserve", "", "--preserve", "square", "--method", "uce",
      "--out", "X"], ["preserve nothing", "cannot be given with names"]),
    (["erase", "--model", "toy-sd", "--concept", "circle,square", "--method", "ant", "--set", "checkpoint=ck",
      "--out", "ck.0"], ["could be one of the checkpoint files"]),
])
def test_user_errors(capsys, tmp_path, monkeypatch, argv, needles):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *argv)
    one_line_error(code, err, *needles)
    assert not (tmp_path / "X").exists()


def test_every_checkpoint_file_of_several_concepts_is_checked_before_training(capsys, tmp_path, monkeypatch):
    """ANT with several concepts checkpoints to FILE.k per concept: a stray FILE.1 was found only after
    the first concept had trained."""
    from fasterase.training import params

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ck.1").write_text("not a checkpoint")
    monkeypatch.setattr(params, "add_lora", lambda *a, **k: pytest.fail("training started"))
    code, _, err = run(capsys, "erase", "--model", "toy-sd", "--concept", "circle,square", "--method", "ant",
                       "--set", "checkpoint=ck", "--out", "X")
    one_line_error(code, err, "ck.1", "not a fasterase training checkpoint")
    assert (tmp_path / "ck.1").read_text() == "not a checkpoint"


def test_an_out_holding_an_edit_is_replaced_only_with_overwrite_and_an_empty_one_is_taken(capsys, tmp_path):
    """An empty --out was refused, asking to "replace the edit in it"."""
    (tmp_path / "out").mkdir()
    argv = ["erase", "--model", "toy-sd", "--concept", "circle", "--method", "uce", "--out", str(tmp_path / "out")]
    assert run(capsys, *argv)[0] == 0 and Edit.load(tmp_path / "out").method == "uce"
    code, _, err = run(capsys, *argv)
    one_line_error(code, err, "holds an edit", "--overwrite")
    assert run(capsys, *argv, "--overwrite")[0] == 0
    code, _, err = run(capsys, *argv[:-1], "")  # "" is no folder (it resolved to the working folder)
    one_line_error(code, err, "the edit folder is empty text")


def test_erase_then_eval_edit(capsys, tmp_path):
    out = tmp_path / "edit"
    code, stdout, err = run(capsys, "erase", "--model", "toy-flux", "--concept", "circle", "--method", "uce",
                            "--set", "lam=0.5", "--out", str(out))
    assert code == 0, err
    assert "edit saved" in stdout and (out / "edit.safetensors").is_file()
    code, stdout, err = run(capsys, "eval", "--edit", str(out), "--json", "--repeats", "1")
    assert code == 0, err
    report = json.loads(stdout)
    assert f"scoring: 100%|██████████| {report['images']}/{report['images']}" in err  # a bar on stderr, not stdout
    assert report["model"] == "toy-flux" and report["erased"] == ["circle"]
    assert {"acc_e", "acc_e_heldout", "acc_g", "acc_s", "H", "color_s", "acc_e_scene", "acc_s_scene", "scenes",
            "concepts"} <= set(report) and "acc_e_pair" not in report
    code, stdout, err = run(capsys, "erase", "--model", "toy-flux", "--concept", "circle", "--method", "uce",
                            "--out", str(out), "--overwrite", "--save-pipeline")
    assert code == 0, err
    assert (out / "pipeline" / "model_index.json").is_file() and f"the edited pipeline to {out / 'pipeline'}" in stdout


def test_methods(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0 and "uce" in out and "esd" in out


@pytest.mark.parametrize("bug", [ValueError("a bug"), TypeError("a bug"), KeyError("a bug")])
def test_bugs_keep_their_traceback(monkeypatch, bug):
    """Only a UserError is a one-line exit 2: the project's own ValueError / TypeError propagates
    (Python prints its traceback, exit 1)."""
    def broken():
        raise bug

    monkeypatch.setattr(fasterase, "methods", broken)
    with pytest.raises(type(bug), match="a bug"):
        main(["methods"])


def test_non_finite_loss_is_one_line_exit_1(capsys, monkeypatch):
    def diverged():
        raise NonFiniteLoss("non-finite loss (nan) at step 3; stopping")

    monkeypatch.setattr(fasterase, "methods", diverged)
    code, _, err = run(capsys, "methods")
    assert code == 1 and err.strip() == "fasterase methods: error: non-finite loss (nan) at step 3; stopping"


def test_out_of_memory_names_the_plan_of_the_run(capsys, tmp_path, monkeypatch):
    """A run out of memory keeps torch's message, exit 1, with the `fasterase plan` command of the same run
    (model, method, dtype, resolution, concept type, memory options and --set options), which runs."""
    import dataclasses
    import shlex

    from fasterase.methods import REGISTRY

    def out_of_memory(model, concepts, cfg, progress):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")

    monkeypatch.setitem(REGISTRY, "esd", dataclasses.replace(REGISTRY["esd"], run=out_of_memory))
    code, _, err = run(capsys, "erase", "--model", "toy-sd", "--concept", "red", "--concept-type", "style",
                       "--method", "esd", "--set", "steps=3", "--set", "parameters=esd-u", "--micro-batch", "2",
                       "--out", str(tmp_path / "e"))
    lines = err.strip().splitlines()
    assert code == 1 and "Traceback" not in err and not (tmp_path / "e").exists()
    assert lines[0] == "fasterase erase: error: CUDA out of memory. Tried to allocate 2.00 GiB."
    command = shlex.split(lines[1].split("`")[1])
    assert command[:2] == ["fasterase", "plan"]
    assert " ".join(command[2:]) == ("--model toy-sd --method esd --concept-type style --micro-batch 2 --set steps=3 "
                                     "--set parameters=esd-u")
    code, out, _ = run(capsys, *command[1:])
    assert code == 0 and "esd on toy-sd at 32x48 px, concept type style" in out and "micro-batch 2" in out


def test_out_of_memory_on_the_cpu_names_the_plan_of_the_run(capsys, tmp_path):
    """torch's CPU allocator failing (a 1e8 px ESD run's 40 PB noise) is told like a GPU's: its message and
    the plan command, exit 1, no traceback, nothing written."""
    code, _, err = run(capsys, "erase", "--model", "toy-sd", "--concept", "circle", "--method", "esd",
                       "--resolution", "100000000", "--out", str(tmp_path / "e"))
    lines = err.strip().splitlines()[-2:]  # after the progress bar's
    assert code == 1 and "Traceback" not in err and not (tmp_path / "e").exists()
    assert lines[0].startswith("fasterase erase: error: ") and "can't allocate memory" in lines[0]
    assert lines[1].startswith("`fasterase plan --model toy-sd --method esd --resolution 100000000` gives")


def test_out_of_memory_plans_one_concept_and_the_weights_when_loading(tmp_path, monkeypatch, capsys):
    """Several concepts: the options idle for one are left out, so the planner takes the command; a Path
    option is text; out of memory while a folder's weights load: the plan of the weights."""
    import dataclasses
    import shlex
    from pathlib import Path

    from fasterase import api
    from fasterase.methods import REGISTRY

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setitem(REGISTRY, "ant", dataclasses.replace(REGISTRY["ant"], run=out_of_memory))
    with pytest.raises(torch.OutOfMemoryError) as caught:
        fasterase.erase("toy-sd", "circle, square", method="ant", rank=2, checkpoint=Path(tmp_path / "c.pt"),
                        resolution=(32, 64), progress=False)
    note = caught.value.__notes__[0]
    assert "gives this run's memory for one of its concepts part by part" in note
    command = shlex.split(note.split("`")[1])
    assert "rank=2" not in command and f"checkpoint={tmp_path / 'c.pt'}" in command and "32x64" in command
    assert main(command[1:]) == 0 and "ant on toy-sd at 32x64 px" in capsys.readouterr().out
    monkeypatch.setattr(api.models, "load", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError) as caught:
        fasterase.erase("toy-sd", "circle", method="esd", dtype="bf16", progress=False)
    assert "`fasterase plan --model toy-sd --method esd --dtype bf16` gives the model's weights part by part" in (
        caught.value.__notes__[0])


def test_several_concepts_one_rule(capsys, tmp_path, monkeypatch):
    """Commas separate concepts in erase and eval alike, and so does repeating the option; eval
    --edit scores every concept of the edit."""
    from fasterase import eval as eval_module

    for argv, out in ((["--concept", "circle, square"], "a"), (["--concept", "circle", "--concept", "square"], "b")):
        code, _, err = run(capsys, "erase", "--model", "toy-sd", *argv, "--method", "uce", "--out", str(tmp_path / out))
        assert code == 0, err
    a, b = (Edit.load(tmp_path / out) for out in "ab")
    assert [c["name"] for c in a.concepts] == [c["name"] for c in b.concepts] == ["circle", "square"]
    assert a.report["preserve"] == ["triangle", "cross", "star"]
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    scored = []  # what evaluate is asked to score (its scores: test_red_circle_is_erased_and_scored)
    monkeypatch.setattr(eval_module, "evaluate", lambda model, erased, **k: scored.append(erased) or {"concepts": {}})
    monkeypatch.setattr(eval_module, "format_table", lambda report: "")
    code, _, err = run(capsys, "eval", "--edit", str(tmp_path / "a"))
    assert code == 0, err
    assert scored == [["circle", "square"]]


def test_preserve_empty_keeps_nothing_and_is_no_option_a_method_must_use(capsys, tmp_path):
    """--preserve "" is preserve=[]: UCE's prior then holds no kept shape (the edit differs from the
    default's), and ESD, which keeps nothing by name, takes it rather than refusing a preserve set."""
    for argv, out in (([], "default"), (["--preserve", ""], "none")):
        code, _, err = run(capsys, "erase", "--model", "toy-sd", "--concept", "circle", "--method", "uce", *argv,
                           "--out", str(tmp_path / out))
        assert code == 0, err
    default, none = (Edit.load(tmp_path / out) for out in ("default", "none"))
    assert default.report["preserve"] == ["square", "triangle", "cross", "star"] and none.report["preserve"] == []
    assert any(not torch.equal(default.weights[k], none.weights[k]) for k in default.weights)
    code, _, err = run(capsys, "erase", "--model", "toy-sd", "--concept", "circle", "--method", "esd", "--preserve", "",
                       "--set", "steps=1", "--set", "sample_steps=2", "--out", str(tmp_path / "esd"))
    assert code == 0, err
    assert Edit.load(tmp_path / "esd").report["preserve"] == []


def test_red_circle_is_erased_and_scored(capsys, tmp_path):
    """A concept naming a shape with other words: the default preserve set leaves that shape out
    (its prompts are the erase prompts), and eval scores the edit by the shape it names."""
    code, _, err = run(capsys, "erase", "--model", "toy-sd", "--concept", "red circle", "--method", "uce",
                       "--out", str(tmp_path / "e"))
    assert code == 0, err
    edit = Edit.load(tmp_path / "e")
    assert edit.report["preserve"] == ["square", "triangle", "cross", "star"]
    code, stdout, err = run(capsys, "eval", "--edit", str(tmp_path / "e"), "--json", "--repeats", "1")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["erased"] == ["circle"] and report["acc_s"] >= 0.9
    assert report["concepts"]["circle"]["acc"] < 0.9  # the red circles are gone


def test_eval_says_when_erased_is_not_the_edits_concepts(capsys, tmp_path, monkeypatch):
    """--erased overrides what an edit erased: said on stderr, not silently."""
    from fasterase import eval as eval_module

    fasterase.erase("toy-sd", "circle", method="uce", progress=False).edit.save(tmp_path / "e")
    scored = []
    monkeypatch.setattr(eval_module, "evaluate", lambda model, erased, **k: scored.append(erased) or {"concepts": {}})
    monkeypatch.setattr(eval_module, "format_table", lambda report: "")
    for erased, note in (("square", True), ("circle", False), (" Circle", False)):
        code, _, err = run(capsys, "eval", "--edit", str(tmp_path / "e"), "--erased", erased)
        assert code == 0, err
        assert ("note: scoring --erased square as erased; the edit erased circle" in err) == note
    assert scored == [["square"], ["circle"], ["Circle"]]


def _must_not(monkeypatch, target, name, what):
    def fail(*a, **k):
        raise AssertionError(what)

    monkeypatch.setattr(target, name, fail)


def test_demo_checks_what_was_asked_before_any_work(capsys, tmp_path, monkeypatch):
    from fasterase import eval as eval_module
    from fasterase import models

    _must_not(monkeypatch, eval_module, "evaluate", "evaluated before the refusal")
    _must_not(monkeypatch, models, "load", "a model loaded before the refusal")
    code, _, err = run(capsys, "demo", "--method", "nope", "--out", str(tmp_path / "d"))
    one_line_error(code, err, "unknown method 'nope'", "uce, esd, ant")
    code, _, err = run(capsys, "demo", "--models", "toy-sd,my-sd", "--out", str(tmp_path / "d"))
    one_line_error(code, err, "my-sd is not of it", "toy-sd, toy-flux")


@pytest.mark.parametrize("extra,needle", [
    (["--json"], "only the toy world"),
    (["--grid", "g.png", "--repeats", "3"], "--repeats sets how often"),
    (["--grid", "g.png", "--erased", "circle"], "only the toy world"),
])
def test_eval_refuses_a_model_outside_the_toy_world_before_loading_it(capsys, tmp_path, monkeypatch, extra, needle):
    from fasterase import models

    folder = tmp_path / "sd"
    (folder / "vae").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                         "vae": ["diffusers", "AutoencoderKL"]}))
    (folder / "vae" / "config.json").write_text(json.dumps({"sample_size": 512}))
    _must_not(monkeypatch, models, "load", "the model loaded before the refusal")
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "eval", "--model", str(folder), *extra)
    one_line_error(code, err, needle)


def test_a_saved_toy_pipeline_is_known_before_loading(tmp_path):
    from fasterase.toy import components

    components.sd_pipeline().save_pretrained(tmp_path / "toy")
    assert components.is_toy_source(str(tmp_path / "toy")) and components.is_toy_source("toy-flux")
    assert not components.is_toy_source(str(tmp_path)) and not components.is_toy_source("toy-nope")


def test_concept_type_makes_every_concept_of_that_type(capsys, tmp_path, monkeypatch):
    seen = []

    def erase(model, concepts, **kwargs):
        seen.extend(concepts)
        raise UserError("stopped here")

    monkeypatch.setattr(fasterase, "erase", erase)
    code, _, err = run(capsys, "erase", "--model", str(tmp_path / "model"), "--concept", "Van Gogh, Monet",
                       "--concept", "Picasso", "--concept-type", "style", "--method", "esd", "--out",
                       str(tmp_path / "edit"))
    assert code == 2 and "stopped here" in err
    assert [(c.name, c.type) for c in seen] == [("Van Gogh", "style"), ("Monet", "style"), ("Picasso", "style")]
    assert seen[0].prompts()[1] == "a painting by Van Gogh"


def test_sigterm_saves_the_checkpoint_as_an_interrupt_does(capsys, tmp_path, monkeypatch):
    """SIGTERM (a job scheduler's, or `kill`'s) unwinds as Ctrl-C does: training saves its checkpoint
    at the last step taken, and the command exits 143 with one line; the handler is gone after."""
    import os
    import signal

    from fasterase.training import loop

    ckpt, before = tmp_path / "run.ckpt", signal.getsignal(signal.SIGTERM)

    def erase(model, concepts, **kwargs):
        w = torch.nn.Parameter(torch.zeros(3))

        def loss(step, g):
            if step == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return (w - 1).square().sum()

        loop.train(loss, [w], torch.optim.SGD([w], lr=0.1), 10, seed=0, checkpoint=ckpt, progress=False)
        pytest.fail("training went on after SIGTERM")

    monkeypatch.setattr(fasterase, "erase", erase)
    code, _, err = run(capsys, "erase", "--model", "toy-sd", "--concept", "circle", "--method", "esd", "--out",
                       str(tmp_path / "edit"))
    assert code == 143 and err.strip().splitlines()[-1] == "fasterase erase: terminated (SIGTERM)"
    assert f"interrupted after step 3 of 10: saved to {ckpt}" in err
    assert loop.read_checkpoint(ckpt)["step"] == 3 and not (tmp_path / "edit").exists()
    assert signal.getsignal(signal.SIGTERM) is before


def test_set_reads_json_and_pythons_spellings():
    """--set checkpoint=None wrote a checkpoint file named None; True/False were text the options refused."""
    from fasterase.cli import _settings

    assert _settings(["checkpoint=None", "saliency=False", "text_kv=True", "lr=1e-3", "neutral=a blank",
                      "rank=null"]) == {"checkpoint": None, "saliency": False, "text_kv": True, "lr": 1e-3,
                                        "neutral": "a blank", "rank": None}
