"""Pictures in TensorBoard, the `relumon summary` CLI, and a real TensorBoard server serving relumon's data."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import relumon
from tests.helpers import MLP, train_steps
from tests.lightning_helpers import boring_module, import_namespace, loader, trainer

pytest.importorskip("tensorboard")
pytest.importorskip("matplotlib")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from relumon.figures import dead_heatmap_figure, grad_flow_figure  # noqa: E402


def dead_run(logdir: Path, windows: int = 4) -> relumon.Monitor:
    """A plain-torch run where act2 is dead from the start and half of act1 dies at window 2 (step 30)."""
    model = MLP()
    with torch.no_grad():
        model.fc2.bias.fill_(-1e3)
    writer = SummaryWriter(str(logdir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", relumon.DeadUnitsWarning)
        with relumon.watch(model, measure_every=1) as monitor:
            for window in range(windows):
                if window == 2:
                    with torch.no_grad():
                        model.fc1.bias[:8] = -1e3
                        model.fc1.weight[:8] = 0.0
                train_steps(model, steps=2, batch=16)
                monitor.log(writer, step=10 * (window + 1))
            monitor.log_figures(writer, step=10 * windows)
    writer.close()
    return monitor


def test_grad_flow_figure_has_one_bar_per_layer_coloured_by_state() -> None:
    model = MLP()
    with torch.no_grad():
        model.fc2.bias.fill_(-1e3)
    with relumon.watch(model, measure_every=1, on_dead="ignore") as monitor:
        train_steps(model, steps=2)
    report = monitor.report()
    fig = grad_flow_figure(report)
    ax = fig.axes[0]
    bars = ax.patches[: len(report)]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["act1", "act2"]
    assert ax.get_yscale() == "log"
    red = (0xC4 / 255, 0x4E / 255, 0x52 / 255, 1.0)
    assert bars[1].get_facecolor() == pytest.approx(red)  # act2: every unit dead
    assert bars[0].get_hatch() == "//"  # act1: no gradient flows back through the dead act2
    png = io.BytesIO()
    fig.savefig(png, format="png")
    assert png.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dead_heatmap_is_layers_by_windows(tmp_path: Path) -> None:
    monitor = dead_run(tmp_path)
    assert [step for step, _ in monitor.timeline] == [10, 20, 30, 40]
    fig = dead_heatmap_figure(monitor.timeline)
    image = fig.axes[0].images[0].get_array()
    assert image.shape == (2, 4)
    assert image[1].tolist() == [1.0, 1.0, 1.0, 1.0]  # act2
    assert image[0, 2] >= 0.5 and image[0, 0] < 0.5  # half of act1 died at window 2


def test_plain_api_writes_images_and_layout(tmp_path: Path) -> None:
    dead_run(tmp_path)
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    assert set(acc.Tags()["images"]) == {"relumon/grad_flow", "relumon/dead_heatmap"}
    image = acc.Images("relumon/grad_flow")[0]
    assert image.step == 40 and image.width > 300 and image.height > 200
    assert "custom_scalars__config__" in acc.Tags()["tensors"]


def test_log_figures_before_any_window_is_a_clear_error(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))  # never log_dir=None: that writes runs/<date>_<host>/ into the cwd
    with relumon.watch(MLP()) as monitor, pytest.raises(relumon.RelumonError, match="no window closed"):
        monitor.log_figures(writer, 0)
    writer.close()


@pytest.mark.parametrize("namespace", ["lightning.pytorch"])
def test_lightning_writes_pictures_each_epoch_and_at_the_end(namespace: str, tmp_path: Path) -> None:
    pl = import_namespace(namespace)
    from relumon.lightning import ReluMonitor

    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="pics", version=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", relumon.DeadUnitsWarning)
        trainer(pl, [ReluMonitor(log_every_n_steps=2, measure_every=1)], logger=logger, max_epochs=2).fit(
            boring_module(pl, dead_fc2=True), loader(4)
        )
    acc = EventAccumulator(str(tmp_path / "pics" / "version_0"), size_guidance={"images": 0})
    acc.Reload()
    steps = [e.step for e in acc.Images("relumon/grad_flow")]
    assert steps == [4, 8]  # end of epoch 1; end of epoch 2, which is the end of fit: once per step
    assert [e.step for e in acc.Images("relumon/dead_heatmap")] == [4, 8]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relumon.cli", *args], capture_output=True, text=True, timeout=120)


def test_summary_prints_a_table_per_run(tmp_path: Path) -> None:
    dead_run(tmp_path / "exp1")
    result = run_cli("summary", str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "run exp1  (last step 40)"
    assert lines[1].split() == [
        "layer",
        "last",
        "dead",
        "%",
        "max",
        "dead",
        "%",
        "first",
        "step",
        "fully",
        "dead",
        "last",
        "grad",
        "norm",
        "note",
    ]
    act1 = next(line.split() for line in lines if line.startswith("act1"))
    act2 = next(line.split() for line in lines if line.startswith("act2"))
    assert act2[1:4] == ["100.0%", "100.0%", "10"]  # dead from the first window, at step 10
    assert act1[3] == "-" and float(act1[1].rstrip("%")) >= 50.0
    assert act1[4] == "0.000e+00"  # nothing flows back through the dead act2...
    assert " ".join(act1[5:]) == "gradient blocked by a dead layer downstream"  # ...and the table says so
    assert " ".join(act2[5:]) == "root of a dead cascade"


def test_summary_of_a_single_run_names_the_directory(tmp_path: Path) -> None:
    dead_run(tmp_path / "exp1")
    result = run_cli("summary", str(tmp_path / "exp1"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "run exp1  (last step 40)"


def test_summary_json(tmp_path: Path) -> None:
    dead_run(tmp_path / "exp1")
    result = run_cli("summary", str(tmp_path), "--json")
    data = json.loads(result.stdout)
    act2 = next(x for x in data["runs"]["exp1"] if x["layer"] == "act2")
    assert act2["first_step_fully_dead"] == 10 and act2["max_dead_fraction"] == 1.0 and act2["windows"] == 4


@pytest.mark.parametrize(
    ("make", "code", "message"),
    [
        (lambda p: p / "missing", 2, "no such directory"),
        (lambda p: p, 1, "no TensorBoard event files"),
    ],
)
def test_summary_errors_are_one_line(tmp_path: Path, make: Any, code: int, message: str) -> None:
    result = run_cli("summary", str(make(tmp_path)))
    assert result.returncode == code
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_summary_without_relumon_data_is_one_line(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    writer.add_scalar("loss", 1.0, 0)
    writer.close()
    result = run_cli("summary", str(tmp_path))
    assert result.returncode == 1 and "no relumon scalars" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_a_real_tensorboard_serves_relumon_scalars_images_and_layout(tmp_path: Path) -> None:
    dead_run(tmp_path / "exp1")
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(tmp_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--reload_interval",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                scalars = _get(f"{base}/data/plugin/scalars/tags")
                if "exp1" in scalars:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                pytest.fail(f"tensorboard did not serve exp1 in time: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)
        assert {"relumon/dead_fraction/act2", "relumon/grad_norm/act1"} <= set(scalars["exp1"])
        series = _get(f"{base}/data/plugin/scalars/scalars?run=exp1&tag=relumon/dead_fraction/act2")
        assert [point[1] for point in series] == [10, 20, 30, 40] and all(p[2] == 1.0 for p in series)
        images = _get(f"{base}/data/plugin/images/tags")
        assert {"relumon/grad_flow", "relumon/dead_heatmap"} <= set(images["exp1"])
        layout = _get(f"{base}/data/plugin/custom_scalars/layout")
        titles = [chart["title"] for category in layout["category"] for chart in category["chart"]]
        assert "dead fraction per layer" in titles
        assert "gradient norm at the activation output (L2 over the batch tensor)" in titles
        assert "units with NaN output" not in titles  # only what is logged
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.slow
def test_the_screenshot_script_captures_tensorboard_in_headless_chromium(tmp_path: Path) -> None:
    import shutil

    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    import importlib.util

    import matplotlib.image
    import numpy as np

    dead_run(tmp_path / "logs" / "exp1")
    script = Path(__file__).resolve().parents[1] / "scripts" / "tensorboard_screenshot.py"
    spec = importlib.util.spec_from_file_location("tensorboard_screenshot", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shots = module.main(["--logdir", str(tmp_path / "logs"), "--out", str(tmp_path / "shots"), "--size", "1200,900"])
    assert {shot.name for shot in shots} == set(module.DASHBOARDS)
    for shot in shots:
        pixels = matplotlib.image.imread(shot)
        assert pixels.shape[:2] == (900, 1200)
        colours = np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
        assert len(colours) > 100, f"{shot.name} looks blank: {len(colours)} colours"
