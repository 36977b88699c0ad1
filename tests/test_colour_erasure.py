"""A colour is a concept: `fasterase erase --concept red` through the CLI, then `fasterase eval
--edit` scores it by the colour (red images gone; shapes and the other colours kept)."""
import json

from fasterase.cli import main
from fasterase.edit import Edit


def test_erase_red_end_to_end(tmp_path, capsys):
    out = tmp_path / "no-red"
    assert main(["erase", "--model", "toy-sd", "--concept", "red", "--method", "uce", "--out", str(out)]) == 0
    capsys.readouterr()
    concept, = Edit.load(out).concepts
    assert concept["type"] == "style" and "a photo of a red star" in [t.format("red") for t in concept["templates"]]
    assert main(["eval", "--edit", str(out), "--json", "--repeats", "1"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["erased"] == ["red"]
    assert r["acc_e"] <= 0.2 and r["acc_e_heldout"] <= 0.3 and r["acc_e_scene"] <= 0.3
    assert r["acc_s"] >= 0.85 and r["acc_s_scene"] >= 0.8 and r["scenes"]["acc_both"] >= 0.8
    assert r["acc_g"] is None and r["color_s"] is None
    for shape in ("circle", "square", "triangle", "cross", "star"):  # the red prompts still draw their shape
        assert r["concepts"][shape]["acc"] >= 0.85
