"""Where Lightning users already look: pictures in W&B and MLflow, the dead share in the progress bar, and warnings
that point at the user's code. Real libraries throughout: wandb offline, an MLflow file store, real Trainer fits."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest

import relumon
from tests.lightning_helpers import boring_module, import_namespace, loader, trainer

pytest.importorskip("matplotlib")

PICTURES = ("grad_flow", "dead_heatmap")


@pytest.fixture
def pl() -> Any:
    return import_namespace("lightning.pytorch")


def fit_with(pl: Any, logger: Any, **callback: Any) -> Any:
    """Two epochs of 4 steps, windows of 2 steps, act2 dead from the start: pictures at steps 4 and 8."""
    from relumon.lightning import ReluMonitor

    monitor = ReluMonitor(log_every_n_steps=2, measure_every=1, **callback)
    fit = trainer(pl, [monitor], logger=logger, max_epochs=2, log_every_n_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", relumon.DeadUnitsWarning)
        fit.fit(boring_module(pl, dead_fc2=True), loader(4))
    return fit


def test_wandb_offline_run_holds_relumons_pictures(pl: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = pl.loggers.WandbLogger(save_dir=str(tmp_path), offline=True, project="relumon-test")
    try:
        fit_with(pl, logger)
        run_dir = Path(logger.experiment.dir).parent  # <save_dir>/wandb/offline-run-.../files -> the run
    finally:
        logger.experiment.finish()
    images = run_dir / "files" / "media" / "images" / "relumon"
    for picture in PICTURES:
        files = sorted(images.glob(f"{picture}_*.png"))
        assert len(files) == 2, files  # steps 4 and 8, once each
        assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # nothing left open in pyplot


def test_mlflow_run_holds_pictures_as_artifacts_and_the_scalars(
    pl: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    logger = pl.loggers.MLFlowLogger(experiment_name="relumon", tracking_uri=f"file:{tmp_path / 'mlruns'}")
    fit_with(pl, logger)
    client = logger.experiment
    for picture in PICTURES:
        listed = [a.path for a in client.list_artifacts(logger.run_id, f"relumon/{picture}")]
        assert listed == [f"relumon/{picture}/step_000004.png", f"relumon/{picture}/step_000008.png"]
    local = Path(client.download_artifacts(logger.run_id, "relumon/grad_flow/step_000008.png", str(tmp_path)))
    assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dead = client.get_metric_history(logger.run_id, "relumon/dead_fraction/net.3")
    assert [(m.step, m.value) for m in dead] == [(2, 1.0), (4, 1.0), (6, 1.0), (8, 1.0)]
    assert client.get_metric_history(logger.run_id, "relumon/summary/dead_fraction")


def test_a_logger_that_cannot_take_pictures_warns_once_and_training_goes_on(pl: Any, tmp_path: Path) -> None:
    class WandbLogger(pl.loggers.CSVLogger):  # named like W&B's logger, but it has no log_image
        pass

    logger = WandbLogger(str(tmp_path))
    with pytest.warns(
        relumon.RelumonWarning, match="could not write its picture `relumon/grad_flow` to Weights"
    ) as rec:
        fit = fit_with(pl, logger)
    assert fit.global_step == 8 and fit.state.finished
    assert sum("could not write its picture" in str(w.message) for w in rec) == 1
    assert (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").is_file()  # the scalars still went out


def test_prog_bar_shows_the_dead_share_of_each_closed_window(pl: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from relumon.lightning import ReluMonitor

    relu_monitor = ReluMonitor(log_every_n_steps=2, measure_every=1, prog_bar=True)
    seen: list[tuple[int, float, float]] = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            shown = trainer.progress_bar_metrics.get("dead%")
            if shown is not None:
                report = relu_monitor.last_report
                seen.append((trainer.global_step, float(shown), 100 * report.dead_fraction))

    class KillHalfOfAct1(pl.Callback):  # at step 4, so that the dead share changes between windows
        def on_train_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            if trainer.global_step == 4:
                import torch

                with torch.no_grad():
                    pl_module.net[0].weight[:8] = 0.0
                    pl_module.net[0].bias[:8] = -1e3

    fit = trainer(
        pl,
        [relu_monitor, Watch(), KillHalfOfAct1()],
        max_epochs=2,
        enable_progress_bar=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", relumon.DeadUnitsWarning)
        fit.fit(boring_module(pl, dead_fc2=True), loader(4))
    assert [step for step, _, _ in seen] == [2, 3, 4, 5, 6, 7, 8]  # from the first closed window on
    assert all(shown == pytest.approx(expected) for _, shown, expected in seen)
    assert seen[0][1] >= 100 * 12 / 28  # act2's 12 units of 28 are dead from the start
    assert seen[-1][1] >= 100 * 20 / 28 > seen[0][1]  # 8 units of act1 died at step 4: the bar followed
    assert fit.progress_bar_metrics["dead%"] == pytest.approx(seen[-1][1])
    drawn = capsys.readouterr()
    # TQDM drew it (dead%=71.4), or Rich where `rich` is installed (transformers brings it): dead%: 71.429.
    drawn_text = drawn.out + drawn.err
    assert f"dead%={seen[-1][1]:.3g}" in drawn_text or f"dead%: {seen[-1][1]:.3g}" in drawn_text


def test_prog_bar_is_off_by_default(pl: Any) -> None:
    fit = fit_with(pl, False)
    assert "dead%" not in fit.progress_bar_metrics


SCRIPT = """
    import lightning.pytorch as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from relumon.lightning import ReluMonitor

    class Boring(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
            with torch.no_grad():
                self.net[0].bias.fill_(-1e3)

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    data = DataLoader(TensorDataset(torch.randn(16, 8)), batch_size=4)
    trainer = pl.Trainer(max_epochs=1, callbacks=[ReluMonitor(measure_every=1, log_every_n_steps=2)], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(Boring(), data)  # the line the warning points at
"""


@pytest.mark.parametrize("script", ["train.py", "train_lightning.py"])
def test_dead_layer_warning_points_at_the_fit_call_with_its_category(tmp_path: Path, script: str) -> None:
    pytest.importorskip("lightning")
    path = tmp_path / script
    path.write_text(textwrap.dedent(SCRIPT))
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "trainer.fit(" in text)
    result = subprocess.run(
        [sys.executable, str(path)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "default"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    warning = next(x for x in result.stderr.splitlines() if "all 16 units of `net.1`" in x)
    # Lightning's formatter drops the category for paths containing "lightning": relumon keeps it in sight.
    assert warning.startswith(f"{path}:{line}: DeadUnitsWarning: relumon: all 16 units"), warning
