"""The examples run end to end and show what they promise."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("tensorboard")
pytest.importorskip("matplotlib")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_relu_story_shows_vanishing_dying_and_skip(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = load("relu_story").main(["--logdir", str(tmp_path), "--quick"])
    vanishing = results["vanishing"]
    first = {name: report.layers[0].grad_norm for name, report in vanishing.items()}
    assert first["Sigmoid"] < first["ReLU"] / 100  # the sigmoid's gradient vanishes on the way down
    skip = results["skip"]
    assert skip["residual"].layers[0].grad_norm > 1e3 * skip["plain"].layers[0].grad_norm
    out = capsys.readouterr().out
    assert "tensorboard --logdir" in out and "relumon summary" in out
    assert {p.name for p in tmp_path.iterdir()} == {"1_vanishing", "2_dying", "3_skip"}


def test_plain_torch_example_kills_a_layer(tmp_path: Path) -> None:
    import relumon

    with warnings.catch_warnings(record=True) as record:
        report = load("plain_torch").main(["--logdir", str(tmp_path)])
    assert report.dead_layers, "the example's learning rate must kill a layer"
    assert any(issubclass(w.category, relumon.DeadUnitsWarning) for w in record)


def test_lightning_example_relu_dies_leaky_keeps_the_gradient_flowing(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    import relumon

    with pytest.warns(relumon.DeadUnitsWarning, match="net.5"):
        reports = load("lightning_dying_relu").main(["--logdir", str(tmp_path), "--epochs", "4"])
    assert reports["ReLU"].dead_layers
    assert not reports["LeakyReLU"].dead_layers
    assert reports["LeakyReLU"].layers[0].grad_norm > 0 == reports["ReLU"].layers[0].grad_norm
    assert max(x.dead_fraction for x in reports["LeakyReLU"]) > 0.5  # the learning rate hurts LeakyReLU too


def test_huggingface_example_prints_dead_ffn_units_per_layer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("transformers")
    picture = tmp_path / "dead.png"
    result = load("huggingface_opt").main(["--logdir", str(tmp_path / "run"), "--quick", "--picture", str(picture)])
    # Windows at the Trainer's logging steps, one dead share per OPT decoder layer's FFN activation.
    assert [step for step, _ in result["timeline"]] == [4, 8]
    assert result["layers"] == ["model.decoder.layers.0.activation_fn", "model.decoder.layers.1.activation_fn"]
    assert all(set(fractions) == set(result["layers"]) for _, fractions in result["timeline"])
    out = capsys.readouterr().out
    assert "share of dead FFN units per layer" in out and "tensorboard --logdir" in out
    assert picture.stat().st_size > 0 and any((tmp_path / "run").rglob("events.out.tfevents.*"))


def test_plasticity_example_runs_quick_and_recycles(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    runs = load("plasticity").main(["--quick", "--plot", str(tmp_path / "p.png"), "--json", str(tmp_path / "p.json")])
    plain, recycled = runs
    assert (plain.name, recycled.name) == ("plain", "recycle")
    assert len(plain.accuracy) == len(recycled.accuracy) == 4
    assert all(0.0 < a <= 1.0 for a in plain.accuracy + recycled.accuracy)
    assert sum(plain.recycled) == 0 and sum(recycled.recycled) > 0  # only the second run recycles
    assert plain.accuracy[0] > 0.5  # load_digits is learnable: the stream starts from a working network
    assert (tmp_path / "p.png").stat().st_size > 0 and (tmp_path / "p.json").is_file()
