"""The evaluation on the shipped toy pipelines: they really know the concepts."""
import importlib
import json

import pytest
from PIL import Image

from fasterase import models
from fasterase.cli import main
from fasterase.errors import UserError
from fasterase.eval import evaluate, format_table
from fasterase.toy import detector, shapes

evaluate_module = importlib.import_module("fasterase.eval.evaluate")  # the package exports its function


def test_detector_accuracy_on_held_out_images():
    import numpy as np
    import torch

    images, _, s_idx, c_idx = shapes.sample(1000, np.random.default_rng(12345), p_empty=0.0, p_no_shape=0.0)
    pred_s, pred_c = detector.load().classify(torch.from_numpy(images))
    assert np.mean([p == shapes.SHAPES[i] for p, i in zip(pred_s, s_idx)]) >= 0.98
    assert np.mean([p == shapes.COLORS[i] for p, i in zip(pred_c, c_idx)]) >= 0.98
    blank = detector.load().classify(torch.from_numpy(shapes.render([None] * 8, [None] * 8, np.random.default_rng(0))))
    assert blank[0] == ["none"] * 8


@pytest.mark.parametrize("name", ["toy-sd", "toy-flux"])
def test_toy_pipelines_know_every_concept(name, tmp_path):
    report = evaluate(models.load(name), grid=tmp_path / "grid.png")
    for shape, r in report["concepts"].items():
        assert r["acc"] >= 0.9, (shape, r)
        assert r["acc_color"] >= 0.9, (shape, r)
        if shapes.SYNONYMS.get(shape):
            assert r["acc_synonyms"] >= 0.8, (shape, r)
        else:
            assert r["acc_synonyms"] is None
    assert Image.open(tmp_path / "grid.png").size[0] > 0
    assert "circle" in format_table(report)


def test_cli_eval_json_with_erased(capsys):
    assert main(["eval", "--model", "toy-flux", "--erased", "circle", "--json", "--repeats", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["repeats"] == 1 and report["images"] == 112  # half of the default 224
    assert set(report["concepts"]) == set(shapes.SHAPES)
    assert report["erased"] == ["circle"]
    # nothing was erased: the original model still draws circles
    assert report["acc_e"] >= 0.9 and report["acc_s"] >= 0.9
    kept = [s for s in shapes.SHAPES if s != "circle"]
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


def test_erased_concepts_are_scored_by_the_shapes_they_name(monkeypatch):
    model = models.load("toy-sd")
    _no_images(monkeypatch, model)
    assert evaluate_module.erased_shapes(["red circle", "disk", "box"]) == ["circle", "square"]
    with pytest.raises(UserError, match="'red' names no toy shape.*circle.*disk"):
        evaluate(model, erased=["red"])
    with pytest.raises(UserError, match="repeats"):
        evaluate(model, repeats=True)


def test_batches_shrink_with_the_image_size():
    from types import SimpleNamespace

    def model(side):
        return SimpleNamespace(pipeline=SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(sample_size=side))))

    assert [evaluate_module._batch_size(model(s)) for s in (32, 512, 768, 1024, 2048)] == [256, 4, 1, 1, 1]


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
    assert main(["eval", "--model", str(folder), "--grid", str(tmp_path / "g.png")]) == 0
    assert "112 sample images" in capsys.readouterr().out and batches == [256]
    assert Image.open(tmp_path / "g.png").size == (16 * 34 * 4, 7 * 34 * 4)  # a row per shape or synonym
    for argv in ([], ["--erased", "circle", "--grid", str(tmp_path / "h.png")], ["--json"],
                 ["--grid", str(tmp_path / "h.png"), "--repeats", "4"]):
        assert main(["eval", "--model", str(folder), *argv]) == 2
        err = capsys.readouterr().err
        assert "toy world" in err and "Traceback" not in err
    assert batches == [256] and not (tmp_path / "h.png").exists()


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
    assert Image.open(grid).size == (2 * 6 * 4, 6 * 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder.png", "g.png", "model_index.json",
                                                         "notes.png"]  # no temporary file left
