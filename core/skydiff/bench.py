r"""``skydiff bench``: wall time and peak memory of each stage of an AL subtraction.

The benchmark simulates a realistic science/template pair (:func:`benchmark_pair`), measures
one full-frame ``float32`` :func:`scipy.fft.rfft2` of the same size on the same machine as the
unit of time, then runs and times every stage:

``psf_estimation``
    the ``empirical`` :class:`~skydiff.roles.PsfEstimator` (from the registry) on the science
    exposure stripped of its PSF;
``preparation``, ``source_selection``, ``kernel_solve``, ``convolution``, ``decorrelation``
    the stages of the ``al`` :class:`~skydiff.roles.Subtraction` plugin, read from the
    ``<stage>.wall_s`` / ``<stage>.cpu_s`` entries its :meth:`~skydiff.task.Task.timer`
    records in the task metadata (``psf``, ``sources``, ``solve``, ``convolve``,
    ``decorrelate``);
``kernel_convolution``
    :func:`skydiff.convolve` of the template with a realistic Alard–Lupton kernel of spatial
    order 1 (:func:`al_matching_kernel`): the FFT engine alone. When the ``al`` plugin is
    missing or fails, this also stands in for ``convolution``;
``io``
    writing the difference as a skydiff multi-extension FITS exposure in a temporary
    directory and reading it back;
``subtraction``
    the whole ``al`` subtraction with decorrelation (the issue's target: at most 40 rfft2
    and a peak of at most 12 input exposures).

Times are reported in seconds and as a ratio to the rfft2 unit (the median of warm
transforms timed before and after the stages, since a shared machine's load drifts), so that
figures compare across machines; memory as the peak of :mod:`tracemalloc` (NumPy reports its
allocations to it) above the memory held when the stage started, in MB and as a ratio to the
bytes of one input exposure (image ``float32`` + mask ``uint32`` + variance ``float32``).
Memory is measured in a separate traced run that also serves as warm-up; for the plugin's
stages the benchmark wraps the ``timer`` of the task instance it created, so that every timed
block also records its peak (nested blocks are handled). Times come from the ``repeat``
untraced runs that follow (median). A stage whose plugin is not registered, or that fails, is
reported as skipped with a note.

Examples
--------
>>> from skydiff.bench import run_benchmark
>>> result = run_benchmark(size=(128, 256), stages=("kernel_convolution",))
>>> result.stage("kernel_convolution").rfft2_ratio > 0
True
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
import numpy as np
import scipy
import scipy.fft

from skydiff import _memory
from skydiff.convolve import convolve
from skydiff.errors import InputError
from skydiff.exposure import Exposure
from skydiff.kernel import BasisKernel, n_spatial_terms, spatial_functions
from skydiff.sim import SimConfig, SimulatedPair, fwhm_at, simulate_pair

__all__ = [
    "STAGES",
    "TARGET_MEMORY_RATIO",
    "TARGET_RFFT2_RATIO",
    "BenchResult",
    "StageResult",
    "al_matching_kernel",
    "benchmark_config",
    "benchmark_pair",
    "measure_rfft2",
    "run_benchmark",
]

_log = logging.getLogger("skydiff.bench")

T = TypeVar("T")

#: Every stage, in the order they are run and reported.
STAGES: tuple[str, ...] = (
    "psf_estimation",
    "preparation",
    "source_selection",
    "kernel_solve",
    "convolution",
    "decorrelation",
    "kernel_convolution",
    "io",
    "subtraction",
)

#: Stages read from the timers of the subtraction plugin: bench stage → timer name.
_PLUGIN_STAGES: dict[str, str] = {
    "preparation": "psf",
    "source_selection": "sources",
    "kernel_solve": "solve",
    "convolution": "convolve",
    "decorrelation": "decorrelate",
}

#: The issue's targets for the whole subtraction of a 2048×4096 pair.
TARGET_RFFT2_RATIO = 40.0
TARGET_MEMORY_RATIO = 12.0

#: Stars per pixel of the simulated field (3000 on a 2048×4096 frame), at least _MIN_STARS.
_STAR_DENSITY = 3000 / (2048 * 4096)
_MIN_STARS = 250

_MB = 2.0**20


# ------------------------------------------------------------------------------------------
# results


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _floats(values: Iterable[Any]) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def _strings(values: Iterable[Any]) -> tuple[str, ...]:
    return tuple(str(v) for v in values)


def _stages(values: Iterable[StageResult]) -> tuple[StageResult, ...]:
    return tuple(values)


def _shape(values: Iterable[Any]) -> tuple[int, int]:
    rows, cols = (int(v) for v in values)
    return rows, cols


@attrs.frozen(kw_only=True)
class StageResult:
    """The cost of one benchmark stage.

    Attributes
    ----------
    name : str
        A name from :data:`STAGES`.
    wall_s : float or None
        Median wall-clock seconds over the timed runs; None if the stage was skipped.
    cpu_s : float or None
        Median CPU seconds of the process (all threads).
    peak_bytes : int or None
        Peak traced memory above the memory held when the stage started; None if not
        measured.
    rfft2_ratio : float or None
        ``wall_s`` divided by the rfft2 unit.
    memory_ratio : float or None
        ``peak_bytes`` divided by the bytes of one input exposure.
    samples : tuple of float
        Wall-clock seconds of every timed run.
    source : str
        What was measured: ``"subtraction.al"``, ``"psf_estimator.empirical"``,
        ``"skydiff.convolve"``, ``"skydiff.io"``.
    note : str
        Why the stage was skipped or substituted, else empty.
    """

    name: str
    wall_s: float | None = attrs.field(default=None, converter=_optional_float)
    cpu_s: float | None = attrs.field(default=None, converter=_optional_float)
    peak_bytes: int | None = None
    rfft2_ratio: float | None = attrs.field(default=None, converter=_optional_float)
    memory_ratio: float | None = attrs.field(default=None, converter=_optional_float)
    samples: tuple[float, ...] = attrs.field(default=(), converter=_floats)
    source: str = ""
    note: str = ""

    @property
    def skipped(self) -> bool:
        """True if the stage was not run."""
        return self.wall_s is None

    @property
    def peak_mb(self) -> float | None:
        """``peak_bytes`` in MiB."""
        return None if self.peak_bytes is None else self.peak_bytes / _MB

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (``samples`` as a list, plus ``peak_mb`` and ``skipped``)."""
        data = attrs.asdict(self)
        data["samples"] = list(self.samples)
        data["peak_mb"] = self.peak_mb
        data["skipped"] = self.skipped
        return data


