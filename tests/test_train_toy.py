"""Smoke test of scripts/train_toy.py: every stage runs, and a resumed run is the same run."""
import subprocess
import sys
from pathlib import Path


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


def test_all_stages_run_in_order(tmp_path):
    """`all` trains every stage from scratch (here 2 steps each) into --out, with learning curves."""
    out = tmp_path / "out"
    train("all", "--steps", "2", "--eval-every", "2", "--work", str(tmp_path / "w"), "--out", str(out))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in WEIGHTS.glob("*.safetensors"))
    assert '"heldout_scene_acc"' in (tmp_path / "w" / "detector_curve.jsonl").read_text()
    for stage in ("sd", "flux"):
        assert '"scene_both"' in (tmp_path / "w" / f"{stage}_curve.jsonl").read_text()
