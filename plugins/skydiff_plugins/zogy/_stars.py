r"""Matched stars: the photometric ratio and the registration of the two images.

ZOGY needs what Alard–Lupton absorbs into its kernel: the flux ratio :math:`F_R/F_N` of the
two images and their relative registration. Both are measured on stars found in both images
(:func:`match_stars`):

* :func:`psf_matched_fluxes` -- fluxes on the *cross-convolved* stamps :math:`P_R\otimes N`
  and :math:`P_N\otimes R`, which have the same PSF :math:`Q = P_N\otimes P_R`, so that one
  weight gives both fluxes on the same scale whatever the two PSFs are;
* :func:`fit_flux_ratio` -- the ratio :math:`r = f_N/f_R` by an errors-in-both-variables
  straight line through the origin with outlier rejection (variables, blends);
* :func:`fit_registration` -- the offset of the template's stars relative to the science's
  (a constant or an affine function of position) and its scatter, the astrometric noise of
  ZOGY's corrected score (Zackay, Ofek & Gal-Yam 2016, §3.3).

References
----------
.. [1] Zackay, B., Ofek, E. O. & Gal-Yam, A. 2016, ApJ 830, 27.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import scipy.fft
from astropy.table import Table
from scipy.spatial import cKDTree

import skydiff
from skydiff.psf import psf_moments

__all__ = [
    "FWHM_PER_SIGMA",
    "FluxRatio",
    "Registration",
    "empty_stars",
    "fit_flux_ratio",
    "fit_registration",
    "match_stars",
    "psf_images",
    "psf_matched_fluxes",
]

#: :math:`2\sqrt{2\ln 2}`.
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: Stars per batch of the stamp FFTs (bounds the memory of large PSFs).
_BATCH = 64


def _columns(table: Table, names: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(table[name], dtype=np.float64) for name in names]


def empty_stars() -> Table:
    """A table of matched stars with no row (the columns of :func:`match_stars`)."""
    names = ("x", "y", "snr", "fwhm")
    return Table({name: np.zeros(0) for name in (*names, *(f"{n}_template" for n in names))})


def match_stars(science: skydiff.Exposure, template: skydiff.Exposure, *,
                sources: Table | None, threshold: float, min_snr: float, max_stars: int,
                match_radius: float, bad_planes: Sequence[str]) -> Table:
    """Isolated, clean stars measured in both images.

    Without ``sources``, :func:`skydiff.find_stars` runs on both images and the detections
    are paired with their nearest neighbour within ``match_radius`` pixels (each star used at
    most once). With ``sources`` (columns ``x``, ``y``: science array coordinates),
    :func:`skydiff.measure_stars` measures those positions in both images.

    Returns
    -------
    astropy.table.Table
        Columns ``x``, ``y``, ``snr``, ``fwhm`` (science), ``x_template``, ``y_template``,
        ``snr_template``, ``fwhm_template``; the stars that are isolated, unmasked and
        unsaturated in both images with S/N ≥ ``min_snr`` in both, at most ``max_stars``
        (the brightest). Possibly empty.
    """
    names = ("x", "y", "snr", "fwhm")
    empty = empty_stars()
    if sources is not None:
        if not {"x", "y"} <= set(sources.colnames):
            msg = "sources must have the columns x and y (0-based column and row)"
            raise skydiff.InputError(msg)
        xs, ys = _columns(sources, ("x", "y"))
        height, width = science.shape
        inside = (np.isfinite(xs) & np.isfinite(ys) & (np.rint(xs) >= 0)
                  & (np.rint(xs) < width) & (np.rint(ys) >= 0) & (np.rint(ys) < height))
        if not inside.any():
            return empty
        xs, ys = xs[inside], ys[inside]
        sci = skydiff.measure_stars(science, xs, ys, bad_planes=bad_planes)
        tem = skydiff.measure_stars(template, xs, ys, bad_planes=bad_planes)
        pairs = np.arange(len(sci))
        sci_index, tem_index = pairs, pairs
    else:
        # measure only a few of the most significant detections per cell (about 2 x
        # max_stars over the image): the brightest isolated stars, well spread
        height, width = science.shape
        cell = max(32, int(np.sqrt(height * width / max(max_stars, 1))))
        sci = skydiff.find_stars(science, threshold=threshold, bad_planes=bad_planes,
                                 max_per_cell=2, cell_size=cell)
        tem = skydiff.find_stars(template, threshold=threshold, bad_planes=bad_planes,
                                 max_per_cell=2, cell_size=cell)
        if len(sci) == 0 or len(tem) == 0:
            return empty
        tree = cKDTree(np.column_stack(_columns(tem, ("x", "y"))))
        distance, nearest = tree.query(np.column_stack(_columns(sci, ("x", "y"))),
                                       distance_upper_bound=match_radius)
        found = np.isfinite(distance)
        sci_index = np.flatnonzero(found)
        tem_index = nearest[found]
        # each template star at most once: keep the closest science star
        order = np.argsort(distance[found], kind="stable")
        _, first = np.unique(tem_index[order], return_index=True)
        keep = np.sort(order[first])
        sci_index, tem_index = sci_index[keep], tem_index[keep]
    good = np.ones(sci_index.size, dtype=bool)
    for table, index in ((sci, sci_index), (tem, tem_index)):
        rows = table[index]
        good &= (np.asarray(rows["isolated"], dtype=bool) & ~np.asarray(rows["masked"], bool)
                 & ~np.asarray(rows["saturated"], dtype=bool)
                 & (np.asarray(rows["snr"], dtype=np.float64) >= min_snr)
                 & np.isfinite(np.asarray(rows["fwhm"], dtype=np.float64))
                 & np.isfinite(np.asarray(rows["x"], dtype=np.float64))
                 & np.isfinite(np.asarray(rows["y"], dtype=np.float64)))
    sci_index, tem_index = sci_index[good], tem_index[good]
    if sci_index.size == 0:
        return empty
    snr = np.asarray(sci["snr"], dtype=np.float64)[sci_index]
    order = np.argsort(-snr, kind="stable")[:max_stars]
    sci_index, tem_index = sci_index[order], tem_index[order]
    out = Table()
    for name in names:
        out[name] = np.asarray(sci[name], dtype=np.float64)[sci_index]
    for name in names:
        out[f"{name}_template"] = np.asarray(tem[name], dtype=np.float64)[tem_index]
    return out


def psf_images(psf: Any, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Unit-sum PSF images at many parent-frame positions, ``(n, S, S)`` float64.

    Uses the vectorised ``kernel_images`` of :class:`skydiff.PolynomialPsf`, one image for
    the position-independent built-ins, and a loop over positions otherwise.
    """
    xs = np.asarray(xs, dtype=np.float64).ravel()
    ys = np.asarray(ys, dtype=np.float64).ravel()
    if isinstance(psf, skydiff.PolynomialPsf):
        return np.asarray(psf.kernel_images(xs, ys), dtype=np.float64)
    if isinstance(psf, skydiff.GaussianPsf | skydiff.ImagePsf):
        image = np.asarray(psf.kernel_image(), dtype=np.float64)
        return np.broadcast_to(image / image.sum(), (xs.size, *image.shape)).copy()
    images = [np.asarray(psf.kernel_image(x, y), dtype=np.float64) for x, y in zip(xs, ys,
                                                                                   strict=True)]
    return np.stack([image / image.sum() for image in images])


