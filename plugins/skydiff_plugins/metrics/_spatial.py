r"""The ``spatial`` metric: quality figures sampled at quasi-random positions over the image.

A port of ``lsst.ip.diffim``'s ``SpatiallySampledMetricsTask``. ``n_positions`` positions are
drawn from a two-dimensional Halton sequence (:class:`scipy.stats.qmc.Halton`, scrambled with
a fixed seed by default, so a run is reproducible) and mapped onto the image,

.. math::

    x_j = m + u_j\,(W - 1 - 2m), \qquad y_j = m + v_j\,(H - 1 - 2m),

with :math:`(u_j, v_j) \in [0, 1)^2` the sequence, :math:`W \times H` the image and
:math:`m` the ``margin``. A low-discrepancy sequence covers the image evenly without the
clumps and holes of random positions, and without the aliasing of a regular grid.

Around every position a box of :math:`(2h + 1)^2` pixels (:math:`h` = ``box_half_size``,
clipped to the image; ``lsst.ip.diffim`` grows its 17-pixel sky footprints by 100 pixels) gives:

* **densities** of diaSources (non-sky catalog rows whose position falls in the box) and of
  dipoles (``is_dipole``): :math:`N / A`, with :math:`A` the box area in square degrees when
  the exposure has a celestial WCS (pixel area from the WCS Jacobian at the position), else
  per :math:`10^6` square pixels (``metadata["density_unit"]``);
* the **circular mean** dipole orientation :math:`\operatorname{atan2}(\sum\sin\theta_k,
  \sum\cos\theta_k)` (degrees) and the mean dipole separation (pixels) of the dipoles in the
  box, from the ``dipole_orientation`` and ``dipole_separation`` columns;
* the **medians** of the science, matched-template and difference images and of their
  variance planes (pixels with an ``exclude_planes`` bit or a non-finite value left out);
* the **fraction** of the box's difference-image pixels in each of ``mask_planes``;
* the **PSF FWHM** of the science, template and difference exposures at the position;
* the PSF-matching **kernel sum** and the offset of the kernel's centroid from its centre
  (``kernel_dx``, ``kernel_dy``, pixels) at the position.

Anything whose input is missing is NaN, with a note in the metadata. The values are the
median and the maximum over the positions of the main figures; the table holds one row per
position.

References
----------
.. [1] lsst/ip_diffim, ``python/lsst/ip/diffim/computeSpatiallySampledMetrics.py``.
.. [2] Halton, J. H. 1960, Numer. Math. 2, 84, "On the efficiency of certain quasi-random
   sequences of points in evaluating multi-dimensional integrals".
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from typing import Any

import astropy.units as u
import numpy as np
from astropy.table import Table
from astropy.wcs import WCS
from scipy.stats import qmc

import skydiff

from ._common import NAN, bool_column, check_inputs, first_exposure, positions, sky_flags

#: The default mask planes whose fractions are reported (those of lsst.ip.diffim's list that
#: skydiff defines).
DEFAULT_MASK_PLANES: tuple[str, ...] = (
    "BAD", "CR", "DETECTED", "DETECTED_NEGATIVE", "EDGE", "INJECTED", "INJECTED_TEMPLATE",
    "INTRP", "NO_DATA", "SAT", "SAT_TEMPLATE", "STREAK", "SUSPECT")

#: Per-position quantities summarised (median and maximum over the positions) in the values.
SUMMARY_COLUMNS: tuple[str, ...] = (
    "source_density", "dipole_density", "science_value", "template_value", "difference_value",
    "science_variance", "template_variance", "difference_variance", "science_fwhm",
    "template_fwhm", "difference_fwhm", "kernel_sum", "kernel_offset")

_IMAGES = ("science", "template", "difference")
#: SciPy ≥ 1.15 names the random-state argument of the QMC engines ``rng`` (SPEC 7) and will
#: deprecate ``seed``; older releases only know ``seed``. An integer means different streams
#: under the two names, a ``numpy.random.Generator`` the same one, so one is always passed.
_HALTON_SEED_KEYWORD = "rng" if "rng" in inspect.signature(qmc.Halton).parameters else "seed"
#: Square pixels per density unit without a WCS.
_PIXEL_AREA_UNIT = 1.0e6
_DENSITY_PER_PIXELS = u.CompositeUnit(1.0 / _PIXEL_AREA_UNIT, [u.pix], [-2])


@skydiff.configclass
class SpatialMetricConfig(skydiff.Config):
    """Options of the ``spatial`` metric."""

    n_positions: int = skydiff.RangeField(
        100, min=1, doc="Number of Halton positions (lsst.ip.diffim: about 100).")
    box_half_size: int = skydiff.RangeField(
        100, min=1, doc="Half side in pixels of the box around each position (clipped to "
                        "the image).")
    margin: float = skydiff.RangeField(
        0.0, min=0.0, doc="Keep the positions at least this many pixels from the image "
                          "edges.")
    scramble: bool = skydiff.Field(
        True, doc="Scramble the Halton sequence (with seed); unscrambled, the first position "
                  "is the corner (0, 0).")
    seed: int = skydiff.RangeField(
        0, min=0, doc="Seed of the scrambling: the same seed gives the same positions.")
    mask_planes: tuple[str, ...] = skydiff.ListField(
        list(DEFAULT_MASK_PLANES), dtype=str,
        doc="Mask planes whose fraction of difference-image pixels is reported per position "
            "(NaN for a plane the difference does not define).")
    exclude_planes: tuple[str, ...] = skydiff.ListField(
        ["BAD", "NO_DATA"], dtype=str,
        doc="Pixels with any of these planes set are left out of the image and variance "
            "medians.")
    psf_fwhm: bool = skydiff.Field(
        True, doc="Evaluate the three PSFs' FWHM at every position (one PSF evaluation per "
                  "position and image).")


def halton_positions(shape: tuple[int, int], n: int, *, margin: float = 0.0,
                     scramble: bool = True, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Quasi-random positions inside an image of ``shape`` from a 2-D Halton sequence.

    Parameters
    ----------
    shape : (int, int)
        ``(H, W)``.
    n : int
        Number of positions.
    margin : float, optional
        Least distance in pixels from the edges (reduced to fit a small image).
    scramble : bool, optional
        Scramble the sequence.
    seed : int, optional
        Seed of the scrambling.

    Returns
    -------
    x, y : ndarray of shape (n,)
        0-based column and row, within ``[margin, W - 1 - margin]`` and
        ``[margin, H - 1 - margin]``.

    Examples
    --------
    >>> x, y = halton_positions((100, 200), 4, scramble=False)
    >>> x.tolist(), y.tolist()
    ([0.0, 99.5, 49.75, 149.25], [0.0, 33.0, 66.0, 11.0])
    """
    height, width = shape
    generator = np.random.default_rng(seed)
    sampler = qmc.Halton(d=2, scramble=scramble, **{_HALTON_SEED_KEYWORD: generator})
    points = sampler.random(n)
    mx = min(float(margin), (width - 1) / 2.0)
    my = min(float(margin), (height - 1) / 2.0)
    x = mx + points[:, 0] * (width - 1 - 2.0 * mx)
    y = my + points[:, 1] * (height - 1 - 2.0 * my)
    return x, y


