"""Run a list of tasks, some waiting for others, N at a time in worker processes (``seg study --jobs N``).

A task is a picklable call (a module-level function with its arguments) with a key, and optionally the key of
the task it must wait for (a fine-tuning run waits for the pretraining run it starts from). With one job every
task runs here, in list order; with N, in N spawned processes, each with ``threads`` torch threads (the cores
divided among the jobs) and quiet consoles (every run writes its own ``log.txt``), a task starting as soon as a
process is free and the task it waits for has finished, the earliest in the list first. Results come back in
list order. The first failure stops the pool (tasks not started are cancelled; running ones finish) and is
raised here; Ctrl-C reaches every process of the terminal's group, and since each training stage resumes, the
same command continues later. A worker does not outlive the process that started it: killed any other way
(``kill``, a job scheduler, an out-of-memory kill), the workers get SIGTERM too (Linux), rather than training
on unseen into the run folders a restarted study resumes from.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Callable, Hashable

import attrs

from seg.core.console import info, progress_bar


@attrs.frozen
class Task:
    """One unit of work: ``call()`` (picklable), named ``key``, started only after the task keyed ``after``."""

    key: Hashable
    call: Callable
    after: Hashable | None = None
    label: str = ""  # what the progress line calls it
    order: tuple = ()  # where it runs among the tasks (run_in_order); results keep the list's order


def run_in_order(tasks: list[Task], jobs: int = 1) -> list:
    """:func:`run_tasks` with the tasks started in the order of their ``order`` (ties: list order; a task's
    ``order`` must not put it before the task it waits for); the results in the order of ``tasks``."""
    ordered = sorted(tasks, key=lambda t: t.order)
    results = dict(zip([t.key for t in ordered], run_tasks(ordered, jobs)))
    return [results[t.key] for t in tasks]


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    """The torch threads each of ``jobs`` processes gets: the cores shared out, at least one."""
    return max(1, (cores or os.cpu_count() or 1) // max(1, jobs))


def _die_with(parent: int) -> None:
    """Have this process get SIGTERM when ``parent`` exits (Linux's PR_SET_PDEATHSIG; elsewhere nothing), and
    exit now if it already has."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _job_setup(threads: int, parent: int) -> None:
    _die_with(parent)
    import torch

    from seg.core.console import set_quiet

    torch.set_num_threads(threads)
    set_quiet(True)


def run_tasks(tasks: list[Task], jobs: int = 1, threads: int | None = None) -> list:
    """Every task's result, in the order of ``tasks`` (a task's ``after`` must name an earlier task); with
    ``jobs`` > 1 each process gets ``threads`` torch threads (default :func:`threads_per_job`)."""
    keys = [t.key for t in tasks]
    for i, task in enumerate(tasks):
        if task.after is not None and task.after not in keys[:i]:
            raise ValueError(f"task {task.key!r} waits for {task.after!r}, which is not an earlier task")
    if jobs <= 1:
        return [task.call() for task in tasks]
    results, done = {}, set()
    waiting = list(range(len(tasks)))
    context = multiprocessing.get_context("spawn")  # fork is unsafe once torch threads have started
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_job_setup,
                             initargs=(threads or threads_per_job(jobs), os.getpid())) as pool, \
            progress_bar(f"{len(tasks)} runs, {jobs} at a time", len(tasks)) as advance:
        running = {}
        try:
            while waiting or running:
                ready = [i for i in waiting if tasks[i].after is None or tasks[i].after in done]
                for i in ready[:jobs - len(running)]:  # no more than a free process each: the pool's queue is FIFO
                    waiting.remove(i)
                    running[pool.submit(tasks[i].call)] = i
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    i = running.pop(future)
                    results[i] = future.result()
                    done.add(tasks[i].key)
                    info(f"finished {tasks[i].label or tasks[i].key} ({len(results)} of {len(tasks)})")
                    advance()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return [results[i] for i in range(len(tasks))]
