"""Smoke test of scripts/ant_reversal.py: plain guidance draws the shape, guidance reversed from the
first step does not, and a t' outside [0, 1] is refused."""
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "ant_reversal.py"


def reversal(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


@pytest.mark.parametrize("model", ["toy-sd", "toy-flux"])
def test_reversing_the_condition_direction_removes_the_shape(model):
    done = reversal("--model", model, "--concept", "circle", "--t-split", "0,1", "--repeats", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|") for line in done.stdout.splitlines() if line.startswith(f"| {model} |")]
    rates = {float(r[2]): float(r[3]) for r in rows}
    assert rates[0.0] >= 0.9  # never reversed: the original model's guided sampling
    assert rates[1.0] <= 0.1  # reversed on every step


def test_t_split_out_of_range_is_refused():
    done = reversal("--t-split", "0.5,1.5")
    assert done.returncode != 0
    assert "t' must lie in [0, 1]" in done.stderr
