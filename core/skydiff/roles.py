"""The algorithm roles: one abstract base class and one named result type per role.

Every algorithm plugin subclasses the base class of its role and is registered with
``registries.<role>.add(cls)`` from its :func:`~skydiff.hookspecs.skydiff_register_algorithms`
hook. A base class fixes the signature of :meth:`run` and the type of its result, so that
pipelines and the conformance suite can call any plugin of a role interchangeably.

Each plugin class declares

``name``
    the registry name, selected in configs (``subtract.name = "al"``);
``ConfigClass``
    a :func:`~skydiff.config.configclass` holding every option;
``tags``
    capability tags (a frozenset of strings such as ``"needs_psf"``, ``"spatially_varying"``,
    ``"symmetric"``, ``"linear"``) that select conformance checks;
``order``
    for multi-select roles (measurement, dipole_classifier, metric), the execution order (lower
    runs first), as ``lsst.meas.base`` execution-order constants.

Results are frozen :mod:`attrs` classes with named fields, never bare tuples.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import numpy as np

from skydiff.task import Task

if TYPE_CHECKING:
    from astropy.table import Table

    from skydiff.exposure import Exposure
    from skydiff.kernel import BasisKernel, FixedKernel
    from skydiff.psf import Psf

__all__ = [
    "ROLE_BASES",
    "Algorithm",
    "ClassificationResult",
    "DecorrelationResult",
    "Decorrelator",
    "DetectionResult",
    "Detector",
    "DipoleClassifier",
    "Executor",
    "ExecutorResult",
    "KernelBasisGenerator",
    "KernelBasisResult",
    "Measurement",
    "MeasurementInputs",
    "MeasurementResult",
    "Metric",
    "MetricInputs",
    "MetricResult",
    "PsfEstimationResult",
    "PsfEstimator",
    "Subtraction",
    "SubtractionResult",
    "TemplateGetter",
    "TemplateResult",
]


def _frozen_dict(value: Mapping[str, Any] | None) -> dict[str, Any]:
    return dict(value or {})


class Algorithm(Task):
    """Base of every algorithm plugin: a :class:`~skydiff.task.Task` with a registry identity.

    Subclasses set the class attributes ``name``, ``ConfigClass`` and optionally ``tags`` and
    ``order``; ``role`` is fixed by the role base class.
    """

    role: ClassVar[str] = ""
    #: The registry name. On an instance, ``self.name`` is the task name instead (the config
    #: field it was made from, e.g. ``"subtract"``); ``type(self).name`` stays the registry name.
    name: str = ""
    tags: ClassVar[frozenset[str]] = frozenset()
    order: ClassVar[float] = 0.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name and not getattr(cls, "default_name", ""):
            cls.default_name = cls.name


# --------------------------------------------------------------------------------------------
# psf_estimator


@attrs.frozen
class PsfEstimationResult:
    """Result of a :class:`PsfEstimator`.

    Attributes
    ----------
    psf : Psf
        The estimated PSF model.
    sources : astropy.table.Table or None
        The stars used, with at least ``x`` and ``y`` (0-based column, row).
    metadata : dict
        Scalars describing the fit (number of stars, FWHM, ...).
    """

    psf: Psf
    sources: Table | None = None
    metadata: dict[str, Any] = attrs.field(factory=dict, converter=_frozen_dict)


class PsfEstimator(Algorithm):
    """Estimate a PSF model from the stars of an exposure that has none."""

    role = "psf_estimator"

    @abc.abstractmethod
    def run(self, exposure: Exposure, *, sources: Table | None = None) -> PsfEstimationResult:
        """Estimate the PSF of ``exposure``, optionally from the given star list."""


# --------------------------------------------------------------------------------------------
# kernel_basis


@attrs.frozen
class KernelBasisResult:
    """Result of a :class:`KernelBasisGenerator`.

    Attributes
    ----------
    basis : ndarray of shape (n_basis, K, K)
        The basis kernel images (K odd).
    constant_first : bool
        Whether the first basis carries the photometric scale, so that its coefficient is held
        spatially constant (Alard–Lupton and PCA bases).
    regularization : ndarray of shape (n_basis + 1, n_basis + 1) or None
        The regularization matrix :math:`H = B^T B` for delta-function bases (the last row and
        column belong to the background term).
    metadata : dict
        Scalars describing the basis (widths, size, mode).
    """

    basis: np.ndarray = attrs.field(eq=attrs.cmp_using(eq=np.array_equal))
    constant_first: bool = True
    regularization: np.ndarray | None = attrs.field(
        default=None, eq=attrs.cmp_using(eq=lambda a, b: (a is None and b is None)
                                         or (a is not None and b is not None
                                             and np.array_equal(a, b))))
    metadata: dict[str, Any] = attrs.field(factory=dict, converter=_frozen_dict)


class KernelBasisGenerator(Algorithm):
    """Build the basis of PSF-matching kernels from the two PSF widths."""

    role = "kernel_basis"

    @abc.abstractmethod
    def run(self, *, target_fwhm: float | None, reference_fwhm: float | None
            ) -> KernelBasisResult:
        """Build the basis for matching an image of ``target_fwhm`` to one of ``reference_fwhm``.

        ``target_fwhm`` is the FWHM (pixels) of the image that is convolved; either may be
        ``None`` when unknown, in which case the configured default basis is used.
        """


# --------------------------------------------------------------------------------------------
# subtraction


@attrs.frozen
class SubtractionResult:
    """Result of a :class:`Subtraction`.

    Attributes
    ----------
    difference : Exposure
        The difference image, in the science image's flux units, with its variance and PSF.
    matched_image : Exposure or None
        The image that was convolved, after matching (the matched template in the usual case).
    kernel : FixedKernel or BasisKernel or None
        The PSF-matching kernel (``None`` for methods without one).
    background : ndarray of shape (H, W) or None
        The fitted differential background, already removed from ``difference``.
    score : Exposure or None
        The score (likelihood) image, when the method produces one.
    kernel_sources : astropy.table.Table or None
        The stars used to fit the kernel, with their fit status.
    convolved : {"template", "science", "none"}
        Which input the kernel convolved (``"none"`` for methods that filter both, e.g. ZOGY).
    prefilter : ndarray of shape (P, P) or None
        The filter the science image was convolved with before matching (the reflected science
        PSF of the pre-convolution path), else ``None``.
    metadata : dict
        Scalars describing the subtraction.
    """

    difference: Exposure
    matched_image: Exposure | None = None
    kernel: FixedKernel | BasisKernel | None = None
    background: np.ndarray | None = attrs.field(default=None, eq=False)
    score: Exposure | None = None
    kernel_sources: Table | None = attrs.field(default=None, eq=False)
    convolved: str = attrs.field(
        default="template", validator=attrs.validators.in_(("template", "science", "none")))
    prefilter: np.ndarray | None = attrs.field(default=None, eq=False)
    metadata: dict[str, Any] = attrs.field(factory=dict, converter=_frozen_dict)


class Subtraction(Algorithm):
    """PSF-match a template to a science exposure (or the reverse) and subtract."""

    role = "subtraction"

    @abc.abstractmethod
    def run(self, science: Exposure, template: Exposure, *,
            sources: Table | None = None) -> SubtractionResult:
        """Subtract ``template`` from ``science``; ``sources`` optionally lists kernel stars."""


# --------------------------------------------------------------------------------------------
# decorrelation


@attrs.frozen
class DecorrelationResult:
    """Result of a :class:`Decorrelator`.

    Attributes
    ----------
    difference : Exposure
        The corrected difference image with its propagated variance and updated PSF.
    score : Exposure or None
        The corrected score image, for subtractions that produce one.
    metadata : dict
        Scalars describing the correction.
    """

    difference: Exposure
    score: Exposure | None = None
    metadata: dict[str, Any] = attrs.field(factory=dict, converter=_frozen_dict)


class Decorrelator(Algorithm):
    """Remove the noise correlation a PSF-matching convolution put into a difference image."""

    role = "decorrelation"

    @abc.abstractmethod
    def run(self, science: Exposure, template: Exposure,
            subtraction: SubtractionResult) -> DecorrelationResult:
        """Decorrelate ``subtraction.difference`` (or its score image)."""


# --------------------------------------------------------------------------------------------
# detection


@attrs.frozen
class DetectionResult:
    """Result of a :class:`Detector`.

    Attributes
    ----------
    catalog : astropy.table.Table
        One row per footprint: ``id``, ``x``, ``y`` (peak, 0-based column/row), ``peak_value``,
        ``significance`` and ``is_negative`` at least, sorted by decreasing absolute
        significance.
    footprints : ndarray of shape (H, W), int32
        Label image: 0 for background, ``id`` inside each footprint.
    background : ndarray of shape (H, W) or None
        The background the detector fitted to the image and subtracted before thresholding
        (``None`` when it fitted none); measurements use ``image - background``.
    cosmic_rays : ndarray of shape (H, W), bool, or None
        Pixels the detector identified as cosmic rays (to be OR-ed into the ``CR`` plane), or
        ``None`` when it did not look for them.
    metadata : dict
        Scalars describing the detection.
    """

    catalog: Table = attrs.field(eq=False)
    footprints: np.ndarray = attrs.field(eq=attrs.cmp_using(eq=np.array_equal))
    background: np.ndarray | None = attrs.field(default=None, eq=False)
    cosmic_rays: np.ndarray | None = attrs.field(default=None, eq=False)
    metadata: dict[str, Any] = attrs.field(factory=dict, converter=_frozen_dict)


class Detector(Algorithm):
    """Find positive and negative sources on a difference or score image."""

    role = "detection"

    @abc.abstractmethod
    def run(self, image: Exposure, *, is_score: bool = False) -> DetectionResult:
        """Detect footprints on ``image`` (a score image is not smoothed again)."""


# --------------------------------------------------------------------------------------------
# measurement (multi)


@attrs.frozen
class MeasurementInputs:
    """Everything a measurement plugin may look at.

    Attributes
    ----------
    catalog : astropy.table.Table
        The sources to measure, with the columns of earlier plugins.
    difference : Exposure
        The difference image.
    footprints : ndarray of shape (H, W) or None
        The detection label image.
    science, template : Exposure or None
        The science image and the matched template, for forced photometry and dipole fits.
    """

    catalog: Table = attrs.field(eq=False)
    difference: Exposure
    footprints: np.ndarray | None = attrs.field(default=None, eq=False)
    science: Exposure | None = None
    template: Exposure | None = None


@attrs.frozen
class MeasurementResult:
    """Result of a :class:`Measurement`: new catalog columns, one row per input source.

    Attributes
    ----------
    columns : astropy.table.Table
        The columns this plugin adds (same number of rows as the input catalog).
    metadata : dict
        Scalars describing the measurement.
    """

    columns: Table = attrs.field(eq=False)
    metadata: dict[str, Any] = attrs.field(factory=dict, converter=_frozen_dict)


class Measurement(Algorithm):
    """Measure quantities of detected sources; several run in ``order``."""

    role = "measurement"

    @abc.abstractmethod
    def run(self, inputs: MeasurementInputs) -> MeasurementResult:
        """Measure every source of ``inputs.catalog``."""


# --------------------------------------------------------------------------------------------
# dipole_classifier (multi)


@attrs.frozen
class ClassificationResult:
    """Result of a :class:`DipoleClassifier`.

    Attributes
    ----------
    flag : ndarray of shape (n,), bool
        True where the source is classified as a dipole.
    score : ndarray of shape (n,), float
        The statistic the decision was based on.
    metadata : dict
        Scalars describing the classification.
    """

    flag: np.ndarray = attrs.field(eq=attrs.cmp_using(eq=np.array_equal))
    score: np.ndarray = attrs.field(eq=attrs.cmp_using(eq=np.array_equal))
    metadata: dict[str, Any] = attrs.field(factory=dict, converter=_frozen_dict)


class DipoleClassifier(Algorithm):
    """Decide which measured sources are dipoles."""

    role = "dipole_classifier"

    @abc.abstractmethod
    def run(self, catalog: Table) -> ClassificationResult:
        """Classify every row of ``catalog`` (which carries the dipole-fit columns)."""


# --------------------------------------------------------------------------------------------
# metric (multi)


@attrs.frozen
class MetricInputs:
    """The outputs of a pipeline run that metrics may use (any may be missing).

    Attributes
    ----------
    science, template, difference : Exposure or None
        The science exposure, the matched template and the (decorrelated) difference.
    catalog : astropy.table.Table or None
        The measured difference-image sources, sky sources included (``sky_source`` column).
    science_sources : astropy.table.Table or None
        Sources detected on the science image (``x``, ``y``, ``flux``).
    kernel_sources : astropy.table.Table or None
        The stars the PSF-matching kernel was fitted on (``x``, ``y``).
    kernel : FixedKernel or BasisKernel or None
        The PSF-matching kernel.
    """

    science: Exposure | None = None
    template: Exposure | None = None
    difference: Exposure | None = None
    catalog: Table | None = attrs.field(default=None, eq=False)
    science_sources: Table | None = attrs.field(default=None, eq=False)
    kernel_sources: Table | None = attrs.field(default=None, eq=False)
    kernel: FixedKernel | BasisKernel | None = None


@attrs.frozen
class MetricResult:
    """Result of a :class:`Metric`: named scalar values.

    Attributes
    ----------
    values : dict of str to float
        The metric values.
    table : astropy.table.Table or None
        Per-position or per-source values behind the scalars (e.g. the spatially sampled
        metrics), or ``None``.
    metadata : dict
        Scalars describing the computation.
    """

    values: dict[str, float] = attrs.field(converter=_frozen_dict)
    table: Table | None = attrs.field(default=None, eq=False)
    metadata: dict[str, Any] = attrs.field(factory=dict, converter=_frozen_dict)


class Metric(Algorithm):
    """Compute quality scalars from the outputs of a run."""

    role = "metric"

    @abc.abstractmethod
    def run(self, inputs: MetricInputs) -> MetricResult:
        """Compute this metric's values."""