def _fit_size(images: np.ndarray, size: int) -> np.ndarray:
    """Odd square stamps ``(n, S, S)`` cropped or zero-padded about the centre to ``size``."""
    current = images.shape[-1]
    if current == size:
        return images
    if current > size:
        cut = (current - size) // 2
        return images[:, cut:cut + size, cut:cut + size]
    pad = (size - current) // 2
    return np.pad(images, ((0, 0), (pad, pad), (pad, pad)))


def _phase(freq_r: np.ndarray, freq_c: np.ndarray, dy: np.ndarray, dx: np.ndarray
           ) -> np.ndarray:
    """``exp(-2πi (k_y dy + k_x dx))`` for shifts ``(n,)``: moves an image by ``(+dx, +dy)``."""
    return np.exp(-2j * np.pi * (freq_r[None, :, None] * dy[:, None, None]
                                 + freq_c[None, None, :] * dx[:, None, None]))


def _support(image: np.ndarray, fraction: float) -> int:
    """Half-size of the centred box holding all but ``fraction`` of ``sum |image|``."""
    size = image.shape[0]
    centre = size // 2
    offsets = np.abs(np.arange(size) - centre)
    chebyshev = np.maximum(offsets[:, None], offsets[None, :])
    mass = np.bincount(chebyshev.ravel(), weights=np.abs(image).ravel(), minlength=centre + 1)
    outside = mass.sum() - np.cumsum(mass)
    inside = np.flatnonzero(outside <= fraction * mass.sum())
    return int(inside[0]) if inside.size else centre


