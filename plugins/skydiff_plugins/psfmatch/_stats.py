"""Robust, NaN-aware summary statistics used by PSF matching.

The clipped statistics reproduce the semantics of afw's ``MEANCLIP`` / ``STDEVCLIP``
(``lsst::afw::math::Statistics``), which ip_diffim uses to clip kernel sums
(``KernelSumVisitor``) and tests use to summarise difference images:

1. the first pass is centred on the median with a half-width of ``n_sigma`` times the
   inter-quartile range converted to a Gaussian sigma (``0.7413 * IQR``);
2. every later pass is centred on the previous clipped mean with a half-width of ``n_sigma``
   times the previous clipped standard deviation (unbiased, ``ddof=1``);
3. ``n_iter`` passes in total.

Non-finite values are ignored everywhere.
"""

from __future__ import annotations

import attrs
import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "IQR_TO_SIGMA",
    "MAD_TO_SIGMA",
    "ClippedStats",
    "clipped_mean_std",
    "clipped_stats",
    "robust_sigma",
]

#: Factor converting an inter-quartile range to a Gaussian standard deviation,
#: :math:`1 / (2\,\Phi^{-1}(0.75))` (afw's ``IQ_TO_STDEV``).
IQR_TO_SIGMA = 0.741301109252802

#: Factor converting a median absolute deviation to a Gaussian standard deviation,
#: :math:`1 / \Phi^{-1}(0.75)`.
MAD_TO_SIGMA = 1.482602218505602


def _readonly(array: ArrayLike) -> NDArray[np.bool_]:
    out = np.array(array, dtype=bool)
    out.setflags(write=False)
    return out


@attrs.frozen
class ClippedStats:
    """Result of :func:`clipped_stats`.

    Attributes
    ----------
    mean : float
        Clipped mean (NaN when no finite value was given).
    std : float
        Clipped unbiased standard deviation (NaN when fewer than two values survive).
    n_used : int
        Number of values that entered the final mean.
    used : ndarray of bool
        Same shape as the input; True for the values of the final clipped set.
    """

    mean: float
    std: float
    n_used: int
    used: NDArray[np.bool_] = attrs.field(
        converter=_readonly, eq=attrs.cmp_using(eq=np.array_equal), hash=False, repr=False
    )


def clipped_stats(values: ArrayLike, *, n_sigma: float = 3.0, n_iter: int = 3) -> ClippedStats:
    r"""Iteratively sigma-clipped mean and standard deviation (afw ``MEANCLIP`` semantics).

    Parameters
    ----------
    values : array_like
        Values of any shape; non-finite entries are ignored.
    n_sigma : float, optional
        Clipping half-width in units of the (robust, then clipped) standard deviation; > 0.
    n_iter : int, optional
        Total number of clipping passes, the first one centred on the median; >= 1.

    Returns
    -------
    ClippedStats
        Mean, standard deviation, number of values used and the boolean mask of used values.

    Raises
    ------
    ValueError
        If ``n_sigma <= 0`` or ``n_iter < 1``.

    Notes
    -----
    Pass :math:`k` keeps the values with :math:`|x - c_k| \le h_k` where

    .. math::

        c_0 = \operatorname{median}(x),\quad h_0 = n_\sigma\, 0.7413\,\mathrm{IQR}(x);\qquad
        c_k = \bar x_{k-1},\quad h_k = n_\sigma\, s_{k-1}\ (k \ge 1),

    and :math:`\bar x_k, s_k` are the mean and unbiased standard deviation of the values kept in
    pass :math:`k`. The comparison is inclusive so that a degenerate distribution (IQR or
    standard deviation of zero) keeps the values equal to the centre instead of none. When fewer
    than two values survive, the standard deviation is undefined and iteration stops.

    Examples
    --------
    >>> stats = clipped_stats([1, 1, 1, 1, 2, 3, 4, 50])
    >>> round(stats.mean, 4), stats.n_used
    (1.8571, 7)
    """
    if not n_sigma > 0:
        msg = f"n_sigma must be positive, got {n_sigma}"
        raise ValueError(msg)
    if n_iter < 1:
        msg = f"n_iter must be at least 1, got {n_iter}"
        raise ValueError(msg)
    arr = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(arr)
    x = arr[finite]
    used_full = np.zeros(arr.shape, dtype=bool)
    if x.size == 0:
        return ClippedStats(mean=float("nan"), std=float("nan"), n_used=0, used=used_full)
    q25, median, q75 = np.percentile(x, [25.0, 50.0, 75.0])
    center = float(median)
    half_width = float(n_sigma * IQR_TO_SIGMA * (q75 - q25))
    keep = np.ones(x.shape, dtype=bool)
    mean = center
    std = float("nan")
    for _ in range(n_iter):
        new_keep = np.abs(x - center) <= half_width
        if not new_keep.any():
            break
        keep = new_keep
        kept = x[keep]
        mean = float(kept.mean())
        std = float(kept.std(ddof=1)) if kept.size > 1 else float("nan")
        if not np.isfinite(std):
            break
        center = mean
        half_width = n_sigma * std
    used_full[finite] = keep
    return ClippedStats(mean=mean, std=std, n_used=int(keep.sum()), used=used_full)


def clipped_mean_std(
    values: ArrayLike, *, n_sigma: float = 3.0, n_iter: int = 3
) -> tuple[float, float]:
    """Sigma-clipped mean and standard deviation, ignoring non-finite values.

    Thin wrapper around :func:`clipped_stats`; see there for the algorithm.

    Parameters
    ----------
    values : array_like
        Values of any shape.
    n_sigma : float, optional
        Clipping half-width in standard deviations.
    n_iter : int, optional
        Number of clipping passes (the first centred on the median).

    Returns
    -------
    mean, std : float
        Clipped mean and unbiased standard deviation (NaN when undefined).

    Examples
    --------
    >>> mean, std = clipped_mean_std([1.0, 2.0, 3.0, float("nan")])
    >>> mean, std
    (2.0, 1.0)
    """
    stats = clipped_stats(values, n_sigma=n_sigma, n_iter=n_iter)
    return stats.mean, stats.std


def robust_sigma(values: ArrayLike) -> float:
    r"""Gaussian-equivalent standard deviation from the median absolute deviation.

    Parameters
    ----------
    values : array_like
        Values of any shape; non-finite entries are ignored.

    Returns
    -------
    float
        :math:`1.4826\,\operatorname{median}(|x - \operatorname{median}(x)|)`, or NaN when no
        finite value is present.

    Examples
    --------
    >>> robust_sigma([1.0, 2.0, 3.0, 4.0, 100.0])
    1.482602218505602
    """
    arr = np.asarray(values, dtype=np.float64)
    x = arr[np.isfinite(arr)]
    if x.size == 0:
        return float("nan")
    return float(MAD_TO_SIGMA * np.median(np.abs(x - np.median(x))))
