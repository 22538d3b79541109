r"""Input preparation shared by the PSF-matching subtraction plugins (``lsst.ip.diffim`` §1.5).

Everything here returns new objects; the caller's exposures are never modified.

* :func:`scale_variances` -- ``ScaleVarianceTask`` on both inputs, via
  :func:`skydiff.stats.variance_scale_factor`.
* :func:`mask_hygiene` -- clear the template planes that do not describe the difference,
  copy template ``SAT`` (and ``INJECTED``) into ``*_TEMPLATE`` planes, clear the science's
  detection planes.
* :func:`merge_masks` -- OR two masks whose plane dictionaries may assign different bits.
* :func:`psf_fwhm`, :func:`psf_axis_fwhms` -- PSF widths for the basis and the ``auto`` mode.
* :func:`spatial_image` -- a Chebyshev/polynomial model of position evaluated on the pixel
  grid, separably.

Whole-image passes avoid full-size temporaries (row blocks, in-place operations): on a
2048 × 4096 frame every fresh 32 MB array costs page faults comparable to the arithmetic.
Independent NumPy work is spread over the CPUs with threads, and matrix products are split
so that BLAS never wakes its thread pool, by :mod:`skydiff.parallel`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

import skydiff
from skydiff.parallel import parallel_map, serial_matmul

__all__ = [
    "FWHM_PER_SIGMA",
    "exposure_bbox",
    "frozen",
    "mask_hygiene",
    "merge_masks",
    "psf_axis_fwhms",
    "psf_fwhm",
    "scale_variances",
    "spatial_image",
]

#: :math:`2\sqrt{2\ln 2}`.
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def frozen(array: np.ndarray) -> np.ndarray:
    """Mark a freshly computed array read-only, so that an Exposure adopts it without a copy.

    :class:`skydiff.Exposure` shares an array that is read-only, owns its memory, is
    C-contiguous and has the plane's dtype; any other array is copied.
    """
    array.setflags(write=False)
    return array


def _plane_bits(exposure: skydiff.Exposure, names: Sequence[str]) -> int:
    present = [name for name in names if name in exposure.mask_planes.names]
    return exposure.mask_planes.value(*present) if present else 0


def scale_variances(science: skydiff.Exposure, template: skydiff.Exposure
                    ) -> tuple[skydiff.Exposure, skydiff.Exposure, float, float]:
    r"""Rescale both variance planes to the measured pixel noise (``ScaleVarianceTask``).

    The factor :math:`f` of :func:`skydiff.variance_scale_factor` (squared ratio of the
    measured to the predicted noise of the background-subtracted image, from a sample of
    tiles on large images) multiplies each variance plane. The two exposures are handled in
    parallel threads.

    Returns
    -------
    science, template : skydiff.Exposure
        New exposures with ``variance * f``.
    f_science, f_template : float
        The factors.
    """

    def scaled(exposure: skydiff.Exposure) -> tuple[skydiff.Exposure, float]:
        factor = skydiff.variance_scale_factor(exposure, max_pixels=1 << 19)
        return (exposure.evolve(variance=frozen(exposure.variance * np.float32(factor))),
                factor)

    # the two exposures are independent: one thread each (NumPy releases the GIL)
    (science, f_science), (template, f_template) = parallel_map(scaled, (science, template))
    return science, template, f_science, f_template


def mask_hygiene(science: skydiff.Exposure, template: skydiff.Exposure, *,
                 preserve_template_planes: Sequence[str],
                 clear_science_planes: Sequence[str] = ("DETECTED", "DETECTED_NEGATIVE"),
                 template_copies: Sequence[tuple[str, str]] = (("SAT", "SAT_TEMPLATE"),
                                                               ("INJECTED",
                                                                "INJECTED_TEMPLATE")),
                 ) -> tuple[skydiff.Exposure, skydiff.Exposure]:
    """Mask bookkeeping before subtraction (``updateMasks`` of ``lsst.ip.diffim``).

    * template: ``SAT`` is copied to ``SAT_TEMPLATE`` and ``INJECTED`` to
      ``INJECTED_TEMPLATE`` (so the difference can tell template from science defects), then
      every plane except ``preserve_template_planes`` (and the copies) is cleared;
    * science: the detection planes are cleared (the difference gets its own detections).

    The masks are rewritten with whole-array bit operations, and only where a bit actually
    changes: an input whose mask needs no change keeps its mask array (shared, not copied).

    Returns
    -------
    science, template : skydiff.Exposure
        The updated exposures (``science`` itself when it has no detection bit set).
    """

    def clean_template() -> skydiff.Exposure:
        t_planes = template.mask_planes
        source = template.mask
        t_used = int(np.bitwise_or.reduce(source, axis=None))
        moves = []
        copies = []
        for name, target in template_copies:
            if name in t_planes.names:
                t_planes = t_planes.with_plane(target)
                copies.append(target)
                if t_used >> t_planes.bit(name) & 1:
                    moves.append((t_planes.bit(name), t_planes.bit(target)))
        keep = [name for name in (*preserve_template_planes, *copies)
                if name in t_planes.names]
        keep_bits = t_planes.value(*keep) if keep else 0
        if t_used & ~keep_bits or moves:
            t_mask = np.bitwise_and(source, np.uint32(keep_bits))
            _or_moved_bits(t_mask, source, moves)
            return template.evolve(mask=frozen(t_mask), mask_planes=t_planes)
        if t_planes != template.mask_planes:
            return template.evolve(mask_planes=t_planes)
        return template

    def clean_science() -> skydiff.Exposure:
        s_bits = _plane_bits(science, clear_science_planes)
        if s_bits and int(np.bitwise_or.reduce(science.mask, axis=None)) & s_bits:
            s_mask = np.bitwise_and(science.mask, np.uint32(~s_bits & 0xFFFFFFFF))
            return science.evolve(mask=frozen(s_mask))
        return science

    science_c, template_c = parallel_map(lambda clean: clean(), (clean_science, clean_template))
    return science_c, template_c


#: Rows per block of the whole-image mask passes (small temporaries, no full-size ones).
_ROW_BLOCK = 128

def _or_moved_bits(out: np.ndarray, mask: np.ndarray, moves: Sequence[tuple[int, int]]
                   ) -> None:
    """``out |= ((mask >> bit) & 1) << target`` for every ``(bit, target)``, by row blocks."""
    if not moves:
        return
    scratch = np.empty((min(_ROW_BLOCK, mask.shape[0]), *mask.shape[1:]), dtype=mask.dtype)
    for r0 in range(0, mask.shape[0], _ROW_BLOCK):
        source = mask[r0:r0 + _ROW_BLOCK]
        target_rows = out[r0:r0 + _ROW_BLOCK]
        moved = scratch[:source.shape[0]]
        for bit, target in moves:
            np.bitwise_and(source, np.uint32(1 << bit), out=moved)
            if target > bit:
                np.left_shift(moved, np.uint32(target - bit), out=moved)
            elif target < bit:
                np.right_shift(moved, np.uint32(bit - target), out=moved)
            np.bitwise_or(target_rows, moved, out=target_rows)


def merge_masks(first: skydiff.Exposure, second_mask: np.ndarray,
                second_planes: skydiff.MaskPlanes
                ) -> tuple[np.ndarray, skydiff.MaskPlanes]:
    """OR a second mask into the first exposure's, translating bits by plane name.

    Planes at the same bit in both masks are merged in one operation; only planes whose bit
    differs are moved one by one.

    Returns
    -------
    mask : ndarray of uint32
        The merged mask (a new array).
    planes : skydiff.MaskPlanes
        The first exposure's planes plus any plane only the second defines.
    """
    planes = first.mask_planes
    used = int(np.bitwise_or.reduce(second_mask, axis=None)) if second_mask.size else 0
    same = 0
    moves = []
    for name in second_planes.names:
        bit = second_planes.bit(name)
        if not used >> bit & 1:
            continue
        planes = planes.with_plane(name)
        target = planes.bit(name)
        if target == bit:
            same |= 1 << bit
        else:
            moves.append((bit, target))
    if same:
        out = np.bitwise_and(second_mask, np.uint32(same))
        np.bitwise_or(out, first.mask, out=out)
    else:
        out = first.mask.copy()
    _or_moved_bits(out, second_mask, moves)
    return out, planes


def exposure_bbox(exposure: skydiff.Exposure) -> tuple[float, float, float, float]:
    """The exposure's pixel area as a continuous box ``(x0 - ½, y0 - ½, x1 - ½, y1 - ½)``.

    This is ``afw``'s ``Box2D(bbox)``, the domain the spatial polynomials map onto
    :math:`[-1, 1]^2`.
    """
    x0, y0, x1, y1 = exposure.bbox
    return (x0 - 0.5, y0 - 0.5, x1 - 0.5, y1 - 0.5)


def _grid(exposure: skydiff.Exposure, n: int) -> tuple[np.ndarray, np.ndarray]:
    x0, y0 = exposure.origin
    height, width = exposure.shape
    xs = x0 + np.linspace(0.05, 0.95, n) * (width - 1)
    ys = y0 + np.linspace(0.05, 0.95, n) * (height - 1)
    gx, gy = np.meshgrid(xs, ys)
    return gx.ravel(), gy.ravel()


def psf_fwhm(exposure: skydiff.Exposure, *, n_grid: int = 3) -> float:
    """Mean FWHM (pixels) of the exposure's PSF over an ``n_grid`` × ``n_grid`` grid.

    The grid spans 5-95 % of each axis (``fwhmExposureGrid``/``Buffer`` of upstream, used
    there only as a fallback); for a constant PSF this is the FWHM at any position.

    Raises
    ------
    skydiff.InputError
        If the exposure has no PSF or the PSF gives no positive finite FWHM.
    """
    psf = exposure.psf
    if psf is None:
        msg = "the exposure has no PSF; estimate one first"
        raise skydiff.InputError(msg)
    values = [float(psf.fwhm(x, y)) for x, y in zip(*_grid(exposure, n_grid), strict=True)]
    good = [v for v in values if math.isfinite(v) and v > 0]
    if not good:
        msg = "the PSF model gives no positive, finite FWHM over the exposure"
        raise skydiff.InputError(msg)
    return float(np.mean(good))


def psf_axis_fwhms(exposure: skydiff.Exposure) -> tuple[float, float]:
    r"""Per-axis FWHMs ``(x, y)`` of the PSF at the image centre, from adaptive moments.

    A circular Gaussian weight of width :math:`\sigma_w` (the PSF's own width, from its FWHM)
    gives weighted second moments :math:`M_{xx}`; for a Gaussian profile the intrinsic
    moment is :math:`I_{xx} = M_{xx}\sigma_w^2/(\sigma_w^2 - M_{xx})`, and the axis FWHM is
    :math:`2.3548\sqrt{I_{xx}}` (``getPsfFwhm(average=False)`` of upstream).
    """
    psf = exposure.psf
    if psf is None:
        msg = "the exposure has no PSF; estimate one first"
        raise skydiff.InputError(msg)
    x0, y0 = exposure.origin
    height, width = exposure.shape
    cx, cy = x0 + 0.5 * (width - 1), y0 + 0.5 * (height - 1)
    image = np.asarray(psf.kernel_image(cx, cy), dtype=np.float64)
    sigma_w = skydiff.psf_fwhm_from_image(image) / FWHM_PER_SIGMA
    rows = np.arange(image.shape[0]) - image.shape[0] // 2
    cols = np.arange(image.shape[1]) - image.shape[1] // 2
    weight = np.exp(-0.5 * (rows[:, None] ** 2 + cols[None, :] ** 2) / sigma_w**2)
    weighted = image * weight
    total = weighted.sum()
    mx = float((weighted.sum(axis=0) @ cols) / total)
    my = float((weighted.sum(axis=1) @ rows) / total)
    mxx = float((weighted.sum(axis=0) @ (cols - mx) ** 2) / total)
    myy = float((weighted.sum(axis=1) @ (rows - my) ** 2) / total)
    out = []
    for moment in (mxx, myy):
        moment = min(moment, 0.999 * sigma_w**2)
        out.append(FWHM_PER_SIGMA * math.sqrt(moment * sigma_w**2 / (sigma_w**2 - moment)))
    return out[0], out[1]


def spatial_image(coefficients: np.ndarray, *, order: int,
                  bbox: tuple[float, float, float, float], kind: str,
                  shape: tuple[int, int], origin: tuple[int, int], stride: int = 1,
                  out: np.ndarray | None = None) -> np.ndarray:
    r"""Evaluate :math:`\sum_t c_t f_t(x, y)` at every pixel, separably, in float32.

    :math:`f_t = T_i(u) T_j(v)` (or :math:`u^i v^j`) in the term order of
    :func:`skydiff.chebyshev_terms`, with :math:`u, v` the positions mapped from ``bbox``
    onto :math:`[-1, 1]`. Grouping the terms by their row factor,
    :math:`\sum_j T_j(v) \big(\sum_i c_{ij} T_i(u)\big)`, the image is the product of an
    ``(H, n + 1)`` and an ``(n + 1, W)`` float32 matrix: one pass over the output, and no
    ``(n_terms, H, W)`` array or full-size temporary is ever built.

    Parameters
    ----------
    coefficients : array_like of shape (n_terms,)
        :math:`c_t`.
    order : int
        Total degree.
    bbox : tuple of 4 floats
        ``(x_min, y_min, x_max, y_max)`` mapped onto :math:`[-1, 1]^2`.
    kind : {"chebyshev", "polynomial"}
        Function family.
    shape : tuple of int
        ``(H, W)`` of the full pixel grid.
    origin : tuple of int
        ``(x0, y0)`` of pixel ``[0, 0]``.
    stride : int, optional
        Evaluate every ``stride``-th row and column only (shape ``ceil(H/stride),
        ceil(W/stride)``).
    out : ndarray of float32, optional
        C-contiguous array of the output shape that receives the result.

    Returns
    -------
    ndarray, float32
        ``out`` if given.
    """
    height, width = shape
    x0, y0 = origin
    u, v = _normalised_axes(height, width, x0, y0, bbox, stride)
    fu = _vander(u, order, kind)
    fv = _vander(v, order, kind)
    coeffs = np.asarray(coefficients, dtype=np.float64).reshape(-1)
    # Group the terms by their row factor: sum_i c_ij T_i(u) is one row vector per j.
    row_vectors: dict[int, np.ndarray] = {}
    for c, (i, j) in zip(coeffs, skydiff.chebyshev_terms(order), strict=True):
        if c != 0.0:
            row_vectors[j] = row_vectors.get(j, np.zeros(u.size)) + c * fu[i]
    if not row_vectors:
        if out is None:
            return np.zeros((v.size, u.size), dtype=np.float32)
        out.fill(0.0)
        return out
    degrees = sorted(row_vectors)
    columns = np.ascontiguousarray(fv[degrees].T, dtype=np.float32)  # (H, n_j)
    rows = np.array([row_vectors[j] for j in degrees], dtype=np.float32)  # (n_j, W)
    return serial_matmul(columns, rows, out=out)


def _normalised_axes(height: int, width: int, x0: int, y0: int,
                     bbox: tuple[float, float, float, float], stride: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    bx0, by0, bx1, by1 = bbox
    u = (2.0 * (np.arange(0, width, stride) + x0) - (bx0 + bx1)) / (bx1 - bx0)
    v = (2.0 * (np.arange(0, height, stride) + y0) - (by0 + by1)) / (by1 - by0)
    return u, v


def _vander(values: np.ndarray, order: int, kind: str) -> np.ndarray:
    if kind == "chebyshev":
        return np.polynomial.chebyshev.chebvander(values, order).T
    return np.polynomial.polynomial.polyvander(values, order).T


def fit_sky_background(image: np.ndarray, variance: np.ndarray,
                       good: np.ndarray | Callable[[slice, slice], np.ndarray], *,
                       order: int, bbox: tuple[float, float, float, float], kind: str,
                       origin: tuple[int, int], n_iter: int = 3, n_sigma: float = 3.0,
                       max_pixels: int = 1 << 18) -> np.ndarray:
    r"""Robust weighted least-squares polynomial of position fitted to the sky of an image.

    Minimises :math:`\sum_p w_p\,(D_p - \sum_t g_t f_t(x_p, y_p))^2` with
    :math:`w_p = 1/V_p` over the ``good`` pixels, then clips pixels whose normalised residual
    :math:`|D - B|/\sqrt V` exceeds ``n_sigma`` robust standard deviations and refits,
    ``n_iter`` times. The spatial functions :math:`f_t` are those of :func:`spatial_image`.
    The normal equations are accumulated separably,

    .. math::

        M_{(i,j),(i',j')} = \sum_r f^v_j(r) f^v_{j'}(r) \sum_c w_{rc}\, f^u_i(c) f^u_{i'}(c),

    i.e. :math:`(n+1)^2` matrix-vector products with the weight image and no design matrix
    of the image's size. Images larger than ``max_pixels`` are sampled on a regular grid
    of every :math:`s`-th row and column (:math:`s = \lceil\sqrt{HW/\mathrm{max}}\rceil`):
    a polynomial of a few terms is determined to a fraction :math:`\sim 1/\sqrt{N}` of the
    pixel noise by :math:`N` pixels, 0.2 % for the default :math:`2^{18}`.

    Parameters
    ----------
    image, variance : ndarray of shape (H, W)
        The data :math:`D` and its variance :math:`V`.
    good : ndarray of bool, shape (H, W), or callable
        Pixels that may be used (unmasked sky), or ``good(rows, cols)`` returning them for
        the sampled rows and columns (slices), which avoids evaluating full-size masks.
    order : int
        Total degree of the polynomial.
    bbox, kind, origin
        As for :func:`spatial_image`.
    n_iter : int, optional
        Clip-and-refit passes.
    n_sigma : float, optional
        Clipping threshold in robust standard deviations of the normalised residual.
    max_pixels : int, optional
        Largest number of pixels used (see above).

    Returns
    -------
    ndarray of shape ((order+1)(order+2)/2,)
        The coefficients :math:`g_t` in :func:`skydiff.chebyshev_terms` order (zeros if no
        pixel is usable).
    """
    height, width = image.shape
    stride = max(1, math.ceil(math.sqrt(height * width / max_pixels)))
    x0, y0 = origin
    u, v = _normalised_axes(height, width, x0, y0, bbox, stride)
    fu = _vander(u, order, kind)
    fv = _vander(v, order, kind)
    terms = skydiff.chebyshev_terms(order)
    n_terms = len(terms)
    sample = (slice(None, None, stride), slice(None, None, stride))
    allowed = good(*sample) if callable(good) else good[sample]
    use = allowed & (variance[sample] > 0) & np.isfinite(image[sample])
    data = np.where(use, image[sample], 0.0).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        inverse = np.where(use, 1.0 / variance[sample].astype(np.float64), 0.0)
    coefficients = np.zeros(n_terms)
    for _ in range(max(1, n_iter)):
        weight = np.where(use, inverse, 0.0)
        if np.count_nonzero(weight) < n_terms:
            return np.zeros(n_terms)
        weighted = weight * data
        rhs_rows = {i: weighted @ fu[i] for i in range(order + 1)}
        rhs = np.array([fv[j] @ rhs_rows[i] for i, j in terms])
        products: dict[tuple[int, int], np.ndarray] = {}
        matrix = np.empty((n_terms, n_terms))
        for a, (i, j) in enumerate(terms):
            for b, (k, m) in enumerate(terms):
                if b < a:
                    continue
                key = (min(i, k), max(i, k))
                if key not in products:
                    products[key] = weight @ (fu[key[0]] * fu[key[1]])
                matrix[a, b] = matrix[b, a] = (fv[j] * fv[m]) @ products[key]
        try:
            coefficients = np.linalg.solve(matrix, rhs)
        except np.linalg.LinAlgError:
            coefficients = np.linalg.lstsq(matrix, rhs, rcond=None)[0]
        model = spatial_image(coefficients, order=order, bbox=bbox, kind=kind,
                              shape=(height, width), origin=origin, stride=stride)
        normalised = (data - model) * np.sqrt(inverse)
        values = normalised[use]
        if values.size < 2 * n_terms:
            break
        centre = float(np.median(values))
        spread = 1.4826 * float(np.median(np.abs(values - centre)))
        if not spread > 0:
            break
        keep = use & (np.abs(normalised - centre) <= n_sigma * spread)
        if np.array_equal(keep, use):
            break
        use = keep
    return coefficients