def _celestial(wcs: WCS | None) -> WCS | None:
    if wcs is None or not wcs.has_celestial or wcs.pixel_n_dim != 2:
        return None
    return wcs.celestial


def pixel_area_deg2(wcs: WCS, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    r"""The solid angle of a pixel (square degrees) at each position, from the WCS Jacobian.

    With :math:`(\alpha, \delta)` the sky coordinates, the area is
    :math:`|\partial_x\alpha\cos\delta\,\partial_y\delta - \partial_y\alpha\cos\delta\,
    \partial_x\delta|`, the derivatives taken as central differences over one pixel.

    Parameters
    ----------
    wcs : astropy.wcs.WCS
        A celestial WCS of the exposure's own pixel grid (0-based).
    x, y : ndarray
        Positions (0-based column and row).

    Returns
    -------
    ndarray
        Square degrees per pixel.
    """
    xs = np.concatenate([x - 0.5, x + 0.5, x, x])
    ys = np.concatenate([y, y, y - 0.5, y + 0.5])
    lon, lat = (np.asarray(v, dtype=np.float64) for v in wcs.pixel_to_world_values(xs, ys))
    lon = lon.reshape(4, -1)
    lat = lat.reshape(4, -1)
    cos_dec = np.cos(np.deg2rad(lat.mean(axis=0)))

    def dlon(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return ((b - a + 180.0) % 360.0 - 180.0) * cos_dec

    dlon_x, dlat_x = dlon(lon[0], lon[1]), lat[1] - lat[0]
    dlon_y, dlat_y = dlon(lon[2], lon[3]), lat[3] - lat[2]
    return np.abs(dlon_x * dlat_y - dlon_y * dlat_x)


def _summary(values: np.ndarray) -> tuple[float, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN
        return float(np.nanmedian(values)), float(np.nanmax(values))


def _box_bounds(x: np.ndarray, y: np.ndarray, half: int, shape: tuple[int, int]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Inclusive pixel bounds ``x_min, x_max, y_min, y_max`` of the clipped boxes."""
    height, width = shape
    col = np.rint(x).astype(np.int64)
    row = np.rint(y).astype(np.int64)
    return (np.clip(col - half, 0, width - 1), np.clip(col + half, 0, width - 1),
            np.clip(row - half, 0, height - 1), np.clip(row + half, 0, height - 1))


class SpatialMetric(skydiff.Metric):
    r"""Spatially sampled quality figures at quasi-random (Halton) positions.

    See the module documentation for the quantities. The table has one row per position:

    ``id``, ``x``, ``y`` (pix), ``ra``, ``dec`` (deg, NaN without a celestial WCS),
    ``x_min``, ``x_max``, ``y_min``, ``y_max`` (inclusive box bounds), ``n_pixels``,
    ``n_dia_sources``, ``source_density``, ``n_dipoles``, ``dipole_density``,
    ``dipole_orientation`` (deg), ``dipole_separation`` (pix), ``science_value``,
    ``template_value``, ``difference_value``, ``science_variance``, ``template_variance``,
    ``difference_variance``, ``<plane>_fraction`` for every plane of ``mask_planes`` (lower
    case), ``science_fwhm``, ``template_fwhm``, ``difference_fwhm`` (pix), ``kernel_sum``,
    ``kernel_dx``, ``kernel_dy`` and ``kernel_offset`` (pix).

    The values are ``n_positions`` and ``<column>_median`` and ``<column>_max`` for every
    column of ``SUMMARY_COLUMNS``. Densities are per square degree with a celestial WCS,
    else per :math:`10^6` square pixels (``metadata["density_unit"]`` says which).

    References
    ----------
    .. [1] lsst/ip_diffim ``SpatiallySampledMetricsTask``.

    Examples
    --------
    >>> import numpy as np
    >>> from astropy.table import Table
    >>> difference = skydiff.Exposure.from_arrays(np.zeros((300, 300)),
    ...                                           variance=np.ones((300, 300)))
    >>> catalog = Table({"x": [10.0, 150.0], "y": [10.0, 150.0]})
    >>> result = SpatialMetric().run(skydiff.MetricInputs(difference=difference,
    ...                                                   catalog=catalog))
    >>> len(result.table), result.metadata["density_unit"]
    (100, '1e-06 ct / pix2')
    """

    name = "spatial"
    ConfigClass = SpatialMetricConfig
    order = 3.0

    def run(self, inputs: skydiff.MetricInputs) -> skydiff.MetricResult:
        inputs = check_inputs(inputs, type(self).name)
        with self.timer("run"):
            values, table, metadata = self._compute(inputs)
        self.metadata.update(metadata)
        return skydiff.MetricResult(values=values, table=table, metadata=metadata)

    # -- steps ---------------------------------------------------------------------------

    def _compute(self, inputs: skydiff.MetricInputs
                 ) -> tuple[dict[str, float], Table | None, dict[str, Any]]:
        config = self.config
        notes: list[str] = []
        values: dict[str, float] = {"n_positions": 0}
        for column in SUMMARY_COLUMNS:
            values[f"{column}_median"] = NAN
            values[f"{column}_max"] = NAN
        metadata: dict[str, Any] = {"notes": notes, "density_unit": "none",
                                    "box_half_size": int(config.box_half_size)}
        reference = first_exposure(inputs)
        if reference is None:
            notes.append("no exposure given: the positions need an image")
            return values, None, metadata
        shape = reference.shape
        x, y = halton_positions(shape, int(config.n_positions), margin=config.margin,
                                scramble=config.scramble, seed=config.seed)
        n = x.size
        half = int(config.box_half_size)
        x_min, x_max, y_min, y_max = _box_bounds(x, y, half, shape)
        n_pixels = (x_max - x_min + 1) * (y_max - y_min + 1)
        table = Table({"id": np.arange(1, n + 1, dtype=np.int64), "x": x, "y": y})
        table["x"].unit = u.pix
        table["y"].unit = u.pix

        wcs = None
        for name in ("science", "difference", "template"):
            exposure = getattr(inputs, name)
            if exposure is not None and exposure.wcs is not None:
                wcs = _celestial(exposure.wcs)
                if wcs is None:
                    notes.append(f"the WCS of the {name} exposure is not celestial")
                break
        if wcs is not None:
            ra, dec = (np.asarray(v, dtype=np.float64) for v in wcs.pixel_to_world_values(x, y))
            area = n_pixels * pixel_area_deg2(wcs, x, y)
            density_unit = u.deg**-2
        else:
            ra = dec = np.full(n, np.nan)
            area = n_pixels / _PIXEL_AREA_UNIT
            density_unit = _DENSITY_PER_PIXELS
        metadata["density_unit"] = (u.count * density_unit).to_string()
        table["ra"] = ra * u.deg
        table["dec"] = dec * u.deg
        table["x_min"], table["x_max"] = x_min, x_max
        table["y_min"], table["y_max"] = y_min, y_max
        table["n_pixels"] = n_pixels

        self._sources(table, inputs.catalog, area, density_unit, notes)
        self._image_medians(table, inputs, notes)
        self._mask_fractions(table, inputs.difference, notes)
        self._psf_fwhms(table, inputs, notes)
        self._kernel(table, inputs.kernel, reference.origin, notes)

        values["n_positions"] = n
        for column in SUMMARY_COLUMNS:
            median, maximum = _summary(np.asarray(table[column], dtype=np.float64))
            values[f"{column}_median"] = median
            values[f"{column}_max"] = maximum
        metadata["n_positions"] = n
        metadata["seed"] = int(config.seed)
        return values, table, metadata

    def _sources(self, table: Table, catalog: Table | None, area: np.ndarray,
                 density_unit: u.UnitBase, notes: list[str]) -> None:
        """Counts, densities and dipole statistics of the catalog in every box."""
        n = len(table)
        nan = np.full(n, np.nan)
        columns: dict[str, Any] = {
            "n_dia_sources": nan.copy(), "source_density": nan.copy(),
            "n_dipoles": nan.copy(), "dipole_density": nan.copy(),
            "dipole_orientation": nan.copy(), "dipole_separation": nan.copy()}
        if catalog is None:
            notes.append("densities: no catalog given")
        else:
            xs, ys = positions(catalog, "catalog", type(self).name)
            real = ~sky_flags(catalog) & np.isfinite(xs) & np.isfinite(ys)
            xs, ys = xs[real], ys[real]
            # (positions, sources): a source is in a box when its pixel is
            x_lo = np.asarray(table["x_min"])[:, None] - 0.5
            x_hi = np.asarray(table["x_max"])[:, None] + 0.5
            y_lo = np.asarray(table["y_min"])[:, None] - 0.5
            y_hi = np.asarray(table["y_max"])[:, None] + 0.5
            inside = ((xs >= x_lo) & (xs < x_hi) & (ys >= y_lo) & (ys < y_hi))
            count = inside.sum(axis=1)
            columns["n_dia_sources"] = count
            columns["source_density"] = count / area
            dipole = bool_column(catalog, "is_dipole")
            if dipole is None:
                notes.append("dipole statistics: the catalog has no is_dipole column")
            else:
                is_dipole = inside & dipole[real]
                n_dipoles = is_dipole.sum(axis=1)
                columns["n_dipoles"] = n_dipoles
                columns["dipole_density"] = n_dipoles / area
                columns["dipole_orientation"] = self._circular_mean(
                    catalog, "dipole_orientation", real, is_dipole, notes)
                columns["dipole_separation"] = self._mean(
                    catalog, "dipole_separation", real, is_dipole, notes)
        for name, value in columns.items():
            table[name] = value
        table["source_density"].unit = u.count * density_unit
        table["dipole_density"].unit = u.count * density_unit
        table["dipole_orientation"].unit = u.deg
        table["dipole_separation"].unit = u.pix

    @staticmethod
    def _column(catalog: Table, name: str, real: np.ndarray, notes: list[str]
                ) -> np.ndarray | None:
        if name not in catalog.colnames:
            notes.append(f"{name}: the catalog has no such column")
            return None
        return np.asarray(catalog[name], dtype=np.float64)[real]

    def _circular_mean(self, catalog: Table, name: str, real: np.ndarray,
                       selection: np.ndarray, notes: list[str]) -> np.ndarray:
        r"""Per box, :math:`\operatorname{atan2}(\sum\sin\theta, \sum\cos\theta)` in degrees."""
        angle = self._column(catalog, name, real, notes)
        if angle is None:
            return np.full(selection.shape[0], np.nan)
        use = selection & np.isfinite(angle)
        radians = np.deg2rad(np.where(np.isfinite(angle), angle, 0.0))
        sin = (use * np.sin(radians)).sum(axis=1)
        cos = (use * np.cos(radians)).sum(axis=1)
        return np.where(use.any(axis=1), np.rad2deg(np.arctan2(sin, cos)), np.nan)

    def _mean(self, catalog: Table, name: str, real: np.ndarray, selection: np.ndarray,
              notes: list[str]) -> np.ndarray:
        value = self._column(catalog, name, real, notes)
        if value is None:
            return np.full(selection.shape[0], np.nan)
        use = selection & np.isfinite(value)
        total = (use * np.where(np.isfinite(value), value, 0.0)).sum(axis=1)
        count = use.sum(axis=1)
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    def _boxes(self, table: Table) -> list[tuple[slice, slice]]:
        return [(slice(int(r0), int(r1) + 1), slice(int(c0), int(c1) + 1))
                for r0, r1, c0, c1 in zip(table["y_min"], table["y_max"], table["x_min"],
                                          table["x_max"], strict=True)]

    def _image_medians(self, table: Table, inputs: skydiff.MetricInputs,
                       notes: list[str]) -> None:
        """Medians of every image and variance plane in every box (one loop over boxes)."""
        boxes = self._boxes(table)
        planes: Sequence[str] = self.config.exclude_planes
        for name in _IMAGES:
            exposure = getattr(inputs, name)
            value = np.full(len(boxes), np.nan)
            variance = np.full(len(boxes), np.nan)
            if exposure is None:
                notes.append(f"{name}_value, {name}_variance: no {name} image given")
            else:
                known = [p for p in planes if p in exposure.mask_planes.names]
                bits = np.uint32(exposure.mask_planes.value(*known)) if known else np.uint32(0)
                for k, (rows, cols) in enumerate(boxes):  # loop over ~100 boxes
                    good = (exposure.mask[rows, cols] & bits) == 0
                    image = exposure.image[rows, cols][good]
                    var = exposure.variance[rows, cols][good]
                    image = image[np.isfinite(image)]
                    var = var[np.isfinite(var)]
                    value[k] = float(np.median(image)) if image.size else np.nan
                    variance[k] = float(np.median(var)) if var.size else np.nan
            table[f"{name}_value"] = value
            table[f"{name}_variance"] = variance

    def _mask_fractions(self, table: Table, difference: skydiff.Exposure | None,
                        notes: list[str]) -> None:
        """Fraction of each box's difference pixels in every configured mask plane."""
        planes = list(self.config.mask_planes)
        fractions = {plane: np.full(len(table), np.nan) for plane in planes}
        if difference is None:
            notes.append("mask fractions: no difference image given")
        else:
            missing = [p for p in planes if p not in difference.mask_planes.names]
            if missing:
                notes.append(f"mask fractions: planes {missing} are not defined")
            known = [p for p in planes if p in difference.mask_planes.names]
            bits = [np.uint32(1 << difference.mask_planes.bit(p)) for p in known]
            n_pixels = np.asarray(table["n_pixels"], dtype=np.float64)
            for k, (rows, cols) in enumerate(self._boxes(table)):  # loop over ~100 boxes
                box = difference.mask[rows, cols]
                for plane, bit in zip(known, bits, strict=True):
                    fractions[plane][k] = np.count_nonzero(box & bit) / n_pixels[k]
        for plane in planes:
            table[f"{plane.lower()}_fraction"] = fractions[plane]

    def _psf_fwhms(self, table: Table, inputs: skydiff.MetricInputs, notes: list[str]) -> None:
        x = np.asarray(table["x"], dtype=np.float64)
        y = np.asarray(table["y"], dtype=np.float64)
        for name in _IMAGES:
            exposure = getattr(inputs, name)
            fwhm = np.full(len(table), np.nan)
            if exposure is None or exposure.psf is None:
                notes.append(f"{name}_fwhm: no {name} PSF")
            elif not self.config.psf_fwhm:
                notes.append(f"{name}_fwhm: psf_fwhm is off")
            else:
                x0, y0 = exposure.origin
                psf = exposure.psf
                fwhm = np.array([psf.fwhm(float(xi + x0), float(yi + y0))
                                 for xi, yi in zip(x, y, strict=True)])  # one per position
            table[f"{name}_fwhm"] = fwhm * u.pix

    def _kernel(self, table: Table, kernel: skydiff.FixedKernel | skydiff.BasisKernel | None,
                origin: tuple[int, int], notes: list[str]) -> None:
        r"""Kernel sum and centroid offset :math:`\sum K\,\Delta / \sum K` at every position."""
        n = len(table)
        ksum = dx = dy = np.full(n, np.nan)
        if kernel is None:
            notes.append("kernel_sum, kernel_dx, kernel_dy: no kernel given")
        else:
            px = np.asarray(table["x"], dtype=np.float64) + origin[0]
            py = np.asarray(table["y"], dtype=np.float64) + origin[1]
            ksum = np.asarray(kernel.sum_at(px, py), dtype=np.float64).reshape(n)
            images = kernel.images_at(px, py)
            k_rows, k_cols = images.shape[1:]
            row_offsets = np.arange(k_rows) - k_rows // 2
            col_offsets = np.arange(k_cols) - k_cols // 2
            total = images.sum(axis=(1, 2))
            safe = np.where(total != 0, total, np.nan)
            dx = np.einsum("nrc,c->n", images, col_offsets) / safe
            dy = np.einsum("nrc,r->n", images, row_offsets) / safe
        table["kernel_sum"] = ksum
        table["kernel_dx"] = dx * u.pix
        table["kernel_dy"] = dy * u.pix
        table["kernel_offset"] = np.hypot(dx, dy) * u.pix
