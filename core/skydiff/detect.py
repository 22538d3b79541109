r"""Detect and measure the sources of a difference image: the ``detect`` step of a pipeline.

:class:`DetectAndMeasureTask` (and its functional twin :func:`detect_and_measure`) orchestrates
the plugins of three roles, in the spirit of ``lsst.ip.diffim``'s ``DetectAndMeasureTask``:

1. **Detection** — the ``detection`` plugin finds positive and negative footprints on the
   difference, or on the score image when one is given (``use_score``; a score image is not
   smoothed again). When it ran on the difference, the background it fitted is subtracted
   from the difference that everything after it sees; the ``DETECTED`` and
   ``DETECTED_NEGATIVE`` planes of that difference are reset from the footprints and the
   cosmic rays it found are OR-ed into ``CR``.
2. **Sky sources** — ``n_sky_sources`` disks of radius ``sky_source_radius`` are placed at the
   points of a scrambled Halton sequence (``scipy.stats.qmc.Halton``, seeded by
   ``sky_source_seed``) where the disk touches no footprint and no pixel of
   ``sky_source_avoid_planes``, and lies entirely inside the image; disks never overlap. They
   get rows with ``sky_source = True`` and labels of their own in the footprint image, and
   are measured like every other source, to characterise the noise and the false-positive
   rate (upstream's ``SkyObjectsTask``).
3. **Measurement** — the ``measurement`` plugins run in their ``order``; each sees the columns
   of those before it. After the ``centroid_slot`` plugin, ``x``/``y`` become its centroid
   where it is finite and not flagged (the detection peak stays in ``peak_x``/``peak_y``).
   A plugin that raises for the whole call (anything but :class:`~skydiff.errors.InputError`
   or :class:`MemoryError`) is logged, its ``<name>_flag`` is set for every row, its other
   columns are filled with NaN/False/0 when a zero-row call reveals them, and the others run
   on: one plugin's failure flags its measurements and never stops the rest.
4. **Dipole classification** — each ``dipole_classifier`` adds ``is_dipole_<name>`` and
   ``dipole_score_<name>``; ``is_dipole`` is the AND of the selected classifiers' flags
   (False for sky sources, and everywhere when no classifier is selected). The ``x``/``y`` of
   a dipole become the fitted mean centroid of its two lobes (``dipole_x``/``dipole_y``).
5. **Removal** — rows with any of the ``remove_flagged`` columns True are dropped (upstream's
   ``badSourceFlags``); the remaining rows are renumbered ``1..n`` and the footprint image is
   relabelled to match.
6. **Finishing** — ``snr = psf_flux / psf_flux_err``, ``ra``/``dec`` from the difference's
   WCS, units and a description on every column (:data:`CATALOG_COLUMNS`), and catalog
   metadata.

Units: positions in ``pix``, areas and second moments in ``pix2``, angles and sky
coordinates in ``deg``, fluxes and pixel values in the difference's ``BUNIT`` header unit when
astropy can parse it, else dimensionless (skydiff images carry no unit unless their header
says so). A unit a plugin set on its own column is kept.

References
----------
.. [1] Bosch, J. et al. 2018, PASJ 70, S5 (the LSST/HSC measurement framework).
.. [2] Reiss, D. J. & Lupton, R. H. 2016, DMTN-007, "Implementation of dipole fitting".
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import attrs
import numpy as np
from astropy import units as u
from astropy.table import Table

from skydiff.config import (
    ChoiceField,
    Config,
    Field,
    ListField,
    RangeField,
    RegistryField,
    RegistrySelection,
    configclass,
)
from skydiff.errors import ConfigError, InputError
from skydiff.exposure import Exposure
from skydiff.roles import DetectionResult, MeasurementInputs, MeasurementResult
from skydiff.task import Task

__all__ = [
    "CATALOG_COLUMNS",
    "DEFAULT_MEASUREMENTS",
    "DEFAULT_REMOVE_FLAGGED",
    "CatalogColumn",
    "DetectAndMeasureConfig",
    "DetectAndMeasureResult",
    "DetectAndMeasureTask",
    "detect_and_measure",
]

log = logging.getLogger("skydiff.detect")

#: The measurement plugins run by default, in execution order.
DEFAULT_MEASUREMENTS: tuple[str, ...] = ("centroid", "pixel_flags", "psf_flux", "aperture_flux",
                                         "shape", "dipole_fit", "forced_psf")

#: Flag columns whose True rows are dropped by default: the ``pixel_flags`` analogue of
#: upstream's ``badSourceFlags`` (off image; bad, edge, no-data or saturated centre, in the
#: science or the template). ``flag_intrp_center`` is not among them: it is set when *any*
#: centre pixel was interpolated, where upstream removes only fully interpolated centres.
DEFAULT_REMOVE_FLAGGED: tuple[str, ...] = (
    "off_image", "flag_bad_center", "flag_edge_center", "flag_no_data_center",
    "flag_sat_center", "flag_sat_template_center")

_FATAL = (InputError, MemoryError)


class CatalogColumn(NamedTuple):
    """One documented column of the difference-image catalog.

    Attributes
    ----------
    name : str
        Column name; ``<r>``, ``<plane>`` and ``<name>`` stand for the parts that vary.
    unit : str or None
        ``"pix"``, ``"pix2"``, ``"deg"``, ``"flux"`` (the difference image's unit), ``""``
        (dimensionless) or None (integers and booleans carry no unit).
    source : str
        What produces it: ``"detection"``, ``"core"`` or the plugin name.
    description : str
        What it holds (also stored as the column's ``description``).
    """

    name: str
    unit: str | None
    source: str
    description: str


_PLANES = ("bad", "sat", "cr", "edge", "no_data", "intrp", "suspect", "sat_template")

#: Every column of the catalog written by the default configuration, in the order of the
#: contracts (``docs/user/detection.md`` renders this table).
CATALOG_COLUMNS: tuple[CatalogColumn, ...] = (
    CatalogColumn("id", None, "core",
                  "Source id, 1..n in catalog order; the source's label in the footprint "
                  "image."),
    CatalogColumn("x", "pix", "core",
                  "Column of the source, 0-based in the difference image's own pixel grid: "
                  "the centroid-slot position where it was measured, else the detection "
                  "peak."),
    CatalogColumn("y", "pix", "core", "Row of the source, 0-based (as x)."),
    CatalogColumn("ra", "deg", "core",
                  "Right ascension (ICRS, from the difference's WCS at x, y); NaN without "
                  "a celestial WCS."),
    CatalogColumn("dec", "deg", "core", "Declination (as ra)."),
    CatalogColumn("snr", "", "core", "Signal-to-noise ratio psf_flux / psf_flux_err (signed)."),
    CatalogColumn("is_dipole", None, "core",
                  "True where every selected dipole classifier flags the source as a dipole "
                  "(never for sky sources)."),
    CatalogColumn("sky_source", None, "core",
                  "True for a sky source: a disk placed on empty sky to measure the noise."),
    CatalogColumn("peak_x", "pix", "core", "Column of the detection peak (before the centroid "
                                           "slot replaced x)."),
    CatalogColumn("peak_y", "pix", "core", "Row of the detection peak."),
    CatalogColumn("peak_value", "flux", "detection",
                  "Value of the detection image (the difference, or the score image when "
                  "detecting on it; in its unit) at the peak, after background subtraction."),
    CatalogColumn("significance", "", "detection",
                  "Signed peak value of the detection image over its noise (negative for "
                  "negative peaks)."),
    CatalogColumn("is_negative", None, "detection",
                  "True when the footprint came only from the negative threshold."),
    CatalogColumn("footprint_area", "pix2", "detection", "Number of pixels of the footprint."),
    CatalogColumn("n_peaks", None, "detection", "Number of peaks in the footprint."),
    CatalogColumn("pos_peak_x", "pix", "detection",
                  "Column of the strongest positive peak in the footprint (NaN if none)."),
    CatalogColumn("pos_peak_y", "pix", "detection", "Row of the strongest positive peak."),
    CatalogColumn("neg_peak_x", "pix", "detection",
                  "Column of the strongest negative peak in the footprint (NaN if none)."),
    CatalogColumn("neg_peak_y", "pix", "detection", "Row of the strongest negative peak."),
    CatalogColumn("centroid_x", "pix", "centroid", "Centroid column."),
    CatalogColumn("centroid_y", "pix", "centroid", "Centroid row."),
    CatalogColumn("centroid_x_err", "pix", "centroid", "Uncertainty of centroid_x."),
    CatalogColumn("centroid_y_err", "pix", "centroid", "Uncertainty of centroid_y."),
    CatalogColumn("centroid_flag", None, "centroid",
                  "True where the centroid could not be measured."),
    CatalogColumn("flag_<plane>", None, "pixel_flags",
                  "Any pixel of the footprint (a 5x5 box for sky sources without one) has the "
                  "mask plane <PLANE> (bad, sat, cr, edge, no_data, intrp, suspect, "
                  "sat_template)."),
    CatalogColumn("flag_<plane>_center", None, "pixel_flags",
                  "Any pixel of the 3x3 centre has the mask plane <PLANE>."),
    CatalogColumn("off_image", None, "pixel_flags", "The position is outside the image."),
    CatalogColumn("pixel_flags_flag", None, "pixel_flags",
                  "True where the pixel flags could not be evaluated."),
    CatalogColumn("psf_flux", "flux", "psf_flux",
                  "PSF-fit flux on the difference (weighted linear fit of the difference's "
                  "PSF at x, y)."),
    CatalogColumn("psf_flux_err", "flux", "psf_flux", "Uncertainty of psf_flux."),
    CatalogColumn("psf_chi2dof", "", "psf_flux", "Reduced chi-square of the PSF fit."),
    CatalogColumn("psf_flux_flag", None, "psf_flux", "True where the PSF fit failed."),
    CatalogColumn("aperture_flux_<r>", "flux", "aperture_flux",
                  "Flux in a circular aperture of radius <r> pixels (3_0 = 3.0 px)."),
    CatalogColumn("aperture_flux_<r>_err", "flux", "aperture_flux",
                  "Uncertainty of aperture_flux_<r>."),
    CatalogColumn("aperture_flux_flag", None, "aperture_flux",
                  "True where an aperture flux could not be measured."),
    CatalogColumn("shape_xx", "pix2", "shape", "Adaptive Gaussian second moment <x x>."),
    CatalogColumn("shape_yy", "pix2", "shape", "Adaptive Gaussian second moment <y y>."),
    CatalogColumn("shape_xy", "pix2", "shape", "Adaptive Gaussian second moment <x y>."),
    CatalogColumn("shape_flag", None, "shape", "True where the moments did not converge."),
    CatalogColumn("dipole_pos_flux", "flux", "dipole_fit",
                  "Flux of the positive lobe of the dipole model (a positive number)."),
    CatalogColumn("dipole_pos_flux_err", "flux", "dipole_fit", "Uncertainty of "
                                                               "dipole_pos_flux."),
    CatalogColumn("dipole_neg_flux", "flux", "dipole_fit",
                  "Flux of the negative lobe of the dipole model (a positive number)."),
    CatalogColumn("dipole_neg_flux_err", "flux", "dipole_fit", "Uncertainty of "
                                                               "dipole_neg_flux."),
    CatalogColumn("dipole_pos_x", "pix", "dipole_fit", "Column of the positive lobe."),
    CatalogColumn("dipole_pos_y", "pix", "dipole_fit", "Row of the positive lobe."),
    CatalogColumn("dipole_neg_x", "pix", "dipole_fit", "Column of the negative lobe."),
    CatalogColumn("dipole_neg_y", "pix", "dipole_fit", "Row of the negative lobe."),
    CatalogColumn("dipole_pos_x_err", "pix", "dipole_fit", "Uncertainty of dipole_pos_x."),
    CatalogColumn("dipole_pos_y_err", "pix", "dipole_fit", "Uncertainty of dipole_pos_y."),
    CatalogColumn("dipole_neg_x_err", "pix", "dipole_fit", "Uncertainty of dipole_neg_x."),
    CatalogColumn("dipole_neg_y_err", "pix", "dipole_fit", "Uncertainty of dipole_neg_y."),
    CatalogColumn("dipole_x", "pix", "dipole_fit", "Flux-weighted mean column of the lobes."),
    CatalogColumn("dipole_y", "pix", "dipole_fit", "Flux-weighted mean row of the lobes."),
    CatalogColumn("dipole_separation", "pix", "dipole_fit", "Distance between the lobes."),
    CatalogColumn("dipole_orientation", "deg", "dipole_fit",
                  "Direction from the negative to the positive lobe, counter-clockwise from "
                  "+x: atan2(y+ - y-, x+ - x-)."),
    CatalogColumn("dipole_chi2dof", "", "dipole_fit", "Reduced chi-square of the dipole fit."),
    CatalogColumn("dipole_single_chi2dof", "", "dipole_fit",
                  "Reduced chi-square of the best single-PSF model over the same pixels."),
    CatalogColumn("dipole_n_data", None, "dipole_fit", "Number of pixels in the dipole fit."),
    CatalogColumn("dipole_dof", None, "dipole_fit",
                  "Degrees of freedom of the dipole fit: dipole_n_data minus the number of fitted "
                  "parameters."),
    CatalogColumn("dipole_sn", "", "dipole_fit", "Signal-to-noise ratio of the dipole fit."),
    CatalogColumn("dipole_fit_flag", None, "dipole_fit",
                  "True where no dipole was fitted or the fit failed."),
    CatalogColumn("forced_science_flux", "flux", "forced_psf",
                  "PSF-fit flux at x, y on the science image (NaN without one)."),
    CatalogColumn("forced_science_flux_err", "flux", "forced_psf",
                  "Uncertainty of forced_science_flux."),
    CatalogColumn("forced_template_flux", "flux", "forced_psf",
                  "PSF-fit flux at x, y on the matched template (NaN without one)."),
    CatalogColumn("forced_template_flux_err", "flux", "forced_psf",
                  "Uncertainty of forced_template_flux."),
    CatalogColumn("forced_psf_flag", None, "forced_psf",
                  "True where a forced flux could not be measured."),
    CatalogColumn("is_dipole_<name>", None, "core",
                  "The decision of the dipole classifier <name>."),
    CatalogColumn("dipole_score_<name>", "", "core",
                  "The statistic the dipole classifier <name> decided on."),
)

_KNOWN = {column.name: column for column in CATALOG_COLUMNS if "<" not in column.name}
_PATTERNS: tuple[tuple[re.Pattern[str], str | None, str], ...] = (
    (re.compile(r"^aperture_flux_(\d+)_(\d+)_err$"), "flux",
     "Uncertainty of the flux in a circular aperture of radius {0}.{1} pixels."),
    (re.compile(r"^aperture_flux_(\d+)_(\d+)$"), "flux",
     "Flux in a circular aperture of radius {0}.{1} pixels."),
    (re.compile(r"^flag_(\w+)_center$"), None,
     "Any pixel of the 3x3 centre has the mask plane {0}."),
    (re.compile(r"^flag_(\w+)$"), None,
     "Any pixel of the footprint (a 5x5 box for sky sources) has the mask plane {0}."),
    (re.compile(r"^is_dipole_(\w+)$"), None, "The decision of the dipole classifier {0}."),
    (re.compile(r"^dipole_score_(\w+)$"), "",
     "The statistic the dipole classifier {0} decided on."),
)
_POSITION = re.compile(r"(^|_)[xy](_err)?$")

#: The detection columns the core relies on, with the fill value used for a missing one and
#: for sky-source rows.
_DETECTION_FILL: dict[str, Any] = {
    "peak_value": np.nan, "significance": np.nan, "is_negative": False,
    "footprint_area": 0, "n_peaks": 0, "pos_peak_x": np.nan, "pos_peak_y": np.nan,
    "neg_peak_x": np.nan, "neg_peak_y": np.nan,
}


# --------------------------------------------------------------------------------------------
# configuration


def _is_identifier(value: str) -> bool:
    return value == "" or re.fullmatch(r"[A-Za-z_]\w*", value) is not None


@configclass
class DetectAndMeasureConfig(Config):
    """Settings of the ``detect`` step: detection, sky sources, measurement, classification."""

    detection: RegistrySelection = RegistryField(
        "detection", default="threshold",
        doc="The detection algorithm (footprints with peaks on the difference or score image).")
    measurement: RegistrySelection = RegistryField(
        "measurement", default=DEFAULT_MEASUREMENTS, optional=True,
        doc="The measurement plugins, run in their declared order; each adds columns.")
    dipole_classifier: RegistrySelection = RegistryField(
        "dipole_classifier", default=("sn_flux_ratio", "chi2"), optional=True,
        doc="The dipole classifiers; is_dipole is the AND of their decisions (False "
            "everywhere when none is selected).")
    use_score: str = ChoiceField(
        "auto", allowed={"auto": "detect on the score image when one is given",
                         "always": "detect on the score image; fail without one",
                         "never": "always detect on the difference"},
        doc="Which image the detection runs on (a score image is not smoothed again).")
    centroid_slot: str = Field(
        "centroid", check=_is_identifier,
        doc="Measurement plugin whose <name>_x, <name>_y replace x, y where they are finite "
            "and <name>_flag is False (sky sources keep their centres); '' keeps the "
            "detection peaks. Positions stay at the peaks when the plugin is not selected.")
    n_sky_sources: int = RangeField(
        100, min=0, doc="Number of sky sources to place (fewer when the empty sky runs out).")
    sky_source_radius: float = RangeField(
        8.0, min=1.0, doc="Radius in pixels of the sky-source disks.")
    sky_source_avoid_planes: tuple[str, ...] = ListField(
        ("DETECTED", "DETECTED_NEGATIVE", "BAD", "NO_DATA", "EDGE", "SAT", "SAT_TEMPLATE"),
        dtype=str,
        doc="Mask planes a sky-source disk must not touch (besides the footprints); planes "
            "the difference does not define are ignored. SAT and SAT_TEMPLATE are included "
            "because a detection peaking on saturated pixels is rejected and leaves no "
            "DETECTED mask behind.")
    sky_source_seed: int = RangeField(
        0, min=0, doc="Seed of the scrambled Halton sequence of sky-source positions.")
    remove_flagged: tuple[str, ...] = ListField(
        DEFAULT_REMOVE_FLAGGED, dtype=str,
        doc="Boolean catalog columns whose True rows are dropped after measurement "
            "(upstream's badSourceFlags); columns the catalog lacks are ignored.")


# --------------------------------------------------------------------------------------------
# result


def _dict(value: Mapping[str, Any] | None) -> dict[str, Any]:
    return dict(value or {})


@attrs.frozen
class DetectAndMeasureResult:
    """Result of :class:`DetectAndMeasureTask`.

    Attributes
    ----------
    catalog : astropy.table.Table
        One row per kept source (sky sources included, ``sky_source`` True), with units and
        descriptions; see :data:`CATALOG_COLUMNS`.
    footprints : ndarray of shape (H, W), int32
        Label image: 0 for no source, else the ``id`` of the row whose footprint (or sky
        disk) covers the pixel.
    difference : Exposure
        The difference the measurements saw: the input minus the detection background (when
        detecting on the difference), with ``DETECTED``/``DETECTED_NEGATIVE`` reset from the
        detections and the detected cosmic rays in ``CR``.
    sky_sources : int
        Number of sky sources in the catalog.
    metadata : dict
        Nested scalars: counts, failures, the detector's metadata, timings.
    """

    catalog: Table = attrs.field(eq=False)
    footprints: np.ndarray = attrs.field(eq=attrs.cmp_using(eq=np.array_equal))
    difference: Exposure
    sky_sources: int
    metadata: dict[str, Any] = attrs.field(factory=dict, converter=_dict)


# --------------------------------------------------------------------------------------------
# helpers


def _scalars(value: Mapping[str, Any]) -> dict[str, Any]:
    """The metadata-storable part of ``value`` (scalars, lists of scalars, nested mappings)."""
    out: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key or "." in key:
            continue
        if isinstance(item, np.generic):
            item = item.item()
        if isinstance(item, bool | int | float | str):
            out[key] = item
        elif isinstance(item, Mapping):
            out[key] = _scalars(item)
        elif isinstance(item, list | tuple) and all(
                isinstance(v, bool | int | float | str | np.generic) for v in item):
            out[key] = [v.item() if isinstance(v, np.generic) else v for v in item]
    return out


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _check_exposure(value: Any, name: str, shape: tuple[int, int] | None) -> None:
    if value is None:
        return
    if not isinstance(value, Exposure):
        msg = (f"{name} must be a skydiff.Exposure or None, got {type(value).__name__}; read "
               "files with skydiff.Exposure.read(path)")
        raise InputError(msg)
    if shape is not None and value.shape != shape:
        msg = (f"{name} has shape {value.shape} but the difference has {shape}; give images "
               "on the difference's pixel grid")
        raise InputError(msg)


def _flux_unit(exposure: Exposure) -> u.UnitBase:
    """The unit of the image values: ``BUNIT`` when astropy parses it, else dimensionless."""
    text = exposure.metadata.get("BUNIT")
    if isinstance(text, str) and text.strip():
        try:
            unit = u.Unit(text.strip(), parse_strict="silent")
        except (ValueError, TypeError):
            return u.dimensionless_unscaled
        if not isinstance(unit, u.UnrecognizedUnit):
            return unit
    return u.dimensionless_unscaled


def _halton(n: int, seed: int) -> np.ndarray:
    """``n`` points of a scrambled 2-D Halton sequence in [0, 1)², deterministic in ``seed``."""
    from scipy.stats import qmc

    rng = np.random.default_rng(seed)
    try:
        sampler = qmc.Halton(d=2, scramble=True, rng=rng)
    except TypeError:  # scipy < 1.15 names the argument ``seed``
        sampler = qmc.Halton(d=2, scramble=True, seed=rng)
    return np.asarray(sampler.random(n))


def _disk_offsets(radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Row and column offsets of the pixels within ``radius`` of a pixel centre."""
    half = math.floor(radius)
    dy, dx = np.mgrid[-half:half + 1, -half:half + 1]
    inside = dx * dx + dy * dy <= radius * radius
    return dy[inside], dx[inside]


def place_sky_sources(forbidden: np.ndarray, *, n: int, radius: float,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    r"""Positions of up to ``n`` non-overlapping disks on the pixels that are not forbidden.

    Candidates are the points of a scrambled Halton sequence (20 per requested source, at
    least 256), mapped to pixel centres at least :math:`\lfloor r\rfloor` from the border; a
    candidate is accepted, in sequence order, when no pixel of its disk is forbidden and its
    centre is more than :math:`2r` from every accepted one.

    Parameters
    ----------
    forbidden : ndarray of shape (H, W), bool
        Pixels a disk must not touch.
    n : int
        Number of disks wanted (>= 0).
    radius : float
        Disk radius :math:`r` in pixels.
    seed : int, optional
        Seed of the sequence's scrambling.

    Returns
    -------
    x, y : ndarray of shape (m,), int64
        Column and row of the accepted centres (m <= n).
    """
    height, width = forbidden.shape
    half = math.floor(radius)
    if n <= 0 or height <= 2 * half or width <= 2 * half:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy()
    points = _halton(max(20 * n, 256), seed)
    cols = np.rint(half + points[:, 0] * (width - 1 - 2 * half)).astype(np.int64)
    rows = np.rint(half + points[:, 1] * (height - 1 - 2 * half)).astype(np.int64)
    dy, dx = _disk_offsets(radius)
    hits = forbidden[rows[:, None] + dy[None, :], cols[:, None] + dx[None, :]].any(axis=1)
    accepted: list[int] = []
    min_sq = (2.0 * radius) ** 2
    for index in np.flatnonzero(~hits):
        if accepted:
            ax, ay = cols[accepted], rows[accepted]
            if np.any((ax - cols[index]) ** 2 + (ay - rows[index]) ** 2 <= min_sq):
                continue
        accepted.append(int(index))
        if len(accepted) == n:
            break
    return cols[accepted], rows[accepted]


def _plane_bits(exposure: Exposure, planes: Sequence[str]) -> int:
    names = [name for name in planes if name in exposure.mask_planes.names]
    return int(exposure.mask_planes.value(*names)) if names else 0


def _fill_value(column: Any) -> Any:
    kind = np.asarray(column).dtype.kind
    if kind == "b":
        return False
    if kind in "iu":
        return 0
    if kind == "f":
        return np.nan
    if kind in "US":
        return ""
    return None


def _filled_like(column: Any, n: int) -> np.ndarray:
    """``n`` rows of NaN / False / 0 / "" (zeros for other dtypes) shaped like ``column``."""
    array = np.asarray(column)
    shape = (n, *array.shape[1:])
    value = _fill_value(column)
    if value is None:
        return np.zeros(shape, dtype=array.dtype)
    return np.full(shape, value, dtype=array.dtype)


# --------------------------------------------------------------------------------------------
# the task


class DetectAndMeasureTask(Task):
    """Detect, add sky sources, measure and classify the sources of a difference image.

    Parameters
    ----------
    config : DetectAndMeasureConfig, optional
        The settings; default ``DetectAndMeasureConfig()``.
    name : str, optional
        Task name (default ``"detect"``).
    parent : Task, optional
        Parent task.

    Raises
    ------
    ConfigError
        If a selected plugin is not registered, the config is invalid, or ``centroid_slot``
        names no registered measurement plugin.

    Notes
    -----
    See ``skydiff.detect`` for the steps. The subtasks are ``self.detection`` (the
    detector) and the dicts ``self.measurement`` and ``self.dipole_classifier`` (``{name:
    plugin}`` in execution order).

    Examples
    --------
    >>> task = DetectAndMeasureTask()                                    # doctest: +SKIP
    >>> result = task.run(difference, science=science, template=matched)  # doctest: +SKIP
    """

    ConfigClass = DetectAndMeasureConfig
    default_name = "detect"

    config: DetectAndMeasureConfig
    detection: Any
    measurement: dict[str, Any]
    dipole_classifier: dict[str, Any]

    def __init__(self, config: DetectAndMeasureConfig | None = None, *, name: str | None = None,
                 parent: Task | None = None) -> None:
        super().__init__(config, name=name, parent=parent)
        slot = self.config.centroid_slot
        if slot:
            registry = self.config.measurement._registry()
            registry.lookup(slot, path=f"{self.full_name}.centroid_slot")
        self.make_subtask("detection")
        self.make_subtask("measurement")
        self.make_subtask("dipole_classifier")

    # -- run ------------------------------------------------------------------------------

    def run(self, difference: Exposure, *, science: Exposure | None = None,
            template: Exposure | None = None, score: Exposure | None = None
            ) -> DetectAndMeasureResult:
        """Detect and measure the sources of ``difference``.

        Parameters
        ----------
        difference : Exposure
            The (decorrelated) difference image, with its variance and PSF.
        science : Exposure, optional
            The science exposure (forced photometry, dipole fits).
        template : Exposure, optional
            The matched template (forced photometry, dipole fits).
        score : Exposure, optional
            The score image of the subtraction; the detection runs on it when ``use_score``
            allows.

        Returns
        -------
        DetectAndMeasureResult
            ``catalog``, ``footprints``, the processed ``difference``, the number of
            ``sky_sources`` and ``metadata``.

        Raises
        ------
        InputError
            If an input is not an Exposure, has another shape than the difference, no score
            is given with ``use_score = "always"``, or a plugin raised InputError.
        AlgorithmError
            If the detector raised one (the detection is not optional).
        TypeError, ValueError
            If the detector's result breaks the detection contract (a plugin bug).
        """
        _check_exposure(difference, "difference", None)
        if difference is None:
            msg = "difference must be a skydiff.Exposure, got None"
            raise InputError(msg)
        for name, value in (("science", science), ("template", template), ("score", score)):
            _check_exposure(value, name, difference.shape)
        config = self.config
        use_score = score is not None and config.use_score != "never"
        if config.use_score == "always" and score is None:
            msg = ("detect.use_score is 'always' but no score image was given; pass score= or "
                   "set detect.use_score=auto")
            raise InputError(msg)
        for key in ("measurement_failed", "measurement_errors", "classifier_failed",
                    "classifier_errors"):
            self.metadata.pop(key, None)

        with self.timer("timing.detection"):
            detection = self.detection.run(score if use_score else difference,
                                           is_score=use_score)
        base, labels = self._detection_catalog(detection, difference.shape)
        processed = self._processed_difference(difference, detection, base, labels,
                                               subtract_background=not use_score)
        n_detected = len(base)
        with self.timer("timing.sky_sources"):
            catalog, labels = self._add_sky_sources(base, labels, processed)
        owners: dict[str, str] = {}
        catalog = self._measure(catalog, labels, processed, science, template, owners)
        catalog = self._classify(catalog)
        catalog, labels, removed = self._remove_flagged(catalog, labels)
        flux_unit = _flux_unit(difference)
        peak_unit = _flux_unit(score) if use_score and score is not None else flux_unit
        catalog = self._finish(catalog, processed, flux_unit, owners, peak_unit=peak_unit)

        sky = np.asarray(catalog["sky_source"], dtype=bool)
        real = catalog[~sky]
        negative = np.asarray(real["is_negative"], dtype=bool)
        dipole = np.asarray(real["is_dipole"], dtype=bool)
        meta = self.metadata
        meta["detected_on"] = "score" if use_score else "difference"
        meta["n_detected"] = n_detected
        meta["n_sky_sources"] = int(np.count_nonzero(sky))
        meta["n_sky_sources_requested"] = config.n_sky_sources
        meta["n_removed"] = sum(removed.values())
        meta["removed_by"] = removed
        meta["n_sources"] = len(real)
        meta["n_positive"] = int(np.count_nonzero(~negative & ~dipole))
        meta["n_negative"] = int(np.count_nonzero(negative & ~dipole))
        meta["n_dipoles"] = int(np.count_nonzero(dipole))
        self._set_catalog_meta(catalog, detection, flux_unit, use_score, difference)
        labels.flags.writeable = False
        return DetectAndMeasureResult(catalog=catalog, footprints=labels, difference=processed,
                                      sky_sources=int(np.count_nonzero(sky)),
                                      metadata=self.metadata.to_dict())

    # -- steps ----------------------------------------------------------------------------

    def _detection_catalog(self, detection: DetectionResult, shape: tuple[int, int]
                           ) -> tuple[Table, np.ndarray]:
        """The detector's catalog with the core columns, and a writable label image."""
        # A detector that breaks its contract is a bug of that plugin, not bad input.
        plugin = type(self.detection).name
        if not isinstance(detection, DetectionResult):
            msg = (f"the detection plugin {plugin!r} returned {type(detection).__name__}, not "
                   "a skydiff.DetectionResult")
            raise TypeError(msg)
        labels = np.asarray(detection.footprints)
        if labels.shape != shape:
            msg = (f"the detection plugin {plugin!r} returned footprints of shape "
                   f"{labels.shape} for an image of shape {shape}")
            raise ValueError(msg)
        catalog = Table(detection.catalog, copy=True)
        missing = [name for name in ("id", "x", "y") if name not in catalog.colnames]
        if missing:
            msg = (f"the detection plugin {plugin!r} returned a catalog without the "
                   f"column(s) {', '.join(missing)}")
            raise ValueError(msg)
        catalog["id"] = np.asarray(catalog["id"], dtype=np.int64)
        for name in ("x", "y"):
            catalog[name] = np.asarray(catalog[name], dtype=np.float64)
        for name, fill in _DETECTION_FILL.items():
            if name not in catalog.colnames:
                catalog[name] = np.full(len(catalog), fill)
        catalog["peak_x"] = np.array(catalog["x"], dtype=np.float64)
        catalog["peak_y"] = np.array(catalog["y"], dtype=np.float64)
        catalog["sky_source"] = np.zeros(len(catalog), dtype=bool)
        self.metadata["detection.result"] = _scalars(detection.metadata)
        return catalog, np.array(labels, dtype=np.int32)

    def _processed_difference(self, difference: Exposure, detection: DetectionResult,
                              catalog: Table, labels: np.ndarray, *,
                              subtract_background: bool) -> Exposure:
        """The difference minus the background, with detection and cosmic-ray planes set."""
        image = difference.image
        background = detection.background
        subtracted = subtract_background and background is not None
        if subtracted:
            image = np.subtract(image, np.asarray(background, dtype=np.float32),
                                dtype=np.float32)
        planes = difference.mask_planes
        for plane in ("DETECTED", "DETECTED_NEGATIVE"):
            planes = planes.with_plane(plane)
        positive_bit = np.uint32(1 << planes.bit("DETECTED"))
        negative_bit = np.uint32(1 << planes.bit("DETECTED_NEGATIVE"))
        mask = difference.mask & ~(positive_bit | negative_bit)
        n = int(labels.max(initial=0))
        # Per-label polarity: 0 positive, 1 negative, 2 both (split by the pixel sign).
        polarity = np.zeros(n + 1, dtype=np.int8)
        if len(catalog):
            ids = np.asarray(catalog["id"], dtype=np.int64)
            negative = np.asarray(catalog["is_negative"], dtype=bool)
            both = (np.isfinite(np.asarray(catalog["pos_peak_x"], dtype=float))
                    & np.isfinite(np.asarray(catalog["neg_peak_x"], dtype=float)))
            valid = (ids >= 1) & (ids <= n)
            polarity[ids[valid]] = np.where(both, 2, np.where(negative, 1, 0))[valid]
        kind = polarity[labels]
        inside = labels > 0
        is_negative = inside & ((kind == 1) | ((kind == 2) & (image < 0)))
        mask = (mask | np.where(inside & ~is_negative, positive_bit, np.uint32(0))
                | np.where(is_negative, negative_bit, np.uint32(0)))
        n_cr = 0
        if detection.cosmic_rays is not None:
            cosmic = np.asarray(detection.cosmic_rays, dtype=bool)
            if cosmic.shape == labels.shape:
                planes = planes.with_plane("CR")
                mask = mask | (cosmic.astype(np.uint32) << np.uint32(planes.bit("CR")))
                n_cr = int(np.count_nonzero(cosmic))
        self.metadata["background_subtracted"] = bool(subtracted)
        self.metadata["n_cosmic_ray_pixels"] = n_cr
        return difference.evolve(image=image, mask=mask.astype(np.uint32), mask_planes=planes)

    def _add_sky_sources(self, catalog: Table, labels: np.ndarray, difference: Exposure
                         ) -> tuple[Table, np.ndarray]:
        """Append the sky-source rows and paint their disks into ``labels``."""
        config = self.config
        forbidden = labels > 0
        bits = _plane_bits(difference, config.sky_source_avoid_planes)
        if bits:
            forbidden |= (difference.mask & np.uint32(bits)) != 0
        xs, ys = place_sky_sources(forbidden, n=config.n_sky_sources,
                                   radius=config.sky_source_radius,
                                   seed=config.sky_source_seed)
        n_sky = len(xs)
        if n_sky < config.n_sky_sources:
            log.info("placed %d of %d sky sources (not enough empty sky)", n_sky,
                     config.n_sky_sources)
        if n_sky == 0:
            return catalog, labels
        first = int(max(labels.max(initial=0),
                        np.max(catalog["id"], initial=0) if len(catalog) else 0)) + 1
        ids = np.arange(first, first + n_sky, dtype=np.int64)
        dy, dx = _disk_offsets(config.sky_source_radius)
        labels[ys[:, None] + dy[None, :], xs[:, None] + dx[None, :]] = ids[:, None].astype(
            np.int32)
        values = np.asarray(difference.image, dtype=np.float64)[ys, xs]
        variance = np.asarray(difference.variance, dtype=np.float64)[ys, xs]
        with np.errstate(divide="ignore", invalid="ignore"):
            significance = np.where(variance > 0, values / np.sqrt(variance), np.nan)
        sky = Table()
        for name in catalog.colnames:
            sky[name] = _filled_like(catalog[name], n_sky)
        sky["id"] = ids
        sky["x"] = sky["peak_x"] = xs.astype(np.float64)
        sky["y"] = sky["peak_y"] = ys.astype(np.float64)
        sky["peak_value"] = values
        sky["significance"] = significance
        sky["is_negative"] = False
        sky["footprint_area"] = len(dy)
        sky["sky_source"] = True
        from astropy.table import vstack

        merged = vstack([catalog, sky], join_type="exact", metadata_conflicts="silent")
        return merged, labels

    def _measure(self, catalog: Table, labels: np.ndarray, difference: Exposure,
                 science: Exposure | None, template: Exposure | None,
                 owners: dict[str, str]) -> Table:
        """Run the measurement plugins in order and merge their columns.

        ``owners`` receives ``{column: plugin name}`` for every column added.
        """
        failed: list[str] = []
        errors: dict[str, str] = {}
        footprints = labels.view()
        footprints.flags.writeable = False
        slot = self.config.centroid_slot
        plugins: dict[str, Any] = self.measurement
        for name, plugin in plugins.items():
            inputs = MeasurementInputs(catalog=catalog.copy(), difference=difference,
                                       footprints=footprints, science=science,
                                       template=template)
            try:
                with self.timer(f"timing.measurement.{name}"):
                    result = plugin.run(inputs)
                columns = self._checked_columns(name, result, catalog)
            except _FATAL:
                raise
            except Exception as exc:
                message = _describe(exc)
                log.warning("measurement plugin %r failed for all %d sources (flagged): %s",
                            name, len(catalog), message)
                failed.append(name)
                errors[name] = message
                columns = self._failed_columns(name, plugin, inputs, catalog)
            else:
                self.metadata[f"measurement_result.{name}"] = _scalars(result.metadata)
            for column_name in columns.colnames:
                catalog[column_name] = columns[column_name]
                owners[column_name] = name
            if name == slot and name not in failed:
                self._apply_slot(catalog, name)
        self.metadata["measurement_failed"] = failed
        self.metadata["measurement_errors"] = errors
        self.metadata["centroid_slot_applied"] = bool(slot) and slot in plugins \
            and slot not in failed
        return catalog

    def _checked_columns(self, name: str, result: Any, catalog: Table) -> Table:
        """The plugin's new columns, after checking the measurement contract."""
        if not isinstance(result, MeasurementResult):
            msg = f"returned {type(result).__name__}, not a skydiff.MeasurementResult"
            raise TypeError(msg)
        columns = result.columns
        if not isinstance(columns, Table):
            msg = f"returned columns of type {type(columns).__name__}, not an astropy Table"
            raise TypeError(msg)
        if len(columns) != len(catalog):
            msg = f"returned {len(columns)} rows for {len(catalog)} sources"
            raise ValueError(msg)
        clash = sorted(set(columns.colnames) & set(catalog.colnames))
        if clash:
            msg = f"returned columns already in the catalog: {', '.join(clash)}"
            raise ValueError(msg)
        flag = f"{name}_flag"
        if flag not in columns.colnames:
            msg = f"returned no {flag!r} column"
            raise ValueError(msg)
        return Table(columns, copy=True)

    def _failed_columns(self, name: str, plugin: Any, inputs: MeasurementInputs,
                        catalog: Table) -> Table:
        """NaN/False/0 columns of a failed plugin (its schema from a zero-row call, if any)."""
        n = len(catalog)
        out = Table()
        try:
            empty = plugin.run(attrs.evolve(inputs, catalog=catalog[:0].copy()))
            schema = self._checked_columns(name, empty, catalog[:0])
        except Exception:  # the schema is a nicety: without it only the flag is added
            schema = Table()
        for column_name in schema.colnames:
            out[column_name] = _filled_like(schema[column_name], n)
            out[column_name].unit = getattr(schema[column_name], "unit", None)
            out[column_name].description = schema[column_name].description
        out[f"{name}_flag"] = np.ones(n, dtype=bool)
        return out

    def _apply_slot(self, catalog: Table, name: str) -> None:
        """Replace x, y by the slot plugin's centroid where it is good."""
        names = (f"{name}_x", f"{name}_y", f"{name}_flag")
        if not all(column in catalog.colnames for column in names):
            log.warning("centroid slot %r: the plugin produced no %s columns; positions stay "
                        "at the detection peaks", name, "/".join(names))
            return
        cx = np.asarray(catalog[names[0]], dtype=np.float64)
        cy = np.asarray(catalog[names[1]], dtype=np.float64)
        good = (np.isfinite(cx) & np.isfinite(cy) & ~np.asarray(catalog[names[2]], dtype=bool)
                & ~np.asarray(catalog["sky_source"], dtype=bool))
        catalog["x"] = np.where(good, cx, np.asarray(catalog["x"], dtype=np.float64))
        catalog["y"] = np.where(good, cy, np.asarray(catalog["y"], dtype=np.float64))

    def _classify(self, catalog: Table) -> Table:
        """Add the classifiers' columns and their AND, ``is_dipole``."""
        n = len(catalog)
        combined = np.ones(n, dtype=bool)
        failed: list[str] = []
        errors: dict[str, str] = {}
        classifiers: dict[str, Any] = self.dipole_classifier
        for name, classifier in classifiers.items():
            try:
                with self.timer(f"timing.dipole_classifier.{name}"):
                    result = classifier.run(catalog.copy())
                flag = np.asarray(result.flag)
                score = np.asarray(result.score, dtype=np.float64)
                if flag.shape != (n,) or score.shape != (n,):
                    msg = (f"returned flag/score of shapes {flag.shape}/{score.shape} for "
                           f"{n} sources")
                    raise ValueError(msg)
                flag = flag.astype(bool)
            except _FATAL:
                raise
            except Exception as exc:
                message = _describe(exc)
                log.warning("dipole classifier %r failed (no source classified as a dipole by "
                            "it): %s", name, message)
                failed.append(name)
                errors[name] = message
                flag = np.zeros(n, dtype=bool)
                score = np.full(n, np.nan)
            catalog[f"is_dipole_{name}"] = flag
            catalog[f"dipole_score_{name}"] = score
            combined &= flag
        if not classifiers:
            combined[:] = False
        catalog["is_dipole"] = combined & ~np.asarray(catalog["sky_source"], dtype=bool)
        self._dipole_positions(catalog)
        self.metadata["classifier_failed"] = failed
        self.metadata["classifier_errors"] = errors
        return catalog

    def _dipole_positions(self, catalog: Table) -> None:
        """Move the position of each classified dipole to its fitted mean centroid.

        A dipole's peak (and hence its centroid) lies on one lobe; the dipole fit's
        flux-weighted mean of the two lobes (``dipole_x``, ``dipole_y``) is the position of
        the source, as upstream's slot centroid switches to the dipole fit.
        """
        if not {"dipole_x", "dipole_y"} <= set(catalog.colnames):
            self.metadata["n_dipole_positions"] = 0
            return
        dx = np.asarray(catalog["dipole_x"], dtype=np.float64)
        dy = np.asarray(catalog["dipole_y"], dtype=np.float64)
        use = np.asarray(catalog["is_dipole"], dtype=bool) & np.isfinite(dx) & np.isfinite(dy)
        catalog["x"] = np.where(use, dx, np.asarray(catalog["x"], dtype=np.float64))
        catalog["y"] = np.where(use, dy, np.asarray(catalog["y"], dtype=np.float64))
        self.metadata["n_dipole_positions"] = int(np.count_nonzero(use))

    def _remove_flagged(self, catalog: Table, labels: np.ndarray
                        ) -> tuple[Table, np.ndarray, dict[str, int]]:
        """Drop flagged rows, renumber the ids 1..n and relabel the footprints."""
        n = len(catalog)
        drop = np.zeros(n, dtype=bool)
        removed: dict[str, int] = {}
        for name in self.config.remove_flagged:
            if name not in catalog.colnames:
                continue
            column = catalog[name]
            values = np.asarray(column.filled(False) if hasattr(column, "filled") else column)
            if values.dtype.kind != "b":
                continue
            new = values & ~drop
            removed[name] = int(np.count_nonzero(new))
            drop |= values
        kept = catalog[~drop]
        old_ids = np.asarray(kept["id"], dtype=np.int64)
        size = int(max(labels.max(initial=0), np.max(catalog["id"], initial=0) if n else 0)) + 1
        lookup = np.zeros(size, dtype=np.int32)
        new_ids = np.arange(1, len(kept) + 1, dtype=np.int64)
        valid = (old_ids >= 0) & (old_ids < size)
        lookup[old_ids[valid]] = new_ids[valid].astype(np.int32)
        lookup[0] = 0
        relabelled = lookup[np.clip(labels, 0, size - 1)]
        kept["id"] = new_ids
        return kept, relabelled, removed

    def _finish(self, catalog: Table, difference: Exposure, flux_unit: u.UnitBase,
                owners: Mapping[str, str], *, peak_unit: u.UnitBase) -> Table:
        """Add snr, ra, dec; order the columns; set units and descriptions."""
        n = len(catalog)
        if "psf_flux" in catalog.colnames and "psf_flux_err" in catalog.colnames:
            flux = np.asarray(catalog["psf_flux"], dtype=np.float64)
            err = np.asarray(catalog["psf_flux_err"], dtype=np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                snr = np.where(err > 0, flux / err, np.nan)
        else:
            snr = np.full(n, np.nan)
        catalog["snr"] = snr
        ra = np.full(n, np.nan)
        dec = np.full(n, np.nan)
        wcs = difference.wcs
        if wcs is not None and wcs.has_celestial and n:
            # The WCS belongs to this array (Exposure.cutout slices it), so pixel (x, y) of
            # the exposure is pixel (x, y) of its WCS: no origin offset.
            try:
                coords = wcs.celestial.pixel_to_world(
                    np.asarray(catalog["x"], dtype=np.float64),
                    np.asarray(catalog["y"], dtype=np.float64))
                icrs = coords.icrs
                ra = np.asarray(icrs.ra.deg, dtype=np.float64)
                dec = np.asarray(icrs.dec.deg, dtype=np.float64)
            except (ValueError, TypeError, AttributeError) as exc:
                log.warning("ra/dec left NaN: the difference's WCS cannot convert pixel "
                            "positions (%s)", _describe(exc))
        catalog["ra"] = ra
        catalog["dec"] = dec
        first = ["id", "x", "y", "ra", "dec", "snr", "is_dipole", "sky_source"]
        order = first + [name for name in catalog.colnames if name not in first]
        catalog = catalog[order]
        plugin_of = {column.name: f"the {column.source} step"
                     for column in CATALOG_COLUMNS if "<" not in column.name}
        plugin_of.update({name: f"the measurement plugin {owner!r}"
                          for name, owner in owners.items()})
        for name in catalog.colnames:
            column = catalog[name]
            unit_key, description = _column_info(name, plugin_of)
            if column.unit is None and unit_key is not None \
                    and np.asarray(column).dtype.kind in "fiu" and name not in ("id",):
                column.unit = (peak_unit if name == "peak_value"
                               else _UNITS.get(unit_key, flux_unit))
            if not column.description:
                column.description = description
        return catalog

    def _set_catalog_meta(self, catalog: Table, detection: DetectionResult,
                          flux_unit: u.UnitBase, use_score: bool, difference: Exposure) -> None:
        from skydiff import __version__

        meta = detection.metadata
        config = self.config
        catalog.meta.clear()
        catalog.meta.update({
            "skydiff_version": __version__,
            "detection": str(config.detection.name),
            "measurement": ",".join(config.measurement.names),
            "dipole_classifier": ",".join(config.dipole_classifier.names),
            "detected_on": "score" if use_score else "difference",
            "flux_unit": flux_unit.to_string() or "dimensionless",
            "image_width": int(difference.shape[1]),
            "image_height": int(difference.shape[0]),
            "image_x0": int(difference.origin[0]),
            "image_y0": int(difference.origin[1]),
            "n_sky_sources": int(np.count_nonzero(np.asarray(catalog["sky_source"]))),
            "remove_flagged": ",".join(config.remove_flagged),
            "n_removed": int(self.metadata["n_removed"]),
            "measurement_failed": ",".join(self.metadata["measurement_failed"]),
        })
        for key in ("threshold", "noise"):
            value = meta.get(key)
            if isinstance(value, int | float | np.integer | np.floating):
                catalog.meta[key] = float(value)


_UNITS: dict[str, u.UnitBase] = {"pix": u.pix, "pix2": u.pix ** 2, "deg": u.deg,
                                 "": u.dimensionless_unscaled}


def _column_info(name: str, plugin_of: Mapping[str, str]) -> tuple[str | None, str]:
    """The unit key and description of a catalog column, known or by name pattern."""
    known = _KNOWN.get(name)
    if known is not None:
        return known.unit, known.description
    for pattern, unit, text in _PATTERNS:
        match = pattern.match(name)
        if match:
            groups = [g.upper() if pattern.pattern.startswith("^flag_") else g
                      for g in match.groups()]
            return unit, text.format(*groups)
    if name.endswith("_flag"):
        plugin = name[:-5]
        return None, (f"True where the measurement plugin {plugin!r} could not measure the "
                      "source.")
    guess: str | None = None
    if "flux" in name:
        guess = "flux"
    elif _POSITION.search(name):
        guess = "pix"
    owner = plugin_of.get(name)
    return guess, f"Column added by {owner or 'a plugin'}."


# --------------------------------------------------------------------------------------------
# functional entry point


def detect_and_measure(difference: Exposure, *, science: Exposure | None = None,
                       template: Exposure | None = None, score: Exposure | None = None,
                       config: DetectAndMeasureConfig | None = None) -> DetectAndMeasureResult:
    """Detect, measure and classify the sources of a difference image.

    The Python twin of ``skydiff detect``: builds a :class:`DetectAndMeasureTask` with
    ``config`` and runs it.

    Parameters
    ----------
    difference : Exposure
        The difference image, with variance and PSF.
    science, template : Exposure, optional
        The science exposure and the matched template (forced photometry, dipole fits).
    score : Exposure, optional
        The subtraction's score image; detection runs on it when ``config.use_score``
        allows.
    config : DetectAndMeasureConfig, optional
        The settings; default ``DetectAndMeasureConfig()``.

    Returns
    -------
    DetectAndMeasureResult
        The ``catalog`` (see :data:`CATALOG_COLUMNS`), the ``footprints`` label image, the
        processed ``difference``, the number of ``sky_sources`` and ``metadata``.

    Raises
    ------
    InputError
        If an input is not an Exposure or its shape differs from the difference's.
    ConfigError
        If ``config`` is not a DetectAndMeasureConfig, or it selects unknown plugins.
    AlgorithmError
        If the detection fails on these data.

    Examples
    --------
    >>> import skydiff
    >>> from skydiff.detect import detect_and_measure
    >>> from skydiff.sim import simulate_pair
    >>> pair = simulate_pair(shape=(256, 256), n_stars=150, n_transients=3,
    ...                      transient_flux=(5000.0, 8000.0), seed=3)
    >>> sub = skydiff.subtract(pair.science, pair.template)
    >>> result = detect_and_measure(sub.difference, science=pair.science,
    ...                             template=sub.matched_image)
    >>> result.sky_sources, result.metadata["n_positive"] >= 3
    (100, True)
    >>> result.catalog["x"].unit
    Unit("pix")
    """
    if config is not None and not isinstance(config, DetectAndMeasureConfig):
        msg = (f"config must be a DetectAndMeasureConfig, got {type(config).__name__}; for a "
               "PipelineConfig pass its .detect")
        raise ConfigError(msg)
    task = DetectAndMeasureTask(config)
    return task.run(difference, science=science, template=template, score=score)
