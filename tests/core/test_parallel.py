"""Tests of skydiff.parallel: the shared thread pool, parallel_map/parallel_rows, serial_matmul.

Most tests force four CPUs (``cpu_count`` patched) so that the threaded paths run on any
machine; calls that could deadlock run in a thread joined with a timeout.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from skydiff import parallel
from skydiff.parallel import cpu_count, parallel_map, parallel_rows, serial_matmul

#: Seconds after which a call is taken to be deadlocked.
_TIMEOUT = 60.0


@pytest.fixture
def four_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend the process may use four CPUs (the pool then has three workers)."""
    monkeypatch.setattr(parallel, "cpu_count", lambda: 4)


def _within(seconds: float, function: Callable[[], Any]) -> Any:
    """``function()`` in a new thread; fails if it has not returned after ``seconds``."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = function()
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"no result after {seconds} s: deadlock"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# ------------------------------------------------------------------------------------------
# cpu_count


def test_cpu_count_is_the_affinity_capped_by_omp_num_threads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    full = cpu_count()
    assert full == len(os.sched_getaffinity(0)) >= 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_count() == 1  # read on every call
    for ignored in ("0", "-2", "two", "", "1000"):
        monkeypatch.setenv("OMP_NUM_THREADS", ignored)
        assert cpu_count() == full


# ------------------------------------------------------------------------------------------
# parallel_map


@pytest.mark.usefixtures("four_cpus")
def test_parallel_map_keeps_order_and_matches_the_loop() -> None:
    rng = np.random.default_rng(11)
    arrays = [rng.normal(size=int(n)) for n in rng.integers(1, 5000, size=57)]

    def norm(array: np.ndarray) -> float:
        return float(np.sqrt(np.sum(array * array)))

    assert parallel_map(norm, arrays) == [norm(array) for array in arrays]
    assert parallel_map(str, (i for i in range(9))) == [str(i) for i in range(9)]
    assert parallel_map(norm, []) == []


@pytest.mark.usefixtures("four_cpus")
def test_parallel_map_spreads_items_over_threads_starting_with_the_caller() -> None:
    def who(item: int) -> tuple[int, int]:
        time.sleep(0.02)
        return item, threading.get_ident()

    caller = threading.get_ident()
    results = parallel_map(who, range(8))
    assert [item for item, _ in results] == list(range(8))
    idents = {ident for _, ident in results}
    assert results[0][1] == caller  # the first item runs on the calling thread
    assert 2 <= len(idents) <= 4  # at most cpu_count() threads
    assert parallel_map(who, [5])[0][1] == caller  # one item: serial


@pytest.mark.usefixtures("four_cpus")
def test_parallel_map_uses_one_persistent_pool() -> None:
    def name(_: int) -> str:
        time.sleep(0.01)
        return threading.current_thread().name

    parallel_map(name, range(4))
    pool = parallel._pool()
    assert parallel._executor is pool
    names = parallel_map(name, range(8))
    assert parallel._pool() is pool  # reused, not recreated
    assert any(name.startswith("skydiff") for name in names)


def test_pool_grows_with_the_cpu_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "cpu_count", lambda: 2)
    small = parallel._pool()
    workers = parallel._executor_workers
    assert workers >= 1
    monkeypatch.setattr(parallel, "cpu_count", lambda: workers + 3)
    large = parallel._pool()
    assert large is not small and parallel._executor_workers == workers + 2
    monkeypatch.setattr(parallel, "cpu_count", lambda: 2)
    assert parallel._pool() is large  # never shrinks
    assert parallel_map(lambda x: -x, range(9)) == [-x for x in range(9)]


def test_omp_num_threads_one_runs_everything_on_the_calling_thread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    caller = threading.get_ident()
    assert set(parallel_map(lambda _: threading.get_ident(), range(20))) == {caller}
    idents: list[int] = []
    parallel_rows(lambda start, stop: idents.append(threading.get_ident()), 100)
    assert idents == [caller]
    a = np.ones((1100, 3), np.float32)
    b = np.ones((3, 1000), np.float32)
    np.testing.assert_array_equal(serial_matmul(a, b), np.full((1100, 1000), 3.0, np.float32))


@pytest.mark.usefixtures("four_cpus")
def test_parallel_map_raises_the_first_error_after_started_items_finish() -> None:
    started: list[int] = []
    finished: list[int] = []
    lock = threading.Lock()

    def work(item: int) -> int:
        with lock:
            started.append(item)
        time.sleep(0.05 if item == 0 else 0.005)
        if item == 0:
            msg = "item 0 failed"
            raise ValueError(msg)
        with lock:
            finished.append(item)
        return item

    with pytest.raises(ValueError, match="item 0 failed"):
        _within(_TIMEOUT, lambda: parallel_map(work, range(1000)))
    assert sorted([0, *finished]) == sorted(started)  # nothing still running
    assert len(started) < 1000  # no item handed out after the failure
    assert parallel_map(lambda x: x + 1, range(5)) == [1, 2, 3, 4, 5]  # the pool still works


@pytest.mark.usefixtures("four_cpus")
def test_parallel_map_error_in_a_worker_propagates() -> None:
    def work(item: int) -> int:
        if item == 7:
            msg = f"bad item {item}"
            raise KeyError(msg)
        return item

    with pytest.raises(KeyError, match="bad item 7"):
        _within(_TIMEOUT, lambda: parallel_map(work, range(20)))


@pytest.mark.usefixtures("four_cpus")
def test_nested_parallel_map_completes_serially_in_workers() -> None:
    caller: list[int] = []
    inner_threads: dict[int, set[int]] = {}
    outer_threads: dict[int, int] = {}
    lock = threading.Lock()

    def inner(pair: tuple[int, int]) -> int:
        i, j = pair
        with lock:
            inner_threads.setdefault(i, set()).add(threading.get_ident())
        time.sleep(0.002)
        return i * j

    def outer(i: int) -> int:
        with lock:
            outer_threads[i] = threading.get_ident()
        return sum(parallel_map(inner, [(i, j) for j in range(12)]))

    def run() -> list[int]:
        caller.append(threading.get_ident())
        return parallel_map(outer, range(10))

    assert _within(_TIMEOUT, run) == [i * 66 for i in range(10)]
    for i, ident in outer_threads.items():
        if ident != caller[0]:  # an outer item run by a pool worker: its inner call is serial
            assert inner_threads[i] == {ident}


@pytest.mark.usefixtures("four_cpus")
def test_nested_call_from_the_callers_share_does_not_wait_for_busy_workers() -> None:
    release = threading.Event()

    def outer(i: int) -> list[int]:
        if i == 0:  # the caller's item: the three workers are blocked meanwhile
            result = parallel_map(lambda j: j * j, range(50))
            release.set()
            return result
        release.wait(_TIMEOUT)
        return []

    result = _within(_TIMEOUT, lambda: parallel_map(outer, range(4)))
    assert result[0] == [j * j for j in range(50)]


@pytest.mark.usefixtures("four_cpus")
def test_nested_rows_and_products_inside_parallel_map_are_exact() -> None:
    rng = np.random.default_rng(5)
    a = rng.normal(size=(1100, 7)).astype(np.float32)
    b = rng.normal(size=(7, 1000)).astype(np.float32)
    reference = serial_matmul(a, b)  # the same row blocks as the nested calls below

    def product(_: int) -> np.ndarray:
        return serial_matmul(a, b)

    for result in _within(_TIMEOUT, lambda: parallel_map(product, range(6))):
        np.testing.assert_array_equal(result, reference)


@pytest.mark.usefixtures("four_cpus")
def test_concurrent_callers_share_the_pool() -> None:
    results: dict[int, list[int]] = {}

    def caller(k: int) -> None:
        def scaled(x: int) -> int:
            time.sleep(0.001)
            return x * k

        results[k] = parallel_map(scaled, range(40))

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(_TIMEOUT)
    assert not any(thread.is_alive() for thread in threads)
    assert results == {k: [x * k for x in range(40)] for k in range(4)}


# ------------------------------------------------------------------------------------------
# parallel_rows


@pytest.mark.usefixtures("four_cpus")
@pytest.mark.parametrize("n_rows", [0, 1, 2, 3, 5, 17, 1000, 4097])
@pytest.mark.parametrize("threads", [None, 1, 2, 3, 8, 64])
def test_parallel_rows_covers_every_row_once(n_rows: int, threads: int | None) -> None:
    parts: list[tuple[int, int]] = []
    lock = threading.Lock()
    caller = threading.get_ident()
    first_thread: list[int] = []

    def record(start: int, stop: int) -> None:
        with lock:
            parts.append((start, stop))
            if start == 0:
                first_thread.append(threading.get_ident())

    parallel_rows(record, n_rows, threads=threads)
    if n_rows == 0:
        assert parts == []
        return
    n_parts = min(4 if threads is None else threads, n_rows)
    parts.sort()
    assert len(parts) == n_parts
    assert parts == [(n_rows * i // n_parts, n_rows * (i + 1) // n_parts)
                     for i in range(n_parts)]
    assert all(stop > start for start, stop in parts)
    assert first_thread == [caller]


def test_parallel_rows_rejects_zero_threads() -> None:
    with pytest.raises(ValueError, match="threads"):
        parallel_rows(lambda start, stop: None, 10, threads=0)


@pytest.mark.usefixtures("four_cpus")
def test_parallel_rows_propagates_errors() -> None:
    def fail(start: int, stop: int) -> None:
        if start > 0:
            msg = f"rows {start}:{stop}"
            raise RuntimeError(msg)

    with pytest.raises(RuntimeError, match="rows 25:50"):
        _within(_TIMEOUT, lambda: parallel_rows(fail, 50, threads=2))


# ------------------------------------------------------------------------------------------
# serial_matmul


def _complex(rng: np.random.Generator, shape: tuple[int, int], dtype: type) -> np.ndarray:
    return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(dtype)


@pytest.mark.usefixtures("four_cpus")
@pytest.mark.parametrize(("m", "k", "n"), [
    (517, 33, 2049),   # several rows per block
    (5, 3, 100_001),   # one row per block
    (1031, 5, 1023),   # a threaded output (>= 2**20 values)
    (1, 1, 1),
    (0, 4, 3),
])
def test_serial_matmul_real_matches_matmul(m: int, k: int, n: int) -> None:
    rng = np.random.default_rng(13)
    a = rng.normal(size=(m, k)).astype(np.float32)
    b = rng.normal(size=(k, n)).astype(np.float32)
    result = serial_matmul(a, b)
    assert result.dtype == np.float32 and result.shape == (m, n)
    np.testing.assert_allclose(result, a @ b, rtol=1e-5, atol=1e-5)
    out = np.empty((m, n), np.float32)
    assert serial_matmul(a, b, out=out) is out
    np.testing.assert_array_equal(out, result)
    np.testing.assert_allclose(serial_matmul(a, np.asfortranarray(b)), result,
                               rtol=1e-5, atol=1e-5)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    np.testing.assert_allclose(serial_matmul(a64, b64), a64 @ b64, rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("four_cpus")
@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
@pytest.mark.parametrize(("m", "k", "n"), [
    (301, 23, 1025),   # row blocks
    (3, 41, 5003),     # two rows exceed the block: columns are split too
    (727, 7, 733),     # a threaded output (>= 2**19 complex values)
    (1, 1, 1),
])
def test_serial_matmul_complex_matches_matmul(m: int, k: int, n: int, dtype: type) -> None:
    rng = np.random.default_rng(17)
    a = _complex(rng, (m, k), dtype)
    b = _complex(rng, (k, n), dtype)
    tolerance = 1e-4 if dtype == np.complex64 else 1e-11
    result = serial_matmul(a, b)
    assert result.dtype == dtype and result.shape == (m, n)
    np.testing.assert_allclose(result, a @ b, rtol=tolerance, atol=tolerance)
    out = np.empty((m, n), dtype)
    assert serial_matmul(a, b, out=out) is out
    np.testing.assert_array_equal(out, result)
    strided = np.zeros((m, 2 * n), dtype)[:, ::2]  # not contiguous: computed, then copied
    assert serial_matmul(a, b, out=strided) is strided
    np.testing.assert_array_equal(strided, result)


def test_serial_matmul_mixed_real_and_complex() -> None:
    rng = np.random.default_rng(19)
    a = rng.normal(size=(40, 9)).astype(np.float32)
    b = _complex(rng, (9, 31), np.complex64)
    result = serial_matmul(a, b)
    assert result.dtype == np.complex64
    np.testing.assert_allclose(result, a @ b, rtol=1e-5, atol=1e-5)


def test_serial_matmul_checks_shapes() -> None:
    with pytest.raises(ValueError, match="2-D"):
        serial_matmul(np.ones((3, 4)), np.ones((5, 2)))
    with pytest.raises(ValueError, match="2-D"):
        serial_matmul(np.ones(3), np.ones((3, 2)))
    with pytest.raises(ValueError, match="out has shape"):
        serial_matmul(np.ones((3, 4)), np.ones((4, 2)), out=np.empty((2, 3)))


# ------------------------------------------------------------------------------------------
# fork safety


@pytest.mark.usefixtures("four_cpus")
def test_reset_after_fork_forgets_the_pool() -> None:
    parallel_map(lambda x: x, range(4))
    before = parallel._pool()
    parallel._reset_after_fork()
    assert parallel._executor is None
    after = parallel._pool()
    assert after is not before
    assert parallel_map(lambda x: 2 * x, range(6)) == [0, 2, 4, 6, 8, 10]
    before.shutdown(wait=False)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.usefixtures("four_cpus")
def test_forked_child_creates_its_own_pool() -> None:
    parallel_map(lambda x: x, range(4))  # the parent's pool exists
    read, write = os.pipe()
    with warnings.catch_warnings():  # Python >= 3.12 warns about forking with threads
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        status = 1
        try:
            fresh = parallel._executor is None
            ok = parallel_map(lambda x: x * x, range(16)) == [x * x for x in range(16)]
            os.write(write, b"ok" if fresh and ok else b"bad")
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    deadline = time.monotonic() + _TIMEOUT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child did not finish: deadlock")
        time.sleep(0.01)
    with os.fdopen(read, "rb") as pipe:
        report = pipe.read()
    assert os.waitstatus_to_exitcode(status) == 0
    assert report == b"ok"
