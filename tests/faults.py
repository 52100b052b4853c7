"""Faults injected from outside the product code (recovery tests): a training loop whose worker dies
once at a chosen step, and a watcher that kills a Ray Train worker from outside."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def loop_dying_once_after(step: int, rank: int, marker: Path) -> Callable[[dict], None]:
    """A stand-in for `pipeline.train_worker.train_loop_per_worker` (monkeypatch the name
    `pipeline.train.train_loop_per_worker`, which the driver starts, before
    `run_train`): the real loop, except that worker `rank` exits right after its step-`step`
    checkpoint was reported, once (`marker` remembers it across the replacement worker). A closure,
    so Ray ships it by value: the workers need not import this test module."""

    def loop(loop_config: dict) -> None:
        import pipeline.train_worker as worker

        report = worker._save_and_report

        def report_then_die(*args) -> None:
            report(*args)
            reported_step, reported_rank = args[3], args[5]  # (engine, trainable, config, step, history, rank, ...)
            if reported_step == step and reported_rank == rank and not marker.exists():
                marker.write_text("injected")
                time.sleep(3)  # let the controller register this step's checkpoint before the worker dies
                os._exit(1)

        worker._save_and_report = report_then_die
        try:
            worker.train_loop_per_worker(loop_config)
        finally:
            worker._save_and_report = report

    return loop


def _descends_from_this_process(pid: int) -> bool:
    """Whether `pid` was started under this process (its Ray cluster's raylet is our child): another suite's
    Ray on the same machine is none of our business."""
    while pid > 1:
        if pid == os.getpid():
            return True
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
    return False


def _train_worker_pids() -> list[int]:
    """This process's Ray Train workers (by process title)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if b"RayTrainWorker" in (entry / "cmdline").read_bytes() and _descends_from_this_process(int(entry.name)):
                    pids.append(int(entry.name))
    return pids


@contextlib.contextmanager
def kill_a_train_worker_when(ready: Callable[[], bool], poll_seconds: float = 0.1) -> Iterator[list[int]]:
    """While the block runs, SIGKILL a Ray Train worker once `ready()` is true (e.g. training has
    logged a step: a worker killed while the group starts up is restarted by Ray Train's
    controller, whatever the run's max_failures); yields the list the killed pid is appended to."""
    killed: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set() and not killed:
            for pid in _train_worker_pids() if ready() else []:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    break
            done.wait(poll_seconds)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield killed
    finally:
        done.set()
        watcher.join()
