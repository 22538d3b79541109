r"""Selection of the stars a PSF-matching kernel is fitted on ("kernel sources").

A kernel source is a star whose stamp of :math:`(2K+1)^2` pixels (``K`` the kernel size)
around it is usable in *both* images. Candidates come from a given table (columns ``x``,
``y``: 0-based column and row of the science array) or from
:func:`skydiff.sources.find_stars` on the science image; each is then checked, vectorised over
all candidates:

``edge``
    the stamp (plus an optional extra margin) must lie inside the image, i.e. the centre is at
    least :math:`K` pixels from every border;
``masked_science`` / ``masked_template``
    no pixel of the stamp may carry one of ``bad_planes`` (``NO_DATA``, ``BAD``, ``SAT``,
    ``EDGE``, ``CR``, ``HIGH_VARIANCE``, ``SUSPECT``, ``INTRP``, ``SAT_TEMPLATE`` by default)
    in the science or in the template -- this is also the saturation cut;
``not_isolated``
    :func:`~skydiff.sources.find_stars` found a neighbour within its isolation radius;
``low_snr`` / ``high_snr``
    the science S/N must lie in ``[min_snr, max_snr]``;
``template_faint``
    the star must be detected in the template too (S/N of
    :func:`~skydiff.sources.measure_stars` at the same position >= ``min_template_snr``):
    transients and fast movers are no kernel sources;
``variable``
    with ``reject_variables``, the star's science/template flux ratio (the same aperture in
    both) must lie within ``max_ratio_sigma`` of the median ratio, in units of its
    error widened by the scatter of the ratios (:func:`flux_ratio_deviations`): a variable
    kernel star pulls the kernel towards its change (not tested upstream). Like the cells
    below, the test never leaves fewer than twice the required number of candidates: the
    least deviant of the stars it flags are then kept;
``cell_full`` / ``max_sources``
    the survivors are sorted brightest first (by science flux) and at most ``n_per_cell`` are
    kept per square cell and ``max_sources`` in all, so that the spatial model is constrained
    everywhere and not only where stars crowd. When the cells keep fewer than twice the
    required number (small images have few cells), the brightest of the others are added
    back up to that number: the cells thin out crowds, they never starve a fit.

The cells are ``cell_size`` pixels wide, or wider on large images (:func:`cell_side`): a
spatial model of kernel order 1 and background order 2 has about 85 parameters, and each
stamp of :math:`(2K+1)^2` pixels constrains all of them, so a few hundred well-spread stars
determine it; with cells of 128 pixels a 2048 × 4096 frame (512 cells) would offer up to
2560, and the kernel fit costs time in proportion. ``target_sources`` (250 by default) sets
the cell side to :math:`\sqrt{H W\,n_\mathrm{cell}/N_\mathrm{target}}`, i.e. about
:math:`N_\mathrm{target}/n_\mathrm{cell}` cells of ``n_per_cell`` sources each.

When the stars are found here (no ``sources`` table), :func:`~skydiff.sources.find_stars`
looks only where a stamp fits (its ``border``: the stamp half-size plus ``margin``) and, on
images whose cells offer at least half of ``target_sources`` (and twice the required
number: the top-up above may need the other stars), measures only ``2 n_per_cell``
detections per cell (``max_per_cell``: the most significant isolated, unflagged ones)
instead of every star of the frame; the table of candidates holds those.

Kernel sources are bright (S/N >= ``min_snr``), so they need not be searched for at full
resolution: the search runs on the science image binned :math:`b \times b` (image and variance
summed, so a star keeps its flux and S/N; mask planes OR-ed), with
:math:`b = \min(4, \lfloor \mathrm{FWHM} / 1.5 \rfloor)` by default (``bin_factor``): the
binned PSF stays at least 1.5 pixels wide, and its FWHM is
:math:`\sqrt{(\mathrm{FWHM}/b)^2 + 2.3548^2\,(b^2 - 1)/(12\, b^2)}` (the larger pixels
add a box of variance :math:`(b^2-1)/12` original pixels²). The border, cells and isolation
radius are scaled by :math:`1/b`, and a position :math:`x_b` maps back to
:math:`b\,x_b + (b - 1)/2`, within a fraction of a pixel of the full-resolution centroid --
enough for a stamp of :math:`2K + 1` pixels, whose fit absorbs the offset. On a 2048 × 4096
frame with FWHM 4 px this halves the cost of the step; the kernel and the difference are the
same to within the noise.

Upstream (``lsst.ip.diffim`` ``_sourceSelector``) keeps S/N in [10, 500]; here the upper limit
defaults to none: bright unsaturated stars carry most of the information about the kernel
(their wings constrain the large Gaussians of the basis), saturated ones are removed by the
``SAT`` mask, and a star the kernel cannot model is rejected later by the residual clipping of
the fit. Set ``max_snr = 500`` to reproduce the upstream cut.

Fewer than ``min_sources`` survivors raise :class:`skydiff.InsufficientKernelSourcesError`
carrying how many were found and needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
from astropy.table import Table

import skydiff
from skydiff.parallel import parallel_map

from ._basis import FWHM_PER_SIGMA

__all__ = [
    "DEFAULT_BAD_PLANES",
    "SELECTION_REASONS",
    "KernelSourceSelection",
    "KernelSourcesConfig",
    "select_kernel_sources",
]

#: Mask planes that disqualify a stamp when set on any of its pixels (in either image).
DEFAULT_BAD_PLANES: tuple[str, ...] = ("NO_DATA", "BAD", "SAT", "EDGE", "CR", "HIGH_VARIANCE",
                                       "SUSPECT", "INTRP", "SAT_TEMPLATE")

#: Detections measured per cell when the stars are found here: ``n_per_cell`` times
#: _PRESELECT_FACTOR plus _PRESELECT_EXTRA, room for the stamp-mask, S/N and template
#: rejections (about one candidate in eight on the benchmark field).
_PRESELECT_FACTOR = 2
_PRESELECT_EXTRA = 0

#: Automatic binning of the star search: the largest factor (at most _MAX_AUTO_BIN) that
#: keeps the PSF FWHM at least _MIN_BINNED_FWHM binned pixels.
_MAX_AUTO_BIN = 4
_MIN_BINNED_FWHM = 1.5

#: Quartile and median of :math:`|x|` for a standard normal :math:`x` (robust spreads).
_HALF_NORMAL_Q25 = 0.31863936396437514
_HALF_NORMAL_Q50 = 0.6744897501960817

#: Rejection reasons of the selection step, in the order they are tested.
SELECTION_REASONS: tuple[str, ...] = ("not_finite", "edge", "masked_science", "masked_template",
                                      "not_isolated", "low_snr", "high_snr", "template_faint",
                                      "variable", "cell_full", "max_sources")


@skydiff.configclass
class KernelSourcesConfig(skydiff.Config):
    """How kernel sources are found and which are kept."""

    detection_threshold: float = skydiff.RangeField(
        5.0, min=0.0, inclusive_min=False,
        doc="Detection threshold (sigma) of find_stars on the science image.")
    min_snr: float = skydiff.RangeField(
        10.0, min=0.0, doc="Smallest science S/N of a kernel source (upstream 10).")
    max_snr: float | None = skydiff.RangeField(
        None, min=0.0, inclusive_min=False, optional=True,
        doc="Largest science S/N of a kernel source; none by default (upstream 500) because "
            "bright unsaturated stars constrain the kernel best; saturated stars are removed "
            "by the SAT mask.")
    min_template_snr: float = skydiff.RangeField(
        3.0, min=0.0, doc="Smallest template S/N at the source position (rejects transients "
                          "and movers).")
    require_isolated: bool = skydiff.Field(
        True, doc="Reject stars with a detected neighbour within the isolation radius.")
    isolation_radius: float | None = skydiff.RangeField(
        None, min=0.0, optional=True,
        doc="Isolation radius in pixels passed to find_stars (None: its default).")
    bad_planes: tuple[str, ...] = skydiff.ListField(
        DEFAULT_BAD_PLANES, dtype=str,
        doc="Mask planes that disqualify a stamp when set on any of its pixels in either image "
            "(planes absent from an exposure are ignored).")
    cell_size: int = skydiff.RangeField(
        128, min=8, doc="Side in pixels of the square cells that cap the sources per area "
                        "(the smallest side: see target_sources).")
    n_per_cell: int = skydiff.RangeField(
        5, min=1, doc="Most sources kept per cell, brightest first (nStarPerCell).")
    target_sources: int = skydiff.RangeField(
        250, min=0,
        doc="About how many sources the cells should offer: on images with more than "
            "target_sources / n_per_cell cells of cell_size, the cells grow to a side of "
            "sqrt(area * n_per_cell / target_sources) pixels so that the sources stay spread "
            "over the whole image without thousands of stamps (the spatial model has ~100 "
            "parameters). 0: cells of cell_size whatever the image size.")
    max_sources: int = skydiff.RangeField(
        1000, min=1, doc="Most sources kept in all (maxKernelSources).")
    min_sources: int | None = skydiff.RangeField(
        None, min=1, optional=True,
        doc="Fewest sources needed; None: the number of spatial terms of the kernel and "
            "background models, at least 3.")
    reject_variables: bool = skydiff.Field(
        True, doc="Reject stars whose science/template flux ratio (the same aperture in "
                  "both) differs from the median ratio by more than max_ratio_sigma: "
                  "variable stars, which the kernel would otherwise partly absorb. False: "
                  "no such test (upstream).")
    max_ratio_sigma: float = skydiff.RangeField(
        4.0, min=0.0, inclusive_min=False,
        doc="Threshold of reject_variables, in units of each ratio's own error widened by "
            "the relative scatter of the precise ratios and by the spread of all ratios "
            "(flux_ratio_deviations).")
    bin_factor: int | None = skydiff.RangeField(
        None, min=1, max=8, optional=True,
        doc="Find the stars on the science image binned bin_factor x bin_factor (sums: "
            "a star's flux and S/N are kept), positions mapped back. None: automatic, "
            "the largest factor (at most 4) that leaves the PSF at least 1.5 binned pixels "
            "wide (FWHM 3 px: 2), 1 when the FWHM is unknown; 1: full resolution.")


@attrs.frozen
class KernelSourceSelection:
    """Outcome of :func:`select_kernel_sources`.

    Attributes
    ----------
    table : astropy.table.Table
        Every candidate, brightest first: ``x``, ``y`` (science array column, row), ``flux``,
        ``snr``, ``template_snr``, ``ratio_z`` (the flux-ratio deviation of
        :func:`flux_ratio_deviations`; NaN where not tested), ``selected`` (bool) and
        ``reason`` (``""`` when selected, else one of :data:`SELECTION_REASONS`).
    index : ndarray of int
        Rows of ``table`` that were selected, brightest first.
    """

    table: Table = attrs.field(eq=False)
    index: np.ndarray = attrs.field(eq=attrs.cmp_using(eq=np.array_equal))

    @property
    def n_selected(self) -> int:
        """Number of selected sources."""
        return int(self.index.size)


def _plane_value(exposure: skydiff.Exposure, names: Sequence[str]) -> int:
    present = [name for name in names if name in exposure.mask_planes.names]
    return exposure.mask_planes.value(*present) if present else 0


def _box_any(flags: np.ndarray, rows: np.ndarray, cols: np.ndarray, half: int) -> np.ndarray:
    """Whether any flag is set in the ``(2 half + 1)²`` box around each (row, col), vectorised.

    Sparse flags (cosmic rays, bad columns, saturated cores: at most 2 % of the pixels) are
    put in a k-d tree and each centre asks for its nearest flagged pixel in the Chebyshev
    metric; dense flags are dilated by the box with two running maxima
    (:func:`scipy.ndimage.maximum_filter1d`, linear in the image size) and read at the
    centres. Either way the cost does not grow with the box.
    """
    if rows.size == 0:
        return np.zeros(rows.size, dtype=bool)
    n_flagged = int(np.count_nonzero(flags))
    if n_flagged == 0:
        return np.zeros(rows.size, dtype=bool)
    if n_flagged <= 0.02 * flags.size:
        from scipy.spatial import cKDTree

        flagged = np.column_stack(np.nonzero(flags))
        distance, _ = cKDTree(flagged).query(np.column_stack([rows, cols]), k=1, p=np.inf,
                                             distance_upper_bound=half + 0.5)
        return np.isfinite(distance)
    from scipy.ndimage import maximum_filter1d

    grown = flags.view(np.uint8) if flags.dtype == bool else flags.astype(np.uint8)
    grown = maximum_filter1d(grown, 2 * half + 1, axis=0, mode="constant", cval=0)
    grown = maximum_filter1d(grown, 2 * half + 1, axis=1, mode="constant", cval=0)
    return grown[rows, cols] != 0


def _stamps_flagged(mask: np.ndarray, bits: int, rows: np.ndarray, cols: np.ndarray,
                    half: int) -> np.ndarray:
    """Whether any of ``bits`` is set in the ``(2 half + 1)²`` box around each (row, col).

    Few boxes are read directly (the centres must lie at least ``half`` from the edges); many
    go through a full-image flag plane and :func:`_box_any`.
    """
    side = 2 * half + 1
    if rows.size * side * side > mask.size // 2:
        return _box_any((mask & np.uint32(bits)) != 0, rows, cols, half)
    offsets = np.arange(-half, half + 1)
    box = (offsets[:, None] * mask.shape[1] + offsets[None, :]).reshape(-1)
    flat = np.ascontiguousarray(mask).reshape(-1)
    centres = rows * mask.shape[1] + cols
    hit = np.zeros(rows.size, dtype=bool)
    chunk = max(1, (1 << 20) // (side * side))
    for start in range(0, rows.size, chunk):
        boxes = np.take(flat, centres[start:start + chunk, None] + box[None, :])
        hit[start:start + chunk] = (np.bitwise_or.reduce(boxes, axis=1) & np.uint32(bits)) != 0
    return hit


def cell_side(shape: tuple[int, int], config: KernelSourcesConfig) -> int:
    r"""Side in pixels of the square cells that cap the kernel sources per area.

    ``config.cell_size``, or :math:`\lceil\sqrt{H W\,n_\mathrm{cell} /
    N_\mathrm{target}}\rceil` if that is larger (``n_per_cell``, ``target_sources``; not
    when ``target_sources`` is 0), so that the cells offer about ``target_sources`` sources
    however large the image.
    """
    side = int(config.cell_size)
    if config.target_sources > 0:
        height, width = shape
        wanted = math.sqrt(height * width * config.n_per_cell / config.target_sources)
        side = max(side, math.ceil(wanted))
    return side


def binning_factor(fwhm: float | None, config: KernelSourcesConfig) -> int:
    """The binning of the star search: ``config.bin_factor``, or automatic (module notes)."""
    if config.bin_factor is not None:
        return int(config.bin_factor)
    if fwhm is None or not math.isfinite(fwhm) or fwhm <= 0:
        return 1
    return max(1, min(_MAX_AUTO_BIN, int(fwhm / _MIN_BINNED_FWHM)))


def _binned(exposure: skydiff.Exposure, factor: int) -> skydiff.Exposure:
    """The exposure binned ``factor`` × ``factor``: image and variance summed, mask planes
    OR-ed, the last rows/columns that do not fill a bin dropped; no PSF or WCS."""
    height, width = (n // factor * factor for n in exposure.shape)

    def combine(plane: np.ndarray, ufunc: np.ufunc) -> np.ndarray:
        rows = plane[:height]
        summed = ufunc(rows[0::factor], rows[1::factor])
        for r in range(2, factor):
            ufunc(summed, rows[r::factor], out=summed)
        out = ufunc(summed[:, 0:width:factor], summed[:, 1:width:factor])
        for c in range(2, factor):
            ufunc(out, summed[:, c:width:factor], out=out)
        return out

    return skydiff.Exposure(
        combine(exposure.image, np.add), mask=combine(exposure.mask, np.bitwise_or),
        variance=combine(exposure.variance, np.add), mask_planes=exposure.mask_planes)


def _column(table: Table, name: str, default: float | bool, n: int) -> np.ndarray:
    if name in table.colnames:
        return np.asarray(table[name])
    return np.full(n, default)


def _measure(exposure: skydiff.Exposure, x: np.ndarray, y: np.ndarray, fwhm: float | None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Flux and S/N at fixed positions with :func:`skydiff.sources.measure_stars`."""
    if x.size == 0:
        return np.zeros(0), np.zeros(0)
    from skydiff.sources import measure_stars

    measured = measure_stars(exposure, x, y, fwhm=fwhm)
    flux = np.asarray(measured["flux"], dtype=np.float64)
    if "snr" in measured.colnames:
        snr = np.asarray(measured["snr"], dtype=np.float64)
    else:
        err = np.asarray(measured["flux_err"], dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = np.where(err > 0, flux / err, np.nan)
    return flux, snr


def aperture_snr(exposure: skydiff.Exposure, rows: np.ndarray, cols: np.ndarray,
                 fwhm: float) -> np.ndarray:
    r"""Aperture S/N of point sources at integer positions, vectorised over the sources.

    The flux is summed in a circular aperture of radius :math:`\max(2, \mathrm{FWHM})`
    (94 % of a Gaussian's flux) after subtracting the median of the ring between
    :math:`2\,\mathrm{FWHM}` and :math:`2.5\,\mathrm{FWHM}`; the noise is
    :math:`\sqrt{\sum V}` over the aperture. Stamps are clipped to the image.
    """
    flux, error = _fwhm_aperture(exposure, rows, cols, fwhm)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(error > 0, flux / error, np.nan)


def aperture_flux(exposure: skydiff.Exposure, rows: np.ndarray, cols: np.ndarray, *,
                  radius: float, inner: float, outer: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    r"""Sky-subtracted aperture fluxes and their errors at integer positions (vectorised).

    The sum over the pixels within ``radius`` of the centre minus their number times the
    median of the ring ``[inner, outer]``; the error is :math:`\sqrt{\sum V}` over the
    aperture. Stamps are clipped to the image.
    """
    if rows.size == 0:
        return np.zeros(0), np.zeros(0)
    half = math.ceil(outer)
    offsets = np.arange(-half, half + 1)
    height, width = exposure.shape
    rr = np.clip(rows[:, None, None] + offsets[None, :, None], 0, height - 1)
    cc = np.clip(cols[:, None, None] + offsets[None, None, :], 0, width - 1)
    distance = np.hypot(offsets[:, None], offsets[None, :])
    aperture = distance <= radius
    ring = (distance >= inner) & (distance <= outer)
    image = exposure.image[rr, cc].astype(np.float64)
    variance = exposure.variance[rr, cc].astype(np.float64)
    sky = np.median(image[:, ring], axis=1)
    flux = (image[:, aperture] - sky[:, None]).sum(axis=1)
    noise = np.sqrt(np.maximum(variance[:, aperture].sum(axis=1), 0.0))
    return flux, noise


def _fwhm_aperture(exposure: skydiff.Exposure, rows: np.ndarray, cols: np.ndarray,
                   fwhm: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`aperture_flux` with radius ``max(2, FWHM)`` and the ring ``[2, 2.5] FWHM``."""
    radius = max(2.0, float(fwhm))
    return aperture_flux(exposure, rows, cols, radius=radius,
                         inner=max(radius + 1.0, 2.0 * float(fwhm)),
                         outer=max(radius + 2.0, 2.5 * float(fwhm)))


def flux_ratio_deviations(science: skydiff.Exposure, template: skydiff.Exposure,
                          x: np.ndarray, y: np.ndarray, fwhm: float, *,
                          threshold: float = 4.0, max_iter: int = 10
                          ) -> tuple[np.ndarray, float, float]:
    r"""How far each star's science/template flux ratio lies from the others', in σ.

    Each image's flux is summed in the same aperture of radius :math:`\max(2,
    \mathrm{FWHM})` (the larger FWHM) around the nearest pixel, after subtracting the median
    of the ring :math:`[2, 2.5]\,\mathrm{FWHM}`: no PSF model is needed (estimated models
    of stacked images err by several per cent), and the different fractions of the two PSFs
    inside the aperture change all ratios alike -- the median absorbs them, and their
    variation across the field goes into the scatter :math:`f` below. With
    :math:`r_i = F^S_i / F^T_i`, :math:`\tilde r` the median ratio of the stars kept,
    :math:`\delta_i = r_i/\tilde r - 1` and :math:`\epsilon_i` the relative error of
    :math:`r_i` from both flux errors,

    .. math::

        z_i = \frac{\delta_i}{s\,\sqrt{\epsilon_i^2 + f^2}}, \qquad
        s = \max\Big(1,\ 1.4826\,\operatorname{median}_{\mathrm{kept}}
        \frac{|\delta_i|}{\sqrt{\epsilon_i^2 + f^2}}\Big),

    where :math:`f = 1.4826\,\operatorname{median}|\delta_i|` over the more precise half of
    the kept stars is the relative scatter of the ratios beyond their photon noise (PSF
    variations across the field, centring on the nearest pixel: they hit the brightest
    stars hardest) and :math:`s` absorbs errors that the variance planes
    underestimate (correlated noise). All stars are kept at first, with the spreads taken
    from the first quartile of :math:`|\cdot|` instead of the median (divided by 0.3186, its
    value for a normal sample), which holds while three quarters are constant stars; stars
    with :math:`|z| >` ``threshold`` are then set aside and the statistics recomputed until
    no star changes side (at most ``max_iter`` passes), so that a field rich in variables
    does not inflate them. A variable star has :math:`|z| \gg 1`; so has a star blended
    differently in the two images.

    Returns
    -------
    z : ndarray
        NaN where a flux is not positive.
    f, s : float
        The relative scatter and the scale.
    """
    rows, cols = np.rint(y).astype(np.int64), np.rint(x).astype(np.int64)
    # the two images in parallel threads (NumPy releases the GIL)
    (f_s, e_s), (f_t, e_t) = parallel_map(
        lambda exposure: _fwhm_aperture(exposure, rows, cols, fwhm), (science, template))
    z = np.full(x.shape, np.nan)
    with np.errstate(invalid="ignore"):
        good = (f_s > 0) & (f_t > 0) & (e_s > 0) & (e_t > 0)
    if np.count_nonzero(good) < 3:
        return z, 0.0, 1.0
    ratio = f_s[good] / f_t[good]
    relative = np.hypot(e_s[good] / f_s[good], e_t[good] / f_t[good])
    kept = np.ones(ratio.shape, dtype=bool)
    floor, scale, values = 0.0, 1.0, np.zeros(ratio.shape)
    for iteration in range(max(2, max_iter)):
        # the first pass must survive a field rich in variables: spreads from the first
        # quartile of |x| (0.3186 sigma for a normal sample: robust to 75 % outliers); then
        # from the median of |x| of the stars kept
        quantile, unit = (0.25, _HALF_NORMAL_Q25) if iteration == 0 else (0.5, _HALF_NORMAL_Q50)
        delta = ratio / np.median(ratio[kept]) - 1.0
        precise = kept & (relative <= np.median(relative[kept]))
        floor = float(np.quantile(np.abs(delta[precise]), quantile)) / unit
        deviation = delta / np.hypot(relative, floor)
        scale = max(1.0, float(np.quantile(np.abs(deviation[kept]), quantile)) / unit)
        values = deviation / scale
        inside = np.abs(values) <= threshold
        if np.count_nonzero(inside) < 3 or (iteration > 0 and np.array_equal(inside, kept)):
            break
        kept = inside
    z[good] = values
    return z, floor, scale


def _candidates(science: skydiff.Exposure, sources: Table | None, config: KernelSourcesConfig,
                fwhm: float | None, *, border: int = 0, max_per_cell: int | None = None,
                cell_size: int = 128) -> Table:
    """Candidate positions with flux, S/N and isolation (given, or found at least ``border``
    pixels from the edges and at most ``max_per_cell`` per cell)."""
    if sources is not None:
        if not isinstance(sources, Table):
            msg = f"sources must be an astropy Table with columns x and y, got {type(sources)}"
            raise skydiff.InputError(msg)
        missing = [name for name in ("x", "y") if name not in sources.colnames]
        if missing:
            msg = (f"the kernel source table lacks the columns {missing}; it needs x and y "
                   "(0-based column and row of the science image)")
            raise skydiff.InputError(msg)
        n = len(sources)
        x = np.asarray(sources["x"], dtype=np.float64).reshape(-1)
        y = np.asarray(sources["y"], dtype=np.float64).reshape(-1)
        out = Table({"x": x, "y": y})
        if "flux" in sources.colnames and "snr" in sources.colnames:
            out["flux"] = np.asarray(sources["flux"], dtype=np.float64)
            out["snr"] = np.asarray(sources["snr"], dtype=np.float64)
        else:
            finite = np.isfinite(x) & np.isfinite(y)
            flux = np.full(n, np.nan)
            snr = np.full(n, np.nan)
            flux[finite], snr[finite] = _measure(science, x[finite], y[finite], fwhm)
            out["flux"], out["snr"] = flux, snr
        out["isolated"] = _column(sources, "isolated", True, n).astype(bool)
        return out
    from skydiff.sources import find_stars

    factor = binning_factor(fwhm, config)
    if factor > 1 and min(science.shape) < 2 * factor:
        factor = 1
    searched = science
    kwargs: dict[str, Any] = {"threshold": config.detection_threshold, "fwhm": fwhm,
                              "bad_planes": tuple(config.bad_planes), "border": int(border)}
    if factor > 1:
        assert fwhm is not None
        searched = _binned(science, factor)
        # the binned PSF: the FWHM scaled, widened by the larger pixels' box (variance
        # (b² - 1) / 12 px² in the original pixels)
        kwargs.update(fwhm=math.sqrt((fwhm / factor) ** 2 + FWHM_PER_SIGMA**2
                                     * (factor**2 - 1) / (12.0 * factor**2)),
                      border=int(border) // factor)
    if max_per_cell is not None:
        kwargs.update(max_per_cell=int(max_per_cell),
                      cell_size=max(1, int(cell_size) // factor))
    if config.isolation_radius is not None:
        kwargs["isolation_radius"] = max(config.isolation_radius / factor, 1e-3)
    found = find_stars(searched, **kwargs)
    n = len(found)
    # the centre of binned pixel j is at (b - 1) / 2 + b j in the original pixels
    offset = 0.5 * (factor - 1)
    return Table({
        "x": factor * np.asarray(found["x"], dtype=np.float64).reshape(-1) + offset,
        "y": factor * np.asarray(found["y"], dtype=np.float64).reshape(-1) + offset,
        "flux": np.asarray(found["flux"], dtype=np.float64).reshape(-1),
        "snr": np.asarray(found["snr"], dtype=np.float64).reshape(-1),
        "isolated": _column(found, "isolated", True, n).astype(bool).reshape(-1),
    })


def select_kernel_sources(
    science: skydiff.Exposure,
    template: skydiff.Exposure,
    *,
    kernel_size: int,
    config: KernelSourcesConfig,
    min_sources: int,
    sources: Table | None = None,
    fwhm: float | None = None,
    template_fwhm: float | None = None,
    margin: int = 0,
    mask_exposure: skydiff.Exposure | None = None,
) -> KernelSourceSelection:
    r"""Choose the stars the PSF-matching kernel is fitted on.

    Parameters
    ----------
    science : skydiff.Exposure
        The science exposure: stars are found (or measured) on it.
    template : skydiff.Exposure
        The template on the same pixel grid: its mask and S/N are checked.
    kernel_size : int
        Odd kernel size :math:`K`; stamps have :math:`2K + 1` pixels a side.
    config : KernelSourcesConfig
        The selection settings.
    min_sources : int
        Fewest sources the fit needs (``config.min_sources`` overrides it when set).
    sources : astropy.table.Table, optional
        Candidate positions (``x``, ``y``: 0-based column and row of the science array;
        optional ``flux``, ``snr`` and ``isolated`` columns, else measured); default: found
        with :func:`skydiff.sources.find_stars`.
    fwhm : float, optional
        Science PSF FWHM in pixels (used by find_stars when the science has no PSF).
    template_fwhm : float, optional
        Template PSF FWHM in pixels (aperture of the template S/N; default ``fwhm``).
    margin : int, optional
        Extra distance from the border beyond the stamp half-size (the pre-convolution path
        adds the pre-filter half-width).
    mask_exposure : skydiff.Exposure, optional
        Exposure whose mask is checked instead of the science's (the pre-filtered science).

    Returns
    -------
    KernelSourceSelection
        All candidates with their status (found stars: those measured, see the module notes);
        the selected rows brightest first.

    Raises
    ------
    skydiff.InsufficientKernelSourcesError
        If fewer than the required number survive; its metadata holds ``n_found``,
        ``n_needed``, ``n_candidates`` and the count of every rejection reason.
    skydiff.InputError
        If a given source table lacks ``x`` or ``y``.
    """
    needed = int(config.min_sources if config.min_sources is not None else min_sources)
    height, width = science.shape
    half = int(kernel_size)  # stamp half-size: the stamp is 2K + 1 pixels
    reach = half + int(margin)
    cell = cell_side((height, width), config)
    n_cells = math.ceil(height / cell) * math.ceil(width / cell)
    # Measure only the best few detections per cell on images whose cells offer many
    # sources, unless the top-up may need the others.
    offered = n_cells * config.n_per_cell
    thin = offered >= 2 * needed and 2 * offered >= config.target_sources
    candidates = _candidates(
        science, sources, config, fwhm, border=max(reach, 0),
        max_per_cell=_PRESELECT_FACTOR * config.n_per_cell + _PRESELECT_EXTRA if thin else None,
        cell_size=cell)
    n = len(candidates)
    x = np.asarray(candidates["x"], dtype=np.float64)
    y = np.asarray(candidates["y"], dtype=np.float64)
    flux = np.asarray(candidates["flux"], dtype=np.float64)
    snr = np.asarray(candidates["snr"], dtype=np.float64)
    reasons = np.full(n, "", dtype="<U16")

    def reject(where: np.ndarray, reason: str) -> None:
        reasons[(reasons == "") & where] = reason

    finite = np.isfinite(x) & np.isfinite(y)
    reject(~finite, "not_finite")
    cols = np.rint(np.where(finite, x, -1e9)).astype(np.int64)
    rows = np.rint(np.where(finite, y, -1e9)).astype(np.int64)
    inside = (cols >= reach) & (cols <= width - 1 - reach) & (rows >= reach) & (
        rows <= height - 1 - reach)
    reject(~inside, "edge")
    live = reasons == ""
    check = mask_exposure if mask_exposure is not None else science
    live = reasons == ""

    def flagged(exposure: skydiff.Exposure) -> np.ndarray:
        bits = _plane_value(exposure, config.bad_planes)
        hit = np.zeros(n, dtype=bool)
        if bits and live.any():
            hit[live] = _stamps_flagged(exposure.mask, bits, rows[live], cols[live], half)
        return hit

    # both images at once (threads); a source masked in both is "masked_science"
    for hit, reason in zip(parallel_map(flagged, (check, template)),
                           ("masked_science", "masked_template"), strict=True):
        reject(hit, reason)
    if config.require_isolated:
        reject(~np.asarray(candidates["isolated"], dtype=bool), "not_isolated")
    reject(~(snr >= config.min_snr), "low_snr")
    if config.max_snr is not None:
        reject(snr > config.max_snr, "high_snr")
    template_snr = np.full(n, np.nan)
    live = reasons == ""
    if config.min_template_snr > 0 and live.any():
        width_t = template_fwhm if template_fwhm is not None else (fwhm or 3.0)
        template_snr[live] = aperture_snr(template, rows[live], cols[live], width_t)
        reject(~(template_snr >= config.min_template_snr), "template_faint")
    ratio_z = np.full(n, np.nan)
    live = reasons == ""
    if config.reject_variables and np.count_nonzero(live) >= 3:
        widest = max(fwhm or 0.0, template_fwhm or 0.0) or 3.0
        ratio_z[live], _, _ = flux_ratio_deviations(science, template, x[live], y[live],
                                                    widest, threshold=config.max_ratio_sigma)
        flagged = np.flatnonzero(live & (np.abs(ratio_z) > config.max_ratio_sigma))
        # like the cells, the test never starves the fit: it leaves at least twice the
        # required number of candidates, giving back the least deviant stars it flagged
        # (the fit's kernel-sum and residual clipping still apply to them)
        spare = np.count_nonzero(live) - flagged.size - 2 * needed
        if spare < 0:
            flagged = flagged[np.argsort(-np.abs(ratio_z[flagged]), kind="stable")]
            flagged = flagged[:max(0, flagged.size + spare)]
        reject(np.isin(np.arange(n), flagged), "variable")

    order = np.argsort(-np.where(np.isfinite(flux), flux, -np.inf), kind="stable")
    ok = order[reasons[order] == ""]
    cell_id = (rows[ok] // cell) * (width // cell + 1) + cols[ok] // cell
    # rank of each source within its cell, brightest first (ok is sorted by flux)
    sort_cells = np.argsort(cell_id, kind="stable")
    sorted_ids = cell_id[sort_cells]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    run_start = np.repeat(starts, np.diff(np.r_[starts, sorted_ids.size]))
    rank = np.empty(ok.size, dtype=np.int64)
    rank[sort_cells] = np.arange(ok.size) - run_start
    capped = rank < config.n_per_cell
    if np.count_nonzero(capped) < 2 * needed:
        # The cells only thin out crowded areas; they must not starve a small image (whose
        # few cells cannot hold enough sources): top up with the brightest of the others,
        # to twice the minimum so that the fit can still reject some.
        extra = np.flatnonzero(~capped)[:2 * needed - np.count_nonzero(capped)]
        capped[extra] = True
    reasons[ok[~capped]] = "cell_full"
    ok = ok[capped]
    reasons[ok[config.max_sources:]] = "max_sources"
    selected = ok[:config.max_sources]

    table = Table({"x": x, "y": y, "flux": flux, "snr": snr, "template_snr": template_snr,
                   "ratio_z": ratio_z})
    table["selected"] = reasons == ""
    table["reason"] = reasons
    table = table[order]
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    index = np.sort(position[selected])
    if index.size < needed:
        counts = {f"n_{reason}": int(np.sum(reasons == reason)) for reason in SELECTION_REASONS}
        detail = ", ".join(f"{k[2:]} {v}" for k, v in counts.items() if v)
        msg = (f"found {index.size} usable kernel source(s) of {n} candidate(s), need at least "
               f"{needed}{f' (rejected: {detail})' if detail else ''}; lower "
               f"spatial_kernel_order / spatial_bg_order, relax kernel_sources.min_snr or the "
               f"mask planes, or pass a source list")
        raise skydiff.InsufficientKernelSourcesError(
            msg, n_found=int(index.size), n_needed=needed, n_candidates=n, **counts)
    return KernelSourceSelection(table=table, index=index)


def default_min_sources(*, kernel_order: int, background_order: int, fit_background: bool
                        ) -> int:
    r"""Fewest kernel sources that determine the spatial model.

    The kernel coefficients and the background are polynomials of position with
    :math:`(n+1)(n+2)/2` terms each; every stamp constrains them at one position only (the
    kernel is assumed constant across a stamp), so at least that many distinct positions are
    needed, and never fewer than 3 (upstream ``minKernelSources``).
    """
    terms = [(kernel_order + 1) * (kernel_order + 2) // 2]
    if fit_background:
        terms.append((background_order + 1) * (background_order + 2) // 2)
    return max(3, *terms)
