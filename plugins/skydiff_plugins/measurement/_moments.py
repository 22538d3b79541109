r"""Vectorized Gaussian-weighted moments of stacked stamps (centroids and adaptive shapes).

Stamp coordinates: pixel ``[r, c]`` of an ``(S, S)`` stamp has the position
``(X, Y) = (c - S // 2, r - S // 2)`` relative to the stamp centre. All functions work on
stacks ``(n, S, S)`` and iterate all stamps together (the loop is over iterations only);
stamps that have converged or failed are frozen.

*Sign awareness*: difference images hold negative sources. Each stamp is multiplied by the
sign :math:`s = \operatorname{sign}\sum_i w_i I_i` of its weighted flux under the initial
window, so that a negative source is measured exactly like a positive one.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Centroids(NamedTuple):
    """Result of :func:`windowed_centroid` (positions relative to the stamp centre)."""

    x: np.ndarray
    y: np.ndarray
    x_err: np.ndarray
    y_err: np.ndarray
    sign: np.ndarray
    failed: np.ndarray


class Moments(NamedTuple):
    """Result of :func:`adaptive_moments` (positions relative to the stamp centre)."""

    x: np.ndarray
    y: np.ndarray
    xx: np.ndarray
    yy: np.ndarray
    xy: np.ndarray
    sign: np.ndarray
    failed: np.ndarray


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.arange(size, dtype=np.float64) - size // 2
    return offsets[None, None, :], offsets[None, :, None]  # X (columns), Y (rows)


def weighted_sign(stamps: np.ndarray, usable: np.ndarray, x0: np.ndarray, y0: np.ndarray,
                  sigma: np.ndarray) -> np.ndarray:
    r"""Sign of :math:`\sum_i w_i I_i` under a circular Gaussian window (0 when undefined)."""
    gx, gy = _grid(stamps.shape[-1])
    s2 = sigma[:, None, None] ** 2
    w = np.exp(-0.5 * ((gx - x0[:, None, None]) ** 2 + (gy - y0[:, None, None]) ** 2) / s2)
    total = np.sum(np.where(usable, w * stamps, 0.0), axis=(1, 2))
    return np.where(np.isfinite(total), np.sign(total), 0.0)


def windowed_centroid(stamps: np.ndarray, variance: np.ndarray, usable: np.ndarray, *,
                      x0: np.ndarray, y0: np.ndarray, sigma: np.ndarray, max_iter: int,
                      tol: float, max_step: float) -> Centroids:
    r"""Iterative Gaussian-windowed centroid (SExtractor ``XWIN``) with delta-method errors.

    With a circular window :math:`w_i = \exp(-|\mathbf r_i - \mathbf c|^2 / 2\sigma_w^2)` of
    the PSF's width, the centroid is the root of
    :math:`\mathbf f(\mathbf c) = \sum_i w_i\,(\mathbf r_i - \mathbf c)\,s I_i = 0`, found by

    .. math::

        \mathbf c \leftarrow \mathbf c + 2\,\frac{\sum_i w_i (\mathbf r_i - \mathbf c)\,s I_i}
                                              {\sum_i w_i\, s I_i},

    which converges in one step for a Gaussian source of width :math:`\sigma_w` (the weighted
    mean offset is half the true offset) and geometrically otherwise; a step is clipped to
    ``max_step`` pixels. Linearising :math:`\mathbf f` about the root gives the error

    .. math::

        \sigma_{c_x}^2 = \frac{\sum_i w_i^2 (x_i - c_x)^2 V_i}{D_x^2}, \qquad
        D_x = -\frac{\partial f_x}{\partial c_x}
            = \sum_i w_i\,s I_i \left(1 - \frac{(x_i - c_x)^2}{\sigma_w^2}\right),

    (and likewise for :math:`y`), which for a Gaussian source of width :math:`\sigma_w`
    equals the familiar :math:`4 \sum w^2 (x - c_x)^2 V / (\sum w\,I)^2`.

    Returns NaN and ``failed`` where the weighted flux or :math:`D` is not positive or the
    iteration did not converge.
    """
    gx, gy = _grid(stamps.shape[-1])
    data = np.where(usable, stamps, 0.0)
    var = np.where(usable, variance, 0.0)
    sign = weighted_sign(stamps, usable, x0, y0, sigma)
    data = data * sign[:, None, None]
    s2 = sigma[:, None, None] ** 2
    cx = x0.astype(np.float64).copy()
    cy = y0.astype(np.float64).copy()
    failed = sign == 0.0
    active = ~failed
    converged = np.zeros(cx.shape, dtype=bool)
    for _ in range(max_iter):
        if not active.any():
            break
        idx = np.flatnonzero(active)
        dx = gx - cx[idx, None, None]
        dy = gy - cy[idx, None, None]
        wi = np.exp(-0.5 * (dx * dx + dy * dy) / s2[idx]) * data[idx]
        total = wi.sum(axis=(1, 2))
        ok = total > 0.0
        with np.errstate(invalid="ignore", divide="ignore"):
            step_x = np.clip(2.0 * (wi * dx).sum(axis=(1, 2)) / total, -max_step, max_step)
            step_y = np.clip(2.0 * (wi * dy).sum(axis=(1, 2)) / total, -max_step, max_step)
        ok &= np.isfinite(step_x) & np.isfinite(step_y)
        failed[idx[~ok]] = True
        good = idx[ok]
        cx[good] += step_x[ok]
        cy[good] += step_y[ok]
        done = np.hypot(step_x[ok], step_y[ok]) < tol
        converged[good[done]] = True
        active[idx[~ok]] = False
        active[good[done]] = False
    failed |= ~converged
    # errors at the final position
    dx = gx - cx[:, None, None]
    dy = gy - cy[:, None, None]
    w = np.exp(-0.5 * (dx * dx + dy * dy) / s2)
    wd = w * data
    dxx = np.sum(wd * (1.0 - dx * dx / s2), axis=(1, 2))
    dyy = np.sum(wd * (1.0 - dy * dy / s2), axis=(1, 2))
    w2v = w * w * var
    with np.errstate(invalid="ignore", divide="ignore"):
        x_err = np.sqrt(np.sum(w2v * dx * dx, axis=(1, 2))) / dxx
        y_err = np.sqrt(np.sum(w2v * dy * dy, axis=(1, 2))) / dyy
    failed |= ~(dxx > 0.0) | ~(dyy > 0.0)
    cx[failed] = np.nan
    cy[failed] = np.nan
    x_err = np.where(failed, np.nan, x_err)
    y_err = np.where(failed, np.nan, y_err)
    return Centroids(cx, cy, x_err, y_err, sign, failed)


def adaptive_moments(stamps: np.ndarray, usable: np.ndarray, *, x0: np.ndarray,
                     y0: np.ndarray, sigma: np.ndarray, max_iter: int, tol: float,
                     max_sigma: float, recentre: bool = True) -> Moments:
    r"""Adaptive (elliptical Gaussian-weighted) second moments, Bernstein & Jarvis (2002).

    The weight is an elliptical Gaussian of covariance :math:`M` centred on :math:`\mathbf c`,
    :math:`w_i = \exp(-\tfrac12 \mathbf d_i^\mathsf T M^{-1} \mathbf d_i)`,
    :math:`\mathbf d_i = \mathbf r_i - \mathbf c`. With the weighted moments

    .. math::

        \mathbf m = \frac{\sum_i w_i\,s I_i\,\mathbf d_i}{\sum_i w_i\,s I_i}, \qquad
        Q = \frac{\sum_i w_i\,s I_i\,\mathbf d_i \mathbf d_i^\mathsf T}{\sum_i w_i\,s I_i},

    the iteration :math:`\mathbf c \leftarrow \mathbf c + 2\mathbf m`, :math:`M \leftarrow 2Q`
    has as fixed point, for a Gaussian source of covariance :math:`C`, exactly
    :math:`M = C` (since :math:`Q = (C^{-1} + M^{-1})^{-1}`); for other profiles :math:`M` is
    the covariance of the best-matching elliptical Gaussian. The size update contracts by a
    factor two per iteration. Iteration stops when every element of :math:`M` changes by less
    than ``tol`` times :math:`\operatorname{tr} M` and the centre by less than ``tol`` pixels.

    ``failed`` marks stamps whose weighted flux is not positive, whose :math:`M` is not
    positive definite or exceeds ``max_sigma**2``, or that did not converge; their values
    are NaN.
    """
    gx, gy = _grid(stamps.shape[-1])
    data = np.where(usable, stamps, 0.0)
    sign = weighted_sign(stamps, usable, x0, y0, sigma)
    data = data * sign[:, None, None]
    n = data.shape[0]
    cx = x0.astype(np.float64).copy()
    cy = y0.astype(np.float64).copy()
    mxx = sigma.astype(np.float64) ** 2
    myy = mxx.copy()
    mxy = np.zeros(n)
    failed = sign == 0.0
    active = ~failed
    converged = np.zeros(n, dtype=bool)
    max_var = max_sigma**2
    for _ in range(max_iter):
        if not active.any():
            break
        idx = np.flatnonzero(active)
        dx = gx - cx[idx, None, None]
        dy = gy - cy[idx, None, None]
        det = mxx[idx] * myy[idx] - mxy[idx] ** 2
        a = (myy[idx] / det)[:, None, None]
        b = (-mxy[idx] / det)[:, None, None]
        c = (mxx[idx] / det)[:, None, None]
        wi = np.exp(-0.5 * (a * dx * dx + 2.0 * b * dx * dy + c * dy * dy)) * data[idx]
        total = wi.sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            mx = (wi * dx).sum(axis=(1, 2)) / total
            my = (wi * dy).sum(axis=(1, 2)) / total
            qxx = (wi * dx * dx).sum(axis=(1, 2)) / total - mx * mx
            qyy = (wi * dy * dy).sum(axis=(1, 2)) / total - my * my
            qxy = (wi * dx * dy).sum(axis=(1, 2)) / total - mx * my
        new_xx, new_yy, new_xy = 2.0 * qxx, 2.0 * qyy, 2.0 * qxy
        ok = ((total > 0.0) & np.isfinite(new_xx) & np.isfinite(new_yy) & np.isfinite(new_xy)
              & (new_xx > 0.0) & (new_yy > 0.0) & (new_xx * new_yy - new_xy**2 > 0.0)
              & (new_xx + new_yy < 2.0 * max_var))
        bad = idx[~ok]
        failed[bad] = True
        active[bad] = False
        good = idx[ok]
        trace = new_xx[ok] + new_yy[ok]
        change = np.maximum.reduce([np.abs(new_xx[ok] - mxx[good]),
                                    np.abs(new_yy[ok] - myy[good]),
                                    np.abs(new_xy[ok] - mxy[good])]) / trace
        shift = np.zeros(good.size)
        if recentre:
            step_x = np.clip(2.0 * mx[ok], -1.0, 1.0)
            step_y = np.clip(2.0 * my[ok], -1.0, 1.0)
            cx[good] += step_x
            cy[good] += step_y
            shift = np.hypot(step_x, step_y)
        mxx[good], myy[good], mxy[good] = new_xx[ok], new_yy[ok], new_xy[ok]
        done = (change < tol) & (shift < tol)
        converged[good[done]] = True
        active[good[done]] = False
    failed |= ~converged
    for array in (cx, cy, mxx, myy, mxy):
        array[failed] = np.nan
    return Moments(cx, cy, mxx, myy, mxy, sign, failed)
