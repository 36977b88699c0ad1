"""The evaluation on the shipped toy pipelines: they really know the concepts."""
import json

import pytest
from PIL import Image

from fasterase import models
from fasterase.cli import main
from fasterase.eval import evaluate, format_table
from fasterase.toy import detector, shapes


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
