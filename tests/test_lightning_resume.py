"""Lightning resume from a checkpoint that holds no relumon state: the reused callback starts fresh.

Ground truth: a forced-dead layer (``fc2``'s bias at -1e3) that a fresh monitor must alert on in every fit that does
not continue an earlier one's state.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

import relumon
from tests.lightning_helpers import boring_module, import_namespace, loader, trainer


def test_resuming_from_a_checkpoint_without_relumon_state_starts_fresh(tmp_path: Path) -> None:
    pl = import_namespace("lightning.pytorch")
    from relumon.lightning import ReluMonitor

    plain = trainer(pl, [], max_steps=2, default_root_dir=str(tmp_path))  # saved without ReluMonitor
    plain.fit(boring_module(pl, dead_fc2=True), loader(4))
    ckpt = tmp_path / "plain.ckpt"
    plain.save_checkpoint(str(ckpt))
    assert not any("ReluMonitor" in key for key in torch.load(str(ckpt), weights_only=False).get("callbacks", {}))

    callback = ReluMonitor(measure_every=1, log_every_n_steps=2)
    first = trainer(pl, [callback], max_steps=4, default_root_dir=str(tmp_path))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first.fit(boring_module(pl, dead_fc2=True), loader(8))
    assert sum(issubclass(w.category, relumon.DeadUnitsWarning) for w in record) == 1
    assert callback.state_dict()["monitor"]["alerted"] == ["net.3"]

    resumed = trainer(pl, [callback], max_steps=6, max_epochs=3, default_root_dir=str(tmp_path))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        resumed.fit(boring_module(pl, dead_fc2=True), loader(8), ckpt_path=str(ckpt))
    alerts = [str(w.message) for w in record if issubclass(w.category, relumon.DeadUnitsWarning)]
    assert len(alerts) == 1 and "`net.3`" in alerts[0]  # a fresh monitor alerts again
    state = callback.state_dict()["monitor"]
    assert state["alerted"] == ["net.3"] and state["window"] == 2  # windows at steps 4 and 6 of the resumed fit
    assert [step for step, _ in state["timeline"]] == [4, 6]
