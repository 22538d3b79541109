r"""Threads for NumPy work: one persistent pool shared by the core and the plugins.

NumPy and SciPy release the GIL in their loops (ufuncs, BLAS, FFTs), so independent work on
disjoint data (row blocks of a frame, two exposures, cells of an image) runs in parallel in
threads of one process. This module is the one place that does so:

* :func:`cpu_count` -- how many CPUs the process may use;
* :func:`parallel_map` -- ``[function(item) for item in items]`` spread over the CPUs;
* :func:`parallel_rows` -- ``function(start, stop)`` over contiguous parts of ``[0, n_rows)``;
* :func:`serial_matmul` -- a matrix product by blocks that OpenBLAS computes on the calling
  thread (its own thread pool never wakes up), large ones shared out among our threads.

The threads come from one module-level :class:`~concurrent.futures.ThreadPoolExecutor`
(threads named ``skydiff_*``), created on first use with ``cpu_count() - 1`` workers: the
calling thread always works too. Starting threads for every call would cost about a quarter
of a millisecond each time, and jitter on a loaded machine.

**Nesting.** A call made from inside a pool worker (from ``function`` of an outer call) runs
serially in that worker, with the same parts: the workers are busy with the outer call, and
results never depend on the nesting. A call made from the calling thread's own share of an
outer call may use idle workers; it never waits for a worker that has not started (the
calling thread runs every item no worker has taken), so nesting cannot deadlock.

**CPU count.** :func:`cpu_count` is the number of CPUs the process may run on (its affinity
mask), at most ``OMP_NUM_THREADS`` when that is set to a positive integer: the ``processes``
executor sets it in its workers so that workers × threads does not oversubscribe the
machine. The environment is read on every call; the pool grows if the count does.

**Fork safety.** A child created by :func:`os.fork` (the ``processes`` executor on Linux)
inherits the pool object but not its threads: the pool is forgotten in the child (a handler
registered with :func:`os.register_at_fork`) and the child creates its own on first use.

Functions given to :func:`parallel_map` and :func:`parallel_rows` must only touch their own
data (each item, or rows ``[start, stop)`` of the output); pure-Python work gains nothing
from threads because of the GIL.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "SERIAL_COMPLEX_GEMM",
    "SERIAL_GEMM",
    "cpu_count",
    "parallel_map",
    "parallel_rows",
    "serial_matmul",
]

_T = TypeVar("_T")
_R = TypeVar("_R")

#: Largest number of multiply-adds of one block of a real product in :func:`serial_matmul`:
#: 65536 x 4, OpenBLAS's ``SMP_THRESHOLD_MIN`` x ``GEMM_MULTITHREAD_THRESHOLD``. OpenBLAS
#: computes a GEMM of at most this size on the calling thread; a larger one wakes its thread
#: pool, which then keeps spinning for ~0.1 s and slows whatever the process does next on a
#: 2-core machine (the FFT threads in particular).
SERIAL_GEMM = 1 << 18

#: Largest number of real multiply-adds of one block of a complex product in
#: :func:`serial_matmul` (about 2**17 complex multiply-adds). Complex GEMMs are threaded by
#: OpenBLAS from about 2**16 multiply-adds, so complex products are computed as real ones;
#: OpenBLAS gives a real product one thread per :data:`SERIAL_GEMM` multiply-adds (rounded
#: down), so these real products of fewer than twice that size still run on the calling
#: thread.
SERIAL_COMPLEX_GEMM = 2 * SERIAL_GEMM - 1

#: Products with at least this many real output values (half as many complex ones) are
#: shared out among threads by :func:`serial_matmul`.
_PARALLEL_SIZE = 1 << 20

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_executor_workers = 0
_local = threading.local()


def cpu_count() -> int:
    """The number of CPUs this process may run on, at most ``OMP_NUM_THREADS`` when set.

    The count is that of the process's affinity mask (:func:`os.sched_getaffinity`; all the
    machine's CPUs, :func:`os.cpu_count`, where that does not exist), capped by the
    environment variable ``OMP_NUM_THREADS`` when it holds a positive integer (the
    ``processes`` executor sets it in its workers to share the machine). The environment is
    read on every call.

    Returns
    -------
    int
        At least 1.

    Examples
    --------
    >>> from skydiff.parallel import cpu_count
    >>> cpu_count() >= 1
    True
    """
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        count = os.cpu_count() or 1
    limit = os.environ.get("OMP_NUM_THREADS", "")
    if limit.isdigit() and int(limit) > 0:
        count = min(count, int(limit))
    return max(1, count)


def _pool() -> ThreadPoolExecutor:
    """The shared pool: ``cpu_count() - 1`` workers (at least one), created on first use.

    When :func:`cpu_count` has grown since, a larger pool replaces it; the old one is only
    dropped (a caller may still be submitting to it), and its idle threads end once it is
    garbage-collected.
    """
    global _executor, _executor_workers
    wanted = max(1, cpu_count() - 1)
    with _lock:
        if _executor is None or _executor_workers < wanted:
            _executor = ThreadPoolExecutor(max_workers=wanted, thread_name_prefix="skydiff")
            _executor_workers = wanted
        return _executor


def _reset_after_fork() -> None:
    """Forget the parent's pool in a forked child (its threads do not exist there)."""
    global _executor, _executor_workers, _lock
    _executor = None
    _executor_workers = 0
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_reset_after_fork)


