"""Serial and local-process executors."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import skydiff


@skydiff.configclass
class SerialExecutorConfig(skydiff.Config):
    """Options of the ``serial`` executor."""

    fail_fast: bool = skydiff.Field(
        False, doc="Stop at the first failing item and re-raise its error instead of recording it.")


class SerialExecutor(skydiff.Executor):
    """Call the function on every item in turn, in the calling process.

    A :class:`~skydiff.SkydiffError` or any other exception raised for one item is recorded in
    :attr:`~skydiff.ExecutorResult.errors` and the remaining items still run (unless
    ``fail_fast``).

    Examples
    --------
    >>> from skydiff_plugins.executors import SerialExecutor
    >>> SerialExecutor().run(abs, [-1, 2, -3]).results
    [1, 2, 3]
    """

    name = "serial"
    ConfigClass = SerialExecutorConfig

    def run(self, function: Callable[[Any], Any], items: Iterable[Any]) -> skydiff.ExecutorResult:
        results: list[Any] = []
        errors: list[BaseException | None] = []
        start = time.perf_counter()
        for item in items:
            try:
                results.append(function(item))
                errors.append(None)
            except Exception as exc:
                if self.config.fail_fast:
                    raise
                self.log.warning("item %d failed: %s", len(results), exc)
                results.append(None)
                errors.append(exc)
        wall = time.perf_counter() - start
        return skydiff.ExecutorResult(
            results=results, errors=errors,
            metadata={"n_items": len(results), "n_failed": sum(e is not None for e in errors),
                      "n_workers": 1, "wall_s": wall})


@skydiff.configclass
class ProcessesExecutorConfig(skydiff.Config):
    """Options of the ``processes`` executor."""

    max_workers: int = skydiff.Field(
        0, doc="Number of worker processes; 0 means one per available CPU core.",
        check=lambda v: v >= 0)
    threads_per_worker: int = skydiff.Field(
        1, doc="FFT and BLAS threads each worker may use (sets OMP_NUM_THREADS and friends in the "
               "workers so that workers x threads does not oversubscribe the cores).",
        check=lambda v: v >= 1)


def _init_worker(threads: int) -> None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)


def _call(function: Callable[[Any], Any], item: Any) -> tuple[Any, BaseException | None]:
    try:
        return function(item), None
    except Exception as exc:
        return None, exc


class ProcessesExecutor(skydiff.Executor):
    """Fan the items out over local worker processes.

    ``function`` and the items must be picklable (a module-level function, not a lambda).
    Results come back in input order; an item that raises is recorded, not fatal.
    """

    name = "processes"
    ConfigClass = ProcessesExecutorConfig
    tags = frozenset({"parallel", "needs_pickle"})

    def run(self, function: Callable[[Any], Any], items: Iterable[Any]) -> skydiff.ExecutorResult:
        items = list(items)
        n_workers = self.config.max_workers or (os.cpu_count() or 1)
        n_workers = max(1, min(n_workers, len(items) or 1))
        start = time.perf_counter()
        with ProcessPoolExecutor(max_workers=n_workers, initializer=_init_worker,
                                 initargs=(self.config.threads_per_worker,)) as pool:
            outcomes = list(pool.map(_call, [function] * len(items), items))
        wall = time.perf_counter() - start
        results = [r for r, _ in outcomes]
        errors = [e for _, e in outcomes]
        for i, exc in enumerate(errors):
            if exc is not None:
                self.log.warning("item %d failed: %s", i, exc)
        return skydiff.ExecutorResult(
            results=results, errors=errors,
            metadata={"n_items": len(items), "n_failed": sum(e is not None for e in errors),
                      "n_workers": n_workers, "wall_s": wall})
