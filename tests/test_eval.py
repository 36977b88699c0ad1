"""The evaluation on the shipped toy pipelines: they really know the concepts."""
import importlib
import json
import shutil

import pytest
from PIL import Image

import fasterase
from fasterase import Concept, models
from fasterase.cli import main
from fasterase.errors import UserError
from fasterase.eval import evaluate, format_table
from fasterase.toy import detector, shapes

evaluate_module = importlib.import_module("fasterase.eval.evaluate")  # the package exports its function


@pytest.mark.parametrize("p_scene", [0.0, 1.0], ids=["one shape", "two shapes"])
def test_detector_accuracy_on_held_out_images(p_scene):
    """Every shape's presence and every present shape's colour right, on images no training step drew."""
    import numpy as np
    import torch

    images, _, scenes = shapes.sample(600, np.random.default_rng(12345), p_empty=0.0, p_no_shape=0.0,
                                      p_scene=p_scene)
    found = detector.load().classify(torch.from_numpy(images))
    assert np.mean([f == dict(sc) for f, sc in zip(found, scenes)]) >= 0.98
    blank = detector.load().classify(torch.from_numpy(shapes.render([[]] * 8, np.random.default_rng(0))))
    assert blank == [{}] * 8


@pytest.mark.parametrize("name", ["toy-sd", "toy-flux"])
def test_toy_pipelines_know_every_concept(name, tmp_path):
    """The issue's bars for the shipped world: every shape and colour >= 0.95, two-shape prompts
    with both shapes >= 0.85; each prompt sampled once (392 images; the README's figures: twice)."""
    report = evaluate(models.load(name), repeats=1, grid=tmp_path / "grid.png")
    assert set(report["concepts"]) == set(shapes.SHAPES) | set(shapes.COLORS)
    for concept, r in report["concepts"].items():
        assert r["acc"] >= 0.95 and r["acc_heldout"] >= 0.9, (concept, r)
        if concept in shapes.SHAPES:
            assert r["acc_color"] >= 0.95, (concept, r)
        if shapes.SYNONYMS.get(concept):
            assert r["acc_synonyms"] >= 0.8, (concept, r)
        else:
            assert r["acc_synonyms"] is None
    assert report["scenes"]["acc_both"] >= 0.85
    assert Image.open(tmp_path / "grid.png").size == (8 * 50 * 4, 49 * 34 * 4)
    table = format_table(report)
    assert "circle" in table and "held-out" in table and "scenes: both shapes" in table