def _in_worker() -> bool:
    """Whether the current thread is a pool worker running an item of an outer call."""
    return bool(getattr(_local, "worker", False))


class _Share:
    """The items of one :func:`parallel_map` call, handed out one at a time under a lock."""

    __slots__ = ("_lock", "_next", "_size", "error")

    def __init__(self, size: int) -> None:
        self._lock = threading.Lock()
        self._next = 1  # item 0 is the calling thread's
        self._size = size
        self.error: BaseException | None = None

    def take(self) -> int | None:
        """The index of the next item, or None when all are taken or an item failed."""
        with self._lock:
            if self.error is not None or self._next >= self._size:
                return None
            index = self._next
            self._next += 1
            return index

    def fail(self, error: BaseException) -> None:
        """Record a failure (the first one is kept); no further item is handed out."""
        with self._lock:
            if self.error is None:
                self.error = error


def parallel_map(function: Callable[[_T], _R], items: Iterable[_T]) -> list[_R]:
    """``[function(item) for item in items]``, spread over the CPUs with threads.

    For NumPy/SciPy work that releases the GIL on independent data. The calling thread and
    up to ``cpu_count() - 1`` workers of the shared pool (never more threads than items) take
    the items one at a time, the calling thread starting with the first, so items of unequal
    cost balance out. Serial with one CPU or one item, and when called from inside a pool
    worker (module notes).

    Parameters
    ----------
    function : callable
        Called once per item; it must only touch data of its own item.
    items : iterable
        The items (consumed into a list first).

    Returns
    -------
    list
        The results, in the order of ``items``.

    Raises
    ------
    BaseException
        The first exception raised by ``function``, once every item already started has
        finished; no item is started after a failure.

    Examples
    --------
    >>> from skydiff.parallel import parallel_map
    >>> parallel_map(len, ["a", "bb", "ccc"])
    [1, 2, 3]
    """
    tasks = list(items)
    n_threads = min(cpu_count(), len(tasks))
    if n_threads <= 1 or _in_worker():
        return [function(task) for task in tasks]
    results: list[Any] = [None] * len(tasks)
    share = _Share(len(tasks))

    def run(index: int | None) -> None:
        while index is not None:
            try:
                results[index] = function(tasks[index])
            except BaseException as error:  # re-raised by the calling thread
                share.fail(error)
                return
            index = share.take()

    def work() -> None:
        _local.worker = True
        try:
            run(share.take())
        finally:
            _local.worker = False

    pool = _pool()
    futures: list[Future[None]] = [pool.submit(work) for _ in range(n_threads - 1)]
    try:
        run(0)
    finally:
        # workers that have not started are not waited for: the calling thread has run
        # every item they would have taken
        started = [future for future in futures if not future.cancel()]
        wait_futures(started)
    error, share.error = share.error, None
    if error is not None:
        raise error
    return results


