r"""The ``dipole_fit`` measurement: a joint PSF-dipole fit of difference, science and template.

For every eligible source (a footprint with both a positive and a negative peak, area at most
``max_footprint_area``, not a sky source; every source with ``fit_all``), the pixels of the
footprint's bounding box grown by ``margin`` are fitted with (details in ``_model``)

.. math::

    d &\approx F_+ P_d(\mathbf x - \mathbf x_+) - F_- P_d(\mathbf x - \mathbf x_-), \\
    s &\approx F_+ P_s(\mathbf x - \mathbf x_+) + B(\mathbf x), \\
    t &\approx F_- P_t(\mathbf x - \mathbf x_-) + B(\mathbf x),

where :math:`d` is the difference, :math:`s` the science image, :math:`t` the matched
template, each modelled with its own PSF (unit sum, evaluated at the source, shifted by the
Fourier shift theorem): :math:`P_d` the difference's, :math:`P_s` = ``science.psf``,
:math:`P_t` = ``template.psf`` (for a template convolved with the matching kernel :math:`K`,
``al`` and ``model_psf`` set it to :math:`P_T \otimes K`, close to the science PSF); the
difference's PSF models a plane whose exposure has none and a reconstructed plane.
:math:`B` is a local polynomial background of order 0 or 1. A missing science image is
reconstructed as :math:`d + t` (variance :math:`\max(V_d - V_t, V_d/10)`), a missing
template as :math:`s - d`; with neither (or ``rel_weight`` 0) only the difference is
fitted. Pixel weights are the inverse variances of each plane, divided by the plane's noise
factor :math:`\eta_a` (with ``correlated_noise``) and times ``rel_weight`` for the science
and template planes (DMTN-007's relative weight; lsst.ip.diffim ignores the variance
planes). The noise correlations of the planes (``_noise``) are estimated once per call on
the image's blank sky.

The same pixels of the difference are also fitted with a single PSF of either sign,
:math:`d \approx F P_d(\mathbf x - \mathbf x_0)`, for ``dipole_single_chi2dof`` (the ``chi2``
dipole classifier compares the two).

Initial lobe positions are the detection's strongest positive and negative peaks
(``pos_peak_x/y``, ``neg_peak_x/y``; for ``fit_all`` sources without one of them, the
extreme pixel of the difference inside the footprint); initial fluxes and background come
from a weighted linear fit at those positions.

References
----------
.. [1] Reiss, D. J. 2016, DMTN-007, "Dipole characterization for image differencing",
   https://dmtn-007.lsst.io.
.. [2] lsst.ip.diffim ``dipoleFitTask.py`` (``DipoleFitPlugin``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from astropy.table import Table

import skydiff
from skydiff.photometry import cutouts, psf_stamps

from ._lobes import ShiftedPsf
from ._model import Stamp, background_basis, fit_dipole, fit_single
from ._noise import NoiseCorrelation, correlation_radius, estimate_correlation, region_slices
from ._regions import Boxes, catalog_column, fit_boxes, footprint_boxes

__all__ = ["DIPOLE_COLUMNS", "DipoleFitConfig", "DipoleFitMeasurement"]

#: The float64 output columns, in order.
_FLOAT_COLUMNS: tuple[str, ...] = (
    "dipole_pos_flux", "dipole_pos_flux_err", "dipole_neg_flux", "dipole_neg_flux_err",
    "dipole_pos_x", "dipole_pos_x_err", "dipole_pos_y", "dipole_pos_y_err",
    "dipole_neg_x", "dipole_neg_x_err", "dipole_neg_y", "dipole_neg_y_err",
    "dipole_x", "dipole_y", "dipole_separation", "dipole_orientation",
    "dipole_chi2dof", "dipole_single_chi2dof", "dipole_sn",
)
#: The int64 output columns.
_INT_COLUMNS: tuple[str, ...] = ("dipole_n_data", "dipole_dof")
#: Every output column of ``dipole_fit``, in order.
DIPOLE_COLUMNS: tuple[str, ...] = (*_FLOAT_COLUMNS, *_INT_COLUMNS, "dipole_fit_flag")

#: Parameters of the single-PSF model of the difference (x0, y0, F).
_SINGLE_PARAMS = 3
#: Sigma per FWHM of a Gaussian.
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: Floor of a reconstructed plane's variance, as a fraction of the difference variance.
_RECONSTRUCTED_VARIANCE_FLOOR = 0.1
#: Largest fit box, in units of max_footprint_area (guards against long thin footprints).
_MAX_BOX_AREA_FACTOR = 4


@skydiff.configclass
class DipoleFitConfig(skydiff.Config):
    """Options of the ``dipole_fit`` measurement."""

    fit_all: bool = skydiff.Field(
        False, doc="Fit every source (including sky sources and sources without both a "
                   "positive and a negative peak), not only dipole candidates.")
    max_footprint_area: int = skydiff.RangeField(
        1200, min=1, doc="Footprints larger than this many pixels are not fitted (flagged); "
                         "the fit box (footprint bbox + margin) is also limited to 4x this "
                         "area.")
    margin: int = skydiff.RangeField(
        3, min=0, doc="Pixels added on every side of the footprint's bounding box.")
    max_separation: float = skydiff.RangeField(
        5.0, min=0.0, inclusive_min=False,
        doc="Each lobe centroid stays within this many PSF sigmas of its initial guess "
            "(per axis).")
    rel_weight: float = skydiff.RangeField(
        0.5, min=0.0, doc="Weight of the science and template planes relative to the "
                          "difference (on top of the inverse variances); 0 fits the "
                          "difference only.")
    tie_fluxes: bool = skydiff.Field(
        True, doc="Fit one flux for both lobes (F+ = F-, a moving or misaligned source); "
                  "False fits them separately.")
    background_order: int = skydiff.ChoiceField(
        1, allowed={0: "a constant", 1: "a constant and a linear gradient"},
        doc="Order of the local background B shared by the science and template planes.")
    loss: str = skydiff.ChoiceField(
        "soft_l1", allowed={"linear": "plain least squares",
                            "soft_l1": "smooth l1: 2 (sqrt(1 + z) - 1)",
                            "huber": "Huber: quadratic within f_scale, linear beyond"},
        doc="Robust loss of scipy.optimize.least_squares (convex losses only).")
    f_scale: float = skydiff.RangeField(
        3.0, min=0.0, inclusive_min=False,
        doc="Residual (in noise sigmas) where the robust loss departs from least squares.")
    max_nfev: int = skydiff.RangeField(
        200, min=10, doc="Largest number of model evaluations per fit; a fit that does not "
                         "converge is flagged.")
    correlated_noise: bool = skydiff.Field(
        True, doc="Estimate the pixel-to-pixel noise correlations of each plane from its "
                  "blank sky (once per image) and use them: each plane's weights are divided "
                  "by its PSF-flux noise factor and the errors come from the correlated "
                  "covariance. False takes the pixels as independent.")
    bad_planes: tuple[str, ...] = skydiff.ListField(
        ["BAD", "SAT", "NO_DATA", "CR", "EDGE"], dtype=str,
        doc="Mask planes whose pixels are left out of the fit (planes an exposure does not "
            "define are ignored).")


def _empty_columns(n: int) -> dict[str, np.ndarray]:
    columns: dict[str, np.ndarray] = {name: np.full(n, np.nan) for name in _FLOAT_COLUMNS}
    columns.update({name: np.zeros(n, dtype=np.int64) for name in _INT_COLUMNS})
    columns["dipole_fit_flag"] = np.ones(n, dtype=bool)
    return columns


def _check_inputs(inputs: Any) -> None:
    if not isinstance(inputs, skydiff.MeasurementInputs):
        msg = f"dipole_fit needs a skydiff.MeasurementInputs, got {type(inputs).__name__}"
        raise skydiff.InputError(msg)
    if not isinstance(inputs.catalog, Table):
        msg = (f"inputs.catalog must be an astropy Table, got "
               f"{type(inputs.catalog).__name__}")
        raise skydiff.InputError(msg)
    difference = inputs.difference
    if not isinstance(difference, skydiff.Exposure):
        msg = (f"inputs.difference must be a skydiff.Exposure, got "
               f"{type(difference).__name__}")
        raise skydiff.InputError(msg)
    for label in ("science", "template"):
        value = getattr(inputs, label)
        if value is None:
            continue
        if not isinstance(value, skydiff.Exposure):
            msg = f"inputs.{label} must be a skydiff.Exposure or None, got {type(value).__name__}"
            raise skydiff.InputError(msg)
        if value.shape != difference.shape:
            msg = (f"inputs.{label} has shape {value.shape} but the difference has "
                   f"{difference.shape}; pass images on the same pixel grid")
            raise skydiff.InputError(msg)
    footprints = inputs.footprints
    if footprints is not None and (not isinstance(footprints, np.ndarray)
                                   or footprints.shape != difference.shape
                                   or not np.issubdtype(footprints.dtype, np.integer)):
        msg = (f"inputs.footprints must be an integer label image of shape "
               f"{difference.shape} or None")
        raise skydiff.InputError(msg)
    missing = [name for name in ("x", "y") if name not in inputs.catalog.colnames]
    if missing:
        msg = f"the catalog lacks the columns {missing}; dipole_fit needs x and y"
        raise skydiff.InputError(msg)
    clash = [name for name in DIPOLE_COLUMNS if name in inputs.catalog.colnames]
    if clash:
        msg = (f"the catalog already has the dipole_fit columns {clash}; remove them before "
               "measuring again")
        raise skydiff.InputError(msg)


def _bad_pixels(exposure: skydiff.Exposure, planes: tuple[str, ...]) -> np.ndarray:
    known = [name for name in planes if name in exposure.mask_planes.names]
    if not known:
        return np.zeros(exposure.shape, dtype=bool)
    return exposure.masked(*known)


def _odd(value: np.ndarray) -> np.ndarray:
    return value + 1 - value % 2


class _Planes:
    """The planes of the fit as full-image arrays (no copies of the inputs' pixels).

    ``psfs`` holds each plane's PSF: the difference's, the science image's and the matched
    template's own, the difference's for a plane without one or a reconstructed plane;
    ``psf_sources`` says which (``"own"`` or ``"difference"``).
    """

    def __init__(self, inputs: skydiff.MeasurementInputs, config: DipoleFitConfig) -> None:
        bad_planes = tuple(config.bad_planes)
        difference = inputs.difference
        science, template = inputs.science, inputs.template
        self.joint = config.rel_weight > 0 and (science is not None or template is not None)
        self.reconstructed = "none"
        self.images: list[np.ndarray] = [difference.image]
        self.variances: list[np.ndarray] = [difference.variance]
        self.bad: list[np.ndarray] = [_bad_pixels(difference, bad_planes)]
        self.psfs: list[skydiff.Psf | None] = [difference.psf]
        self.psf_sources: dict[str, str] = {}
        if not self.joint:
            return
        for label, exposure in (("science", science), ("template", template)):
            if exposure is None:
                self.images.append(difference.image)  # placeholder, rebuilt on the stamps
                self.variances.append(difference.variance)
                self.bad.append(self.bad[0])
            else:
                self.images.append(exposure.image)
                self.variances.append(exposure.variance)
                self.bad.append(_bad_pixels(exposure, bad_planes))
            own = exposure is not None and exposure.psf is not None
            self.psfs.append(exposure.psf if own and exposure is not None else difference.psf)
            self.psf_sources[label] = "own" if own else "difference"
        if science is None:
            self.reconstructed = "science"
        elif template is None:
            self.reconstructed = "template"

    def _reconstruct(self, data: np.ndarray, variance: np.ndarray, bad: np.ndarray) -> None:
        """Rebuild the missing plane of stacked (n, p, ...) arrays in place."""
        if self.reconstructed == "none":
            return
        other = 2 if self.reconstructed == "science" else 1
        missing = 3 - other
        sign = 1.0 if self.reconstructed == "science" else -1.0
        # science = difference + template; template = science - difference
        data[:, missing] = data[:, other] + sign * data[:, 0]
        variance[:, missing] = np.maximum(variance[:, 0] - variance[:, other],
                                          _RECONSTRUCTED_VARIANCE_FLOOR * variance[:, 0])
        bad[:, missing] = bad[:, 0] | bad[:, other]

    def stamps(self, cols: np.ndarray, rows: np.ndarray, side: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stacked (n, p, L, L) data, variance and validity stamps centred on (rows, cols)."""
        data = np.stack([cutouts(image, cols, rows, size=side).astype(np.float64)
                         for image in self.images], axis=1)
        variance = np.stack([cutouts(var, cols, rows, size=side).astype(np.float64)
                             for var in self.variances], axis=1)
        bad = np.stack([cutouts(mask, cols, rows, size=side, fill=True)
                        for mask in self.bad], axis=1)
        self._reconstruct(data, variance, bad)
        with np.errstate(invalid="ignore"):
            valid = ~bad & np.isfinite(data) & np.isfinite(variance) & (variance > 0)
        return data, variance, valid

    def region(self, rows: slice, cols: slice
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(p, H, W) data, variance and validity of a region, as :meth:`stamps`."""
        data = np.stack([image[rows, cols] for image in self.images]
                        )[None].astype(np.float64)
        variance = np.stack([var[rows, cols] for var in self.variances]
                            )[None].astype(np.float64)
        bad = np.stack([mask[rows, cols] for mask in self.bad])[None]
        self._reconstruct(data, variance, bad)
        with np.errstate(invalid="ignore"):
            valid = ~bad & np.isfinite(data) & np.isfinite(variance) & (variance > 0)
        return data[0], variance[0], valid[0]

    def noise(self, origin: tuple[float, float]) -> NoiseCorrelation | None:
        """The noise correlations of the planes (:func:`._noise.estimate_correlation`)."""
        if any(psf is None for psf in self.psfs):
            return None
        rows, cols = region_slices(self.images[0].shape)
        x = (cols.start + cols.stop - 1) / 2.0 + origin[0]
        y = (rows.start + rows.stop - 1) / 2.0 + origin[1]
        psfs = [psf for psf in self.psfs if psf is not None]
        kernels = [np.asarray(psf.kernel_image(x, y), dtype=np.float64) for psf in psfs]
        fwhm = max(float(psf.fwhm(x, y)) for psf in psfs)
        data, variance, valid = self.region(rows, cols)
        return estimate_correlation(data, variance, valid, kernels,
                                    radius=correlation_radius(fwhm),
                                    grow=max(math.ceil(fwhm), 1))


class DipoleFitMeasurement(skydiff.Measurement):
    r"""Fit a PSF dipole jointly to the difference, science and template of each candidate.

    The model (fitted to the footprint's bounding box grown by ``margin``) is
    :math:`d = F_+ P^d_+ - F_- P^d_-`, :math:`s = F_+ P^s_+ + B`, :math:`t = F_- P^t_- + B`
    with :math:`P^a_\pm` plane :math:`a`'s own PSF at the lobe centroids (the difference's
    for a plane without one) and :math:`B` a local background; pixels are weighted by their
    inverse variances over the plane's noise factor (the correlation of its noise, estimated
    on its sky) and times ``rel_weight`` for :math:`s` and :math:`t`; bounded robust least
    squares (:func:`scipy.optimize.least_squares`); errors from a sandwich covariance with the
    estimated noise correlations within and between the planes, not rescaled by the reduced
    :math:`\chi^2`. The same difference pixels are also fitted with one PSF of either sign.
    The package documentation gives the details.

    Output columns (one row per input source, NaN and ``dipole_fit_flag`` True where not
    fitted): ``dipole_pos_flux``, ``dipole_neg_flux`` (both positive numbers; the model is
    :math:`F_+ P_+ - F_- P_-`) with ``_err``; ``dipole_pos_x/y``, ``dipole_neg_x/y`` with
    ``_err``; ``dipole_x/y`` (flux-weighted mean of the lobe centroids);
    ``dipole_separation`` (pixels); ``dipole_orientation`` (degrees,
    :math:`\operatorname{atan2}(y_+ - y_-, x_+ - x_-)`, counter-clockwise from +x);
    ``dipole_chi2dof`` (plain :math:`\chi^2` of the dipole model over the ``dipole_n_data``
    valid difference pixels, divided by ``dipole_dof`` = ``dipole_n_data`` - 5 tied or 6 free
    parameters); ``dipole_single_chi2dof`` (the best single PSF of either sign over the same
    pixels, divided by ``dipole_n_data`` - 3); ``dipole_sn`` =
    :math:`\sqrt{(F_+/\sigma_{F_+})^2 + (F_-/\sigma_{F_-})^2}` (so :math:`\sqrt2\,F/\sigma_F`
    for tied fluxes, as in lsst.ip.diffim); ``dipole_fit_flag``.

    Errors of a lobe position are NaN when its flux is at the bound 0 (the position is then
    undetermined); the fit is not flagged for that.

    Examples
    --------
    >>> from skydiff.testing._inputs import sample_call
    >>> result = sample_call("measurement")(DipoleFitMeasurement())
    >>> bool(result.columns["dipole_fit_flag"].all())  # no pos/neg peak columns: no fits
    True
    """

    name = "dipole_fit"
    ConfigClass = DipoleFitConfig
    tags = frozenset({"needs_psf"})
    order = 3.0

    config: DipoleFitConfig

    def run(self, inputs: skydiff.MeasurementInputs) -> skydiff.MeasurementResult:
        """Fit every eligible source of ``inputs.catalog``.

        Parameters
        ----------
        inputs : skydiff.MeasurementInputs
            The catalog (``x``, ``y`` and, for eligibility, ``id``, ``pos_peak_x/y``,
            ``neg_peak_x/y``, ``footprint_area``, ``sky_source``), the difference with its
            PSF and variance, the footprint label image and optionally the science image and
            matched template.

        Returns
        -------
        skydiff.MeasurementResult
            The columns listed in the class documentation; metadata ``n_candidates``,
            ``n_fitted``, ``n_failed``, ``fit_mode`` (``"joint"`` or ``"difference"``),
            ``reconstructed`` (``"science"``, ``"template"`` or ``"none"``), ``has_psf``,
            ``plane_psfs`` (``{"science": "own" | "difference", "template": ...}``: whose PSF
            models each plane), ``noise_correlation`` (``"estimated"``, ``"unavailable"`` when
            too little sky was left to estimate it, ``"independent"`` when not asked for or
            nothing was fitted), ``noise_factors`` (``{plane: eta}``) and ``noise_pixels``
            (the sky pixels of the estimate).

        Raises
        ------
        skydiff.InputError
            If the inputs have the wrong types or shapes, the catalog lacks ``x``/``y`` or
            already holds dipole_fit columns.
        """
        _check_inputs(inputs)
        config = self.config
        catalog = inputs.catalog
        n = len(catalog)
        columns = _empty_columns(n)
        planes = _Planes(inputs, config)
        psf = inputs.difference.psf
        metadata: dict[str, Any] = {
            "n_candidates": 0, "n_fitted": 0, "n_failed": 0,
            "fit_mode": "joint" if planes.joint else "difference",
            "reconstructed": planes.reconstructed, "has_psf": psf is not None,
            "plane_psfs": dict(planes.psf_sources), "noise_correlation": "independent",
            "noise_factors": {}, "noise_pixels": 0}
        candidates, boxes, guesses = self._candidates(inputs, psf)
        metadata["n_candidates"] = int(candidates.size)
        if candidates.size and psf is not None:
            noise = None
            if config.correlated_noise:
                noise = planes.noise(inputs.difference.origin)
                metadata["noise_correlation"] = "estimated" if noise else "unavailable"
            if noise is not None:
                labels = ("difference", "science", "template")
                metadata["noise_factors"] = {label: float(value) for label, value
                                             in zip(labels, noise.factors, strict=False)}
                metadata["noise_pixels"] = noise.n_pixels
            fitted, failed = self._fit_all(inputs, planes, noise, candidates, boxes,
                                           guesses, columns)
            metadata["n_fitted"], metadata["n_failed"] = fitted, failed
        table = Table({name: columns[name] for name in DIPOLE_COLUMNS})
        return skydiff.MeasurementResult(columns=table, metadata=metadata)

    # -- selection ---------------------------------------------------------------------

    def _candidates(self, inputs: skydiff.MeasurementInputs, psf: skydiff.Psf | None
                    ) -> tuple[np.ndarray, Boxes, np.ndarray]:
        """Indices of the sources to fit, their fit boxes and initial guesses (m, 4)."""
        config = self.config
        catalog = inputs.catalog
        n = len(catalog)
        x = catalog_column(catalog, "x", np.nan)
        y = catalog_column(catalog, "y", np.nan)
        guesses = np.stack([catalog_column(catalog, name, np.nan)
                            for name in ("pos_peak_x", "pos_peak_y",
                                         "neg_peak_x", "neg_peak_y")], axis=1)
        has_peaks = np.all(np.isfinite(guesses), axis=1)
        sky = catalog_column(catalog, "sky_source", False)
        ids = (np.asarray(catalog["id"], dtype=np.int64) if "id" in catalog.colnames
               else None)
        footprint = footprint_boxes(inputs.footprints, ids, n)
        area = np.where(footprint.found, footprint.area, 0)
        if "footprint_area" in catalog.colnames:
            listed = catalog_column(catalog, "footprint_area", 0.0)
            area = np.where(np.isfinite(listed), listed, area)
        fwhm = float(psf.fwhm()) if psf is not None else 3.0
        points_x = np.column_stack([x, guesses[:, 0], guesses[:, 2]])
        points_y = np.column_stack([y, guesses[:, 1], guesses[:, 3]])
        boxes = fit_boxes(footprint, points_x, points_y, margin=config.margin,
                          fallback=config.margin + math.ceil(2.0 * fwhm))
        box_area = (boxes.row1 - boxes.row0) * (boxes.col1 - boxes.col0)
        shape = inputs.difference.shape
        overlaps = ((boxes.row1 > 0) & (boxes.row0 < shape[0])
                    & (boxes.col1 > 0) & (boxes.col0 < shape[1]))
        eligible = ((has_peaks | config.fit_all) & (~sky | config.fit_all)
                    & np.isfinite(x) & np.isfinite(y) & overlaps
                    & (area <= config.max_footprint_area)
                    & (box_area <= _MAX_BOX_AREA_FACTOR * config.max_footprint_area))
        chosen = np.flatnonzero(eligible)
        picked = Boxes(*(np.asarray(field)[chosen] for field in boxes))
        return chosen, picked, guesses[chosen]

    # -- fitting -----------------------------------------------------------------------

    def _fit_all(self, inputs: skydiff.MeasurementInputs, planes: _Planes,
                 noise: NoiseCorrelation | None, candidates: np.ndarray, boxes: Boxes,
                 guesses: np.ndarray, columns: dict[str, np.ndarray]) -> tuple[int, int]:
        config = self.config
        difference = inputs.difference
        psf = difference.psf
        assert psf is not None
        heights = boxes.row1 - boxes.row0
        widths = boxes.col1 - boxes.col0
        sides = _odd(np.maximum(heights, widths))
        centre_rows = (boxes.row0 + boxes.row1 - 1) // 2
        centre_cols = (boxes.col0 + boxes.col1 - 1) // 2
        mean_x = float(np.mean(centre_cols)) + difference.origin[0]
        mean_y = float(np.mean(centre_rows)) + difference.origin[1]
        sigma = float(psf.fwhm(mean_x, mean_y)) / _FWHM_PER_SIGMA
        reach = config.max_separation * sigma
        n_planes = 3 if planes.joint else 1
        kernels = self._plane_kernels(planes.psfs[:n_planes], centre_cols, centre_rows,
                                      (mean_x, mean_y), difference.origin)
        factors = np.ones(n_planes) if noise is None else noise.factors[:n_planes]
        correlation = None if noise is None else noise.correlation[:n_planes, :n_planes]
        labels = inputs.footprints
        ids = (np.asarray(inputs.catalog["id"], dtype=np.int64)
               if "id" in inputs.catalog.colnames else None)
        fitted = failed = 0
        for side in np.unique(sides):  # one batch of stacked stamps per stamp size
            members = np.flatnonzero(sides == side)
            cols, rows = centre_cols[members], centre_rows[members]
            data, variance, valid = planes.stamps(cols.astype(np.float64),
                                                  rows.astype(np.float64), int(side))
            half = int(side) // 2
            offsets = np.arange(-half, half + 1)
            grid_rows = rows[:, None] + offsets[None, :]
            grid_cols = cols[:, None] + offsets[None, :]
            inside = (((grid_rows >= boxes.row0[members, None])
                       & (grid_rows < boxes.row1[members, None]))[:, :, None]
                      & ((grid_cols >= boxes.col0[members, None])
                         & (grid_cols < boxes.col1[members, None]))[:, None, :])
            valid &= inside[:, None]
            own = None
            if labels is not None and ids is not None:
                own = cutouts(labels, cols.astype(np.float64), rows.astype(np.float64),
                              size=int(side), fill=0)
                own = own == ids[candidates[members]][:, None, None]
            basis = background_basis(int(side), config.background_order)
            for k, member in enumerate(members):  # loop over sources: one small fit each
                index = candidates[member]
                centre = (int(rows[k]), int(cols[k]))
                lobes = _plane_lobes([stack[member] if stack is not None else None
                                      for stack in kernels], int(side), centre, reach)
                stamp = self._stamp(data[k], variance[k], valid[k], basis, lobes, factors,
                                    correlation)
                footprint = own[k] if own is not None and own[k].any() else None
                guess = _initial_guesses(guesses[member], data[k, 0], valid[k, 0], footprint,
                                         centre)
                box = (float(boxes.col0[member]) - 0.5, float(boxes.col1[member]) - 0.5,
                       float(boxes.row0[member]) - 0.5, float(boxes.row1[member]) - 0.5)
                ok = self._fit_one(stamp, guess, reach, box, columns, int(index))
                fitted += ok
                failed += not ok
        return fitted, failed

    @staticmethod
    def _plane_kernels(psfs: list[skydiff.Psf | None], cols: np.ndarray, rows: np.ndarray,
                       mean: tuple[float, float], origin: tuple[float, float]
                       ) -> list[np.ndarray | None]:
        """Each plane's PSF images at the box centres, (m, K, K); None = the difference's."""
        kernels: list[np.ndarray | None] = []
        for plane, psf in enumerate(psfs):  # loop over the (at most 3) planes
            if psf is None or (plane > 0 and psf is psfs[0]):
                kernels.append(None)
                continue
            side = int(np.asarray(psf.kernel_image(*mean)).shape[0])
            kernels.append(psf_stamps(psf, cols.astype(np.float64), rows.astype(np.float64),
                                      size=side, origin=origin))
        return kernels

    def _stamp(self, data: np.ndarray, variance: np.ndarray, valid: np.ndarray,
               basis: np.ndarray, lobes: tuple[ShiftedPsf, ...], factors: np.ndarray,
               correlation: np.ndarray | None) -> Stamp:
        n_planes = len(lobes)
        relative = np.array([1.0, self.config.rel_weight, self.config.rel_weight])[:n_planes]
        flat_valid = valid[:n_planes].reshape(n_planes, -1)
        flat_var = np.where(flat_valid, variance[:n_planes].reshape(n_planes, -1), 1.0)
        flat_data = np.where(flat_valid, data[:n_planes].reshape(n_planes, -1), 0.0)
        weight = np.where(flat_valid, (relative / factors)[:, None] / flat_var, 0.0)
        return Stamp(data=flat_data, variance=flat_var, weight=weight, background=basis,
                     lobes=lobes, correlation=correlation)

    def _fit_one(self, stamp: Stamp, guess: np.ndarray, reach: float,
                 box: tuple[float, float, float, float], columns: dict[str, np.ndarray],
                 index: int) -> bool:
        """Fit one source and fill its row of ``columns``; False if the fit failed."""
        config = self.config
        n_data = stamp.n_data
        n_params = 4 + (1 if config.tie_fluxes else 2)
        if n_data <= n_params or not np.all(np.isfinite(guess)):
            return False
        options: dict[str, Any] = {"reach": reach, "box": box, "loss": config.loss,
                                   "f_scale": config.f_scale, "max_nfev": config.max_nfev}
        try:
            dipole = fit_dipole(stamp, (guess[0], guess[1]), (guess[2], guess[3]),
                                tie_fluxes=config.tie_fluxes, **options)
            single = fit_single(stamp, [(guess[0], guess[1]), (guess[2], guess[3])],
                                **options)
        except (ValueError, np.linalg.LinAlgError, FloatingPointError):
            return False
        if dipole is None:
            return False
        x_pos, y_pos, x_neg, y_neg, f_pos, f_neg = dipole.params
        e_xp, e_yp, e_xn, e_yn, e_fp, e_fn = dipole.errors
        total = f_pos + f_neg
        dof = n_data - dipole.n_params
        values = {
            "dipole_pos_flux": f_pos, "dipole_pos_flux_err": e_fp,
            "dipole_neg_flux": f_neg, "dipole_neg_flux_err": e_fn,
            "dipole_pos_x": x_pos, "dipole_pos_x_err": e_xp,
            "dipole_pos_y": y_pos, "dipole_pos_y_err": e_yp,
            "dipole_neg_x": x_neg, "dipole_neg_x_err": e_xn,
            "dipole_neg_y": y_neg, "dipole_neg_y_err": e_yn,
            "dipole_x": (f_pos * x_pos + f_neg * x_neg) / total if total > 0 else np.nan,
            "dipole_y": (f_pos * y_pos + f_neg * y_neg) / total if total > 0 else np.nan,
            "dipole_separation": math.hypot(x_pos - x_neg, y_pos - y_neg),
            "dipole_orientation": math.degrees(math.atan2(y_pos - y_neg, x_pos - x_neg)),
            "dipole_chi2dof": dipole.chi2 / dof,
            "dipole_single_chi2dof": (single.chi2 / (n_data - _SINGLE_PARAMS)
                                      if single is not None else np.nan),
            "dipole_sn": math.hypot(f_pos / e_fp, f_neg / e_fn),
        }
        for name, value in values.items():
            columns[name][index] = value
        columns["dipole_n_data"][index] = n_data
        columns["dipole_dof"][index] = dof
        columns["dipole_fit_flag"][index] = False
        return True


def _initial_guesses(peaks: np.ndarray, difference: np.ndarray, valid: np.ndarray,
                     footprint: np.ndarray | None, centre: tuple[int, int]) -> np.ndarray:
    """``[x+, y+, x-, y-]``: the catalog peaks, else the extreme difference pixels.

    Missing peaks (``fit_all``) are replaced by the brightest (faintest) valid difference
    pixel inside the footprint, or inside the fit box without one.
    """
    if np.all(np.isfinite(peaks)):
        return peaks
    region = valid & (footprint if footprint is not None else True)
    if not region.any():
        return peaks
    side = difference.shape[0]
    values = np.where(region, difference, np.nan)
    flat = values.ravel()
    result = peaks.copy()
    for slot, index in ((0, int(np.nanargmax(flat))), (2, int(np.nanargmin(flat)))):
        if np.isfinite(result[slot]) and np.isfinite(result[slot + 1]):
            continue
        row, col = divmod(index, side)
        result[slot] = centre[1] + col - side // 2
        result[slot + 1] = centre[0] + row - side // 2
    return result


def _plane_lobes(kernels: list[np.ndarray | None], side: int, centre: tuple[int, int],
                 reach: float) -> tuple[ShiftedPsf, ...]:
    """One lobe generator per plane; planes without their own kernel share the difference's.

    A plane whose kernel equals the difference's shares its generator too (then the fit
    computes the lobes once).
    """
    first = kernels[0]
    assert first is not None
    lobes = [ShiftedPsf(first, side=side, centre=centre, reach=reach)]
    for kernel in kernels[1:]:  # the (at most 2) other planes
        if kernel is None or (kernel.shape == first.shape and np.array_equal(kernel, first)):
            lobes.append(lobes[0])
        else:
            lobes.append(ShiftedPsf(kernel, side=side, centre=centre, reach=reach))
    return tuple(lobes)
