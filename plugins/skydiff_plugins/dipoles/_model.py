r"""The dipole and single-PSF fits of one source (one stamp), with their covariances.

Planes and weights
------------------
A stamp holds the difference :math:`d` and, for the joint fit, the science image :math:`s`
and the matched template :math:`t` (index :math:`a \in \{d, s, t\}`), each with its variance
:math:`V_a` and a validity mask (unmasked pixels with finite data and positive variance
inside the fit box). The weight of pixel :math:`i` of plane :math:`a` is

.. math::

    w_{a,i} = \frac{\lambda_a}{\eta_a V_{a,i}}, \qquad \lambda_d = 1,\ \lambda_s =
    \lambda_t = \lambda \ (\texttt{rel\_weight}),

and 0 for invalid pixels, with :math:`\eta_a` the plane's noise factor (``_noise``: the
true variance of a PSF-weighted sum of its pixels over the one its variance plane predicts
for independent pixels; 1 when the noise correlations are not used). A plane whose pixels
are averages of :math:`\sim\eta` independent ones (the matched template) thus gets the
weight of the information it really holds.

Models
------
With :math:`M^a_\pm = M^a(x_\pm, y_\pm)` the unit-flux lobes of plane :math:`a`'s own PSF
(``_lobes``) and :math:`B(x) = \sum_k b_k T_k(x)` a polynomial background (``1`` or
``1, u, v`` with :math:`u, v` the stamp coordinates scaled to :math:`[-1, 1]`):

.. math::

    d &\approx F_+ M^d_+ - F_- M^d_-, \\
    s &\approx F_+ M^s_+ + B, \\
    t &\approx F_- M^t_- + B,

with :math:`F_- = F_+` when the fluxes are tied; positions and fluxes are shared by the
planes. :math:`B` cancels in :math:`s - t`, so the difference plane has no background. When
the difference is the plain :math:`s - t` of a PSF-matched pair, :math:`M^d = M^s = M^t`;
a decorrelated difference :math:`\phi \otimes (s - t)` has the PSF :math:`\phi \otimes P_s`
(sharper than the science's), which describes the difference and only the difference. The
single-PSF model of the difference is :math:`d \approx F\,M^d(x_0, y_0)` with a signed
:math:`F`.

Estimator
---------
:func:`scipy.optimize.least_squares` (trust-region reflective, analytic Jacobian) minimises
:math:`\sum_{a,i} f^2 \rho(r_{a,i}^2 / f^2)` of the whitened residuals
:math:`r_{a,i} = \sqrt{w_{a,i}}\,(y_{a,i} - m_{a,i})` with a convex loss :math:`\rho`
(``linear``: :math:`\rho(z) = z`; ``soft_l1``: :math:`2(\sqrt{1 + z} - 1)`; ``huber``) and
scale :math:`f` (in units of the noise), under the bounds :math:`|x_\pm - x^0_\pm| \le R`,
:math:`|y_\pm - y^0_\pm| \le R` and :math:`F_\pm \ge 0`.

Covariance
----------
The three planes are not independent (:math:`d = s - t` pixel by pixel for a plain
difference, a filtered :math:`s - t` for a decorrelated one), the pixels of a plane may be
correlated, and the weights are not inverse noise covariances, so the weighted-least-squares
covariance :math:`(J^\mathsf{T}WJ)^{-1}` is wrong. The covariance is the M-estimator
sandwich

.. math::

    \mathrm{Cov}(\hat\theta) = H^{-1} \Big(\sum_{a,b} \sqrt{\kappa_a \kappa_b}\,
    (W_a A_a)^\mathsf{T}\, C_{ab}\, (W_b A_b)\Big) H^{-1}, \qquad
    H = \sum_a A_a^\mathsf{T} \mathrm{diag}(w_a \psi'_a) A_a,

with :math:`A_a = \partial m_a / \partial\theta` (model Jacobian), :math:`W_a =
\mathrm{diag}(w_a)`, :math:`\psi'_a = \rho' + 2 z \rho''` the loss curvature at each pixel's
residual (1 for the linear loss; small for a residual the robust loss discounts, which then
carries less information), :math:`\kappa_a = E[\psi(r)^2] / E[r^2]` with
:math:`\psi(r) = \rho'(r^2/f^2)\,r` the expected gradient factor for Gaussian residuals
:math:`r \sim N(0, \lambda_a \rho_{aa}(0) / \eta_a)` (Gauss-Hermite quadrature; 1 for the
linear loss, 0.78 for ``soft_l1`` with :math:`f = 3` and unit variance, where the sandwich is
then 0.8 % above the linear one: the robust loss costs almost no efficiency), and
:math:`C_{ab}` the noise covariance of the pixels of planes :math:`a` and :math:`b`:

* with the estimated noise correlations :math:`\rho_{ab}` (``_noise``, the default),

  .. math::

      C_{ab}(\mathbf i, \mathbf j) = \sqrt{V_a(\mathbf i)\, V_b(\mathbf j)}\;
      \rho_{ab}(\mathbf j - \mathbf i),

  which covers the correlations within each plane and between planes (a plain difference
  shares the science's and the template's noise, a decorrelated one a filtered version of
  it) as measured on the sky; the double sum over pixel pairs is a correlation, computed
  with FFTs (:func:`_correlated_meat`);
* for independent pixels (``correlated_noise`` off, or too little sky to estimate),
  :math:`C^0`, diagonal in the pixels:

  .. math::

      C^0_{dd} = V_d,\ C^0_{ss} = V_s,\ C^0_{tt} = V_t,\ C^0_{st} = 0,\
      C^0_{ds} = q V_s,\ C^0_{dt} = -q V_t, \qquad
      q = \min\!\Big(1, \sqrt{V_d / (V_s + V_t)}\Big),

  i.e. the difference is :math:`s - t` (:math:`q = 1`) plus, when :math:`V_d > V_s + V_t`,
  independent extra noise, or a rescaled :math:`s - t` when :math:`V_d < V_s + V_t`;
  positive semi-definite either way.

The cross terms use :math:`\sqrt{\kappa_a\kappa_b}` (exact for perfectly correlated
planes). For the difference-only fit with the linear loss and independent pixels this
reduces to :math:`H^{-1}`. The covariance is **not** rescaled by the reduced
:math:`\chi^2`. Parameters that do not affect the model (the position of a lobe whose flux
is at the bound 0) get NaN errors.

:math:`\chi^2` values are plain (not robust) sums over the valid difference pixels,
:math:`\chi^2 = \sum_i (d_i - m_{d,i})^2 / V_{d,i}`, for both models.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import scipy.fft
import scipy.optimize

from ._lobes import ShiftedPsf

__all__ = ["DipoleSolution", "SingleSolution", "Stamp", "fit_dipole", "fit_single"]

#: Relative size below which a Hessian diagonal marks a parameter that the model ignores.
_INACTIVE = 1e-12
#: Relative tolerances (ftol, xtol) of least_squares: 1e-6 of a chi-square of ~1e3 is
#: 1e-3, and 1e-6 of a position of ~1e3 pixels is 1e-3 pixel, far below the errors.
_TOLERANCE = 1e-6


class Stamp(NamedTuple):
    """The pixels of one source, flattened to ``(n_planes, side * side)``.

    Attributes
    ----------
    data : ndarray of shape (p, L*L)
        The planes (difference first, then science and template for the joint fit), 0 where
        invalid.
    variance : ndarray of shape (p, L*L)
        Their variances (1 where invalid).
    weight : ndarray of shape (p, L*L)
        :math:`\\lambda_a / (\\eta_a V_a)`, 0 where invalid.
    background : ndarray of shape (n_b, L*L)
        The background basis :math:`T_k` (``n_b`` = 0 for the difference-only fit).
    lobes : tuple of ShiftedPsf
        The PSF lobe generator of each plane (the same object where two planes share a PSF).
    correlation : ndarray of shape (p, p, 2R + 1, 2R + 1) or None
        The normalised noise correlations :math:`\\rho_{ab}` of the planes (``_noise``);
        None takes the pixels as independent (the covariance :math:`C^0` of the module
        documentation).
    """

    data: np.ndarray
    variance: np.ndarray
    weight: np.ndarray
    background: np.ndarray
    lobes: tuple[ShiftedPsf, ...]
    correlation: np.ndarray | None = None

    @property
    def joint(self) -> bool:
        """Whether the science and template planes are part of the fit."""
        return self.data.shape[0] == 3

    @property
    def n_data(self) -> int:
        """The number of valid difference pixels."""
        return int(np.count_nonzero(self.weight[0]))

    @property
    def side(self) -> int:
        """The side :math:`L` of the stamp."""
        return math.isqrt(self.data.shape[1])


class DipoleSolution(NamedTuple):
    """The dipole fit of one source.

    ``params`` is ``[x+, y+, x-, y-, F+, F-]`` (``F-`` = ``F+`` when tied) and ``errors`` their
    standard errors; ``chi2`` the plain chi-square of the difference plane.
    """

    params: np.ndarray
    errors: np.ndarray
    chi2: float
    n_params: int


class SingleSolution(NamedTuple):
    """The single-PSF fit of the difference: ``params`` = ``[x0, y0, F]``, plain chi-square."""

    params: np.ndarray
    chi2: float


def background_basis(side: int, order: int) -> np.ndarray:
    """The background terms ``1`` (order 0) or ``1, u, v`` (order 1), flattened (n_b, L*L)."""
    coords = (np.arange(side, dtype=np.float64) - side // 2) / max(side // 2, 1)
    rows, cols = np.meshgrid(coords, coords, indexing="ij")
    terms = [np.ones(side * side)]
    if order >= 1:
        terms += [cols.ravel(), rows.ravel()]
    return np.stack(terms)


# ------------------------------------------------------------------------------------------
# robust loss


#: Gauss-Hermite nodes and weights (probabilists', normalised) for expectations over N(0, 1).
_NODES, _NODE_WEIGHTS = np.polynomial.hermite_e.hermegauss(48)
_NODE_WEIGHTS = _NODE_WEIGHTS / _NODE_WEIGHTS.sum()


def _loss_derivatives(residuals: np.ndarray, loss: str, f_scale: float
                      ) -> tuple[np.ndarray, np.ndarray]:
    r""":math:`\rho'(z)` and :math:`\psi'(z) = \rho'(z) + 2z\rho''(z)` at :math:`z = (r/f)^2`."""
    z = (residuals / f_scale) ** 2
    if loss == "soft_l1":
        return (1.0 + z) ** -0.5, (1.0 + z) ** -1.5
    if loss == "huber":
        inside = z <= 1.0
        return np.where(inside, 1.0, 1.0 / np.sqrt(np.maximum(z, 1.0))), inside.astype(float)
    ones = np.ones_like(z)
    return ones, ones


def _meat_factors(loss: str, f_scale: float, spread: np.ndarray) -> np.ndarray:
    r""":math:`\kappa = E[\psi(r)^2] / E[r^2]` for whitened residuals :math:`r \sim N(0, \lambda)`.

    :math:`\psi(r) = \rho'(r^2/f^2)\,r` is the residual's contribution to the gradient;
    :math:`\kappa = 1` for the linear loss. Evaluated by Gauss-Hermite quadrature for each
    plane's :math:`\lambda` (``spread``: 1 for the difference, ``rel_weight`` for the others).
    """
    if loss == "linear":
        return np.ones_like(spread)
    r = np.sqrt(spread)[:, None] * _NODES[None, :]
    rho1, _ = _loss_derivatives(r, loss, f_scale)
    return np.asarray(((rho1 * r) ** 2 * _NODE_WEIGHTS).sum(axis=1) / spread)


def _plane_covariance(variance: np.ndarray) -> np.ndarray:
    """Per-pixel noise covariance blocks C[a, b] of the stacked planes (see the module doc)."""
    n_planes = variance.shape[0]
    cov = np.zeros((n_planes, n_planes, variance.shape[1]))
    for a in range(n_planes):  # loop over the (at most 3) planes
        cov[a, a] = variance[a]
    if n_planes == 3:
        v_d, v_s, v_t = variance
        q = np.minimum(1.0, np.sqrt(v_d / (v_s + v_t)))
        cov[0, 1] = cov[1, 0] = q * v_s
        cov[0, 2] = cov[2, 0] = -q * v_t
    return cov


def _correlated_meat(scaled: np.ndarray, stamp: Stamp) -> np.ndarray:
    r"""The meat :math:`\sum_{ab} G_a^\mathsf{T} C_{ab} G_b` with the correlated-noise covariance.

    ``scaled`` holds :math:`G_a = \sqrt{\kappa_a}\, w_a A_a` (p, n_par, L*L). With
    :math:`h_{ak} = G_{ak} \sqrt{V_a}` and :math:`C_{ab}(\mathbf i, \mathbf j) =
    \sqrt{V_a(\mathbf i) V_b(\mathbf j)}\,\rho_{ab}(\mathbf j - \mathbf i)`, the element
    :math:`kl` is :math:`\sum_{ab}\sum_{\Delta} \rho_{ab}(\Delta)\, c_{ab,kl}(\Delta)`
    with the cross-correlation :math:`c_{ab,kl}(\Delta) = \sum_\mathbf i h_{ak}(\mathbf i)
    h_{bl}(\mathbf i + \Delta)`; by Parseval on an FFT canvas of side :math:`n \ge L + R`
    (no wrap-around for lags up to :math:`R`) it is
    :math:`n^{-2} \sum_{ab}\sum_f \overline{\hat\rho_{ab}(f)}\,
    \overline{\hat h_{ak}(f)}\, \hat h_{bl}(f)`.
    """
    rho = stamp.correlation
    assert rho is not None
    radius = rho.shape[-1] // 2
    side = stamp.side
    n_planes, n_par = scaled.shape[:2]
    n = scipy.fft.next_fast_len(max(side + radius, 2 * radius + 1))
    h = (scaled * np.sqrt(stamp.variance)[:, None, :]).reshape(n_planes, n_par, side, side)
    spectra = scipy.fft.fft2(h, s=(n, n)).reshape(n_planes, n_par, n * n)
    canvas = np.zeros((n_planes, n_planes, n, n))
    lags = np.arange(-radius, radius + 1) % n
    canvas[:, :, lags[:, None], lags[None, :]] = rho
    rho_hat = np.conj(scipy.fft.fft2(canvas)).reshape(n_planes, n_planes, n * n)
    mixed = np.einsum("abf,blf->alf", rho_hat, spectra)
    meat = np.einsum("akf,alf->kl", np.conj(spectra), mixed).real / (n * n)
    return np.asarray(0.5 * (meat + meat.T))


def _sandwich(jacobian: np.ndarray, stamp: Stamp, residuals: np.ndarray, loss: str,
              f_scale: float) -> np.ndarray:
    """Standard errors from the M-estimator sandwich; NaN for parameters without effect.

    ``jacobian`` is the model Jacobian (p, n_par, L*L); ``residuals`` the whitened residuals
    (p, L*L), 0 where invalid. The meat uses the correlated-noise covariance when the stamp
    has ``correlation``, else the independent-pixel covariance :math:`C^0`.
    """
    n_par = jacobian.shape[1]
    _, psi1 = _loss_derivatives(residuals, loss, f_scale)
    weight = stamp.weight
    bread = np.einsum("aki,ai,ali->kl", jacobian, weight * psi1, jacobian)
    spread = np.max(weight * stamp.variance, axis=1)  # lambda_a / eta_a of each plane
    if stamp.correlation is not None:  # the whitened residuals' variance
        centre = stamp.correlation.shape[-1] // 2
        spread = spread * np.diagonal(stamp.correlation[:, :, centre, centre])
    kappa = np.sqrt(_meat_factors(loss, f_scale, np.where(spread > 0, spread, 1.0)))
    scaled = jacobian * (weight * kappa[:, None])[:, None, :]
    if stamp.correlation is not None:
        meat = _correlated_meat(scaled, stamp)
    else:
        cov_planes = _plane_covariance(stamp.variance)
        meat = np.einsum("aki,abi,bli->kl", scaled, cov_planes, scaled)
    diagonal = np.diag(bread)
    active = diagonal > _INACTIVE * max(float(diagonal.max(initial=0.0)), 1e-300)
    errors = np.full(n_par, np.nan)
    if not active.any():
        return errors
    sub = np.ix_(active, active)
    try:
        inverse = np.linalg.inv(bread[sub])
    except np.linalg.LinAlgError:
        return errors
    cov = inverse @ meat[sub] @ inverse
    variances = np.diag(cov)
    errors[active] = np.where(variances > 0, np.sqrt(np.abs(variances)), np.nan)
    return errors


# ------------------------------------------------------------------------------------------
# the least-squares problem


_Evaluate = Callable[[np.ndarray, bool], tuple[np.ndarray, np.ndarray | None]]


def _solve(evaluate: _Evaluate, stamp: Stamp, start: np.ndarray, lower: np.ndarray,
           upper: np.ndarray, scale: np.ndarray, *, loss: str, f_scale: float, max_nfev: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Run least_squares; return (params, model (p, L*L), model Jacobian) or None on failure.

    ``scale`` is the typical size of each parameter (``x_scale``): fixed, rather than from
    the Jacobian, so that a lobe whose position barely matters does not take huge steps.
    """
    planes = stamp.weight > 0
    sqrt_w = np.sqrt(stamp.weight)[planes]
    observed = stamp.data[planes]

    def residuals(theta: np.ndarray) -> np.ndarray:
        model, _ = evaluate(theta, False)
        return np.asarray(sqrt_w * (observed - model[planes]))

    def jacobian(theta: np.ndarray) -> np.ndarray:
        _, jac = evaluate(theta, True)
        assert jac is not None
        return np.asarray(-sqrt_w[:, None] * np.moveaxis(jac, 1, 2)[planes])

    result = scipy.optimize.least_squares(
        residuals, start, jac=jacobian, bounds=(lower, upper), method="trf", loss=loss,
        f_scale=f_scale, x_scale=scale, max_nfev=max_nfev, ftol=_TOLERANCE, xtol=_TOLERANCE)
    if result.status <= 0 or not np.all(np.isfinite(result.x)):
        return None
    model, jac = evaluate(result.x, True)
    assert jac is not None
    return result.x, model, jac


