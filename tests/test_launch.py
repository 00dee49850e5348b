"""The multi-process launcher of the tests fails fast and leaves nothing behind (issue 29): a rank whose peer never
comes, and a run that hangs in a collective, end in a `RankFailure` within their own timeouts, with every process
they started gone, so that pytest always exits."""

from __future__ import annotations

import datetime
import time

import pytest

from tests import dist_workers
from tests.launch import RankFailure, child_pids, run_ranks

pytestmark = pytest.mark.slow


def test_a_rank_whose_peer_never_comes_fails_within_its_init_timeout_and_leaves_no_process() -> None:
    before = child_pids()
    start = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        # Rank 1 of 2 is never started: rank 0 waits in the rendezvous until its 3 s init timeout.
        run_ranks(dist_workers.hang_worker, ranks=[0], init_timeout=datetime.timedelta(seconds=3), timeout=120)
    assert time.monotonic() - start < 60  # its own 3 s timeout ended it, not the run's 120 s deadline
    message = str(failure.value)
    assert "rank 0: exit code 1" in message and "deadline" not in message
    assert "init_process_group" in message or "timeout" in message.lower()  # the rank's own traceback
    assert child_pids() <= before


def test_a_run_that_hangs_in_a_collective_is_killed_at_its_deadline_and_leaves_no_process() -> None:
    before = child_pids()
    start = time.monotonic()
    with pytest.raises(RankFailure, match="passed its 5 s deadline; every rank was killed"):
        run_ranks(dist_workers.hang_worker, timeout=5)  # rank 1 sleeps, rank 0 waits in all_reduce
    assert time.monotonic() - start < 60
    assert child_pids() <= before
