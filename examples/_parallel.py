"""Independent experiment runs in parallel processes, with one progress bar (used by the examples).

Each run is ``worker(job, progress)``: a module-level function (so spawned processes can import
it) that calls ``progress(n)`` as it advances and returns a picklable result. Runs must not share
state: each seeds its own generators, so a result does not depend on how many processes ran.
"""
from __future__ import annotations

import multiprocessing as mp
import signal
import sys
from typing import Any, Callable, Iterator, Sequence

import torch
from tqdm import tqdm


def no_progress(n: int) -> None:
    """The ``progress`` of a run that nobody watches."""


def _call(packed: tuple) -> Any:
    worker, job, queue, threads = packed
    torch.set_num_threads(threads)
    return worker(job, queue.put)


def run_parallel(worker: Callable[[Any, Callable[[int], None]], Any], jobs: Sequence[Any], *, workers: int,
                 total: int, desc: str, unit: str = "step", threads: int = 1) -> Iterator[Any]:
    """Yield ``worker(job, progress)`` for every job, as runs finish, ``workers`` at a time.

    ``total`` is the sum of the runs' progress units. With ``workers <= 1`` (or one job) the runs
    go in this process, in order; otherwise in spawned processes with ``threads`` torch threads
    each (one per core is fastest when the runs fill the cores), started in the order given.
    """
    with tqdm(total=total, desc=desc, unit=unit) as bar:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                yield worker(job, bar.update)
            return
        ctx = mp.get_context("spawn")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the pool terminates its workers
        with ctx.Manager() as manager, ctx.Pool(min(workers, len(jobs))) as pool:
            queue = manager.Queue()
            pending = pool.imap_unordered(_call, [(worker, job, queue, threads) for job in jobs])
            for _ in jobs:
                while True:
                    try:
                        result, done = pending.next(timeout=0.5), True
                    except mp.TimeoutError:
                        done = False
                    while not queue.empty():
                        bar.update(queue.get())
                    if done:
                        break
                yield result
