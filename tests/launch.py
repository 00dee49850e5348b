"""Real multi-process runs for the tests that can neither hang the suite nor leave a process behind.

Three rules, each answering a way a 2-process test has hung here (issue 29):

- **No port race.** The test process hosts the rendezvous store itself, on a port the OS picks and that stays bound
  for the whole run (`RendezvousStore`). The ranks join it as clients: ``TORCHELASTIC_USE_AGENT_STORE=True`` makes
  ``init_process_group``'s ``env://`` rendezvous (plain, Lightning's and the Hugging Face Trainer's) connect to
  ``MASTER_ADDR:MASTER_PORT`` on every rank instead of having rank 0 bind it, exactly as torchrun's agent store does.
  A port found free and closed before the ranks bind it (the old ``free_port()``) could be taken in between.
- **A teardown order that cannot deadlock.** Destroying a gloo process group joins its worker threads while holding
  the GIL; a thread still freeing a finished collective's tensors then waits for the GIL forever
  (pytorch/pytorch#56297).
  That destructor runs when the *last* reference to the group goes: the DDP wrapper's reducer (or FSDP's state, or a
  Trainer's strategy) when it outlives ``destroy_process_group()``. `_rank_main` therefore runs the worker as a
  function whose objects are all gone when it returns or raises (the traceback's frames are cleared), collects
  cycles, and only then destroys the group: with no wrapper left, nothing holds it.
- **A hang fails fast.** ``init_process_group`` gets `INIT_TIMEOUT` (a rank whose peer never comes fails in seconds,
  not 30 minutes), every run has a deadline well under pytest-timeout, and when a rank fails, times out or the test is
  interrupted, every process of the run (and, for commands, its whole process group) is killed before the test
  fails. ``tests/conftest.py`` also ends any child left at the end of the session, so pytest always exits.
"""

from __future__ import annotations

import datetime
import gc
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp

#: ``init_process_group``'s timeout in the workers: the rendezvous and every collective give up after this long.
INIT_TIMEOUT = datetime.timedelta(seconds=60)
#: A whole run's deadline, well under pytest-timeout's 300 s: a run still going then is killed and the test fails.
RUN_TIMEOUT = 180.0


class RankFailure(AssertionError):
    """A rank of a multi-process run failed, or the run passed its deadline (the message has each rank's story)."""


class RendezvousStore:
    """A TCPStore server hosted by the test process on an OS-chosen port, for the ranks to join as clients.

    Use as a context manager; `env` holds the variables the ranks need.
    """

    def __init__(self, world_size: int, timeout: datetime.timedelta = INIT_TIMEOUT) -> None:
        self.store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False, timeout=timeout)
        self.port = int(self.store.port)

    @property
    def env(self) -> dict[str, str]:
        return {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(self.port),
            "TORCHELASTIC_USE_AGENT_STORE": "True",
        }

    def __enter__(self) -> RendezvousStore:
        return self

    def __exit__(self, *exc: object) -> None:
        del self.store


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for processes started inside the block (spawned children copy the environment)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _rank_main(
    fn: Callable[..., None],
    rank: int,
    world_size: int,
    args: tuple[Any, ...],
    init_timeout: datetime.timedelta | None,
    error_file: str,
) -> None:
    """The body of one rank: init the group (unless ``fn`` does, as a Trainer does), run ``fn``, tear down in order."""
    failure = None
    try:
        if init_timeout is not None:
            dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=init_timeout)
        fn(rank, world_size, *args)
    except BaseException as error:  # noqa: BLE001 - reported to the parent, which fails the test
        failure = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        traceback.clear_frames(error.__traceback__)  # the frames' locals (a DDP wrapper...) must go before the group
        del error
    # Everything fn built is unreachable now; collect cycles so that no wrapper still holds the group, then destroy
    # it: the group's last reference goes here, with no collective in flight.
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if failure is not None:
        Path(error_file).write_text(failure)
        sys.stderr.write(failure)
        sys.stderr.flush()
        os._exit(1)