def test_cli_eval_json_with_erased(capsys):
    assert main(["eval", "--model", "toy-flux", "--erased", "circle, square", "--json", "--repeats", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["repeats"] == 1 and report["images"] == 392  # half of the default 784
    assert set(report["concepts"]) == set(shapes.SHAPES) | set(shapes.COLORS)
    assert report["erased"] == ["circle", "square"]
    # nothing was erased: the original model still draws circles and squares, alone and in scenes
    assert report["acc_e"] >= 0.9 and report["acc_e_heldout"] >= 0.9 and report["acc_s"] >= 0.9
    assert report["acc_e_scene"] >= 0.8 and report["acc_s_scene"] >= 0.8 and report["acc_e_pair"] >= 0.8
    assert set(report["scenes"]) == {"acc_both"}
    kept = ["triangle", "cross", "star"]
    assert report["color_s"] == pytest.approx(sum(report["concepts"][s]["acc_color"] for s in kept) / len(kept))
    assert 0.0 <= report["H"] <= 0.2


def _not_toy():
    """toy-sd with one more word in its tokenizer: a model of another world, cheap to run."""
    model = models.load("toy-sd")
    model.pipeline.tokenizer.add_tokens(["zebra"])
    return model


def _no_images(monkeypatch, model):
    def generate(*a, **k):
        raise AssertionError("images were drawn")

    monkeypatch.setattr(model, "generate", generate)


def test_scores_outside_the_toy_world_are_refused_before_any_work(monkeypatch):
    model = _not_toy()
    _no_images(monkeypatch, model)
    with pytest.raises(UserError, match="only the toy world .* has one.*--grid"):
        evaluate(model)


def test_erased_concepts_are_scored_by_the_shapes_or_colours_they_name(monkeypatch):
    model = models.load("toy-sd")
    _no_images(monkeypatch, model)
    assert evaluate_module.erased_concepts(["red circle", "disk", "box"]) == ["circle", "square"]
    assert evaluate_module.erased_concepts(["red", "blue"]) == ["red", "blue"]
    with pytest.raises(UserError, match=r"\['circle', 'red'\] mix shapes and colours"):  # commas split, a string is one
        evaluate(model, erased="circle, red")
    with pytest.raises(UserError, match="'small'.* name no toy shape or colour.*circle.*red"):
        evaluate(model, erased=["small"])
    with pytest.raises(UserError, match="mix shapes and colours"):
        evaluate(model, erased=["red", "circle"])
    with pytest.raises(UserError, match="repeats"):
        evaluate(model, repeats=True)


def test_evaluation_prompts():
    """Every shape x colour with the method templates, synonyms, held-out templates, and scenes
    covering every ordered pair of shapes and every pair of colours."""
    items = evaluate_module._items()
    kinds = [k for _, _, k in items]
    assert kinds.count("plain") == 5 * 4 * len(shapes.TEMPLATES)
    assert kinds.count("heldout") == 5 * 4 * len(shapes.HELDOUT_TEMPLATES)
    assert kinds.count("synonym") == 2 * 4 * len(shapes.TEMPLATES)
    scenes = [objs for _, objs, k in items if k == "scene"]
    assert {(a[0], b[0]) for a, b in scenes} == {(a, b) for a in shapes.SHAPES for b in shapes.SHAPES if a != b}
    assert {(a[1], b[1]) for a, b in scenes} == {(a, b) for a in shapes.COLORS for b in shapes.COLORS}
    for prompt, objs, kind in items:
        held = any(prompt == shapes.caption(t, (objs[0][0], objs[0][1])) for t in shapes.HELDOUT_TEMPLATES)
        assert held == (kind == "heldout"), prompt


def test_batches_shrink_with_the_image_size():
    from types import SimpleNamespace

    def model(side):
        return SimpleNamespace(pipeline=SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(sample_size=side))))

    assert [evaluate_module._batch_size(model(s)) for s in (48, 512, 768, 1024, 2048)] == [256, 4, 1, 1, 1]