@attrs.frozen(kw_only=True)
class BenchResult:
    """The result of :func:`run_benchmark`.

    Attributes
    ----------
    size : tuple of int
        ``(rows, cols)`` of the simulated pair.
    seed : int
        Simulation seed.
    repeat : int
        Timed runs per stage.
    rfft2_s : float
        The unit: median seconds of one warm full-frame ``float32`` :func:`scipy.fft.rfft2`
        (``workers=-1``, as skydiff's FFT engine), timed before and after the stages.
    rfft2_samples : tuple of float
        The individual rfft2 timings.
    exposure_nbytes : int
        Bytes of one input exposure (image + mask + variance).
    stages : tuple of StageResult
        In :data:`STAGES` order, the selected stages only.
    machine : dict
        Cores, platform, Python/NumPy/SciPy/skydiff versions, load averages.
    notes : tuple of str
        Remarks on substitutions and failures.
    """

    size: tuple[int, int] = attrs.field(converter=_shape)
    seed: int
    repeat: int
    rfft2_s: float
    rfft2_samples: tuple[float, ...] = attrs.field(converter=_floats)
    exposure_nbytes: int
    stages: tuple[StageResult, ...] = attrs.field(converter=_stages)
    machine: dict[str, Any] = attrs.field(factory=dict)
    notes: tuple[str, ...] = attrs.field(default=(), converter=_strings)

    def stage(self, name: str) -> StageResult:
        """The result of stage ``name``.

        Raises
        ------
        KeyError
            If the stage was not selected.
        """
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    @property
    def targets(self) -> dict[str, Any]:
        """The issue's targets against the ``subtraction`` stage (None where not measured).

        ``time_ok``: ``subtraction`` ≤ 40 rfft2; ``memory_ok``: its peak ≤ 12 input
        exposures. The targets are defined for a 2048×4096 pair.
        """
        try:
            total = self.stage("subtraction")
        except KeyError:
            total = StageResult(name="subtraction")
        time_ok = None if total.rfft2_ratio is None else total.rfft2_ratio <= TARGET_RFFT2_RATIO
        memory_ok = (None if total.memory_ratio is None
                     else total.memory_ratio <= TARGET_MEMORY_RATIO)
        return {"rfft2_ratio": total.rfft2_ratio, "rfft2_target": TARGET_RFFT2_RATIO,
                "time_ok": time_ok, "memory_ratio": total.memory_ratio,
                "memory_target": TARGET_MEMORY_RATIO, "memory_ok": memory_ok}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of everything, including :attr:`targets`."""
        return {
            "size": list(self.size),
            "seed": self.seed,
            "repeat": self.repeat,
            "rfft2_s": self.rfft2_s,
            "rfft2_samples": list(self.rfft2_samples),
            "exposure_nbytes": self.exposure_nbytes,
            "exposure_mb": self.exposure_nbytes / _MB,
            "stages": [stage.to_dict() for stage in self.stages],
            "targets": self.targets,
            "machine": dict(self.machine),
            "notes": list(self.notes),
        }

    def write_json(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write :meth:`to_dict` as JSON, atomically (temporary file, then rename).

        Raises
        ------
        InputError
            If ``path`` exists and ``overwrite`` is False, or its directory does not exist.
        """
        from skydiff.io import atomic_path

        target = Path(path)
        with atomic_path(target, overwrite=overwrite) as tmp:
            Path(tmp).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return target

    def format_table(self) -> str:
        """A human-readable report: the stage table, the targets, the machine and notes."""
        rows, cols = self.size
        lines = [
            f"skydiff bench: {rows}x{cols} pair, seed {self.seed}, {self.repeat} timed run(s)",
            f"unit: one float32 scipy.fft.rfft2 of {rows}x{cols} = "
            f"{self.rfft2_s * 1e3:.1f} ms (median of {len(self.rfft2_samples)}, all cores)",
            f"one input exposure (image f32 + mask u32 + variance f32) = "
            f"{self.exposure_nbytes / _MB:.1f} MB",
            "",
            f"{'stage':<20}{'wall s':>9}{'x rfft2':>10}{'peak MB':>10}{'x exposure':>12}"
            f"  source",
        ]
        for stage in self.stages:
            if stage.skipped:
                lines.append(f"{stage.name:<20}{'skipped':>9}{'':>10}{'':>10}{'':>12}"
                             f"  {stage.note}")
                continue
            peak = "-" if stage.peak_mb is None else f"{stage.peak_mb:.1f}"
            ratio = "-" if stage.memory_ratio is None else f"{stage.memory_ratio:.2f}"
            lines.append(f"{stage.name:<20}{stage.wall_s:>9.3f}{stage.rfft2_ratio:>10.1f}"
                         f"{peak:>10}{ratio:>12}  {stage.source}")
        targets = self.targets
        if targets["rfft2_ratio"] is not None:
            lines.append("")
            verdict = {True: "met", False: "NOT met", None: "not measured"}
            memory = ("-" if targets["memory_ratio"] is None
                      else f"{targets['memory_ratio']:.2f}")
            lines.append(
                f"targets (2048x4096): subtraction {targets['rfft2_ratio']:.1f} rfft2 "
                f"(<= {TARGET_RFFT2_RATIO:g}: {verdict[targets['time_ok']]}), peak {memory} "
                f"exposures (<= {TARGET_MEMORY_RATIO:g}: {verdict[targets['memory_ok']]})")
        machine = self.machine
        lines.append("")
        lines.append(
            f"machine: {machine.get('cores')} cores ({machine.get('usable_cores')} usable), "
            f"{machine.get('platform')}, Python {machine.get('python')}, "
            f"numpy {machine.get('numpy')}, scipy {machine.get('scipy')}, "
            f"skydiff {machine.get('skydiff')}, load average {machine.get('load_before')} "
            f"-> {machine.get('load_after')}, freed memory "
            f"{'retained' if machine.get('freed_memory_retained') else 'returned to the OS'}")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# inputs


