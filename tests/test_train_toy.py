"""Smoke test of scripts/train_toy.py: every stage runs, and a resumed run is the same run."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fasterase.toy.components import WEIGHTS

SCRIPT = Path(__file__).parents[1] / "scripts" / "train_toy.py"


def train(*args):
    done = subprocess.run([sys.executable, str(SCRIPT), *args, "--threads", "1"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_vae_stage_is_deterministic_and_resumable(tmp_path):
    train("vae", "--steps", "4", "--work", str(tmp_path / "w1"), "--out", str(tmp_path / "o1"))
    train("vae", "--steps", "2", "--work", str(tmp_path / "w2"), "--out", str(tmp_path / "o2"))
    out = train("vae", "--steps", "4", "--work", str(tmp_path / "w2"), "--out", str(tmp_path / "o2"))
    assert "resumed vae at step 2" in out
    assert (tmp_path / "o1" / "vae.safetensors").read_bytes() == (tmp_path / "o2" / "vae.safetensors").read_bytes()


@pytest.mark.parametrize("stage", ["detector", "sd", "flux"])
def test_later_stages_run(tmp_path, stage):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("vae", "detector"):  # the stages' inputs: the shipped autoencoder and detector
        shutil.copy(WEIGHTS / f"{name}.safetensors", out)
    train(stage, "--steps", "2", "--eval-every", "2", "--work", str(tmp_path / "w"), "--out", str(out))
    curve = (tmp_path / "w" / f"{stage}_curve.jsonl").read_text()
    assert ('"shape_acc"' if stage != "detector" else '"heldout_shape_acc"') in curve