def _kill(processes: Sequence[Any]) -> None:
    for process in processes:
        if process.is_alive():
            process.kill()
    for process in processes:
        process.join(5)


def run_ranks(
    fn: Callable[..., None],
    *args: Any,
    world_size: int = 2,
    ranks: Sequence[int] | None = None,
    init: bool = True,
    init_timeout: datetime.timedelta = INIT_TIMEOUT,
    timeout: float = RUN_TIMEOUT,
) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes joined by a gloo group; fail, never hang.

    Args:
        fn: a module-level function (spawn pickles it by name).
        args: passed after ``rank`` and ``world_size``.
        world_size: the group's size.
        ranks: which ranks to start (default all); starting fewer is how a test makes a rank that never meets its peer.
        init: ``False`` when ``fn`` creates the group itself from the environment (a Lightning or HF Trainer does).
        init_timeout: the group's timeout (rendezvous and collectives) when ``init`` is true.
        timeout: the run's deadline in seconds; past it every rank is killed and `RankFailure` is raised.

    Raises:
        RankFailure: a rank exited non-zero (its traceback is in the message) or the deadline passed.
    """
    ctx = mp.get_context("spawn")
    started = list(range(world_size)) if ranks is None else list(ranks)
    store_timeout = init_timeout if init else INIT_TIMEOUT
    with tempfile.TemporaryDirectory() as tmp, RendezvousStore(world_size, store_timeout) as store, _environ(store.env):
        errors = [os.path.join(tmp, f"rank{rank}.err") for rank in started]
        processes = [
            ctx.Process(
                target=_rank_main, args=(fn, rank, world_size, args, init_timeout if init else None, error), daemon=True
            )
            for rank, error in zip(started, errors)
        ]
        try:
            for process in processes:
                process.start()
            deadline = time.monotonic() + timeout
            while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
                # One rank failing leaves its peer waiting in a collective: stop waiting for the others then.
                if any(p.exitcode not in (None, 0) for p in processes):
                    break
                for p in processes:
                    p.join(0.2)
            timed_out = any(p.is_alive() for p in processes) and time.monotonic() >= deadline
        finally:
            _kill(processes)  # also on KeyboardInterrupt or pytest-timeout's exception: nothing is left behind
        stories = []
        for rank, process, error in zip(started, processes, errors):
            if process.exitcode != 0:
                text = Path(error).read_text() if os.path.exists(error) else ""
                stories.append(f"rank {rank}: exit code {process.exitcode}\n{text}")
        if timed_out:
            raise RankFailure(
                f"the run passed its {timeout:.0f} s deadline; every rank was killed\n" + "\n".join(stories)
            )
        if stories:
            raise RankFailure("\n".join(stories))


def run_command(command: Sequence[str], *, timeout: float = RUN_TIMEOUT, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run a command that starts its own ranks (torchrun, a Trainer's ``ddp_spawn``) in a process group of its own.

    On the deadline the whole group is killed, grandchildren included, and `RankFailure` raised; the caller reads
    ``returncode`` otherwise. ``kwargs`` go to `subprocess.Popen` (``cwd``, ``env``...); output is captured as text.
    """
    process = subprocess.Popen(
        list(command), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _killpg(process)
        out, err = process.communicate()
        raise RankFailure(
            f"{command[:4]}... passed its {timeout:.0f} s deadline and was killed\n{err[-3000:]}"
        ) from None
    except BaseException:
        _killpg(process)
        raise
    _killpg(process)  # workers that outlived their launcher
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def _killpg(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


@contextmanager
def rendezvous(world_size: int) -> Iterator[dict[str, str]]:
    """For `run_command`: a `RendezvousStore` kept open while the command runs; yields the environment to give it."""
    with RendezvousStore(world_size) as store:
        yield {**os.environ, **store.env}


def child_pids() -> set[int]:
    """The live child processes of this process (Linux ``/proc``), but multiprocessing's resource tracker, which
    lives as long as the test process by design."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and b"resource_tracker" not in cmdline:
            pids.add(int(stat.parent.name))
    return pids
