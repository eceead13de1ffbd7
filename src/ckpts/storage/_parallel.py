"""Running blocking I/O calls (pwritev, preadv, fsync) on a few plain threads at once."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


def run_parallel(work: Callable[[_Item], _Result], items: Sequence[_Item], *, threads: int
                 ) -> list[_Result]:
    """``[work(x) for x in items]`` on up to ``threads`` threads; the first failure is raised.

    Plain threads rather than concurrent.futures: an async save still in flight at
    interpreter exit must be able to finish, and executors refuse work by then.
    """
    results: list[_Result | None] = [None] * len(items)
    failures: list[BaseException] = []
    queue = iter(enumerate(items))
    lock = threading.Lock()

    def worker() -> None:
        while not failures:
            with lock:
                index, item = next(queue, (-1, None))
            if index < 0:
                return
            try:
                results[index] = work(item)  # type: ignore[arg-type]
            except BaseException as e:  # re-raised below, on the caller's thread
                failures.append(e)

    # the calling thread is one of the workers: one thread fewer to start (a small save
    # pays for every start)
    helpers = [threading.Thread(target=worker, name="ckpts-io")
               for _ in range(min(threads, len(items)) - 1)]
    for thread in helpers:
        thread.start()
    worker()
    for thread in helpers:
        thread.join()
    if failures:
        raise failures[0]
    return results  # type: ignore[return-value]