def _star_count(size: tuple[int, int]) -> int:
    return max(_MIN_STARS, round(_STAR_DENSITY * size[0] * size[1]))


def benchmark_config(size: tuple[int, int] = (2048, 4096)) -> SimConfig:
    """The :class:`~skydiff.sim.SimConfig` of the benchmark pair of ``size``.

    About 3000 stars on a 2048×4096 frame (the same density at other sizes, at least 250),
    science FWHM 4 px varying ±10 % across the field along x, template FWHM 3 px, a
    sub-pixel offset (0.3, -0.2) px, a flux scale of 1.1, saturation at 30000 ADU, a few bad
    columns and cosmic rays, and 10 transients.
    """
    rows, cols = size
    area = rows * cols / (2048 * 4096)
    defects = {"n_bad_columns": 2, "n_cosmic_rays": max(5, round(150 * area)),
               "saturation": 30000.0}
    return SimConfig(
        shape=(rows, cols), n_stars=_star_count(size), offset=(0.3, -0.2), flux_scale=1.1,
        science={"fwhm": 4.0, "fwhm_gradient": (0.1, 0.0), **defects},
        template={"fwhm": 3.0, **defects},
        n_transients=10, source_margin=min(16.0, 0.2 * min(rows, cols)))


def benchmark_pair(size: tuple[int, int] = (2048, 4096), *, seed: int = 0) -> SimulatedPair:
    """Simulate the pair of :func:`benchmark_config` with :func:`~skydiff.sim.simulate_pair`."""
    return simulate_pair(benchmark_config(size), seed=seed)


