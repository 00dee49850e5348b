"""Make the pictures and snippets of docs/where_to_look.md: one Lightning fit logged to TensorBoard, W&B (offline)
and MLflow (a local file store) at once, with relumon's progress-bar figure, and a report's notebook HTML.

    python scripts/where_to_look.py --out docs/img

It copies the PNG that W&B stored under its run's ``files/media/images/`` and the one MLflow stored among its run's
artifacts into ``--out``, and prints the file listings, the progress-bar line and the report's HTML for the page.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs") / "img")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="relumon-where-"))
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(work), MLFLOW_ALLOW_FILE_STORE="true")

    import lightning.pytorch as pl

    from relumon.lightning import ReluMonitor
    from tests.lightning_helpers import boring_module, loader

    loggers = [
        pl.loggers.TensorBoardLogger(str(work / "tb"), name="run", version=0),
        pl.loggers.WandbLogger(save_dir=str(work), offline=True, project="relumon"),
        pl.loggers.MLFlowLogger(experiment_name="relumon", tracking_uri=f"file:{work / 'mlruns'}"),
    ]
    monitor = ReluMonitor(log_every_n_steps=4, measure_every=1, prog_bar=True)
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[monitor], logger=loggers, log_every_n_steps=4, enable_model_summary=False,
        enable_checkpointing=False, accelerator="cpu",
    )  # fmt: skip
    bar = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(bar), contextlib.redirect_stderr(bar):
        warnings.simplefilter("ignore")
        trainer.fit(boring_module(pl, dead_fc2=True), loader(16))
    wandb_run = Path(loggers[1].experiment.dir).parent
    loggers[1].experiment.finish()
    args.out.mkdir(parents=True, exist_ok=True)

    print("== progress bar (last line)")
    print(bar.getvalue().split("\r")[-1].strip())
    print("== trainer.progress_bar_metrics:", trainer.progress_bar_metrics)

    print("== W&B offline run")
    images = sorted((wandb_run / "files" / "media" / "images").rglob("*.png"))
    for image in images:
        print(image.relative_to(wandb_run.parent.parent))
    shutil.copy(next(i for i in images if i.name.startswith("grad_flow")), args.out / "wandb_grad_flow.png")

    print("== MLflow run artifacts")
    artifacts = sorted((work / "mlruns").rglob("artifacts/relumon/*/*.png"))
    for artifact in artifacts:
        print(artifact.relative_to(work))
    shutil.copy(next(a for a in artifacts if "dead_heatmap" in str(a)), args.out / "mlflow_dead_heatmap.png")

    print("== notebook HTML of the last report")
    assert monitor.last_report is not None
    print(monitor.last_report._repr_html_())


if __name__ == "__main__":
    main()
