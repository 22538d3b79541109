"""Small, deterministic sample inputs for every role, used by the conformance checks.

Each role gets one *sample call* (valid arguments of its ``run``) and a few *bad calls*
(role-specific invalid arguments that a plugin must reject with a
:class:`~skydiff.errors.SkydiffError`). Images are 128×128 pixels (large enough for a kernel
fit) from :func:`skydiff.sim.simulate_pair` with a fixed seed: a star field with one transient,
a template of narrower PSF, Poisson and read noise, a cosmic ray and a bad column. The
simulation runs once; every call hands out fresh copies of everything a plugin could mutate
(tables, lists, the exposures' headers and WCS objects; the read-only pixel arrays are shared),
so a misbehaving plugin cannot poison later checks.

The executor sample function :func:`square_or_fail` lives at module level so that process-
and cluster-based executors can pickle it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import numpy as np
from astropy.table import Table

from skydiff.convolve import convolve
from skydiff.exposure import Exposure
from skydiff.kernel import FixedKernel
from skydiff.psf import FWHM_PER_SIGMA
from skydiff.roles import MeasurementInputs, MetricInputs, SubtractionResult
from skydiff.sim import SimulatedPair, simulate_pair

__all__ = [
    "EXECUTOR_FAILING_ITEMS",
    "EXECUTOR_ITEMS",
    "ROLE_CALLS",
    "RoleCall",
    "SampleData",
    "bad_calls",
    "sample_call",
    "sample_data",
    "square_or_fail",
]

#: Seed of the simulated pair behind every sample input.
SAMPLE_SEED = 20240601
#: Shape of the sample images.
SAMPLE_SHAPE = (128, 128)
#: Items of the executor sample call (all succeed).
EXECUTOR_ITEMS: tuple[int, ...] = (3, 1, 4, 1, 5, 9, 2, 6)
#: Items of the executor failure check: the negative one fails.
EXECUTOR_FAILING_ITEMS: tuple[int, ...] = (3, 1, -4, 1, 5)


def square_or_fail(item: int) -> int:
    """Return ``item ** 2``; raise ValueError for a negative item (the executor sample function).

    Parameters
    ----------
    item : int
        The work item.

    Returns
    -------
    int

    Raises
    ------
    ValueError
        If ``item`` is negative (to test that executors record failures per item).
    """
    if item < 0:
        msg = f"item {item} is negative"
        raise ValueError(msg)
    return item * item


@attrs.frozen
class RoleCall:
    """The arguments of one call of a plugin's ``run``.

    Attributes
    ----------
    args : tuple
        Positional arguments.
    kwargs : Mapping
        Keyword arguments.
    label : str
        Short description (used in failure messages).
    """

    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = attrs.field(factory=dict)
    label: str = "sample"

    def __call__(self, plugin: Any) -> Any:
        """Call ``plugin.run(*args, **kwargs)`` and return its result."""
        return plugin.run(*self.args, **self.kwargs)


@attrs.frozen
class SampleData:
    """The simulated images all sample calls are built from.

    Attributes
    ----------
    pair : SimulatedPair
        The simulated science/template pair.
    kernel : FixedKernel
        The Gaussian kernel that matches the template PSF to the science PSF.
    matched : Exposure
        The template convolved with ``kernel``.
    difference : Exposure
        ``science - matched`` with summed variance and OR-ed masks, carrying the science PSF.
    """

    pair: SimulatedPair
    kernel: FixedKernel
    matched: Exposure
    difference: Exposure

    def fresh(self) -> SampleData:
        """A copy sharing the read-only arrays but with new headers, WCS objects and tables."""
        pair = attrs.evolve(self.pair, science=self.pair.science.evolve(),
                            template=self.pair.template.evolve(), truth=self.pair.truth.copy())
        return SampleData(pair=pair, kernel=self.kernel, matched=self.matched.evolve(),
                          difference=self.difference.evolve())

    @property
    def science(self) -> Exposure:
        """The science exposure."""
        return self.pair.science

    @property
    def template(self) -> Exposure:
        """The template exposure (same grid as the science)."""
        return self.pair.template


@functools.cache
def sample_data() -> SampleData:
    """Return the (cached, immutable) simulated images behind the sample calls.

    Returns
    -------
    SampleData
    """
    pair = simulate_pair(shape=SAMPLE_SHAPE, n_stars=60, n_transients=1, source_margin=12.0,
                         flux_min=2000.0, flux_max=50000.0, seed=SAMPLE_SEED,
                         science={"fwhm": 3.0, "n_cosmic_rays": 1, "n_bad_columns": 1},
                         template={"fwhm": 2.0})
    sigma = math.sqrt(_fwhm(pair.science) ** 2 - _fwhm(pair.template) ** 2) / FWHM_PER_SIGMA
    size = 2 * math.ceil(4.0 * sigma) + 1
    offsets = np.arange(size) - size // 2
    profile = np.exp(-0.5 * (offsets / sigma) ** 2)
    image = np.outer(profile, profile)
    kernel = FixedKernel(image / image.sum())
    matched = convolve(pair.template, kernel)
    difference = pair.science.evolve(
        image=pair.science.image - matched.image,
        variance=pair.science.variance + matched.variance,
        mask=pair.science.mask | matched.mask,
        mask_planes=pair.science.mask_planes,
    )
    return SampleData(pair=pair, kernel=kernel, matched=matched, difference=difference)


def _detections(data: SampleData) -> tuple[Table, np.ndarray]:
    """A detection catalog (the transient and two stars) and its label image."""
    truth = data.pair.truth
    chosen = [int(np.flatnonzero(truth["kind"] == "transient")[0])]
    stars = np.flatnonzero(truth["kind"] == "star")
    chosen += [int(i) for i in stars[:2]]
    x = np.asarray(truth["x"][chosen], dtype=np.float64)
    y = np.asarray(truth["y"][chosen], dtype=np.float64)
    rows, cols = np.round(y).astype(int), np.round(x).astype(int)
    rows = np.clip(rows, 0, SAMPLE_SHAPE[0] - 1)
    cols = np.clip(cols, 0, SAMPLE_SHAPE[1] - 1)
    peak = data.difference.image[rows, cols].astype(np.float64)
    significance = peak / np.sqrt(data.difference.variance[rows, cols].astype(np.float64))
    ids = np.arange(1, len(chosen) + 1, dtype=np.int64)
    catalog = Table({"id": ids, "x": x, "y": y, "peak_value": peak,
                     "significance": significance, "is_negative": peak < 0})
    catalog.sort("significance", reverse=True)
    grid_rows, grid_cols = np.indices(SAMPLE_SHAPE)
    footprints = np.zeros(SAMPLE_SHAPE, dtype=np.int32)
    for ident, row, col in zip(ids, rows, cols, strict=True):  # loop over sources
        disk = (grid_rows - row) ** 2 + (grid_cols - col) ** 2 <= 9
        footprints[disk & (footprints == 0)] = ident
    footprints.setflags(write=False)
    return catalog, footprints


def _dipole_catalog() -> Table:
    """Three measured sources with the dipole_fit columns: a dipole, a point source, a faint one.

    The fluxes are from free (untied) fits, so ``dipole_dof = dipole_n_data - 6``. Row 1 is a
    balanced, significant dipole that one PSF fits badly; row 2 a bright point source (no
    negative lobe; the dipole fits no better than one PSF); row 3 a faint pair of lobes at
    S/N 1.8. Both built-in classifiers flag exactly row 1.
    """
    nan = np.nan
    return Table({
        "id": np.array([1, 2, 3], dtype=np.int64),
        "x": np.array([20.0, 40.0, 12.0]),
        "y": np.array([22.0, 31.0, 50.0]),
        "psf_flux": np.array([150.0, 4000.0, 30.0]),
        "psf_flux_err": np.array([40.0, 60.0, 30.0]),
        "dipole_pos_flux": np.array([3000.0, 4000.0, 40.0]),
        "dipole_pos_flux_err": np.array([80.0, 60.0, 30.0]),
        "dipole_neg_flux": np.array([2900.0, 0.0, 35.0]),
        "dipole_neg_flux_err": np.array([80.0, 60.0, 30.0]),
        "dipole_pos_x": np.array([20.5, 40.0, 12.4]),
        "dipole_pos_x_err": np.array([0.03, 0.02, 0.8]),
        "dipole_pos_y": np.array([22.3, 31.0, 50.5]),
        "dipole_pos_y_err": np.array([0.03, 0.02, 0.8]),
        "dipole_neg_x": np.array([19.5, 41.0, 11.6]),
        "dipole_neg_x_err": np.array([0.03, nan, 0.9]),
        "dipole_neg_y": np.array([21.7, 32.0, 49.7]),
        "dipole_neg_y_err": np.array([0.03, nan, 0.9]),
        "dipole_x": np.array([20.008, 40.0, 12.027]),
        "dipole_y": np.array([22.005, 31.0, 50.127]),
        "dipole_separation": np.array([1.166, 1.414, 1.131]),
        "dipole_orientation": np.array([30.96, -135.0, 45.0]),
        "dipole_chi2dof": np.array([1.1, 1.02, 0.9]),
        "dipole_single_chi2dof": np.array([25.0, 1.0, 0.95]),
        "dipole_n_data": np.array([400, 300, 150], dtype=np.int64),
        "dipole_dof": np.array([394, 294, 144], dtype=np.int64),
        "dipole_sn": np.array([52.0, 66.0, 1.8]),
        "dipole_fit_flag": np.array([False, False, False]),
    })


def _wrong_types() -> Any:
    """An array standing in where an Exposure or a Table is expected (typed Any on purpose)."""
    return np.zeros(SAMPLE_SHAPE, dtype=np.float32)


def _fwhm(exposure: Exposure) -> float:
    psf = exposure.psf
    assert psf is not None  # the simulated exposures always carry a PSF
    return psf.fwhm()


def _subtraction_result(data: SampleData) -> SubtractionResult:
    return SubtractionResult(difference=data.difference, matched_image=data.matched,
                             kernel=data.kernel, background=None,
                             metadata={"kernel_sum": data.kernel.sum})


def _psf_estimator(data: SampleData) -> RoleCall:
    return RoleCall((data.science.evolve(psf=None),), {}, "science exposure without PSF")


def _psf_estimator_bad(data: SampleData) -> list[RoleCall]:
    return [RoleCall((_wrong_types(),), {}, "ndarray instead of an Exposure")]


def _kernel_basis(data: SampleData) -> RoleCall:
    return RoleCall((), {"target_fwhm": _fwhm(data.template),
                         "reference_fwhm": _fwhm(data.science)}, "template/science FWHMs")


def _kernel_basis_bad(data: SampleData) -> list[RoleCall]:
    return [RoleCall((), {"target_fwhm": -1.0, "reference_fwhm": _fwhm(data.science)},
                     "negative target FWHM")]


def _subtraction(data: SampleData) -> RoleCall:
    return RoleCall((data.science, data.template), {}, "science and template")


def _subtraction_bad(data: SampleData) -> list[RoleCall]:
    small = data.template.cutout(slice(0, 48), slice(0, 48))
    return [RoleCall((data.science, small), {}, "template shape differs from science"),
            RoleCall((_wrong_types(), data.template), {}, "ndarray instead of an Exposure")]


def _decorrelation(data: SampleData) -> RoleCall:
    return RoleCall((data.science, data.template, _subtraction_result(data)), {},
                    "science, template and a subtraction result")


def _decorrelation_bad(data: SampleData) -> list[RoleCall]:
    small = data.template.cutout(slice(0, 48), slice(0, 48))
    return [RoleCall((data.science, small, _subtraction_result(data)), {},
                     "template shape differs from science"),
            RoleCall((_wrong_types(), data.template, _subtraction_result(data)), {},
                     "ndarray instead of an Exposure")]


def _detection(data: SampleData) -> RoleCall:
    return RoleCall((data.difference,), {"is_score": False}, "difference image")


def _detection_bad(data: SampleData) -> list[RoleCall]:
    return [RoleCall((_wrong_types(),), {}, "ndarray instead of an Exposure")]


def _measurement(data: SampleData) -> RoleCall:
    catalog, footprints = _detections(data)
    inputs = MeasurementInputs(catalog=catalog, difference=data.difference,
                               footprints=footprints, science=data.science,
                               template=data.matched)
    return RoleCall((inputs,), {}, "detections on the difference image")


def _measurement_bad(data: SampleData) -> list[RoleCall]:
    catalog, footprints = _detections(data)
    inputs = MeasurementInputs(catalog=catalog, difference=_wrong_types(),
                               footprints=footprints, science=_wrong_types(),
                               template=_wrong_types())
    return [RoleCall((inputs,), {}, "ndarrays instead of Exposures")]


def _dipole_classifier(data: SampleData) -> RoleCall:
    return RoleCall((_dipole_catalog(),), {}, "catalog with dipole-fit columns")


def _dipole_classifier_bad(data: SampleData) -> list[RoleCall]:
    return [RoleCall((Table({"id": np.array([1, 2], dtype=np.int64)}),), {},
                     "catalog without the dipole-fit columns")]


def _metric(data: SampleData) -> RoleCall:
    catalog, _ = _detections(data)
    truth = data.pair.truth
    stars = truth[truth["kind"] == "star"]
    sources = Table({"x": np.asarray(stars["x"], dtype=np.float64),
                     "y": np.asarray(stars["y"], dtype=np.float64),
                     "flux": np.asarray(stars["flux_science"], dtype=np.float64)})
    inputs = MetricInputs(science=data.science, template=data.matched,
                          difference=data.difference, catalog=catalog,
                          science_sources=sources, kernel_sources=sources.copy())
    return RoleCall((inputs,), {}, "science, matched template, difference and catalogs")


def _metric_bad(data: SampleData) -> list[RoleCall]:
    wrong = _wrong_types()
    inputs = MetricInputs(science=wrong, template=wrong.copy(), difference=wrong.copy(),
                          catalog=wrong.copy(), science_sources=wrong.copy(),
                          kernel_sources=wrong.copy())
    return [RoleCall((inputs,), {}, "ndarrays instead of Exposures and Tables")]


def _template_getter(data: SampleData) -> RoleCall:
    return RoleCall((data.science, [data.template]), {}, "science and one template")


def _template_getter_bad(data: SampleData) -> list[RoleCall]:
    return [RoleCall((data.science, []), {}, "no template"),
            RoleCall((_wrong_types(), [data.template]), {}, "ndarray instead of an Exposure")]


def _executor(data: SampleData) -> RoleCall:
    return RoleCall((square_or_fail, list(EXECUTOR_ITEMS)), {}, "square_or_fail over 8 items")


def _executor_bad(data: SampleData) -> list[RoleCall]:
    # An empty item list is valid for executors, and a failing item is recorded, not raised:
    # executors have no role-level bad input (see check_executor_failures).
    return []


#: ``role -> (sample call builder, bad calls builder)``.
ROLE_CALLS: Mapping[str, tuple[Callable[[SampleData], RoleCall],
                               Callable[[SampleData], list[RoleCall]]]] = {
    "psf_estimator": (_psf_estimator, _psf_estimator_bad),
    "kernel_basis": (_kernel_basis, _kernel_basis_bad),
    "subtraction": (_subtraction, _subtraction_bad),
    "decorrelation": (_decorrelation, _decorrelation_bad),
    "detection": (_detection, _detection_bad),
    "measurement": (_measurement, _measurement_bad),
    "dipole_classifier": (_dipole_classifier, _dipole_classifier_bad),
    "metric": (_metric, _metric_bad),
    "template_getter": (_template_getter, _template_getter_bad),
    "executor": (_executor, _executor_bad),
}


def _builders(role: str) -> tuple[Callable[[SampleData], RoleCall],
                                   Callable[[SampleData], list[RoleCall]]]:
    try:
        return ROLE_CALLS[role]
    except KeyError:
        msg = f"no sample inputs for role {role!r}; known roles: {', '.join(ROLE_CALLS)}"
        raise KeyError(msg) from None


def sample_call(role: str) -> RoleCall:
    """Return valid arguments for the ``run`` of a plugin of ``role`` (fresh containers).

    Parameters
    ----------
    role : str
        A key of :data:`skydiff.registry.ROLES`.

    Returns
    -------
    RoleCall

    Raises
    ------
    KeyError
        If the role is unknown.
    """
    return _builders(role)[0](sample_data().fresh())


def bad_calls(role: str) -> list[RoleCall]:
    """Return invalid arguments a plugin of ``role`` must reject with a SkydiffError.

    Parameters
    ----------
    role : str
        A key of :data:`skydiff.registry.ROLES`.

    Returns
    -------
    list of RoleCall
        Empty for executors, which have no invalid input at the role level.

    Raises
    ------
    KeyError
        If the role is unknown.
    """
    return _builders(role)[1](sample_data().fresh())
