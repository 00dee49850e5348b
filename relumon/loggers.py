"""relumon's pictures to the writers that show them: a ``SummaryWriter``, and every Lightning logger that can show one.

Every adapter reaches its writers from here: `pictures` names relumon's two pictures by tag (the gradient-flow chart
and the dead-unit heatmap, drawn by `relumon.figures`); `write_figures` sends drawn ones to a ``SummaryWriter`` with
``add_figure`` (``Monitor.log_figures``, the Hugging Face callback through the Trainer's ``TensorBoardCallback``);
`PictureWriter` draws them once for all the Lightning loggers that can show an image: TensorBoard, Weights & Biases,
MLflow.

- ``TensorBoardLogger``: an image under the tag (``relumon/grad_flow``, ``relumon/dead_heatmap``) at the step.
- ``WandbLogger``: a W&B image under the same key, through ``WandbLogger.log_image`` (with ``trainer/global_step``).
- ``MLFlowLogger``: a run artifact, one PNG per picture and step: ``relumon/grad_flow/step_000064.png``.
- Any other logger gets the scalars only.

Alerts go the same way as text (`TextWriter`): TensorBoard's ``add_text``, a W&B table (``WandbLogger.log_text``) and
an MLflow text artifact (``relumon/alerts/step_000064.md``).

Loggers are recognised by class name over their MRO, so nothing here imports tensorboard, wandb or mlflow: a logger
that is in use has imported its library already. Each picture is drawn and rendered once, whatever the number of
loggers. A logger that fails to take a picture gets one warning and no more pictures; training goes on.
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

from relumon.errors import RelumonError, warn
from relumon.figures import FIGURE_TAGS, dead_heatmap_figure, grad_flow_figure

if TYPE_CHECKING:
    from relumon.report import Report

__all__ = [
    "PictureWriter",
    "TextWriter",
    "draw",
    "is_tensorboard",
    "picture_logger_kind",
    "pictures",
    "render_rgb",
    "write_figures",
]


def pictures(
    report: Report, timeline: Sequence[tuple[int, Mapping[str, float]]], prefix: str = "relumon"
) -> dict[str, Callable[[], Any]]:
    """relumon's two pictures of a closed window, by tag, each drawn when called: the gradient-flow chart of
    ``report`` (``<prefix>/grad_flow``) and the dead-unit heatmap of ``timeline`` (``<prefix>/dead_heatmap``)."""
    return {
        FIGURE_TAGS["grad_flow"].replace("relumon", prefix, 1): lambda: grad_flow_figure(report),
        FIGURE_TAGS["dead_heatmap"].replace("relumon", prefix, 1): lambda: dead_heatmap_figure(timeline),
    }


def draw(pictures: Mapping[str, Callable[[], Any]]) -> dict[str, Any]:
    """Draw each picture: ``tag -> matplotlib Figure``."""
    return {tag: make() for tag, make in pictures.items()}


def write_figures(writer: Any, figures: Mapping[str, Any], step: int) -> None:
    """Write drawn figures to a ``SummaryWriter`` (``add_figure``, which renders each one) at ``step``."""
    for tag, figure in figures.items():
        writer.add_figure(tag, figure, global_step=step)


#: The Lightning logger classes that get pictures, by class name, with how each is told apart in messages.
PICTURE_LOGGERS: Mapping[str, str] = {
    "TensorBoardLogger": "TensorBoard",
    "WandbLogger": "Weights & Biases",
    "MLFlowLogger": "MLflow",
}


def picture_logger_kind(logger: Any) -> Optional[str]:
    """The class name in ``PICTURE_LOGGERS`` that ``logger`` is an instance of (either Lightning namespace), or None."""
    for cls in type(logger).__mro__:
        if cls.__name__ in PICTURE_LOGGERS:
            return cls.__name__
    return None


def is_tensorboard(logger: Any) -> bool:
    """A TensorBoardLogger of either namespace, without importing tensorboard."""
    return picture_logger_kind(logger) == "TensorBoardLogger"


def render_rgb(figure: Any) -> Any:
    """Render a matplotlib figure with Agg, as TensorBoard's ``add_figure`` does: a ``(height, width, 3)`` uint8 array.

    The figure is not registered with pyplot, so nothing is left open once it is dropped.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas: Any = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()


