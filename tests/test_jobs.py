"""seg.core.jobs: tasks N at a time in worker processes, each after the task it waits for, results in order."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest

from seg.core.jobs import Task, run_in_order, run_tasks, threads_per_job


def _stamp(folder: Path, name: str, seconds: float = 0.0) -> str:
    """Record when the task started and ended (files named NAME.start / NAME.end hold time.monotonic())."""
    (folder / f"{name}.start").write_text(repr(time.monotonic()))
    time.sleep(seconds)
    (folder / f"{name}.end").write_text(repr(time.monotonic()))
    return name


def _fail(message: str) -> None:
    raise RuntimeError(message)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _read(folder: Path, name: str, edge: str) -> float:
    return float((folder / f"{name}.{edge}").read_text())


def test_tasks_wait_for_theirs_run_side_by_side_otherwise_and_return_in_order(tmp_path):
    tasks = [Task("pre", partial(_stamp, tmp_path, "pre", 1.5)),
             Task("free", partial(_stamp, tmp_path, "free", 0.5)),
             Task("a", partial(_stamp, tmp_path, "a"), after="pre"),
             Task("b", partial(_stamp, tmp_path, "b"), after="pre")]
    assert run_tasks(tasks, jobs=2) == ["pre", "free", "a", "b"]
    for name in ("a", "b"):
        assert _read(tmp_path, name, "start") >= _read(tmp_path, "pre", "end")
    assert _read(tmp_path, "free", "start") < _read(tmp_path, "pre", "end")  # two at a time: not one after another


def test_one_job_runs_every_task_here_in_list_order(tmp_path):
    order = []
    tasks = [Task(k, partial(order.append, k), after=None if k == 1 else k - 1) for k in (1, 2, 3)]
    run_tasks(tasks, jobs=1)
    assert order == [1, 2, 3]


def test_a_failing_task_is_raised_and_its_dependants_never_start(tmp_path):
    tasks = [Task("bad", partial(_fail, "broken pretraining")), Task("after", partial(_stamp, tmp_path, "after"),
                                                                     after="bad")]
    with pytest.raises(RuntimeError, match="broken pretraining"):
        run_tasks(tasks, jobs=2)
    assert not (tmp_path / "after.start").exists()


def test_workers_share_the_cores_out():
    assert run_tasks([Task(i, _threads) for i in range(2)], jobs=2, threads=3) == [3, 3]
    assert threads_per_job(2, cores=16) == 8 and threads_per_job(3, cores=2) == 1 and threads_per_job(1, cores=4) == 4


def test_a_task_must_wait_for_an_earlier_one():
    with pytest.raises(ValueError, match="'a' waits for 'b'"):
        run_tasks([Task("a", print, after="b"), Task("b", print)])


def test_tasks_start_in_their_order_and_results_keep_the_list_order():
    started = []
    tasks = [Task(k, partial(started.append, k) , order=o) for k, o in (("a", (1, 2)), ("b", (0,)), ("c", (1, 0)))]
    assert run_in_order(tasks) == [None, None, None] and started == ["b", "c", "a"]
    tasks = [Task(k, partial(str.upper, k), order=o) for k, o in (("a", (1,)), ("b", (0,)))]
    assert run_in_order(tasks, jobs=2) == ["A", "B"]


def test_a_ready_task_never_overtakes_an_earlier_one_that_was_waiting(tmp_path):
    """"late" waits for "pre"; "free" is ready at once but comes after "late" in the list: with one process busy
    on "pre" and the other on "first", "free" must not be queued ahead of "late"."""
    tasks = [Task("pre", partial(_stamp, tmp_path, "pre", 1.0)), Task("first", partial(_stamp, tmp_path, "first", 3.0)),
             Task("late", partial(_stamp, tmp_path, "late"), after="pre"), Task("free", partial(_stamp, tmp_path, "free"))]
    run_tasks(tasks, jobs=2)
    assert _read(tmp_path, "late", "start") < _read(tmp_path, "free", "start")


LINGERING_STUDY = '''
import os, sys, time
from functools import partial
from pathlib import Path
from seg.core.jobs import Task, run_tasks

def linger(folder):
    (Path(folder) / f"{os.getpid()}.pid").write_text("")
    time.sleep(120)

if __name__ == "__main__":
    run_tasks([Task(i, partial(linger, sys.argv[1])) for i in range(2)], jobs=2)
'''


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by whoever adopted it, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")
def test_workers_do_not_outlive_a_killed_parent(tmp_path):
    script = tmp_path / "lingering.py"
    script.write_text(LINGERING_STUDY)
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path)])
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("*.pid"))) < 2:
            assert parent.poll() is None and time.monotonic() < deadline, "the workers never started"
            time.sleep(0.2)
        workers = [int(p.stem) for p in tmp_path.glob("*.pid")]
        assert all(_alive(pid) for pid in workers)
        parent.kill()  # SIGKILL: no handler of the parent's runs
        parent.wait()
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in workers), "a worker outlived the killed study"
    finally:
        parent.kill()
        for pid in [int(p.stem) for p in tmp_path.glob("*.pid")]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