def _al_basis(size: int, sigmas: Sequence[float], degrees: Sequence[int]) -> np.ndarray:
    """Gaussians times monomials of ``(x, y) / half-size``, unit-sum first, others zero-sum."""
    half = size // 2
    coords = (np.arange(size) - half) / max(half, 1)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    r2 = (np.arange(size)[:, None] - half) ** 2 + (np.arange(size)[None, :] - half) ** 2
    images = []
    for sigma, degree in zip(sigmas, degrees, strict=True):
        gauss = np.exp(-r2 / (2.0 * sigma**2))
        for total in range(degree + 1):
            for j in range(total + 1):
                images.append(gauss * xx ** (total - j) * yy**j)
    basis = np.array(images)
    basis[0] /= basis[0].sum()
    for k in range(1, len(basis)):
        total = basis[k].sum()
        if abs(total) > 1e-12:
            basis[k] -= total * basis[0]
        basis[k] /= np.sqrt((basis[k] ** 2).sum())
    return basis


def al_matching_kernel(config: SimConfig, *, size: int = 21, order: int = 1,
                       sigmas: Sequence[float] = (0.7, 1.5, 3.0),
                       degrees: Sequence[int] = (4, 2, 2), grid: int = 5) -> BasisKernel:
    r"""A realistic Alard–Lupton kernel matching the template of ``config`` to its science.

    The true matching kernel of the simulated Gaussian PSFs at position :math:`(x, y)` is a
    Gaussian of variance :math:`\sigma_S(x, y)^2 - \sigma_T(x, y)^2` shifted by the
    simulated offset and scaled by the flux scale. Its best approximation by an
    Alard–Lupton basis (Gaussians of widths ``sigmas`` times monomials up to ``degrees``:
    27 images by default) with Chebyshev spatial coefficients of total degree ``order`` is
    fitted by linear least squares on a ``grid`` × ``grid`` set of positions.

    Parameters
    ----------
    config : SimConfig
        The simulation (Gaussian PSFs; the science PSF may vary across the field).
    size : int, optional
        Kernel side (odd).
    order : int, optional
        Spatial order of the kernel coefficients.
    sigmas, degrees : sequence, optional
        Widths (pixels) and polynomial degrees of the basis Gaussians.
    grid : int, optional
        Positions per axis used in the fit.

    Returns
    -------
    BasisKernel
        Over the science frame's bbox, in its parent coordinates.

    Raises
    ------
    InputError
        If ``size`` is not odd or the science PSF is not broader than the template's.
    """
    if size < 3 or size % 2 == 0:
        msg = f"kernel size must be odd and >= 3, got {size}"
        raise InputError(msg)
    rows, cols = config.shape
    x0, y0 = config.origin
    basis = _al_basis(size, sigmas, degrees)
    half = size // 2
    coords = np.arange(size) - half
    xs = np.linspace(0.0, cols - 1.0, grid)
    ys = np.linspace(0.0, rows - 1.0, grid)
    gx, gy = (a.ravel() for a in np.meshgrid(xs, ys))
    fwhm_to_sigma = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    sigma_s = fwhm_at(config, "science", gx, gy) * fwhm_to_sigma
    sigma_t = fwhm_at(config, "template", gx, gy) * fwhm_to_sigma
    variance = sigma_s**2 - sigma_t**2
    if np.any(variance <= 0.0):
        msg = "the science PSF must be broader than the template PSF everywhere"
        raise InputError(msg)
    dx, dy = config.offset
    targets = np.exp(-((coords[None, None, :] - dx) ** 2 + (coords[None, :, None] - dy) ** 2)
                     / (2.0 * variance[:, None, None]))
    targets *= config.flux_scale / targets.sum(axis=(1, 2), keepdims=True)
    bbox = (float(x0), float(y0), float(x0 + cols), float(y0 + rows))
    f = spatial_functions(gx + x0, gy + y0, order=order, bbox=bbox)  # (n_t, n_pos)
    n_t = n_spatial_terms(order)
    # design[(pos, pixel), (basis, term)] = f_t(pos) B_j[pixel]
    design = np.einsum("tp,jk->pkjt", f, basis.reshape(len(basis), -1)).reshape(
        f.shape[1] * size * size, len(basis) * n_t)
    solution, *_ = np.linalg.lstsq(design, targets.ravel(), rcond=None)
    return BasisKernel(basis, solution.reshape(len(basis), n_t), order=order, bbox=bbox)


