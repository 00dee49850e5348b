"""ReluMonitorCallback in real Hugging Face ``Trainer`` runs on the CPU, on a tiny OPT with a forced ground truth.

Layer 0's FFN is dead by construction and layer 1 has exactly 4 dead units of 32 (see `tests.hf_helpers.tiny_opt`).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import relumon

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402

from relumon.huggingface import ReluMonitorCallback  # noqa: E402
from tests.helpers import kill_units  # noqa: E402
from tests.hf_helpers import ACTS, FFN, SEQ, event_dir, tiny_opt, trainer  # noqa: E402
from tests.launch import run_command  # noqa: E402

DEAD0, PART1 = ACTS
TAG = "train/relumon/dead_fraction/"


def _hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def _dead_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, relumon.DeadUnitsWarning)]


def test_opt_relu_is_an_nn_relu_watched_by_default() -> None:
    # OPT builds its FFN activation with ACT2FN[config.activation_function]: for "relu" an nn.ReLU instance, which
    # the default types (the ReLU family) match. Checked against the installed transformers.
    assert isinstance(ACT2FN["relu"], nn.ReLU)
    model = tiny_opt()
    with relumon.watch(model, measure_every=1) as monitor:
        model(input_ids=torch.randint(2, 64, (3, SEQ)), labels=torch.randint(2, 64, (3, SEQ))).loss.backward()
    with pytest.warns(relumon.DeadUnitsWarning, match=DEAD0):
        report = monitor.report()
    assert monitor.names == list(ACTS)
    # OPT flattens (batch, seq) before its FFN: a sample is a token.
    assert report[DEAD0].samples == 3 * SEQ and report[DEAD0].units == FFN
    assert report[DEAD0].dead_fraction == 1.0 and report[PART1].dead_units == 4


def test_dead_fractions_land_in_tensorboard_at_the_trainers_logging_steps(tmp_path: Path) -> None:
    callback = ReluMonitorCallback(measure_every=1)
    run = trainer(tmp_path, [callback], max_steps=6, logging_steps=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run.train()
    # One warning, for the layer killed by construction, naming it; the partly dead layer never alerts.
    dead = _dead_warnings(record)
    assert len(dead) == 1 and f"`{DEAD0}`" in dead[0] and "over 2 steps" in dead[0]
    assert _hook_count(run.model) == 0 and callback.monitor is None  # removed at train end
    assert "training_step" not in vars(run)  # the exception guard is undone

    acc = EventAccumulator(str(event_dir(tmp_path)), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    # The Trainer's own TensorBoard writer, next to its loss, at its logging steps.
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6]
    assert [(e.step, e.value) for e in acc.Scalars(TAG + DEAD0)] == [(2, 1.0), (4, 1.0), (6, 1.0)]
    assert [e.value for e in acc.Scalars(TAG + PART1)] == [4 / FFN] * 3
    assert [e.value for e in acc.Scalars("train/relumon/dead_units/" + PART1)] == [4.0] * 3
    assert [e.value for e in acc.Scalars("train/relumon/summary/dead_fraction")] == [(FFN + 4) / (2 * FFN)] * 3
    assert {"relumon/grad_flow", "relumon/dead_heatmap"} <= set(acc.Tags()["images"])
    # The keys went to the integrations only: not into the Trainer's log history (trainer_state.json).
    assert all(not key.startswith("relumon/") for entry in run.state.log_history for key in entry)
    assert callback.last_report is not None and callback.last_report[PART1].samples == 2 * 2 * SEQ
    assert _order(run) == ORDER  # in front of the integrations; the keys stripped before the printer


ORDER = ["DefaultFlowCallback", "ReluMonitorCallback", "TensorBoardCallback", "_StripRelumonKeys", "PrinterCallback"]


def _order(run: Any) -> list[str]:
    return [type(cb).__name__ for cb in run.callback_handler.callbacks]


def test_gradient_accumulation_windows_count_optimizer_steps(tmp_path: Path) -> None:
    # 2 micro-batches per optimizer step, a log every 2 optimizer steps: 4 micro-batches of 2 sequences per window.
    callback = ReluMonitorCallback(measure_every=1)
    run = trainer(tmp_path, [callback], max_steps=4, logging_steps=2, gradient_accumulation_steps=2)
    windows: list[tuple[int, int, int]] = []

    class Spy(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            report = callback.last_report
            if report is not None and (not windows or windows[-1][0] != state.global_step):
                windows.append((state.global_step, report.steps, report[PART1].samples))

    run.add_callback(Spy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", relumon.DeadUnitsWarning)
        run.train()
    assert windows == [(2, 4, 4 * 2 * SEQ), (4, 4, 4 * 2 * SEQ)]
    acc = EventAccumulator(str(event_dir(tmp_path)), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars(TAG + PART1)] == [(2, 4 / FFN), (4, 4 / FFN)]


def test_on_dead_stop_ends_training_after_the_window(tmp_path: Path) -> None:
    callback = ReluMonitorCallback(measure_every=1, on_dead="stop")
    run = trainer(tmp_path, [callback], max_steps=20, logging_steps=2)
    with pytest.warns(relumon.DeadUnitsWarning, match=r"Stopping training \(ReluMonitorCallback\(on_dead='stop'\)\)"):
        output = run.train()
    assert output.global_step == 2  # the first window found layer 0 dead
    assert _hook_count(run.model) == 0


def test_on_dead_raise_and_a_failing_step_remove_the_hooks(tmp_path: Path) -> None:
    run = trainer(tmp_path, [ReluMonitorCallback(measure_every=1, on_dead="raise")], logging_steps=2)
    with pytest.raises(relumon.RelumonError, match=DEAD0):
        run.train()
    assert _hook_count(run.model) == 0 and "training_step" not in vars(run)

    class Fails(TrainerCallback):
        """Makes the third micro-batch's forward fail, inside the Trainer's training_step."""

        def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if state.global_step == 2:
                model.model.decoder.layers[1].fc2.register_forward_hook(_raise)

    model = tiny_opt()
    run = trainer(tmp_path / "b", [ReluMonitorCallback(), Fails()], model=model)
    with pytest.raises(RuntimeError, match="out of memory, say"):
        run.train()
    assert sum(len(m._forward_hooks) for m in model.modules()) == 1  # only the test's own hook is left
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == 0


def _raise(*args: Any) -> None:
    raise RuntimeError("out of memory, say")


def test_an_exception_outside_the_training_step_removes_the_hooks_at_the_next_forward(tmp_path: Path) -> None:
    class FailsInCallback(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 3:
                raise KeyError("a callback's bug")

    model = tiny_opt()
    callback = ReluMonitorCallback()
    run = trainer(tmp_path, [callback, FailsInCallback()], model=model)
    with pytest.raises(KeyError):
        run.train()
    assert _hook_count(model) > 0  # no Trainer event fired: the hooks are still there...
    ids = torch.randint(2, 64, (2, SEQ))
    with pytest.warns(relumon.RelumonWarning, match=r"after the Trainer's train\(\) ended"):
        model(input_ids=ids, labels=ids).loss.backward()  # ...until the model trains outside the Trainer
    assert _hook_count(model) == 0 and callback.monitor is None and "training_step" not in vars(run)
    # A later train() with the same callback watches the model again, and removes its hooks at the end.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", relumon.DeadUnitsWarning)
        trainer(tmp_path / "again", [callback], model=model, max_steps=2).train()
    assert callback.last_report is not None and callback.last_report[DEAD0].dead_fraction == 1.0
    assert _hook_count(model) == 0


def test_state_survives_resume_from_checkpoint(tmp_path: Path) -> None:
    model = tiny_opt()
    first = ReluMonitorCallback(measure_every=1)
    with pytest.warns(relumon.DeadUnitsWarning):
        trainer(tmp_path, [first], model=model, max_steps=4, save_strategy="steps", save_steps=2).train()
    saved = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    state = saved["stateful_callbacks"]["ReluMonitorCallback"]
    assert state["args"] == {"on_dead": "warn", "figures": True, "prefix": "relumon", "measure_every": 1}
    assert state["attributes"]["relumon_state"]["alerted"] == [DEAD0]
    payload = torch.load(tmp_path / "checkpoint-2" / "relumon-relumon.pt", weights_only=True)
    assert [step for step, _ in payload["timeline"]] == [2]  # the timeline is in relumon's file, not in the JSON

    # A new process would build a new callback and Trainer: resume from step 2, as a new run of 4 steps.
    for restore in (False, True):
        second = ReluMonitorCallback(measure_every=1)
        run = trainer(
            tmp_path, [second], model=tiny_opt(), max_steps=4, restore_callback_states_from_checkpoint=restore
        )
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            run.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
        assert _dead_warnings(record) == []  # already alerted before the checkpoint
        # With restore_callback_states_from_checkpoint the Trainer rebuilds the callback from the saved args.
        live = next(cb for cb in run.callback_handler.callbacks if isinstance(cb, ReluMonitorCallback))
        assert (live is second) is not restore and live.options.measure_every == 1
        assert _order(run) == ORDER  # a rebuilt callback, appended last by the Trainer, takes its place too
        assert live.last_report is not None and live.last_report.window == 1  # window 0 was before the checkpoint
        assert [step for step, _ in live.history] == [2, 4]


def test_arguments_are_checked() -> None:
    with pytest.raises(TypeError, match=r"takes \['grad_scaler'\] from the Trainer"):
        ReluMonitorCallback(grad_scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match=r"expected `on_dead` to be one of \('warn', 'raise', 'stop', 'ignore'\)"):
        ReluMonitorCallback(on_dead="halt")  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"ReluMonitorCallback\(\) got unexpected keyword argument\(s\) \['measure'\]"
    ) as err:
        ReluMonitorCallback(measure=1)
    # The error lists the callback's own arguments and the options it forwards, not those it takes from the Trainer.
    message = str(err.value)
    assert "prefix" in message and "measure_every" in message and "recycle" in message
    assert "grad_scaler" not in message and "'optimizer'" not in message
    with pytest.raises(TypeError, match=r"takes \['optimizer'\] from the Trainer"):
        ReluMonitorCallback(optimizer=torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
    callback = ReluMonitorCallback(measure_every=2, types=(nn.ReLU,))
    assert callback.measure_every == 2
    # JSON cannot hold `types`: the args the Trainer would rebuild the callback from leave it out.
    assert callback.state() == {
        "args": {"on_dead": "warn", "figures": True, "prefix": "relumon", "measure_every": 2},
        "attributes": {"relumon_state": None, "relumon_unsaved": ["types"]},
    }


@pytest.mark.slow
def test_ddp_figures_are_global_and_rank_0_logs(tmp_path: Path) -> None:
    # torchrun, 2 CPU processes, gloo: each rank reads its own tokens (see tests/hf_ddp_worker.py).
    # --standalone: torchrun's agent hosts the rendezvous on a port the OS picks and keeps (no port race); the whole
    # process group is killed if the run passes its deadline (tests.launch.run_command).
    worker = Path(__file__).with_name("hf_ddp_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = run_command([*command, str(worker), str(tmp_path)])
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # The plain hook's ground truth: unit 4 of layer 1 fired on rank 1 only, so rank 0 alone would count it dead.
    assert [r["local_dead_layer1"] for r in ranks] == [5, 4]
    assert [r["global_dead_layer1"] for r in ranks] == [4, 4]
    for r in ranks:
        assert r["world_size"] == 2
        assert r["layers"][PART1] == {"dead_units": 4, "samples": 2 * 2 * 2 * SEQ}  # both ranks' tokens, global
        assert r["layers"][DEAD0]["dead_units"] == FFN
        assert r["steps"] == 4  # 2 micro-batches per rank in the last window, summed over the ranks
    assert len(ranks[0]["dead_warnings"]) == 1 and f"`{DEAD0}`" in ranks[0]["dead_warnings"][0]
    assert ranks[1]["dead_warnings"] == []  # rank 0 speaks
    assert len(list(tmp_path.rglob("events.out.tfevents.*"))) == 1  # rank 0 writes, through its TensorBoardCallback


# ---------------------------------------------------------------- issue 26: the door, hardened


def _windows_spy(callback: ReluMonitorCallback) -> tuple[Any, list[tuple[int, int]]]:
    """A callback after relumon's that records (step, micro-batches) of each newly closed window."""
    windows: list[tuple[int, int]] = []
    seen: list[Any] = [None]

    class Spy(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            report = callback.last_report
            if report is not None and report is not seen[-1]:
                seen.append(report)
                windows.append((state.global_step, report.steps))

    return Spy(), windows


def test_a_log_of_your_own_in_compute_loss_closes_no_window(tmp_path: Path) -> None:
    from transformers import Trainer

    class AuxTrainer(Trainer):
        """Logs an auxiliary metric at every micro-batch, as a subclass might."""

        def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            self.log({"aux": 1.0})
            return loss

    callback = ReluMonitorCallback(measure_every=1)
    spy, windows = _windows_spy(callback)
    run = trainer(tmp_path, [callback, spy], max_steps=10, logging_steps=5)
    run = AuxTrainer(model=run.model, args=run.args, train_dataset=run.train_dataset, callbacks=[callback, spy])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", relumon.DeadUnitsWarning)
        run.train()
    assert windows == [(5, 5), (10, 5)]  # the Trainer's own logs only, 5 micro-batches each
    acc = EventAccumulator(str(event_dir(tmp_path)), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [5, 10]
    assert [(e.step, e.value) for e in acc.Scalars(TAG + PART1)] == [(5, 4 / FFN), (10, 4 / FFN)]
    assert len(acc.Scalars("train/aux")) == 10  # the subclass's own metric, untouched


def test_a_probe_forward_in_a_callback_keeps_monitoring_on(tmp_path: Path) -> None:
    class Probe(TrainerCallback):
        """A training-mode forward with grad, outside training_step, at step 3."""

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if state.global_step == 3:
                ids = torch.randint(2, 64, (1, SEQ))
                model(input_ids=ids, labels=ids).loss.backward()
                model.zero_grad()

    callback = ReluMonitorCallback(measure_every=1)
    spy, windows = _windows_spy(callback)
    run = trainer(tmp_path, [callback, Probe(), spy], max_steps=6, logging_steps=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run.train()
    assert not [w for w in record if "removed its hooks" in str(w.message)]
    # Every window was reported; the probe counts as one more step of the window it fell in (steps 3 and 4).
    assert windows == [(2, 2), (4, 3), (6, 2)]
    assert len(_dead_warnings(record)) == 1 and _hook_count(run.model) == 0


def test_attach_ties_the_callback_to_a_trainer(tmp_path: Path) -> None:
    callback = ReluMonitorCallback(measure_every=1)
    run = trainer(tmp_path, [])
    assert callback.attach(run) is callback and callback in run.callback_handler.callbacks
    with pytest.warns(relumon.DeadUnitsWarning):
        run.train()
    assert _order(run) == ORDER and [step for step, _ in callback.history] == [2, 4, 6]
    with pytest.raises(TypeError, match="expected `trainer` to be a transformers.Trainer"):
        callback.attach(object())


def test_on_dead_stop_saves_the_checkpoint_that_shows_the_death(tmp_path: Path) -> None:
    callback = ReluMonitorCallback(measure_every=1, on_dead="stop")
    run = trainer(tmp_path, [callback], max_steps=20, logging_steps=2, save_strategy="steps", save_steps=100)
    with pytest.warns(relumon.DeadUnitsWarning, match=r"Stopping training \(ReluMonitorCallback\(on_dead='stop'\)\)"):
        output = run.train()
    assert output.global_step == 2
    checkpoint = tmp_path / "checkpoint-2"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["ReluMonitorCallback"]["attributes"]["relumon_state"]["alerted"] == [DEAD0]
    assert (checkpoint / "relumon-relumon.pt").is_file() and (checkpoint / "model.safetensors").is_file()


def test_on_dead_stop_at_the_last_step_does_not_claim_to_stop(tmp_path: Path) -> None:
    run = trainer(tmp_path, [ReluMonitorCallback(measure_every=1, on_dead="stop")], max_steps=2, logging_steps=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run.train()
    dead = _dead_warnings(record)
    assert len(dead) == 1 and "Training was ending anyway" in dead[0] and "Stopping training" not in dead[0]


def test_two_callbacks_resume_from_their_newest_entries_without_a_second_alert(tmp_path: Path) -> None:
    first = [ReluMonitorCallback(measure_every=1, prefix=p) for p in ("a", "b")]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(tmp_path, first, max_steps=4, save_strategy="steps", save_steps=2).train()
    assert len(_dead_warnings(record)) == 2  # one per callback
    entries = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())["stateful_callbacks"]
    # transformers keeps the entries of train begin and appends at each save: the newest come last.
    prefixes = [e["args"]["prefix"] for e in entries["ReluMonitorCallback"]]
    assert sorted(prefixes) == ["a"] * 3 + ["b"] * 3 and prefixes[:2] == ["a", "b"]
    second = [ReluMonitorCallback(measure_every=1, prefix=p) for p in ("a", "b")]
    run = trainer(tmp_path, second, max_steps=6)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert _dead_warnings(record) == []
    for callback in second:
        assert [step for step, _ in callback.history] == [2, 4, 6]
        assert callback.last_report is not None and callback.last_report.window == 2


def test_alerts_reach_tensorboard_and_relumon_summary_finds_the_trainers_prefix(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from relumon.cli import main

    with pytest.warns(relumon.DeadUnitsWarning) as record:
        trainer(tmp_path, [ReluMonitorCallback(measure_every=1)], max_steps=4, logging_steps=2).train()
    message = next(str(w.message) for w in record if issubclass(w.category, relumon.DeadUnitsWarning))
    capsys.readouterr()  # the Trainer's printer
    assert "window 0 (0-based), which closed at step 2" in message
    assert main(["summary", str(tmp_path), "--json"]) == 0  # no --prefix: train/relumon/... is found
    out = json.loads(capsys.readouterr().out)
    (run,) = out["runs"].values()
    assert {x["layer"]: x["last_dead_fraction"] for x in run} == {DEAD0: 1.0, PART1: 4 / FFN}
    (alerts,) = out["alerts"].values()
    assert [a["step"] for a in alerts] == [2] and alerts[0]["text"] == message
    assert main(["summary", str(tmp_path)]) == 0
    assert "alert at step 2:" in capsys.readouterr().out


def test_trainer_state_json_grows_with_layers_not_units(tmp_path: Path) -> None:
    sizes = {}
    for ffn in (32, 512):
        callback = ReluMonitorCallback(measure_every=1)
        out = tmp_path / str(ffn)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", relumon.DeadUnitsWarning)
            trainer(out, [callback], model=tiny_opt(ffn=ffn), max_steps=2, save_strategy="steps", save_steps=2).train()
        entry = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["stateful_callbacks"]
        sizes[ffn] = len(json.dumps(entry["ReluMonitorCallback"]))
        per_unit = torch.load(out / "checkpoint-2" / "relumon-relumon.pt", weights_only=True)
        assert per_unit["history"][DEAD0]["first_dead_step"].tolist() == [2] * ffn  # every unit of layer 0 died at 2
    assert abs(sizes[512] - sizes[32]) < 64, sizes  # 16x the units, the same JSON (digits of fractions aside)

    # A resume reads the per-unit history back from the checkpoint folder.
    callback = ReluMonitorCallback(measure_every=1)
    run = trainer(tmp_path / "32", [callback], model=tiny_opt(), max_steps=4)
    run.train(resume_from_checkpoint=str(tmp_path / "32" / "checkpoint-2"))
    history = callback._saved["history"] if callback._saved is not None else {}
    assert history[DEAD0]["first_dead_step"] == [2] * FFN and history[PART1]["first_dead_step"][:4] == [2] * 4


def test_epoch_logging_pictures_follow_the_epochs_window(tmp_path: Path) -> None:
    callback = ReluMonitorCallback(measure_every=1)
    drawn: list[tuple[str, int, int]] = []

    class Spy(TrainerCallback):
        """Records, for each picture written, the last window the callback had closed then."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            writer = callback._tensorboard.tb_writer
            add_figure = writer.add_figure

            def spy(tag: str, figure: Any, global_step: int) -> None:
                drawn.append((tag, global_step, callback.history[-1][0]))
                add_figure(tag, figure, global_step=global_step)

            writer.add_figure = spy

    run = trainer(tmp_path, [callback, Spy()], n=8, max_steps=-1, num_train_epochs=2, logging_strategy="epoch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", relumon.DeadUnitsWarning)
        run.train()
    heatmaps = [(step, last) for tag, step, last in drawn if tag == "relumon/dead_heatmap"]
    assert heatmaps == [(4, 4), (8, 8)]  # a picture per epoch, each holding the window closed at its step
    acc = EventAccumulator(str(event_dir(tmp_path)), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("relumon/dead_heatmap")] == [4, 8]


def test_options_given_through_options_survive_restore_callback_states(tmp_path: Path) -> None:
    options = relumon.Options(measure_every=1, permanent_after=5)
    with pytest.warns(relumon.DeadUnitsWarning):
        trainer(
            tmp_path, [ReluMonitorCallback(options=options)], max_steps=2, save_strategy="steps", save_steps=2
        ).train()
    run = trainer(
        tmp_path, [ReluMonitorCallback(options=options)], max_steps=4, restore_callback_states_from_checkpoint=True
    )
    run.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    live = next(cb for cb in run.callback_handler.callbacks if isinstance(cb, ReluMonitorCallback))
    assert (live.options.measure_every, live.options.permanent_after) == (1, 5)


def test_smaller_messages_say_what_to_do(tmp_path: Path) -> None:
    # figures=True without a TensorBoard callback says so, once per callback.
    callback = ReluMonitorCallback(measure_every=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for out in ("a", "b"):
            trainer(tmp_path / out, [callback], max_steps=2, report_to=[]).train()
    assert len([w for w in record if "no TensorBoardCallback" in str(w.message)]) == 1
    # A sampled window that could not be confirmed: the advice names the Trainer's setting.
    with pytest.warns(relumon.RelumonWarning, match=r"could not be confirmed.*`logging_steps` \(now 2\)"):
        trainer(tmp_path / "c", [ReluMonitorCallback()], max_steps=2, logging_steps=2).train()


@pytest.mark.parametrize(("activation", "found"), [("gelu", "GELUActivation"), ("relu2", "ReLUSquaredActivation")])
def test_no_relu_warning_names_the_activations_found_and_types(tmp_path: Path, activation: str, found: str) -> None:
    model = tiny_opt(dead_layer0=False, dead_units_layer1=0, activation=activation)
    with pytest.warns(relumon.RelumonWarning, match=rf"its activations are {found} \(2\).*types=\({found},\)"):
        trainer(tmp_path, [ReluMonitorCallback()], model=model, max_steps=1).train()


def test_relu_squared_is_watched_with_types(tmp_path: Path) -> None:
    from transformers.activations import ReLUSquaredActivation

    callback = ReluMonitorCallback(measure_every=1, types=(ReLUSquaredActivation,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", relumon.DeadUnitsWarning)
        trainer(tmp_path, [callback], model=tiny_opt(activation="relu2"), max_steps=2, logging_steps=2).train()
    report = callback.last_report
    assert report is not None and report.names == list(ACTS)
    assert report[DEAD0].grad_norm is not None and report[DEAD0].samples == 2 * 2 * SEQ


@pytest.mark.xfail(
    strict=True,
    reason="relumon.recorder.counts_dead knows only nn.ReLU/nn.ReLU6 as zero-floor activations: transformers' "
    "ReLUSquaredActivation (relu(x)**2, 0 exactly where ReLU is) gets gradient flow only, its dead column shows '-'",
)
def test_relu_squared_dead_units_are_counted_with_types(tmp_path: Path) -> None:
    from transformers.activations import ReLUSquaredActivation

    callback = ReluMonitorCallback(measure_every=1, types=(ReLUSquaredActivation,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", relumon.DeadUnitsWarning)
        trainer(tmp_path, [callback], model=tiny_opt(activation="relu2"), max_steps=2, logging_steps=2).train()
    report = callback.last_report
    assert report is not None and report[DEAD0].dead_fraction == 1.0 and report[PART1].dead_units == 4


def test_cause_and_recycling_work_under_the_trainer(tmp_path: Path) -> None:
    # The Trainer's optimizer reaches the monitor: the alert's cause names its learning rate; recycle="dead"
    # re-initialises what the first window confirmed dead, so the second window finds every unit alive.
    callback = ReluMonitorCallback(measure_every=1, recycle="dead")
    with pytest.warns(relumon.DeadUnitsWarning, match=r"Cause \(step 2\):.*lr 5e-05") as record:
        trainer(tmp_path, [callback], max_steps=4, logging_steps=2, learning_rate=5e-5).train()
    assert len(_dead_warnings(record)) == 1
    assert callback.history == [(2, {DEAD0: 1.0, PART1: 4 / FFN}), (4, {DEAD0: 0.0, PART1: 0.0})]
    report = callback.last_report
    assert report is not None
    assert (report[DEAD0].recycled_total, report[DEAD0].recycled_checked, report[DEAD0].recycled_dead_again) == (
        FFN,
        FFN,
        0,
    )
    assert (report[PART1].recycled_total, report[PART1].recycled_dead_again) == (4, 0)


def _plain_hook_dead_units(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[Any]]:
    """Per ``nn.ReLU`` module, its per-unit (last dim) peak over every training forward, by plain forward hooks."""
    peaks: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ReLU):

            def hook(module: nn.Module, inputs: Any, output: torch.Tensor, name: str = name) -> None:
                if module.training and torch.is_grad_enabled():
                    peak = output.detach().reshape(-1, output.shape[-1]).amax(0)
                    peaks[name] = torch.maximum(peaks[name], peak) if name in peaks else peak

            handles.append(module.register_forward_hook(hook))
    return peaks, handles


@pytest.mark.parametrize("family", ["t5", "bert"])
def test_t5_and_bert_dead_units_match_plain_hooks(tmp_path: Path, family: str) -> None:
    # One window over the whole run, every step measured: relumon's dead units are the units a plain hook saw <= 0.
    from transformers import BertConfig, BertForMaskedLM, T5Config, T5ForConditionalGeneration

    if family == "t5":
        config = T5Config(
            vocab_size=64, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_decoder_layers=1, num_heads=2,
            feed_forward_proj="relu", dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
        )  # fmt: skip
        model: Any = T5ForConditionalGeneration(config)
        feed = model.encoder.block[0].layer[1].DenseReluDense.wi  # T5 has no biases: zero rows output exactly 0
        with torch.no_grad():
            feed.weight[:5].zero_()
        killed = "encoder.block.0.layer.1.DenseReluDense.act"
    else:
        config = BertConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=16, hidden_act="relu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        model = BertForMaskedLM(config)
        kill_units(model.bert.encoder.layer[0].intermediate.dense, [0, 1, 2])
        killed = "bert.encoder.layer.0.intermediate.intermediate_act_fn"
    peaks, handles = _plain_hook_dead_units(model)
    callback = ReluMonitorCallback(measure_every=1)
    trainer(tmp_path, [callback], model=model, max_steps=4, logging_steps=4).train()
    for handle in handles:
        handle.remove()
    report = callback.last_report
    assert report is not None and killed in report.names and set(report.names) == set(peaks)
    for name, peak in peaks.items():
        assert report[name].dead_units == int((peak <= 0).sum()), name
    assert report[killed].dead_units >= (5 if family == "t5" else 3)


def test_evaluation_is_not_counted_and_closes_no_window(tmp_path: Path) -> None:
    from tests.hf_helpers import Tokens

    callback = ReluMonitorCallback(measure_every=1)
    spy, windows = _windows_spy(callback)
    evaluation = {"eval_dataset": Tokens(6, seed=1), "eval_strategy": "steps", "eval_steps": 1}
    run = trainer(tmp_path, [callback, spy], max_steps=4, logging_steps=2, **evaluation)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", relumon.DeadUnitsWarning)
        run.train()
    assert windows == [(2, 2), (4, 2)]  # evaluations at every step close nothing
    assert callback.last_report is not None and callback.last_report[PART1].samples == 2 * 2 * SEQ  # training only


def test_relumon_summary_names_the_prefixes_when_several_are_found(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from relumon.cli import main

    with SummaryWriter(str(tmp_path)) as writer:
        for head in ("train/relumon", "eval/relumon"):
            writer.add_scalar(f"{head}/dead_fraction/act", 0.5, global_step=1)
    assert main(["summary", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert "several prefixes ['eval/relumon', 'train/relumon']" in error and "pass --prefix" in error
    assert main(["summary", str(tmp_path), "--prefix", "eval/relumon"]) == 0


def test_a_checkpoint_moved_elsewhere_resumes_with_its_own_per_unit_history(tmp_path: Path) -> None:
    import shutil

    with pytest.warns(relumon.DeadUnitsWarning):
        trainer(
            tmp_path / "a", [ReluMonitorCallback(measure_every=1)], max_steps=2, save_strategy="steps", save_steps=2
        ).train()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "moved")
    # Another run (nothing dead) left its own checkpoint-2 in the output_dir the resumed run writes to.
    quiet = tiny_opt(dead_layer0=False, dead_units_layer1=0)
    other = [ReluMonitorCallback(measure_every=1)]
    trainer(tmp_path / "b", other, model=quiet, max_steps=2, save_strategy="steps", save_steps=2).train()
    truth = torch.load(tmp_path / "moved" / "relumon-relumon.pt", weights_only=True)["history"]
    assert truth[DEAD0]["first_dead_step"].tolist() == [2] * FFN  # the moved checkpoint's own file

    callback = ReluMonitorCallback(measure_every=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(tmp_path / "b", [callback], max_steps=4).train(resume_from_checkpoint=str(tmp_path / "moved"))
    assert not [w for w in record if "cannot be read" in str(w.message)]
    assert _dead_warnings(record) == []  # the alerts given before the checkpoint still count
    assert [step for step, _ in callback.history] == [2, 4]
    history = callback._saved["history"] if callback._saved is not None else {}
    assert history[DEAD0]["first_dead_step"] == [2] * FFN  # not the other run's (nothing dead at 2: 4 here)

    # Without relumon's file (copied without it), the callback says so: only output_dir's foreign file is there.
    (tmp_path / "moved" / "relumon-relumon.pt").unlink()
    callback = ReluMonitorCallback(measure_every=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(tmp_path / "b", [callback], max_steps=4).train(resume_from_checkpoint=str(tmp_path / "moved"))
    said = [str(w.message) for w in record if "cannot be read" in str(w.message)]
    assert len(said) == 1 and "belongs to another checkpoint" in said[0], said
    assert _dead_warnings(record) == [] and [step for step, _ in callback.history] == [4]
    history = callback._saved["history"] if callback._saved is not None else {}
    assert history[DEAD0]["first_dead_step"] == [4] * FFN  # started again, not taken from the foreign file


def test_trainer_state_json_does_not_grow_with_windows(tmp_path: Path) -> None:
    # 2 windows by checkpoint-2, 12 by checkpoint-12: relumon's JSON entry is the same size (the timeline, which grows
    # with windows, is in relumon-relumon.pt).
    callback = ReluMonitorCallback(measure_every=1, figures=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", relumon.DeadUnitsWarning)
        trainer(tmp_path, [callback], max_steps=12, logging_steps=1, save_strategy="steps", save_steps=2).train()
    sizes = {}
    for step in (2, 12):
        entry = json.loads((tmp_path / f"checkpoint-{step}" / "trainer_state.json").read_text())
        relumon_state = entry["stateful_callbacks"]["ReluMonitorCallback"]["attributes"]["relumon_state"]
        sizes[step] = len(json.dumps(relumon_state))
        payload = torch.load(tmp_path / f"checkpoint-{step}" / "relumon-relumon.pt", weights_only=True)
        assert [s for s, _ in payload["timeline"]] == list(range(1, step + 1))
        assert payload["digest"] == relumon_state["units_digest"]
    assert abs(sizes[12] - sizes[2]) < 32, sizes  # the digits of `window` and `steps` aside
