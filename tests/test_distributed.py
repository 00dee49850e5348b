"""Real 2-process gloo runs: reports reduce across ranks, alerts agree, Lightning DDP (launched, spawned, forked) logs
global figures, FSDP2 blames whole parameters."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from tests import dist_workers
from tests.launch import rendezvous, run_command, run_ranks

pytestmark = pytest.mark.slow


def run_plain(tmp_path: Path, on_dead: str, kill_all: bool = False, extra_branch_on: int = -1) -> list[dict]:
    run_ranks(dist_workers.plain_worker, str(tmp_path), on_dead, kill_all, extra_branch_on)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_a_unit_alive_only_on_rank_1_is_alive_globally(tmp_path: Path) -> None:
    results = run_plain(tmp_path, on_dead="ignore")
    layers = [r["report"]["layers"][0] for r in results]
    for layer in layers:
        layer.pop("blame")  # facts about the local feeding module: its weight gradient differs without DDP
    assert layers[0] == layers[1]  # every rank returns the same, global figures
    layer = layers[0]
    assert layer["dead_indices"] == [2]  # unit 0 fired on rank 1 only: alive; unit 2 never fired
    assert layer["samples"] == 2 * 3 * 4 and layer["backward_passes"] == 2 * 3
    assert layer["dead_fraction"] == pytest.approx(1 / 3)


def test_alerts_are_decided_identically_on_every_rank(tmp_path: Path) -> None:
    # Rank 0 alone sees units 0 and 2 dead, never the whole layer: no rank raises.
    assert all("error" not in r for r in run_plain(tmp_path, on_dead="raise"))
    # Every unit dead everywhere: both ranks raise the same error, and neither hangs.
    results = run_plain(tmp_path, on_dead="raise", kill_all=True)
    assert results[0]["error"] == results[1]["error"]
    assert "`1`" in results[0]["error"]


def test_call_sites_that_differ_across_ranks_raise_on_every_rank_instead_of_hanging(tmp_path: Path) -> None:
    results = run_plain(tmp_path, on_dead="ignore", extra_branch_on=1)
    assert all("call sites differ across ranks" in r["error"] for r in results)


def test_ranks_pair_call_sites_by_name_and_agree_on_the_union(tmp_path: Path) -> None:
    run_ranks(dist_workers.depth_worker, str(tmp_path))
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0]["local_names"] == ["b.1", "a.1"] and results[1]["local_names"] == ["a.1", "c.1", "b.1"]
    reports = [r["report"] for r in results]
    for report in reports:
        for layer in report["layers"]:
            layer.pop("blame")
    assert reports[0] == reports[1]  # the same global report, in one order, on every rank
    assert reports[0]["steps"] == 2 * 3  # steps add up over ranks, like samples and forwards
    layers = {layer["name"]: layer for layer in reports[0]["layers"]}
    assert [layer["name"] for layer in reports[0]["layers"]] == ["b.1", "a.1", "c.1"]  # rank 0's order, then the rest
    assert layers["b.1"]["dead_units"] == 6 and layers["b.1"]["samples"] == 5 * 5  # 2 steps on rank 0, 3 on rank 1
    assert layers["a.1"]["samples"] == 5 * 5
    assert layers["c.1"]["samples"] == 3 * 5  # run by rank 1 alone, reported by both


def fit_ddp(
    namespace: str, tmp_path: Path, *, on_dead: str, kill_all: bool, max_steps: int
) -> tuple[list[dict], list[dict]]:
    """Fit on 2 CPU processes with Lightning's DDP; return the CSV rows with relumon's scalars and each rank's
    result."""
    pytest.importorskip(namespace)
    run_ranks(dist_workers.lightning_worker, str(tmp_path), namespace, on_dead, kill_all, max_steps, init=False)
    rows = [
        r
        for r in csv.DictReader(open(tmp_path / "ddp" / "version_0" / "metrics.csv"))
        if r.get("relumon/dead_fraction/net.1")
    ]
    return rows, [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("namespace", ["lightning.pytorch", "pytorch_lightning"])
def test_lightning_ddp_logs_the_global_dead_fraction(namespace: str, tmp_path: Path) -> None:
    rows, ranks = fit_ddp(namespace, tmp_path, on_dead="ignore", kill_all=False, max_steps=4)
    assert [int(r["step"]) for r in rows] == [2, 4]  # rank 0 alone writes, once per window
    # Rank 0 alone sees 2 of 3 units dead; globally only unit 2 is.
    assert [float(r["relumon/dead_fraction/net.1"]) for r in rows] == pytest.approx([1 / 3, 1 / 3])
    assert [float(r["relumon/dead_units/net.1"]) for r in rows] == [1.0, 1.0]
    assert ranks[0]["report"] == ranks[1]["report"]  # every rank holds the same global report
    assert ranks[0]["report"]["layers"][0]["samples"] == 2 * 2 * 4


def test_lightning_ddp_stop_stops_every_rank_together(tmp_path: Path) -> None:
    # A hang here would be a rank left waiting in a collective; both ranks must end after window 1.
    rows, ranks = fit_ddp("lightning.pytorch", tmp_path, on_dead="stop", kill_all=True, max_steps=8)
    assert [int(r["step"]) for r in rows] == [2]
    assert float(rows[0]["relumon/dead_fraction/net.1"]) == 1.0
    assert [r["global_step"] for r in ranks] == [2, 2]


def test_fsdp2_blames_whole_parameters_and_every_rank_returns_the_same_global_report(tmp_path: Path) -> None:
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard"):
        pytest.importorskip("torch.distributed._composable.fsdp")
    run_ranks(dist_workers.fsdp2_worker, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["bias"] == "DTensor"  # the parameters really are sharded
    assert ranks[0]["reports"] == ranks[1]["reports"]  # blame included: facts about whole parameters
    first, second = (report["layers"] for report in ranks[0]["reports"])
    half, dead = first
    assert half["samples"] == 2 * 2 * 4 and half["dead_indices"] == [0, 1, 2, 3]  # global figures
    # Facts about the whole bias, not one shard: 4 of the 8 biases are -1e3 (the dead units'), the rest small.
    assert (
        half["blame"].startswith("`0` (Linear 4→8) feeds `1`: ")
        and "of its biases are negative, mean -500" in half["blame"]
    )
    assert "the dead units' biases: 100% negative, mean -1e+03" in half["blame"]
    assert dead["name"] == "3" and dead["dead_fraction"] == 1.0 and dead["samples"] == 2 * 2 * 4
    assert dead["blame"].startswith("`2` (Linear 8→6) feeds `3`: 100% of its biases are negative, mean -1e+03")
    assert second[1]["dead_fraction"] == 1.0
    assert ranks[0]["alerts"] == ranks[1]["alerts"] == ["3"]  # once, on every rank, across both windows


def fit_spawned(tmp_path: Path, strategy: str) -> tuple[list[dict], list[dict]]:
    """Fit in a fresh interpreter with a strategy that starts its own workers; read what the workers wrote.

    ddp_spawn aborts now and then at process exit on this machine ("terminate called without an active exception"),
    with or without relumon, after the fit has finished. So the check reads what the workers wrote (CSV metrics and
    each rank's report) rather than the exit status, and runs once more only when those files are missing.
    """
    code = f"from tests.dist_workers import spawn_fit; spawn_fit({str(tmp_path)!r}, {strategy!r})"
    for attempt in range(2):
        with rendezvous(world_size=2) as env:
            out = run_command([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, env=env, timeout=120)
        results = [tmp_path / f"rank{r}.json" for r in range(2)]
        if all(p.exists() for p in results):
            break
        assert attempt == 0 and "terminate called" in out.stderr, out.stderr[-3000:]
    rows = [
        r
        for r in csv.DictReader(open(tmp_path / "spawn" / "version_0" / "metrics.csv"))
        if r.get("relumon/dead_fraction/net.1")
    ]
    return rows, [json.loads(p.read_text()) for p in results]


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_notebook"])
def test_lightning_strategies_that_start_their_own_workers_log_global_figures(strategy: str, tmp_path: Path) -> None:
    pytest.importorskip("lightning.pytorch")
    rows, ranks = fit_spawned(tmp_path, strategy)
    assert [int(r["step"]) for r in rows] == [2, 4]
    # Rank 0 alone sees 2 of 3 units dead; globally only unit 2 is.
    assert [float(r["relumon/dead_fraction/net.1"]) for r in rows] == pytest.approx([1 / 3, 1 / 3])
    assert ranks[0]["report"] == ranks[1]["report"] and ranks[0]["global_step"] == 4
    assert ranks[0]["report"]["layers"][0]["samples"] == 2 * 2 * 4


def test_every_rank_builds_the_same_cause_of_death(tmp_path: Path) -> None:
    run_ranks(dist_workers.cause_worker, str(tmp_path))
    causes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert causes[0] == causes[1]  # the same cause, advice text included, on both ranks
    first, second = causes[0]
    assert first is None and second is not None
    # DDP averages the gradients: biases 8 on both ranks; weights 0.8 (rank 0) and 1.6 (rank 1), so 1.2.
    assert second["lr"] == 1.0 and second["update_step"] == 1
    assert second["bias_shift"] == pytest.approx(-8.0, abs=1e-5)
    assert second["update_ratio"] == pytest.approx(12.0, rel=1e-5)
