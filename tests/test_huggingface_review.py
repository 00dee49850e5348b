"""A hostile review of the Hugging Face Trainer callback (issue 26): each test reproduces a defect the review found,
with its own ground truth (a plain forward hook, files on disk, the Trainer's own logs)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import relumon

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("tensorboard")
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from relumon.cli import main  # noqa: E402
from relumon.huggingface import ReluMonitorCallback  # noqa: E402
from tests.hf_helpers import ACTS, trainer  # noqa: E402

DEAD0, PART1 = ACTS


def test_relumon_summary_shows_a_trainer_run_next_to_a_plain_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # One logdir, two runs: a plain loop's monitor.log (relumon/...) and a Trainer's (train/relumon/...). The summary
    # showed only the plain run, silently dropping the Trainer run and its dead layer.
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with relumon.watch(model, measure_every=1) as monitor, SummaryWriter(str(tmp_path / "plain")) as writer:
        model(torch.randn(16, 4)).sum().backward()
        monitor.log(writer, step=1)
    with pytest.warns(relumon.DeadUnitsWarning):
        trainer(tmp_path / "hf", [ReluMonitorCallback(measure_every=1)], max_steps=2, logging_steps=2).train()
    capsys.readouterr()
    assert main(["summary", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    hf_run = next(name for name in out["runs"] if name.startswith("hf"))
    assert set(out["runs"]) == {"plain", hf_run}
    assert {x["layer"]: x["last_dead_fraction"] for x in out["runs"][hf_run]}[DEAD0] == 1.0
    assert [a["step"] for a in out["alerts"][hf_run]] == [2]


def test_relumon_summary_finds_a_custom_prefix(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # prefix="mon" under the Trainer writes train/mon/...: it was "no relumon scalars", naming no prefix.
    with pytest.warns(relumon.DeadUnitsWarning):
        trainer(tmp_path, [ReluMonitorCallback(measure_every=1, prefix="mon")], max_steps=2, logging_steps=2).train()
    capsys.readouterr()
    assert main(["summary", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ((_, layers),) = out["runs"].items()
    assert {x["layer"]: x["last_dead_fraction"] for x in layers}[DEAD0] == 1.0
    ((_, alerts),) = out["alerts"].items()
    assert [a["step"] for a in alerts] == [2]
    # Another tool's tags that merely look alike (no dead_units next to dead_fraction) are not taken for relumon's.
    with SummaryWriter(str(tmp_path / "other")) as writer:
        writer.add_scalar("probe/dead_fraction/x", 0.5, global_step=1)
    from relumon.cli import detect_prefixes

    assert detect_prefixes(str(tmp_path)) == ["train/mon"]


def test_restore_callback_states_says_which_options_it_could_not_restore(tmp_path: Path) -> None:
    # With restore_callback_states_from_checkpoint=True transformers replaces the callback by one rebuilt from the
    # JSON args: a callable on_dead and `types` were silently replaced by their defaults.
    seen: list[object] = []
    first = ReluMonitorCallback(measure_every=1, on_dead=seen.append, types=(nn.ReLU,))
    trainer(tmp_path, [first], max_steps=2, save_strategy="steps", save_steps=2).train()
    assert len(seen) == 1  # the callable got the first run's alert
    mine = ReluMonitorCallback(measure_every=1, on_dead=seen.append, types=(nn.ReLU,))
    run = trainer(tmp_path, [mine], max_steps=4, restore_callback_states_from_checkpoint=True)
    with pytest.warns(relumon.RelumonWarning, match=r"without `on_dead`, `types` \(JSON cannot hold them\)"):
        run.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    live = next(cb for cb in run.callback_handler.callbacks if isinstance(cb, ReluMonitorCallback))
    assert live is not mine and live.on_dead == "warn"  # what the warning says
    assert [step for step, _ in live.history] == [2, 4] and mine.history == []
    # Without the flag, your callback runs with your options, and nothing is said.
    mine = ReluMonitorCallback(measure_every=1, on_dead=seen.append, types=(nn.ReLU,))
    run = trainer(tmp_path, [mine], max_steps=4)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert not [w for w in record if "JSON cannot hold" in str(w.message)]
    assert mine.on_dead == seen.append and [step for step, _ in mine.history] == [2, 4]


def _hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_your_own_training_step_on_the_instance_is_kept(tmp_path: Path) -> None:
    # A training_step set on the Trainer instance (a patch of your own) was deleted with relumon's wrapper at the end
    # of train(): the next train() ran without it.
    import types

    run = trainer(tmp_path, [ReluMonitorCallback(measure_every=1)], max_steps=2)
    calls: list[int] = []
    original = run.training_step

    def patched(self: object, *args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(*args, **kwargs)

    run.training_step = types.MethodType(patched, run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", relumon.DeadUnitsWarning)
        run.train()
        assert len(calls) == 2 and run.training_step.__func__ is patched  # put back after train()
        run.train()
    assert len(calls) == 4  # and used by the next train() too


def test_two_callbacks_leave_the_trainer_as_they_found_it(tmp_path: Path) -> None:
    # Two callbacks wrap training_step in turn; whichever detaches first, the Trainer ends with no wrapper.
    callbacks = [ReluMonitorCallback(measure_every=1, prefix=p) for p in ("a", "b")]
    model_run = trainer(tmp_path, callbacks, max_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", relumon.DeadUnitsWarning)
        model_run.train()
    assert "training_step" not in vars(model_run) and _hook_count(model_run.model) == 0
    assert all(cb.last_report is not None and cb.last_report[PART1].dead_units == 4 for cb in callbacks)


def test_a_callable_on_dead_that_raises_removes_the_hooks(tmp_path: Path) -> None:
    # on_dead="raise" removed the hooks before raising; a callable that raises left them (and the wrapper) behind.
    class Abort(Exception):
        pass

    def abort(layer: relumon.LayerReport) -> None:
        raise Abort(layer.name)

    run = trainer(tmp_path, [ReluMonitorCallback(measure_every=1, on_dead=abort)], max_steps=4)
    with pytest.raises(Abort, match=DEAD0):
        run.train()
    assert _hook_count(run.model) == 0 and "training_step" not in vars(run)


def test_two_prefixes_that_read_alike_keep_their_own_files(tmp_path: Path) -> None:
    # "enc/relu" and "enc_relu" both made relumon-enc_relu.pt: the second save overwrote the first's per-unit history.
    first = [ReluMonitorCallback(measure_every=1, prefix=p) for p in ("enc/relu", "enc_relu")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", relumon.DeadUnitsWarning)
        trainer(tmp_path, first, max_steps=2, save_strategy="steps", save_steps=2).train()
    files = sorted(p.name for p in (tmp_path / "checkpoint-2").glob("relumon-*.pt"))
    assert len(files) == 2, files
    second = [ReluMonitorCallback(measure_every=1, prefix=p) for p in ("enc/relu", "enc_relu")]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(tmp_path, second, max_steps=4).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert not [w for w in record if "cannot be read" in str(w.message)]
    assert all([step for step, _ in cb.history] == [2, 4] for cb in second)


def test_epoch_pictures_under_step_logging_hold_the_window_of_their_step(tmp_path: Path) -> None:
    # 4 steps per epoch, a log every 3: the picture at the end of epoch 1 (step 4) held only the window closed at 3.
    from transformers import TrainerCallback

    callback = ReluMonitorCallback(measure_every=1)
    drawn: list[tuple[int, int]] = []

    class Spy(TrainerCallback):
        """Records, per heatmap written, its step and the newest window the callback had closed then."""

        def on_train_begin(self, args: object, state: object, control: object, **kwargs: object) -> None:
            writer = callback._tensorboard.tb_writer
            add_figure = writer.add_figure

            def spy(tag: str, figure: object, global_step: int) -> None:
                if tag.endswith("dead_heatmap"):
                    drawn.append((global_step, callback.history[-1][0]))
                add_figure(tag, figure, global_step=global_step)

            writer.add_figure = spy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", relumon.DeadUnitsWarning)
        trainer(tmp_path, [callback, Spy()], n=8, max_steps=-1, num_train_epochs=3, logging_steps=3).train()
    assert [step for step, _ in callback.history] == [3, 6, 9, 12]
    assert drawn == [(6, 6), (9, 9), (12, 12)]  # one per epoch, each at the step of the newest window it holds


def test_a_logger_added_after_the_trainer_was_built_gets_the_scalars(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # trainer.add_callback(logger) puts it after the printer; relumon's keys were stripped before it (as they are for
    # the printer), so such a logger (W&B added by hand, say) got only the summary.
    from transformers import TrainerCallback

    class Logger(TrainerCallback):
        def __init__(self) -> None:
            self.keys: set[str] = set()

        def on_log(self, args: object, state: object, control: object, logs: object = None, **kwargs: object) -> None:
            self.keys |= {key for key in logs if "relumon" in key}  # type: ignore[union-attr]

    logger = Logger()
    run = trainer(tmp_path, [ReluMonitorCallback(measure_every=1)], max_steps=2, logging_steps=2, report_to=[])
    run.add_callback(logger)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.train()
    assert f"relumon/dead_fraction/{PART1}" in logger.keys and "relumon/summary/dead_fraction" in logger.keys
    printed = capsys.readouterr().out
    assert "relumon/summary/dead_fraction" in printed and "relumon/dead_fraction/" not in printed  # printer: summary
    names = [type(cb).__name__ for cb in run.callback_handler.callbacks]
    assert names[-3:] == ["Logger", "_StripRelumonKeys", "PrinterCallback"]


def test_a_callback_attached_to_one_trainer_watches_the_next_trainer_it_is_given_to(tmp_path: Path) -> None:
    # attach(first), then Trainer(callbacks=[callback]) for a second stage: the callback took `first` as its Trainer,
    # so the second Trainer's training forwards looked like forwards after train() ended: it removed its hooks at the
    # first step, and the second run had no relumon scalar at all.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.hf_helpers import event_dir, tiny_opt

    model = tiny_opt()
    callback = ReluMonitorCallback(measure_every=1)
    first = trainer(tmp_path / "1", [], model=model, max_steps=2)
    callback.attach(first)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first.train()
        trainer(tmp_path / "2", [callback], model=model, max_steps=4, logging_steps=2).train()
    assert not [w for w in record if "removed its hooks" in str(w.message)]
    assert [step for step, _ in callback.history] == [2, 4]
    acc = EventAccumulator(str(event_dir(tmp_path / "2")), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars(f"train/relumon/dead_units/{PART1}")] == [(2, 4.0), (4, 4.0)]


def test_a_truncated_relumon_file_does_not_stop_the_resume(tmp_path: Path) -> None:
    # A job killed while relumon wrote its file left it cut short: torch.load raised out of on_train_begin, so the
    # resume itself failed. The file is now written whole or not at all, and an unreadable one is said and skipped.
    with pytest.warns(relumon.DeadUnitsWarning):
        trainer(
            tmp_path, [ReluMonitorCallback(measure_every=1)], max_steps=2, save_strategy="steps", save_steps=2
        ).train()
    path = tmp_path / "checkpoint-2" / "relumon-relumon.pt"
    assert not list((tmp_path / "checkpoint-2").glob("*.tmp"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    callback = ReluMonitorCallback(measure_every=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        output = trainer(tmp_path, [callback], max_steps=4).train(resume_from_checkpoint=True)
    assert output.global_step == 4
    said = [str(w.message) for w in record if "cannot be read" in str(w.message)]
    assert len(said) == 1 and "unreadable" in said[0]
    assert [step for step, _ in callback.history] == [4]
    assert not [w for w in record if issubclass(w.category, relumon.DeadUnitsWarning)]  # the alert was before


def test_a_wrong_prefix_is_told_the_prefix_found(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.warns(relumon.DeadUnitsWarning):
        trainer(tmp_path, [ReluMonitorCallback(measure_every=1)], max_steps=2, logging_steps=2).train()
    capsys.readouterr()
    assert main(["summary", str(tmp_path), "--prefix", "relumon"]) == 1
    error = capsys.readouterr().err
    assert "no relumon scalars (relumon/dead_fraction/...)" in error and "pass --prefix train/relumon" in error