def parallel_rows(function: Callable[[int, int], None], n_rows: int, *,
                  threads: int | None = None) -> None:
    """``function(start, stop)`` over contiguous parts of ``[0, n_rows)``, in threads.

    The rows are cut into ``parts = min(threads, n_rows)`` parts of nearly equal size (part
    ``i`` starts at row ``n_rows * i // parts``), which :func:`parallel_map` spreads over the
    CPUs; the first part runs on the calling thread. The parts do not depend on how many
    threads run them, nor on nesting (a nested call runs the same parts one after another).

    Parameters
    ----------
    function : callable
        ``function(start, stop)``; it must only touch rows ``[start, stop)`` of its output.
    n_rows : int
        Number of rows; nothing is called when it is 0.
    threads : int, optional
        Most parts (at least 1); default :func:`cpu_count`. 1 calls ``function(0, n_rows)``
        on the calling thread.

    Examples
    --------
    >>> from skydiff.parallel import parallel_rows
    >>> parts = []
    >>> parallel_rows(lambda start, stop: parts.append((start, stop)), 10, threads=3)
    >>> sorted(parts)
    [(0, 3), (3, 6), (6, 10)]
    """
    if threads is not None and threads < 1:
        msg = f"threads must be a positive integer, got {threads!r}"
        raise ValueError(msg)
    n_rows = int(n_rows)
    if n_rows <= 0:
        return
    parts = min(cpu_count() if threads is None else int(threads), n_rows)
    if parts <= 1:
        function(0, n_rows)
        return
    bounds = [n_rows * i // parts for i in range(parts + 1)]
    parallel_map(lambda i: function(bounds[i], bounds[i + 1]), range(parts))


def serial_matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    r"""``a @ b`` (2-D, real or complex) by blocks that OpenBLAS computes on the calling thread.

    OpenBLAS computes a product of at most :data:`SERIAL_GEMM` multiply-adds on the calling
    thread only; a larger one wakes its thread pool, which keeps spinning for ~0.1 s
    afterwards and on a 2-core machine slows down whatever the process does next (the FFT
    threads in particular) far more than the product gained. The product is therefore
    computed by blocks of rows:

    * real: blocks of at most :data:`SERIAL_GEMM` multiply-adds (one row at least);
    * complex (complex GEMMs are threaded from much smaller sizes): as real products of the
      real matrix :math:`[\Re a \mid \Im a]` and the interleaved real and imaginary parts of
      :math:`b` over those of :math:`i b`, each writing the real view of the complex result
      directly (the arithmetic of a complex GEMM), by blocks of at most
      :data:`SERIAL_COMPLEX_GEMM` real multiply-adds (at least two rows; blocks of whole
      complex columns too when two rows are larger).

    Up to rounding, the blocks give the result of one product. Outputs of at least 2**20 real
    values (2**19 complex ones) are shared out among threads: :func:`parallel_rows` cuts the
    rows into one part per CPU, each part starting a new block.

    Parameters
    ----------
    a : ndarray of shape (M, K)
    b : ndarray of shape (K, N)
    out : ndarray of shape (M, N), optional
        Receives the result (of the dtype ``np.result_type(a, b)`` or one it can be cast to).

    Returns
    -------
    ndarray of shape (M, N)
        ``out`` if given.

    Examples
    --------
    >>> import numpy as np
    >>> from skydiff.parallel import serial_matmul
    >>> a = np.arange(6.0).reshape(2, 3)
    >>> b = np.ones((3, 2)) + 1j
    >>> bool(np.allclose(serial_matmul(a, b), a @ b))
    True
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        msg = f"serial_matmul needs 2-D operands (M, K) and (K, N), got {a.shape} and {b.shape}"
        raise ValueError(msg)
    dtype = np.result_type(a, b)
    shape = (a.shape[0], b.shape[1])
    if out is None:
        out = np.empty(shape, dtype=dtype)
    elif out.shape != shape:
        msg = f"out has shape {out.shape}, the product {shape}"
        raise ValueError(msg)
    if out.size == 0:
        return out
    result = out
    if np.issubdtype(dtype, np.complexfloating):
        a_c = np.asarray(a, dtype=dtype)
        b_c = np.asarray(b, dtype=dtype)
        left = np.ascontiguousarray(np.concatenate([a_c.real, a_c.imag], axis=1))
        right = np.concatenate([np.ascontiguousarray(b_c).view(left.dtype),
                                np.ascontiguousarray(b_c * 1j).view(left.dtype)])
        direct = out.dtype == dtype and out.strides[-1] == out.itemsize
        result = out if direct else np.empty(shape, dtype=dtype)
        target = result.view(left.dtype)
        width, inner = right.shape[1], left.shape[1]
        rows = SERIAL_COMPLEX_GEMM // max(1, inner * width)
        cols = width
        if rows < 2:  # wide products: blocks of (whole complex) columns too
            rows = 2
            cols = max(2, SERIAL_COMPLEX_GEMM // (2 * inner) // 2 * 2)
    else:
        left, right, target = a, b, out
        width = right.shape[1]
        rows = max(1, SERIAL_GEMM // max(1, a.shape[1] * width))
        cols = width

    def run(start: int, stop: int) -> None:
        for c0 in range(0, width, cols):
            part = right[:, c0:c0 + cols]
            for r0 in range(start, stop, rows):
                r1 = min(r0 + rows, stop)
                np.matmul(left[r0:r1], part, out=target[r0:r1, c0:c0 + cols])

    parallel_rows(run, shape[0], threads=None if target.size >= _PARALLEL_SIZE else 1)
    if result is not out:
        np.copyto(out, result)
    return out