# ------------------------------------------------------------------------------------------
# measurement


def measure_rfft2(image: np.ndarray, *, n: int = 7) -> tuple[float, tuple[float, ...]]:
    """The unit of time: median seconds of a warm ``scipy.fft.rfft2`` of ``image`` (float32).

    Parameters
    ----------
    image : ndarray of shape (H, W)
        Converted to ``float32`` once, outside the timing.
    n : int, optional
        Number of timed transforms (after one warm-up).

    Returns
    -------
    median : float
    samples : tuple of float
    """
    frame = np.ascontiguousarray(image, dtype=np.float32)
    scipy.fft.rfft2(frame, workers=-1)
    samples = []
    for _ in range(max(1, n)):
        start = time.perf_counter()
        scipy.fft.rfft2(frame, workers=-1)
        samples.append(time.perf_counter() - start)
    return float(np.median(samples)), tuple(samples)


class _Tracer:
    """Peak traced memory per (possibly nested) stage.

    :func:`tracemalloc.reset_peak` starts each stage's measurement; before a reset, the peak
    so far is folded into every enclosing stage, so nested stages keep correct outer peaks.
    """

    def __init__(self) -> None:
        self.peaks: dict[str, int] = {}
        self._active: list[list[int]] = []  # [baseline, running peak] per open stage
        self._started = False

    def __enter__(self) -> _Tracer:
        if not tracemalloc.is_tracing():
            tracemalloc.start()
            self._started = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:
            tracemalloc.stop()

    def _fold(self) -> int:
        peak = tracemalloc.get_traced_memory()[1]
        for frame in self._active:
            frame[1] = max(frame[1], peak)
        return peak

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Record under ``name`` the peak above the memory held at entry."""
        self._fold()
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        frame = [baseline, baseline]
        self._active.append(frame)
        try:
            yield
        finally:
            self._fold()
            self._active.pop()
            self.peaks[name] = max(0, frame[1] - frame[0])
            tracemalloc.reset_peak()


def _instrument_timer(task: Any, tracer: _Tracer) -> None:
    """Make ``task.timer(name)`` also record its block's peak memory in ``tracer``.

    Only the stages of this task (not of its subtasks) are wrapped; they do not nest.
    """
    original = task.timer

    @contextlib.contextmanager
    def timer(name: str) -> Iterator[None]:
        with tracer.stage(name), original(name):
            yield

    setattr(task, "timer", timer)  # noqa: B010 - instance attribute shadows the method


def _timed(function: Callable[[], T], repeat: int) -> tuple[T, list[float], list[float]]:
    result: T | None = None
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        result = function()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    assert result is not None
    return result, walls, cpus


def _metadata_value(metadata: Mapping[str, Any], key: str) -> float | None:
    node: Any = metadata
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return float(node) if isinstance(node, int | float) else None


def _versions() -> dict[str, Any]:
    try:
        skydiff_version = importlib.metadata.version("skydiff")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source tree
        skydiff_version = "unknown"
    usable: int | None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        usable = os.cpu_count()
    return {
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "processor": platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "skydiff": skydiff_version,
        # the skydiff command keeps freed memory for reuse (skydiff._memory)
        "freed_memory_retained": _memory.is_retained(),
    }


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - unavailable
        return None


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in size)
    except (TypeError, ValueError) as exc:
        msg = f"size must be two integers (rows, cols), got {size!r}"
        raise InputError(msg) from exc
    if rows < 64 or cols < 64:
        msg = f"size must be at least 64x64 pixels, got {rows}x{cols}"
        raise InputError(msg)
    return rows, cols


def _check_stages(stages: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(stages, str):
        stages = (stages,)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        msg = f"unknown stage(s) {', '.join(unknown)}; valid stages: {', '.join(STAGES)}"
        raise InputError(msg)
    return tuple(s for s in STAGES if s in stages)


# ------------------------------------------------------------------------------------------
# the benchmark


class _Run:
    """State of one :func:`run_benchmark` call."""

    def __init__(self, *, stages: tuple[str, ...], repeat: int, trace_memory: bool,
                 progress: Callable[[str], None], exposure_nbytes: int) -> None:
        self.selected = stages
        self.repeat = repeat
        self.trace_memory = trace_memory
        self.say = progress
        self.exposure_nbytes = exposure_nbytes
        self.results: dict[str, StageResult] = {}
        self.notes: list[str] = []

    def record(self, name: str, walls: Sequence[float], cpus: Sequence[float],
               peak: int | None, source: str, note: str = "") -> None:
        if name not in self.selected:
            return
        wall = float(np.median(walls))
        cpu = float(np.median(cpus)) if cpus and np.all(np.isfinite(cpus)) else None
        self.results[name] = StageResult(
            name=name, wall_s=wall, cpu_s=cpu, peak_bytes=peak,
            memory_ratio=None if peak is None else peak / self.exposure_nbytes,
            samples=tuple(walls), source=source, note=note)

    def skip(self, name: str, note: str) -> None:
        if name in self.selected:
            self.results[name] = StageResult(name=name, note=note)

    def measure(self, name: str, function: Callable[[], T]) -> tuple[T, list[float],
                                                                      list[float], int | None]:
        """A traced warm-up run (peak memory) and ``repeat`` timed runs."""
        peak: int | None = None
        if self.trace_memory:
            with _Tracer() as tracer, tracer.stage(name):
                function()
            peak = tracer.peaks[name]
        result, walls, cpus = _timed(function, self.repeat)
        return result, walls, cpus, peak


def _psf_stage(run: _Run, science: Exposure) -> None:
    from skydiff._manager import get_registries

    registry = get_registries().psf_estimator
    if "empirical" not in registry:
        run.skip("psf_estimation", "psf_estimator 'empirical' is not registered")
        return
    info = registry["empirical"]
    bare = science.evolve(psf=None)
    run.say("psf_estimation: psf_estimator 'empirical' on the science image without PSF")
    try:
        _, walls, cpus, peak = run.measure(
            "psf_estimation", lambda: info.target().run(bare))
    except Exception as exc:  # a failing plugin is reported, not fatal
        _log.debug("psf_estimation failed", exc_info=True)
        run.skip("psf_estimation", f"psf_estimator 'empirical' failed: "
                                   f"{type(exc).__name__}: {exc}")
        return
    run.record("psf_estimation", walls, cpus, peak, "psf_estimator.empirical")


def _subtraction_stage(run: _Run, science: Exposure, template: Exposure) -> Exposure | None:
    """Run the ``al`` plugin; record its stages. Returns the difference (None on failure)."""
    from skydiff._manager import get_registries

    registry = get_registries().subtraction
    if "al" not in registry:
        note = "subtraction plugin 'al' is not registered"
        for name in (*_PLUGIN_STAGES, "subtraction"):
            run.skip(name, note)
        run.notes.append(f"{note}; 'convolution' measured with skydiff.convolve instead")
        return None
    info = registry["al"]
    run.say("subtraction: 'al' plugin (PSF matching, decorrelation)")
    peaks: dict[str, int] = {}
    try:
        if run.trace_memory:
            with _Tracer() as tracer:
                task = info.target()
                _instrument_timer(task, tracer)
                with tracer.stage("subtraction"):
                    task.run(science, template)
                peaks = dict(tracer.peaks)
        stage_walls: dict[str, list[float]] = {name: [] for name in _PLUGIN_STAGES}
        stage_cpus: dict[str, list[float]] = {name: [] for name in _PLUGIN_STAGES}
        walls, cpus = [], []
        difference: Exposure | None = None
        for _ in range(run.repeat):
            task = info.target()
            wall, cpu = time.perf_counter(), time.process_time()
            result = task.run(science, template)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
            difference = result.difference
            metadata = task.metadata.to_dict()
            for name, key in _PLUGIN_STAGES.items():
                wall_s = _metadata_value(metadata, f"{key}.wall_s")
                cpu_s = _metadata_value(metadata, f"{key}.cpu_s")
                if wall_s is not None:
                    stage_walls[name].append(wall_s)
                    stage_cpus[name].append(cpu_s if cpu_s is not None else float("nan"))
    except Exception as exc:  # a failing plugin is reported, not fatal
        _log.debug("subtraction failed", exc_info=True)
        note = f"subtraction plugin 'al' failed: {type(exc).__name__}: {exc}"
        for name in (*_PLUGIN_STAGES, "subtraction"):
            run.skip(name, note)
        run.notes.append(f"{note}; 'convolution' measured with skydiff.convolve instead")
        return None
    for name, key in _PLUGIN_STAGES.items():
        if stage_walls[name]:
            run.record(name, stage_walls[name], stage_cpus[name], peaks.get(key),
                       "subtraction.al")
        else:
            run.skip(name, f"the 'al' plugin recorded no '{key}' timer")
    run.record("subtraction", walls, cpus, peaks.get("subtraction"), "subtraction.al")
    return difference


def _kernel_convolution_stage(run: _Run, template: Exposure, config: SimConfig,
                              *, as_convolution: bool) -> Exposure:
    kernel = al_matching_kernel(config, order=1)
    run.say("kernel_convolution: skydiff.convolve with a 27-image AL kernel of spatial "
            "order 1")
    matched, walls, cpus, peak = run.measure("kernel_convolution",
                                             lambda: convolve(template, kernel))
    run.record("kernel_convolution", walls, cpus, peak, "skydiff.convolve")
    if as_convolution:
        run.record("convolution", walls, cpus, peak, "skydiff.convolve",
                   note="stand-in: template convolved with an AL kernel fitted to the truth")
    return matched


def _io_stage(run: _Run, exposure: Exposure) -> None:
    from skydiff.io import read_exposure, write_exposure

    run.say("io: write and read the difference as a skydiff FITS exposure")
    with tempfile.TemporaryDirectory(prefix="skydiff-bench-") as tmp:
        path = Path(tmp) / "difference.fits"

        def write_read() -> Exposure:
            write_exposure(exposure, path, overwrite=True)
            return read_exposure(path)

        _, walls, cpus, peak = run.measure("io", write_read)
    run.record("io", walls, cpus, peak, "skydiff.io")


def run_benchmark(*, size: Sequence[int] = (2048, 4096), seed: int = 0,
                  stages: Sequence[str] | str = STAGES, repeat: int = 3,
                  trace_memory: bool = True,
                  progress: Callable[[str], None] | None = None) -> BenchResult:
    r"""Simulate a pair and measure each stage of an AL subtraction (see the module notes).

    Parameters
    ----------
    size : tuple of int, optional
        ``(rows, cols)`` of the simulated pair (at least 64×64). The issue's targets are for
        the default 2048×4096.
    seed : int, optional
        Simulation seed.
    stages : sequence of str, optional
        Which of :data:`STAGES` to run (default all). Selecting any of the plugin stages or
        ``subtraction`` runs the whole ``al`` subtraction.
    repeat : int, optional
        Timed runs per stage (≥ 1, default 3); times are the median.
    trace_memory : bool, optional
        Measure peak memory with :mod:`tracemalloc` in an extra warm-up run per stage
        (default). Without it stages report no memory and the first timed run is cold.
    progress : callable, optional
        Called with a one-line message before each step (``skydiff bench`` prints them to
        stderr).

    Returns
    -------
    BenchResult

    Raises
    ------
    InputError
        If ``size``, ``stages`` or ``repeat`` are invalid.

    Notes
    -----
    The unit is a full-frame rfft2 with all cores (``workers=-1``), the setting skydiff's
    FFT engine uses, measured on the simulated science image. Peak memory counts NumPy and
    Python allocations (:mod:`tracemalloc`) above what was held when the stage began (the
    two inputs are held throughout, adding two exposures to the process's footprint);
    buffers allocated inside BLAS or pocketfft are not traced.
    """
    rows, cols = _check_size(size)
    selected = _check_stages(stages)
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        msg = f"repeat must be a positive integer, got {repeat!r}"
        raise InputError(msg)
    say = progress if progress is not None else (lambda message: None)
    load_before = _load()

    config = benchmark_config((rows, cols))
    say(f"simulating a {rows}x{cols} pair ({config.n_stars} stars, science FWHM 4 px "
        f"±10 %, template FWHM 3 px, seed {seed})")
    pair = simulate_pair(config, seed=seed)
    science, template = pair.science, pair.template
    del pair  # keep only the two inputs alive (the noiseless models are not needed)

    say("unit: timing a full-frame float32 scipy.fft.rfft2")
    _, unit_samples = measure_rfft2(science.image)
    run = _Run(stages=selected, repeat=repeat, trace_memory=trace_memory, progress=say,
               exposure_nbytes=science.nbytes)

    if "psf_estimation" in selected:
        _psf_stage(run, science)
    difference: Exposure | None = None
    if any(name in selected for name in (*_PLUGIN_STAGES, "subtraction")):
        difference = _subtraction_stage(run, science, template)
    needs_stand_in = "convolution" in selected and (
        "convolution" not in run.results or run.results["convolution"].skipped)
    matched: Exposure | None = None
    if "kernel_convolution" in selected or needs_stand_in or (
            "io" in selected and difference is None):
        matched = _kernel_convolution_stage(run, template, config,
                                            as_convolution=needs_stand_in)
    if "io" in selected:
        to_write = difference if difference is not None else matched
        assert to_write is not None
        _io_stage(run, to_write)

    # The unit again at the end: on a shared machine the load may have changed meanwhile.
    _, more_samples = measure_rfft2(science.image)
    unit_samples = (*unit_samples, *more_samples)
    unit = float(np.median(unit_samples))
    machine = {**_versions(), "load_before": load_before, "load_after": _load()}
    ordered = tuple(
        stage if stage.wall_s is None else attrs.evolve(stage, rfft2_ratio=stage.wall_s / unit)
        for stage in (run.results[name] for name in STAGES if name in run.results))
    return BenchResult(size=(rows, cols), seed=seed, repeat=repeat, rfft2_s=unit,
                       rfft2_samples=unit_samples, exposure_nbytes=science.nbytes,
                       stages=ordered, machine=machine, notes=tuple(run.notes))