def _to_tensorboard(logger: Any, tag: str, image: Any, step: int) -> None:
    logger.experiment.add_image(tag, image, global_step=step, dataformats="HWC")


def _to_wandb(logger: Any, tag: str, image: Any, step: int) -> None:
    logger.log_image(key=tag, images=[image], step=step)


def _to_mlflow(logger: Any, tag: str, image: Any, step: int) -> None:
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="relumon-") as directory:
        path = os.path.join(directory, f"step_{step:06d}.png")
        Image.fromarray(image).save(path)
        logger.experiment.log_artifact(logger.run_id, path, artifact_path=tag)


_WRITE: Mapping[str, Callable[[Any, str, Any, int], None]] = {
    "TensorBoardLogger": _to_tensorboard,
    "WandbLogger": _to_wandb,
    "MLFlowLogger": _to_mlflow,
}


class PictureWriter:
    """Writes pictures to the loggers that can show them, at most once per step; a failure warns once per logger.

    Plain data only (it travels with the callback when Lightning pickles it for spawned workers).
    """

    def __init__(self) -> None:
        self.enabled = True
        self.last_step: Optional[int] = None
        self._failed: set[str] = set()

    def write(self, loggers: Any, pictures: Mapping[str, Callable[[], Any]], step: int) -> None:
        """Draw each ``tag -> make_figure`` once and send it to every logger in ``loggers`` that can show it.

        Does nothing when the pictures for ``step`` were written already, or when no logger takes pictures.
        """
        if not self.enabled or step == self.last_step:
            return
        targets = [(kind, logger) for logger in loggers if (kind := picture_logger_kind(logger)) is not None]
        targets = [(kind, logger) for kind, logger in targets if kind not in self._failed]
        if not targets:
            return
        self.last_step = step
        for tag, make in pictures.items():
            try:
                image = render_rgb(make())
            except RelumonError as err:  # matplotlib missing: say so once, keep training
                self.enabled = False
                warn(f"{err}. relumon goes on without pictures.")
                return
            for kind, logger in targets:
                if kind in self._failed:
                    continue
                try:
                    _WRITE[kind](logger, tag, image, step)
                except Exception as err:  # a picture is never worth a training run
                    self._failed.add(kind)
                    warn(
                        f"relumon could not write its picture `{tag}` to {PICTURE_LOGGERS[kind]} "
                        f"({type(err).__name__}: {err}). It sends no more pictures there; scalars go on, and so "
                        "does training."
                    )


def _text_to_tensorboard(logger: Any, tag: str, text: str, step: int) -> None:
    logger.experiment.add_text(tag, text, global_step=step)


def _text_to_wandb(logger: Any, tag: str, text: str, step: int) -> None:
    logger.log_text(key=tag, columns=["step", "alerts"], data=[[step, text]], step=step)


def _text_to_mlflow(logger: Any, tag: str, text: str, step: int) -> None:
    logger.experiment.log_text(logger.run_id, text, f"{tag}/step_{step:06d}.md")


_WRITE_TEXT: Mapping[str, Callable[[Any, str, str, int], None]] = {
    "TensorBoardLogger": _text_to_tensorboard,
    "WandbLogger": _text_to_wandb,
    "MLFlowLogger": _text_to_mlflow,
}


class TextWriter:
    """Writes a text (the alerts of a window) to the loggers that can show one; a failure warns once per logger.

    Plain data only, like `PictureWriter`.
    """

    def __init__(self) -> None:
        self._failed: set[str] = set()

    def write(self, loggers: Any, tag: str, text: str, step: int) -> None:
        """Send ``text`` under ``tag`` at ``step`` to every logger in ``loggers`` that can show text."""
        for logger in loggers:
            kind = picture_logger_kind(logger)
            if kind is None or kind in self._failed:
                continue
            try:
                _WRITE_TEXT[kind](logger, tag, text, step)
            except Exception as err:  # an alert's text is never worth a training run
                self._failed.add(kind)
                warn(
                    f"relumon could not write its alerts as text `{tag}` to {PICTURE_LOGGERS[kind]} "
                    f"({type(err).__name__}: {err}). It sends no more text there; the warning and scalars go on, "
                    "and so does training."
                )