def _chi2_difference(stamp: Stamp, model: np.ndarray) -> float:
    valid = stamp.weight[0] > 0
    resid = stamp.data[0] - model[0]
    return float(np.sum(resid[valid] ** 2 / stamp.variance[0][valid]))


def _linear_fluxes(design: np.ndarray, stamp: Stamp) -> tuple[np.ndarray, np.ndarray]:
    """Weighted linear least squares of ``data`` on ``design`` (n_lin, p, L*L): (coef, err)."""
    sqrt_w = np.sqrt(stamp.weight).ravel()
    matrix = (design.reshape(design.shape[0], -1) * sqrt_w).T
    rhs = stamp.data.ravel() * sqrt_w
    coef, *_ = np.linalg.lstsq(matrix, rhs, rcond=None)
    normal = matrix.T @ matrix
    try:
        err = np.sqrt(np.abs(np.diag(np.linalg.pinv(normal))))
    except np.linalg.LinAlgError:
        err = np.full(coef.shape, np.nan)
    return coef, err


def _position_bounds(positions: np.ndarray, reach: float,
                     box: tuple[float, float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of ``[x, y, (x, y)]``: within ``reach`` of the start and inside ``box``."""
    x_min, x_max, y_min, y_max = box
    box_lo = np.resize(np.array([x_min, y_min]), positions.size)
    box_hi = np.resize(np.array([x_max, y_max]), positions.size)
    lower = np.maximum(positions - reach, np.minimum(box_lo, positions))
    upper = np.minimum(positions + reach, np.maximum(box_hi, positions))
    return lower, upper


def _scales(errors: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Typical sizes of linear parameters: their linear-fit errors (else their values, 1)."""
    scale = np.where(np.isfinite(errors) & (errors > 0), errors, values)
    return np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)


# ------------------------------------------------------------------------------------------
# dipole


def fit_dipole(stamp: Stamp, guess_pos: tuple[float, float], guess_neg: tuple[float, float],
               *, reach: float, box: tuple[float, float, float, float], tie_fluxes: bool,
               loss: str, f_scale: float, max_nfev: int) -> DipoleSolution | None:
    """Fit the dipole model to ``stamp`` (joint or difference-only); None if the fit fails.

    Parameters
    ----------
    stamp : Stamp
        The planes of the source.
    guess_pos, guess_neg : tuple of float
        Initial ``(x, y)`` of the positive and negative lobes (image pixels).
    reach : float
        Each centroid stays within ``reach`` pixels of its guess (per axis).
    box : tuple of float
        ``(x_min, x_max, y_min, y_max)``: the centroids also stay inside the fit box, where
        the data constrain them.
    tie_fluxes : bool
        Fit one flux for both lobes.
    loss, f_scale, max_nfev
        Options of :func:`scipy.optimize.least_squares`.

    Returns
    -------
    DipoleSolution or None
    """
    n_flux = 1 if tie_fluxes else 2
    n_bg = stamp.background.shape[0] if stamp.joint else 0
    n_planes = stamp.data.shape[0]
    pixels = stamp.data.shape[1]

    lobes = stamp.lobes

    def lobe_images(index: int, xs: np.ndarray, ys: np.ndarray, derivatives: bool
                    ) -> np.ndarray:
        """Plane ``index``'s lobes at (xs, ys): (m, pixels) or (m, 3, pixels)."""
        images = lobes[index].images(xs, ys, derivatives=derivatives)
        return images.reshape(*images.shape[:-2], pixels)

    def evaluate(theta: np.ndarray, derivatives: bool
                 ) -> tuple[np.ndarray, np.ndarray | None]:
        f_pos = theta[4]
        f_neg = theta[4] if tie_fluxes else theta[5]
        # lobe images: [0] positive and [1] negative of the difference PSF, then the
        # positive lobe of the science PSF and the negative lobe of the template PSF
        # (the difference's images again where a plane shares its PSF)
        images = [*lobe_images(0, theta[[0, 2]], theta[[1, 3]], derivatives)]
        if stamp.joint:
            for plane, lobe in ((1, 0), (2, 1)):
                images.append(images[lobe] if lobes[plane] is lobes[0] else
                              lobe_images(plane, theta[[2 * lobe]], theta[[2 * lobe + 1]],
                                          derivatives)[0])
        values = [image[0] if derivatives else image for image in images]
        model = np.zeros((n_planes, pixels))
        model[0] = f_pos * values[0] - f_neg * values[1]
        if stamp.joint:
            bg = theta[4 + n_flux:] @ stamp.background
            model[1] = f_pos * values[2] + bg
            model[2] = f_neg * values[3] + bg
        if not derivatives:
            return model, None
        jac = np.zeros((n_planes, 4 + n_flux + n_bg, pixels))
        jac[0, 0:2] = f_pos * images[0][1:]
        jac[0, 2:4] = -f_neg * images[1][1:]
        if tie_fluxes:
            jac[0, 4] = values[0] - values[1]
        else:
            jac[0, 4] = values[0]
            jac[0, 5] = -values[1]
        if stamp.joint:
            jac[1, 0:2] = f_pos * images[2][1:]
            jac[2, 2:4] = f_neg * images[3][1:]
            jac[1, 4] = values[2]
            jac[2, 4 if tie_fluxes else 5] = values[3]
            jac[1, 4 + n_flux:] = stamp.background
            jac[2, 4 + n_flux:] = stamp.background
        return model, jac

    positions = np.array([guess_pos[0], guess_pos[1], guess_neg[0], guess_neg[1]], dtype=float)
    # Start values of the linear parameters: a weighted linear fit at the guessed positions.
    _, start_jac = evaluate(np.concatenate([positions, np.ones(n_flux + n_bg)]), True)
    assert start_jac is not None
    linear, linear_err = _linear_fluxes(start_jac[:, 4:, :].transpose(1, 0, 2), stamp)
    fluxes = linear[:n_flux]
    floor = np.where(np.isfinite(linear_err[:n_flux]), linear_err[:n_flux], 1.0)
    fluxes = np.maximum(np.where(np.isfinite(fluxes), fluxes, 0.0), np.maximum(floor, 1e-12))
    start = np.concatenate([positions, fluxes, np.nan_to_num(linear[n_flux:])])
    pos_lo, pos_hi = _position_bounds(positions, reach, box)
    lower = np.concatenate([pos_lo, np.zeros(n_flux), np.full(n_bg, -np.inf)])
    upper = np.concatenate([pos_hi, np.full(n_flux + n_bg, np.inf)])
    scale = np.concatenate([np.ones(4), _scales(linear_err, np.abs(linear))])
    solved = _solve(evaluate, stamp, start, lower, upper, scale, loss=loss, f_scale=f_scale,
                    max_nfev=max_nfev)
    if solved is None:
        return None
    theta, model, jac = solved
    whitened = np.sqrt(stamp.weight) * (stamp.data - model)
    errors = _sandwich(jac, stamp, whitened, loss, f_scale)
    f_neg, f_neg_err = (theta[4], errors[4]) if tie_fluxes else (theta[5], errors[5])
    params = np.array([*theta[:5], f_neg])
    errs = np.array([*errors[:5], f_neg_err])
    return DipoleSolution(params=params, errors=errs, chi2=_chi2_difference(stamp, model),
                          n_params=4 + n_flux)


# ------------------------------------------------------------------------------------------
# single PSF


def fit_single(stamp: Stamp, guesses: list[tuple[float, float]], *, reach: float,
               box: tuple[float, float, float, float], loss: str, f_scale: float,
               max_nfev: int) -> SingleSolution | None:
    """Fit one PSF of either sign to the difference plane; keep the best of two starts.

    One PSF fitted to a dipole has a local minimum on each lobe, so the fit starts from each
    guess (the positive and the negative peak, with the flux of a linear fit there) and the
    solution with the smaller plain chi-square is kept.

    Returns
    -------
    SingleSolution or None
        None if every start failed.
    """
    correlation = None if stamp.correlation is None else stamp.correlation[:1, :1]
    diff = Stamp(stamp.data[:1], stamp.variance[:1], stamp.weight[:1],
                 stamp.background[:0], stamp.lobes[:1], correlation)
    pixels = diff.data.shape[1]

    def evaluate(theta: np.ndarray, derivatives: bool
                 ) -> tuple[np.ndarray, np.ndarray | None]:
        images = diff.lobes[0].images(theta[:1], theta[1:2], derivatives=derivatives)
        images = images.reshape(*images.shape[:-2], pixels)
        lobe = images[0, 0] if derivatives else images[0]
        model = (theta[2] * lobe)[None]
        if not derivatives:
            return model, None
        jac = np.empty((1, 3, pixels))
        jac[0, 0:2] = theta[2] * images[0, 1:]
        jac[0, 2] = lobe
        return model, jac

    best: SingleSolution | None = None
    for x0, y0 in guesses:  # two starts: the positive and the negative peak
        position = np.array([x0, y0], dtype=float)
        _, start_jac = evaluate(np.array([x0, y0, 1.0]), True)
        assert start_jac is not None
        flux, flux_err = _linear_fluxes(start_jac[:, 2:, :].transpose(1, 0, 2), diff)
        start = np.array([x0, y0, float(np.nan_to_num(flux[0]))])
        pos_lo, pos_hi = _position_bounds(position, reach, box)
        lower = np.concatenate([pos_lo, [-np.inf]])
        upper = np.concatenate([pos_hi, [np.inf]])
        scale = np.concatenate([np.ones(2), _scales(flux_err, np.abs(flux))])
        solved = _solve(evaluate, diff, start, lower, upper, scale, loss=loss, f_scale=f_scale,
                        max_nfev=max_nfev)
        if solved is None:
            continue
        theta, model, _ = solved
        chi2 = _chi2_difference(diff, model)
        if best is None or chi2 < best.chi2:
            best = SingleSolution(params=theta, chi2=chi2)
    return best
