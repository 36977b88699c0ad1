"""The command line: success paths and every user-error path (one line, exit 2)."""
import json

import pytest

from fasterase.cli import main


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
    (["erase", "--model", "toy-sd", "--concept", "zebra", "--method", "uce", "--out", "X"], ["tokenizes to nothing"]),
    (["erase", "--model", "toy-sd", "--concept", "circle", "--method", "uce", "--set", "lam", "--out", "X"],
     ["bad --set", "key=value"]),
    (["erase", "--model", "toy-sd", "--concept", "circle", "--method", "uce", "--set", "gamma=1", "--out", "X"],
     ["unknown option", "lam"]),
    (["erase", "--model", "toy-sd", "--method", "uce", "--out", "X"], ["--concept"]),
    (["eval"], ["--model"]),
    (["eval", "--model", "toy-sd", "--erased", "hexagon"], ["hexagon", "circle"]),
    (["eval", "--edit", "no/such/folder"], ["not a fasterase edit"]),
    (["eval", "--model", "toy-sd", "--repeats", "0"], ["repeats", ">= 1"]),
    (["frobnicate"], ["invalid choice"]),
])
def test_user_errors(capsys, tmp_path, monkeypatch, argv, needles):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *argv)
    one_line_error(code, err, *needles)
    assert not (tmp_path / "X").exists()


def test_existing_out_is_refused(capsys, tmp_path):
    (tmp_path / "out").mkdir()
    code, _, err = run(capsys, "erase", "--model", "toy-sd", "--concept", "circle", "--method", "uce",
                       "--out", str(tmp_path / "out"))
    one_line_error(code, err, "exists", "--overwrite")


def test_erase_then_eval_edit(capsys, tmp_path):
    out = tmp_path / "edit"
    code, stdout, err = run(capsys, "erase", "--model", "toy-flux", "--concept", "circle", "--method", "uce",
                            "--set", "lam=0.5", "--out", str(out))
    assert code == 0, err
    assert "edit saved" in stdout and (out / "edit.safetensors").is_file()
    code, stdout, err = run(capsys, "eval", "--edit", str(out), "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["model"] == "toy-flux" and report["erased"] == ["circle"]
    assert {"acc_e", "acc_g", "acc_s", "H", "concepts"} <= set(report)
    code, _, err = run(capsys, "erase", "--model", "toy-flux", "--concept", "circle", "--method", "uce",
                       "--out", str(out), "--overwrite", "--save-pipeline")
    assert code == 0, err
    assert (out / "pipeline" / "model_index.json").is_file()


def test_methods(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0 and "uce" in out and "esd" in out
