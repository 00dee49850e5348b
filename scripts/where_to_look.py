"""Make the pictures and snippets of docs/where_to_look.md: one Lightning fit logged to TensorBoard, W&B (offline)
and MLflow (a local file store) at once, with relumon's progress-bar figure, and a report's notebook HTML.

    python scripts/where_to_look.py --out docs/img

It copies the first gradient-flow chart that W&B stored under its run's ``files/media/images/`` and the last
dead-unit heatmap MLflow stored among its run's artifacts into ``--out``, and prints the file listings, the
progress-bar line and the report's HTML for the page. The run is seeded, so its numbers reproduce; its W&B and MLflow
files live in a temporary directory that is removed at the end. The fit below is the code the page shows.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
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
    try:
        _make(args.out, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _step_in_name(path: Path) -> int:
    """The step number in a logged picture's file name (``grad_flow_10_<hash>.png``, ``step_000016.png``)."""
    found = re.findall(r"\d+", path.stem.replace("grad_flow", "").replace("dead_heatmap", ""))
    return int(found[0]) if found else -1


def _make(out: Path, work: Path) -> None:
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(work))
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 refuses a file: tracking URI without it

    import lightning.pytorch as pl

    from relumon.lightning import ReluMonitor
    from tests.lightning_helpers import boring_module, loader

    pl.seed_everything(0, verbose=False)  # the model's initial weights: the page's numbers reproduce

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
    out.mkdir(parents=True, exist_ok=True)

    print("== progress bar (last line)")
    print(bar.getvalue().split("\r")[-1].strip())
    print("== trainer.progress_bar_metrics:", trainer.progress_bar_metrics)

    print("== W&B offline run")
    images = sorted(
        (wandb_run / "files" / "media" / "images").rglob("*.png"), key=lambda p: (p.parent, _step_in_name(p))
    )
    for image in images:
        print(image.relative_to(wandb_run.parent.parent))
    # By the step in the name: in plain sorted order `grad_flow_10_...` would come before `grad_flow_4_...`.
    first_chart = min((i for i in images if i.name.startswith("grad_flow")), key=_step_in_name)
    print("copied:", first_chart.name)
    shutil.copy(first_chart, out / "wandb_grad_flow.png")

    print("== MLflow run artifacts")
    artifacts = sorted((work / "mlruns").rglob("artifacts/relumon/*/*.png"))
    for artifact in artifacts:
        print(artifact.relative_to(work))
    last_heatmap = max((a for a in artifacts if "dead_heatmap" in str(a)), key=_step_in_name)
    print("copied:", last_heatmap.relative_to(work))
    shutil.copy(last_heatmap, out / "mlflow_dead_heatmap.png")

    print("== notebook HTML of the last report")
    assert monitor.last_report is not None
    print(monitor.last_report._repr_html_())


if __name__ == "__main__":
    main()