def test_cli_eval_outside_the_toy_world(capsys, tmp_path, monkeypatch):
    """A local folder of another world: a grid alone works, in batches; scores are refused up front."""
    folder = tmp_path / "sd"
    _not_toy().pipeline.save_pretrained(folder)
    batches = []
    real = models.Denoiser.generate

    def generate(self, prompts, seed, batch_size=256):
        batches.append(batch_size)
        return real(self, prompts, seed, batch_size)

    monkeypatch.setattr(models.Denoiser, "generate", generate)
    prompts = ["--prompt", "a red circle", "--prompt", "a green triangle", "--prompt", "a blue square"]
    assert main(["eval", "--model", str(folder), "--grid", str(tmp_path / "g.png"), *prompts]) == 0
    assert "3 sample images" in capsys.readouterr().out and batches == [256]
    # one row of the three, at the UNet's own default size (sample_size x VAE factor: 32x32)
    assert Image.open(tmp_path / "g.png").size == (3 * 34 * 4, 1 * 34 * 4)
    for argv, needle in [([], "toy world"), (["--erased", "circle", "--grid", str(tmp_path / "h.png")], "toy world"),
                         (["--json"], "toy world"), (["--grid", str(tmp_path / "h.png"), "--repeats", "4"], "toy world"),
                         (["--grid", str(tmp_path / "h.png")], "draws the prompts given with --prompt")]:
        assert main(["eval", "--model", str(folder), *argv]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err
    # its size and steps, which the toy world refuses; a bad size before any weights load
    calls = []
    monkeypatch.setattr(models.Denoiser, "generate", lambda self, prompts, seed, batch_size=256: calls.append(
        dict(self.sample_kwargs)) or real(self, prompts, seed, batch_size))
    assert main(["eval", "--model", str(folder), "--grid", str(tmp_path / "s.png"), *prompts[:4], "--resolution",
                 "64x96", "--sample-steps", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert calls[-1]["num_inference_steps"] == 3 and (calls[-1]["height"], calls[-1]["width"]) == (64, 96)
    assert report["resolution"] == [64, 96] and report["sample_steps"] == 3
    assert Image.open(tmp_path / "s.png").size == (98 * 2 * 2, 66 * 2)  # tiles enlarged to 128 px and more
    assert main(["eval", "--model", str(folder), "--grid", str(tmp_path / "t.png"), *prompts, "--resolution",
                 "65"]) == 2 and "65" in capsys.readouterr().err
    for extra in (prompts, ["--resolution", "64"], ["--sample-steps", "3"]):
        assert main(["eval", "--model", "toy-sd", "--grid", str(tmp_path / "h.png"), *extra]) == 2
        assert "toy world's grid shows the prompts it scores" in capsys.readouterr().err
    monkeypatch.setattr(models.Denoiser, "generate", generate)
    assert batches == [256] and not (tmp_path / "h.png").exists()
    # an edit's grid: its concept in its templates (one row), where no --prompt is given
    result = fasterase.erase(str(folder), Concept("circle", templates=("a {}", "a red {}")), method="uce",
                             progress=False)
    result.edit.save(tmp_path / "edit")
    assert main(["eval", "--edit", str(tmp_path / "edit"), "--grid", str(tmp_path / "e.png"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prompts"] == ["a circle", "a red circle"] and Image.open(tmp_path / "e.png").size == (2 * 34 * 4, 34 * 4)
    assert main(["eval", "--model", str(folder), "--grid", str(folder / "unet" / "g.png"), *prompts]) == 2
    assert "is or lies in the model's own folder" in capsys.readouterr().err
    assert not (folder / "unet" / "g.png").exists()
    shutil.move(folder, tmp_path / "moved")
    assert main(["eval", "--edit", str(tmp_path / "edit"), "--grid", str(tmp_path / "e.png")]) == 2
    assert "no model folder now; pass --model" in capsys.readouterr().err


def test_grid_paths_are_checked_before_any_sampling(capsys, tmp_path, monkeypatch):
    """`eval --grid` replaced any file (model_index.json too) after sampling; now only a .png path in
    an existing folder, new or a PNG, and it is checked first; `demo --out` too."""
    import torch

    from fasterase.eval import save_grid

    monkeypatch.setattr(models, "load", lambda m: pytest.fail("loaded a model before checking the grid path"))
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "notes.png").write_text("not a png")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "file").write_text("a file")
    for path, needle in [("model_index.json", "must be a .png"), ("notes.png", "not a PNG"),
                         ("folder.png", "is a folder"), ("missing/g.png", "does not exist"),
                         ("file/g.png", "does not exist")]:
        assert main(["eval", "--model", "toy-sd", "--grid", str(tmp_path / path)]) == 2
        assert needle in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "file")]) == 2
    assert "must be a folder" in capsys.readouterr().err
    assert (tmp_path / "model_index.json").read_text() == "{}" and (tmp_path / "notes.png").read_text() == "not a png"
    grid = tmp_path / "g.png"
    save_grid(torch.rand(2, 3, 4, 4), grid, columns=2)
    save_grid(torch.rand(2, 3, 4, 4), grid, columns=2)  # a PNG is replaced
    monkeypatch.setattr(Image.Image, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_grid(torch.rand(2, 3, 4, 4), grid, columns=2)
    assert Image.open(grid).size == (2 * 6 * 32, 6 * 32)  # 4 px tiles enlarged 32x, to 128 px
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder.png", "g.png", "model_index.json",
                                                         "notes.png"]  # no temporary file left
