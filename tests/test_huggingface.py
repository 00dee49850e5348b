"""ReluMonitorCallback in real Hugging Face ``Trainer`` runs on the CPU, on a tiny OPT with a forced ground truth.

Layer 0's FFN is dead by construction and layer 1 has exactly 4 dead units of 32 (see `tests.hf_helpers.tiny_opt`).
"""

from __future__ import annotations

import json
import socket
import subprocess
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
from tests.hf_helpers import ACTS, FFN, SEQ, event_dir, tiny_opt, trainer  # noqa: E402

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
    assert [step for step, _ in state["attributes"]["relumon_state"]["timeline"]] == [2]

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
        assert live.state()["attributes"]["relumon_state"]["timeline"][0][0] == 2
        assert [step for step, _ in live.state()["attributes"]["relumon_state"]["timeline"]] == [2, 4]


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
        "attributes": {"relumon_state": None},
    }


@pytest.mark.slow
def test_ddp_figures_are_global_and_rank_0_logs(tmp_path: Path) -> None:
    # torchrun, 2 CPU processes, gloo: each rank reads its own tokens (see tests/hf_ddp_worker.py).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).with_name("hf_ddp_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    subprocess.run([*command, str(worker), str(tmp_path)], check=True, timeout=240)
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