def _centroids(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Adaptive centroids of PSF stamps relative to their centre pixel, ``(cx, cy)``."""
    cx = np.zeros(images.shape[0])
    cy = np.zeros(images.shape[0])
    centre = images.shape[-1] // 2
    for i, image in enumerate(images):  # a loop over stamps (a few hundred)
        try:
            x, y, _ = psf_moments(image)
        except skydiff.InputError:
            x, y = centre, centre
        cx[i], cy[i] = x - centre, y - centre
    return cx, cy


def psf_matched_fluxes(science: np.ndarray, science_variance: np.ndarray,
                       template: np.ndarray, template_variance: np.ndarray,
                       filled: np.ndarray, stars: Table, *, psf_science: Any,
                       psf_template: Any, origin: tuple[int, int], size: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    r"""Fluxes of the matched stars on the cross-convolved images, on one photometric scale.

    With :math:`P_N, P_R` the two PSFs at a star (cut to ``size`` and recentred on their
    adaptive centroids) and :math:`Q = P_N\otimes P_R` moved to the star's sub-pixel
    centroid in each image,

    .. math::

        f_N = \frac{\sum Q_N\,(P_R\otimes N)}{\sum Q^2}
            = \frac{\sum_y w_N(y) N(y)}{\sum Q^2}, \qquad
        w_N = Q_N \star P_R,\qquad
        \mathrm{Var}\,f_N = \frac{\sum w_N^2 V_N}{(\sum Q^2)^2},

    and likewise :math:`f_R` with :math:`P_N`. A star of flux :math:`\alpha` in both images
    gives :math:`f_N = F_N\alpha` and :math:`f_R = F_R\alpha` exactly, whatever the PSFs,
    because both cross-convolved images have the PSF :math:`Q`. The stamps are computed in
    batches with FFTs (no loop over pixels).

    Parameters
    ----------
    science, science_variance, template, template_variance : ndarray of shape (H, W)
        Sky-subtracted images and variances.
    filled : ndarray of bool
        Pixels that were filled in either image (stars whose stamps touch one are skipped).
    stars : astropy.table.Table
        From :func:`match_stars`.
    psf_science, psf_template : skydiff.Psf
        The PSF models (parent coordinates).
    origin : tuple of int
        ``(x0, y0)`` of the exposures.
    size : int
        Odd side of the PSF stamps.

    Returns
    -------
    f_n, var_n, f_r, var_r : ndarray of shape (n,)
    ok : ndarray of bool, shape (n,)
        Stars whose stamps lie inside the image without filled pixels.
    """
    n = len(stars)
    f_n, var_n, f_r, var_r = (np.full(n, np.nan) for _ in range(4))
    ok = np.zeros(n, dtype=bool)
    if n == 0:
        return f_n, var_n, f_r, var_r, ok
    x0, y0 = origin
    half = size // 2
    full = 3 * half  # support of w = Q ⋆ P: |Q| ≤ 2 half, plus half
    grid = scipy.fft.next_fast_len(2 * full + 1, real=True)
    freq_r = np.fft.fftfreq(grid)
    freq_c = np.fft.rfftfreq(grid)
    height, width = science.shape
    xs_n, ys_n, xs_r, ys_r = _columns(stars, ("x", "y", "x_template", "y_template"))
    cols_n, rows_n = np.rint(xs_n).astype(int), np.rint(ys_n).astype(int)
    cols_r, rows_r = np.rint(xs_r).astype(int), np.rint(ys_r).astype(int)

    def weights(index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(w_n, w_r, sum Q²)`` of the stars ``index``, centred on a ``grid`` square."""
        p_n = _fit_size(psf_images(psf_science, xs_n[index] + x0, ys_n[index] + y0), size)
        p_r = _fit_size(psf_images(psf_template, xs_r[index] + x0, ys_r[index] + y0), size)
        p_n = p_n / p_n.sum(axis=(1, 2), keepdims=True)
        p_r = p_r / p_r.sum(axis=(1, 2), keepdims=True)
        cnx, cny = _centroids(p_n)
        crx, cry = _centroids(p_r)
        pad = ((0, 0), (0, grid - size), (0, grid - size))
        spec_n = scipy.fft.rfft2(np.roll(np.pad(p_n, pad), (-half, -half), axis=(1, 2)))
        spec_r = scipy.fft.rfft2(np.roll(np.pad(p_r, pad), (-half, -half), axis=(1, 2)))
        spec_n *= _phase(freq_r, freq_c, -cny, -cnx)  # recentre on the adaptive centroid
        spec_r *= _phase(freq_r, freq_c, -cry, -crx)
        q = spec_n * spec_r
        norm = np.sum(scipy.fft.irfft2(q, s=(grid, grid)) ** 2, axis=(1, 2))
        # Q moved to each image's sub-pixel centroid, correlated with the other PSF
        w_n = scipy.fft.irfft2(q * np.conj(spec_r) * _phase(
            freq_r, freq_c, ys_n[index] - rows_n[index], xs_n[index] - cols_n[index]),
            s=(grid, grid))
        w_r = scipy.fft.irfft2(q * np.conj(spec_n) * _phase(
            freq_r, freq_c, ys_r[index] - rows_r[index], xs_r[index] - cols_r[index]),
            s=(grid, grid))
        centred = (grid // 2, grid // 2)
        return (np.roll(w_n, centred, axis=(1, 2)), np.roll(w_r, centred, axis=(1, 2)), norm)

    # the stamps need only the box holding all but 1e-4 of the weights' absolute sum
    w_n0, w_r0, _ = weights(np.arange(1))
    radius = 1 + max(_support(w_n0[0], 1e-4), _support(w_r0[0], 1e-4))
    radius = min(radius, full)
    offsets = np.arange(-radius, radius + 1)
    cut = slice(grid // 2 - radius, grid // 2 + radius + 1)
    inside = ((np.minimum(cols_n, cols_r) - radius >= 0)
              & (np.maximum(cols_n, cols_r) + radius < width)
              & (np.minimum(rows_n, rows_r) - radius >= 0)
              & (np.maximum(rows_n, rows_r) + radius < height))
    for start in range(0, n, _BATCH):
        index = np.arange(start, min(start + _BATCH, n))
        index = index[inside[index]]
        if index.size == 0:
            continue
        w_n, w_r, norm = weights(index)
        w_n, w_r = w_n[:, cut, cut], w_r[:, cut, cut]
        for image, variance, rows, cols, weight, flux, var in (
                (science, science_variance, rows_n, cols_n, w_n, f_n, var_n),
                (template, template_variance, rows_r, cols_r, w_r, f_r, var_r)):
            rr = rows[index][:, None, None] + offsets[None, :, None]
            cc = cols[index][:, None, None] + offsets[None, None, :]
            data = image[rr, cc].astype(np.float64)
            noise = variance[rr, cc].astype(np.float64)
            touched = filled[rr, cc].any(axis=(1, 2))
            flux[index] = np.einsum("nij,nij->n", weight, data) / norm
            var[index] = np.einsum("nij,nij->n", weight**2, noise) / norm**2
            ok[index] = ~touched if image is science else ok[index] & ~touched
    ok &= np.isfinite(f_n) & np.isfinite(f_r) & (var_n > 0) & (var_r > 0) & (f_r > 0) \
        & (f_n > 0)
    return f_n, var_n, f_r, var_r, ok


@attrs.frozen
class FluxRatio:
    """A fitted photometric ratio ``science / template`` of the same source.

    Attributes
    ----------
    value, error : float
        The ratio :math:`r` and its 1σ statistical error.
    n_used, n_rejected : int
        Stars in the final fit and stars rejected as outliers.
    chi2dof : float
        Reduced chi-square of the final fit.
    used : ndarray of bool
        Per input star, whether it was used.
    """

    value: float
    error: float
    n_used: int
    n_rejected: int
    chi2dof: float
    used: np.ndarray = attrs.field(eq=False)


def fit_flux_ratio(f_n: np.ndarray, var_n: np.ndarray, f_r: np.ndarray, var_r: np.ndarray,
                   ok: np.ndarray, *, clip: float, max_iter: int = 10, min_stars: int
                   ) -> FluxRatio | None:
    r"""The ratio :math:`r` of :math:`f_N \simeq r f_R`, both fluxes noisy.

    Minimises :math:`\chi^2(r) = \sum_i (f_{N,i} - r f_{R,i})^2 / (\sigma^2_{N,i} +
    r^2\sigma^2_{R,i})` (a straight line through the origin with errors in both variables)
    by iterated weighted least squares, :math:`r \leftarrow \sum w f_N f_R / \sum w f_R^2`
    with :math:`w = 1/(\sigma_N^2 + r^2\sigma_R^2)`, starting from the median ratio. Stars
    whose normalised residual :math:`(f_N - r f_R)\sqrt w` lies more than ``clip`` robust
    standard deviations (at least 1) from the median are rejected and the fit repeated. The
    error is :math:`(\sum w f_R^2)^{-1/2}`, inflated by :math:`\sqrt{\chi^2/\nu}` when that
    exceeds 1 (PSF-model errors make bright stars scatter more than their photon noise).

    Returns
    -------
    FluxRatio or None
        None with fewer than ``min_stars`` usable stars.
    """
    use = np.asarray(ok, dtype=bool).copy()
    if np.count_nonzero(use) < min_stars:
        return None
    ratio = float(np.median(f_n[use] / f_r[use]))
    for _ in range(max_iter):
        weight = 1.0 / (var_n + ratio**2 * var_r)
        for _ in range(20):
            new = float(np.sum((weight * f_n * f_r)[use]) / np.sum((weight * f_r**2)[use]))
            converged = abs(new - ratio) <= 1e-12 * abs(ratio)
            ratio = new
            weight = 1.0 / (var_n + ratio**2 * var_r)
            if converged:
                break
        residual = (f_n - ratio * f_r) * np.sqrt(weight)
        centre = float(np.median(residual[use]))
        spread = max(1.0, 1.4826 * float(np.median(np.abs(residual[use] - centre))))
        keep = ok & (np.abs(residual - centre) <= clip * spread)
        if np.count_nonzero(keep) < min_stars or np.array_equal(keep, use):
            break
        use = keep
    weight = 1.0 / (var_n + ratio**2 * var_r)
    n_used = int(np.count_nonzero(use))
    chi2 = float(np.sum(((f_n - ratio * f_r) ** 2 * weight)[use]))
    chi2dof = chi2 / max(n_used - 1, 1)
    error = math.sqrt(1.0 / float(np.sum((weight * f_r**2)[use]))) * math.sqrt(max(1.0, chi2dof))
    return FluxRatio(value=ratio, error=error, n_used=n_used,
                     n_rejected=int(np.count_nonzero(ok)) - n_used, chi2dof=chi2dof, used=use)


@attrs.frozen
class Registration:
    r"""Where the template's stars lie relative to the science's, and the scatter.

    The offset of a template star from the same star in the science image,
    :math:`\mathbf d(x, y) = \mathbf x_R - \mathbf x_N`, is modelled as ``coefficients``
    ``(2, 3)``: :math:`d_x = a_0 + a_1 u + a_2 v` (same for :math:`d_y`), :math:`u, v` the
    science array coordinates mapped from ``bbox`` onto :math:`[-1, 1]` (a constant shift
    has :math:`a_1 = a_2 = 0`).

    Attributes
    ----------
    coefficients : ndarray of shape (2, 3)
        Rows :math:`d_x`, :math:`d_y`.
    bbox : tuple of float
        ``(x_min, y_min, x_max, y_max)`` in science array coordinates.
    sigma_x, sigma_y : float
        Scatter of the offsets about the model, measurement errors removed (pixels).
    n_used : int
        Stars used.
    mode : str
        ``"none"``, ``"shift"`` or ``"affine"``.
    error_x, error_y : float
        Standard errors of the constant terms (pixels).
    """

    coefficients: np.ndarray = attrs.field(eq=attrs.cmp_using(eq=np.array_equal))
    bbox: tuple[float, float, float, float]
    sigma_x: float
    sigma_y: float
    n_used: int
    mode: str
    error_x: float = 0.0
    error_y: float = 0.0

    def offset(self, x: float, y: float) -> tuple[float, float]:
        """``(d_x, d_y)`` at the science array position ``(x, y)``."""
        u, v = _normalise(np.array([x]), np.array([y]), self.bbox)
        terms = np.array([1.0, float(u[0]), float(v[0])])
        dx, dy = self.coefficients @ terms
        return float(dx), float(dy)


def _normalise(x: np.ndarray, y: np.ndarray, bbox: tuple[float, float, float, float]
               ) -> tuple[np.ndarray, np.ndarray]:
    x_min, y_min, x_max, y_max = bbox
    u = (2.0 * x - (x_min + x_max)) / max(x_max - x_min, 1e-9)
    v = (2.0 * y - (y_min + y_max)) / max(y_max - y_min, 1e-9)
    return u, v


def fit_registration(stars: Table, *, mode: str, shape: tuple[int, int], min_stars: int,
                     clip: float = 4.0, max_iter: int = 10) -> Registration:
    r"""The template-minus-science offsets of matched stars, their model and scatter.

    Each star's offset :math:`\mathbf d_i = \mathbf x_{R,i} - \mathbf x_{N,i}` has the
    expected centroid variance (per axis) of Gaussian stars of widths :math:`s` (from their
    FWHMs) and flux S/N :math:`\nu` in the two images,

    .. math::

        \epsilon_i^2 = 2\,\frac{s_{N,i}^2}{\nu_{N,i}^2} + 2\,\frac{s_{R,i}^2}{\nu_{R,i}^2}.

    The model (``mode``: a constant ``"shift"`` or an ``"affine"`` function of position;
    ``"affine"`` falls back to a shift with fewer than 3 × ``min_stars`` stars) is fitted by
    weighted least squares, weights :math:`1/(\epsilon_i^2 + \sigma^2)`, with the excess
    scatter :math:`\sigma^2` per axis -- the astrometric (registration) noise -- estimated
    from the same residuals,

    .. math::

        \sigma^2 = \max\!\big(0,\; s_r^2 - \mathrm{median}_i(\epsilon_i^2)\big),

    :math:`s_r` their robust (MAD) standard deviation, and stars whose normalised residual
    exceeds ``clip`` robust σ (at least 1) rejected, until nothing changes. With fewer than
    ``min_stars`` stars, or ``mode = "none"``, offset and scatter are 0.
    """
    height, width = shape
    bbox = (0.0, 0.0, float(width - 1), float(height - 1))
    zero = Registration(coefficients=np.zeros((2, 3)), bbox=bbox, sigma_x=0.0, sigma_y=0.0,
                        n_used=0, mode="none", error_x=0.0, error_y=0.0)
    n = len(stars)
    if mode == "none" or n < min_stars:
        return zero
    x, y, xt, yt = _columns(stars, ("x", "y", "x_template", "y_template"))
    snr_n, snr_r, fwhm_n, fwhm_r = _columns(stars, ("snr", "snr_template", "fwhm",
                                                    "fwhm_template"))
    error2 = (2.0 * (fwhm_n / FWHM_PER_SIGMA / snr_n) ** 2
              + 2.0 * (fwhm_r / FWHM_PER_SIGMA / snr_r) ** 2)
    if mode == "affine" and n < 3 * min_stars:
        mode = "shift"
    u, v = _normalise(x, y, bbox)
    design = np.column_stack([np.ones(n), u, v]) if mode == "affine" else np.ones((n, 1))
    use = np.ones(n, dtype=bool)
    coefficients = np.zeros((2, 3))
    errors = np.zeros(2)
    sigma2 = np.zeros(2)
    for _ in range(max_iter):
        keep = use.copy()
        for axis, values in enumerate((xt - x, yt - y)):
            weight = 1.0 / (error2 + sigma2[axis])
            root = np.sqrt(weight[use])
            solution, *_ = np.linalg.lstsq(design[use] * root[:, None], values[use] * root,
                                           rcond=None)
            covariance = np.linalg.pinv((design[use] * weight[use, None]).T @ design[use])
            coefficients[axis, :solution.size] = solution
            errors[axis] = math.sqrt(max(float(covariance[0, 0]), 0.0))
            residual = values - design @ solution
            robust = 1.4826 * float(np.median(np.abs(residual[use]
                                                     - np.median(residual[use]))))
            sigma2[axis] = max(0.0, robust**2 - float(np.median(error2[use])))
            normalised = residual * np.sqrt(1.0 / (error2 + sigma2[axis]))
            spread = max(1.0, 1.4826 * float(np.median(np.abs(normalised[use]))))
            keep &= np.abs(normalised) <= clip * spread
        if np.count_nonzero(keep) < min_stars or np.array_equal(keep, use):
            break
        use = keep
    return Registration(coefficients=coefficients, bbox=bbox,
                        sigma_x=math.sqrt(sigma2[0]), sigma_y=math.sqrt(sigma2[1]),
                        n_used=int(np.count_nonzero(use)), mode=mode,
                        error_x=float(errors[0]), error_y=float(errors[1]))