# --------------------------------------------------------------------------------------------
# template_getter


@attrs.frozen
class TemplateResult:
    """Result of a :class:`TemplateGetter`.

    Attributes
    ----------
    template : Exposure
        The template on the science exposure's pixel grid.
    coverage : float
        Fraction of science pixels covered by valid template pixels, in [0, 1].
    metadata : dict
        Scalars describing the template.
    """

    template: Exposure
    coverage: float
    metadata: dict[str, Any] = attrs.field(factory=dict, converter=_frozen_dict)


class TemplateGetter(Algorithm):
    """Produce a template on the science exposure's pixel grid from one or more inputs."""

    role = "template_getter"

    @abc.abstractmethod
    def run(self, science: Exposure, templates: Sequence[Exposure]) -> TemplateResult:
        """Build the template for ``science`` from the candidate ``templates``."""


# --------------------------------------------------------------------------------------------
# executor


@attrs.frozen
class ExecutorResult:
    """Result of an :class:`Executor`.

    Attributes
    ----------
    results : list
        One entry per input item, in input order; ``None`` where the call failed.
    errors : list
        One entry per input item: ``None`` on success, else the exception raised.
    metadata : dict
        Scalars describing the run (number of workers, wall time, ...).
    """

    results: list[Any] = attrs.field(converter=list)
    errors: list[BaseException | None] = attrs.field(converter=list, eq=False)
    metadata: dict[str, Any] = attrs.field(factory=dict, converter=_frozen_dict)

    @property
    def n_failed(self) -> int:
        """Number of items whose call raised."""
        return sum(e is not None for e in self.errors)


class Executor(Algorithm):
    """Run one function over many independent items (CCD pairs), serially or in parallel."""

    role = "executor"

    @abc.abstractmethod
    def run(self, function: Callable[[Any], Any], items: Iterable[Any]) -> ExecutorResult:
        """Call ``function(item)`` for every item; a failing item never stops the others.

        ``function`` must be picklable for executors that run in other processes.
        """


ROLE_BASES: dict[str, type[Algorithm]] = {
    cls.role: cls
    for cls in (PsfEstimator, KernelBasisGenerator, Subtraction, Decorrelator, Detector,
                Measurement, DipoleClassifier, Metric, TemplateGetter, Executor)
}
