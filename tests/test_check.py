"""``relumon check``: findings from saved weights, exit statuses, ``--against``, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from relumon.check import check_path, main
from tests.check_models import build

ROOT = str(Path(__file__).resolve().parents[1])


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """old.pt (fresh), new.pt (2 zero-scale channels with shift -0.5, 3 with shift -100), whole.pt, a Lightning
    checkpoint, a NaN file and a junk file."""
    torch.manual_seed(0)
    model = build()
    names = ("old.pt", "new.pt", "whole.pt", "l.ckpt", "nan.pt", "junk.pt", "other.pt")
    paths = {name: str(tmp_path / name) for name in names}
    torch.save(torch.nn.Linear(3, 4).state_dict(), paths["other.pt"])
    torch.save(model.state_dict(), paths["old.pt"])
    with torch.no_grad():
        model[1].weight[[0, 1]] = 0.0
        model[1].bias[[0, 1]] = -0.5
        model[1].bias[[2, 3, 4]] = -100.0
    torch.save(model.state_dict(), paths["new.pt"])
    torch.save(model, paths["whole.pt"])
    lightning = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}
    torch.save(lightning, paths["l.ckpt"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["5.weight"][0, 0] = float("nan")
    torch.save(state, paths["nan.pt"])
    Path(paths["junk.pt"]).write_text("not a checkpoint")
    return paths


def kinds(findings: list) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    out: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for f in findings:
        out.setdefault(f.kind, []).append((f.where, f.units))
    return out


def test_weights_alone_say_dead_if_a_relu_follows_and_estimates_dormant(files: dict[str, str]) -> None:
    found = kinds(check_path(files["new.pt"]))
    assert found["dead-if-relu-follows"] == [("1", (0, 1))]
    assert found["probably-dormant"] == [("1", (2, 3, 4))]
    assert "proven-dead" not in found and "nonfinite" not in found
    messages = [f.message for f in check_path(files["new.pt"])]
    assert any("if a ReLU directly follows" in m for m in messages)
    assert any("an estimate and not a proof" in m for m in messages)
    assert check_path(files["old.pt"]) == []  # a fresh model: BatchNorm biases at 0 are no finding
    zeroed = build().state_dict()
    zeroed["0.weight"].zero_()
    torch.save(zeroed, files["old.pt"] + ".zero")
    assert kinds(check_path(files["old.pt"] + ".zero")) == {"all-zero": [("0.weight", ())]}


def test_model_class_proves_them_and_lightning_prefix_is_stripped(files: dict[str, str]) -> None:
    for path, prefix in ((files["new.pt"], ""), (files["l.ckpt"], "model.")):
        found = kinds(check_path(path, model_spec="tests.check_models:build"))
        assert found["proven-dead"] == [(prefix + "2", (0, 1))]
        assert "dead-if-relu-follows" not in found  # said as a proof instead
        assert [units for _, units in found["bound-dead"]] == [(2, 3, 4)]
    found = kinds(check_path(files["whole.pt"], whole_model=True, values_per_channel=2 * 16 * 16))
    assert found["proven-dead"] == [("2", (0, 1)), ("2", (2, 3, 4))]
    # The proofs hold on the loaded model: those channels never fire, in training or eval mode.
    model = build()
    model.load_state_dict(torch.load(files["new.pt"], weights_only=True))
    for mode in (True, False):
        model.train(mode)
        with torch.no_grad():
            out = model[:3](torch.randn(8, 3, 16, 16) * 10)
        assert (out[:, :2] == 0).all()


def test_exit_status_json_and_against(files: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([files["new.pt"]]) == 0
    assert main([files["new.pt"], "--fail-on", "warning"]) == 1
    assert main([files["new.pt"], "--fail-on", "info"]) == 1
    assert main([files["old.pt"], "--fail-on", "info"]) == 0
    assert main([files["nan.pt"]]) == 1
    capsys.readouterr()
    assert main([files["new.pt"], "--model", "tests.check_models:build", "--json", "--against", files["old.pt"]]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["died_since"] == [{"where": "2", "unit": 0}, {"where": "2", "unit": 1}]
    assert {f["kind"] for f in out["findings"]} == {"proven-dead", "probably-dormant", "bound-dead"}
    assert main([files["nan.pt"], "--json"]) == 1
    nan = json.loads(capsys.readouterr().out)
    assert nan["failed"] and nan["findings"][0] == {
        "severity": "error",
        "kind": "nonfinite",
        "where": "5.weight",
        "units": [],
        "message": "1 of 32 values are NaN or Inf",
    }


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["{whole.pt}"], "--whole-model"),
        (["{junk.pt}"], "not a file torch.load can read"),
        (["nope.pt"], "no such file"),
        (["{new.pt}", "--model", "nosuch_module:build"], "cannot import"),
        (["{new.pt}", "--model", "tests.check_models"], "pkg.module:callable"),
        (["{new.pt}", "--model", "tests.check_models:not_a_model"], "not a torch.nn.Module"),
        (["{old.pt}", "--model", "tests.check_models:build", "--input-shape", "2,5,8,8"], "dry forward"),
        (["{other.pt}", "--model", "tests.check_models:build"], "do not fit"),
    ],
)
def test_bad_files_and_arguments_get_one_line(
    files: dict[str, str], args: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [files[a[1:-1]] if a.startswith("{") else a for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_console_entry_point_runs_check(files: dict[str, str]) -> None:
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run(
        [sys.executable, "-m", "relumon.cli", "check", files["new.pt"], "--fail-on", "warning"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 1, done.stderr
    assert "dead-if-relu-follows" in done.stdout and "fails at --fail-on warning" in done.stdout


def test_known_wiring_drops_the_relu_hint_where_something_adds_before_the_relu(tmp_path: Path) -> None:
    # A zero-initialised residual branch: scale 0, shift 0, but the input is added before the ReLU, which fires.
    from tests.check_models import residual

    model = residual()
    path = str(tmp_path / "res.pt")
    torch.save(model.state_dict(), path)
    with torch.no_grad():  # ground truth with a plain forward: the ReLU's channels fire
        assert (model.act(model.bn(model.fc(torch.ones(4, 8))) + torch.ones(4, 8)) > 0).all()
    alone = kinds(check_path(path))
    assert alone["dead-if-relu-follows"] == [("bn", tuple(range(8)))]  # the weights alone: a hedged hint
    known = kinds(check_path(path, model_spec="tests.check_models:residual"))
    assert "dead-if-relu-follows" not in known and "proven-dead" not in known
    assert known["all-zero"] == [("bn.weight", ())]


def test_weights_of_another_shape_name_the_tensor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = dict(build().state_dict())
    state["0.weight"] = torch.zeros(8, 3, 5, 5)  # a 5x5 filter where --model builds 3x3
    path = str(tmp_path / "shape.pt")
    torch.save(state, path)
    assert main([path, "--model", "tests.check_models:build"]) == 2
    err = capsys.readouterr().err
    assert "size mismatch for 0.weight" in err and len(err.strip().splitlines()) == 1
