r"""Dipole classifiers: the lsst.ip.diffim S/N and flux-ratio rule, and a chi-square test.

``sn_flux_ratio``
    A source is a dipole iff it was fitted, :math:`\mathrm{S/N} > \texttt{min\_sn}` and, for
    each lobe, :math:`|F_\pm| / (|F_+| + |F_-|) < \texttt{max\_flux\_ratio}` and
    :math:`|F_\pm| \ge \texttt{min\_flux}` (lsst.ip.diffim ``DipoleFitPlugin`` classification;
    with tied fluxes the ratio is 1/2 and the rule reduces to the S/N cut). Score: the S/N.

``chi2``
    A model comparison on the difference pixels: with :math:`\chi^2_1` the best single PSF
    (3 parameters) and :math:`\chi^2_2` the dipole (:math:`k` more parameters),

    .. math::

        \Delta\chi^2 = \chi^2_1 - \chi^2_2, \qquad
        p = P\big(\chi^2_k > \Delta\chi^2\big), \qquad Z = \Phi^{-1}(1 - p),

    and a source is a dipole iff it was fitted, :math:`p < \texttt{false\_alarm}` (i.e.
    :math:`\Delta\chi^2` exceeds the :math:`\chi^2_k` quantile) and the dipole fits,
    :math:`\chi^2_2/\nu < \texttt{max\_chi2dof}`. Score: :math:`Z` (Gaussian-equivalent
    significance, 0 when the dipole does not improve on the single PSF).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.special
import scipy.stats
from astropy.table import Table

import skydiff

from ._regions import catalog_column

__all__ = ["Chi2Classifier", "Chi2ClassifierConfig", "SnFluxRatioClassifier",
           "SnFluxRatioConfig", "chi2_significance"]

#: Parameters of the single-PSF model of ``dipole_single_chi2dof``.
_SINGLE_PARAMS = 3


def _columns(catalog: Any, names: tuple[str, ...], plugin: str) -> None:
    if not isinstance(catalog, Table):
        msg = f"{plugin} needs an astropy Table, got {type(catalog).__name__}"
        raise skydiff.InputError(msg)
    missing = [name for name in names if name not in catalog.colnames]
    if missing:
        msg = (f"the catalog lacks the columns {missing} that {plugin} needs; run the "
               "dipole_fit measurement first")
        raise skydiff.InputError(msg)


def _fitted(catalog: Table) -> np.ndarray:
    return ~catalog_column(catalog, "dipole_fit_flag", True)


@skydiff.configclass
class SnFluxRatioConfig(skydiff.Config):
    """Options of the ``sn_flux_ratio`` dipole classifier (lsst.ip.diffim defaults)."""

    min_sn: float = skydiff.RangeField(
        5.0 * np.sqrt(2.0), min=0.0,
        doc="A dipole has dipole_sn above this (5 sqrt 2: each lobe at 5 sigma).")
    max_flux_ratio: float = skydiff.RangeField(
        0.65, min=0.0, max=1.0,
        doc="Each lobe carries less than this fraction of |F+| + |F-|.")
    min_flux: float = skydiff.RangeField(
        1.0, min=0.0, doc="Each lobe has at least this absolute flux (image units).")


class SnFluxRatioClassifier(skydiff.DipoleClassifier):
    r"""The lsst.ip.diffim rule: significant, balanced lobes.

    Dipole iff ``dipole_fit_flag`` is False, ``dipole_sn`` > ``min_sn`` and, for each lobe,
    :math:`|F|/(|F_+| + |F_-|)` < ``max_flux_ratio`` and :math:`|F|` ≥ ``min_flux``.
    NaN values never pass. The score is ``dipole_sn``.

    Examples
    --------
    >>> from skydiff.testing._inputs import sample_call
    >>> result = sample_call("dipole_classifier")(SnFluxRatioClassifier())
    >>> result.flag.tolist()
    [True, False, False]
    """

    name = "sn_flux_ratio"
    ConfigClass = SnFluxRatioConfig
    order = 0.0

    config: SnFluxRatioConfig

    #: Catalog columns the classifier reads.
    required = ("dipole_sn", "dipole_pos_flux", "dipole_neg_flux", "dipole_fit_flag")

    def run(self, catalog: Table) -> skydiff.ClassificationResult:
        """Classify every row of ``catalog``.

        Parameters
        ----------
        catalog : astropy.table.Table
            With ``dipole_sn``, ``dipole_pos_flux``, ``dipole_neg_flux``, ``dipole_fit_flag``.

        Returns
        -------
        skydiff.ClassificationResult
            ``flag`` (bool, one per row), ``score`` (``dipole_sn``); metadata ``n_dipoles``.

        Raises
        ------
        skydiff.InputError
            If ``catalog`` is not a Table or lacks a required column.
        """
        _columns(catalog, self.required, self.name)
        config = self.config
        sn = catalog_column(catalog, "dipole_sn", np.nan)
        pos = np.abs(catalog_column(catalog, "dipole_pos_flux", np.nan))
        neg = np.abs(catalog_column(catalog, "dipole_neg_flux", np.nan))
        total = pos + neg
        with np.errstate(invalid="ignore", divide="ignore"):
            balanced = ((pos / total < config.max_flux_ratio)
                        & (neg / total < config.max_flux_ratio))
            flag = (_fitted(catalog) & (sn > config.min_sn) & balanced
                    & (pos >= config.min_flux) & (neg >= config.min_flux))
        return skydiff.ClassificationResult(flag=flag, score=sn,
                                            metadata={"n_dipoles": int(flag.sum())})


@skydiff.configclass
class Chi2ClassifierConfig(skydiff.Config):
    """Options of the ``chi2`` dipole classifier."""

    false_alarm: float = skydiff.RangeField(
        1e-3, min=0.0, max=1.0, inclusive_min=False, inclusive_max=False,
        doc="False-alarm probability of the chi-square test: a single point source (or "
            "noise) passes with this probability if Delta chi2 follows chi2 with k = the "
            "number of extra dipole parameters (2 tied, 3 free) degrees of freedom.")
    max_chi2dof: float = skydiff.RangeField(
        10.0, min=0.0, inclusive_min=False,
        doc="A dipole's reduced chi-square (dipole_chi2dof) must be below this: the dipole "
            "must describe the difference, not just less badly than one PSF.")


def chi2_significance(delta_chi2: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""The log p-value and Gaussian-equivalent significance of :math:`\Delta\chi^2` for k dof.

    :math:`\ln p = \ln P(\chi^2_k > \Delta\chi^2)` (computed in logs so that huge values do
    not underflow; asymptotically :math:`\ln\Gamma(k/2, x/2) \approx (k/2 - 1)\ln(x/2) - x/2`)
    and :math:`Z = -\Phi^{-1}(p)`, clipped below at 0.

    Parameters
    ----------
    delta_chi2 : ndarray of shape (n,)
    k : ndarray of shape (n,)
        Degrees of freedom (> 0).

    Returns
    -------
    log_p, z : ndarray of shape (n,)
        NaN where an input is not finite.
    """
    delta = np.asarray(delta_chi2, dtype=np.float64)
    dof = np.asarray(k, dtype=np.float64)
    finite = np.isfinite(delta) & np.isfinite(dof) & (dof > 0)
    log_p = np.full(delta.shape, np.nan)
    z = np.full(delta.shape, np.nan)
    if not finite.any():
        return log_p, z
    d = np.maximum(delta[finite], 0.0)
    kk = dof[finite]
    lp = scipy.stats.chi2.logsf(d, kk)
    tail = ~np.isfinite(lp)
    if tail.any():
        half = d[tail] / 2.0
        lp[tail] = ((kk[tail] / 2.0 - 1.0) * np.log(half) - half
                    - scipy.special.gammaln(kk[tail] / 2.0))
    log_p[finite] = lp
    z[finite] = np.maximum(-scipy.special.ndtri_exp(lp), 0.0)
    return log_p, z


class Chi2Classifier(skydiff.DipoleClassifier):
    r"""Model comparison of the dipole and the single-PSF fits of the difference.

    With :math:`\nu_2` = ``dipole_dof``, :math:`n` = ``dipole_n_data``,
    :math:`\chi^2_2 = \nu_2\,` ``dipole_chi2dof``, :math:`\nu_1 = n - 3`,
    :math:`\chi^2_1 = \nu_1\,` ``dipole_single_chi2dof`` and :math:`k = \nu_1 - \nu_2` (2
    for tied fluxes, 3 for free ones), a source is a dipole iff ``dipole_fit_flag`` is False,
    :math:`\Delta\chi^2 = \chi^2_1 - \chi^2_2 > \chi^2_{k}(1 - \alpha)` (:math:`\alpha` =
    ``false_alarm``) and ``dipole_chi2dof`` < ``max_chi2dof``. The score is the
    Gaussian-equivalent significance :math:`Z = \Phi^{-1}(1 - p)` of :math:`\Delta\chi^2`
    (0 when :math:`p \ge 1/2`; NaN where not fitted).

    Both :math:`\chi^2` are plain sums over the same difference pixels. Wilks' theorem makes
    :math:`\Delta\chi^2 \sim \chi^2_k` only for nested models at interior points; here the
    dipole parameters come from the joint fit (so :math:`\Delta\chi^2` is smaller than the
    difference-only optimum: conservative), a vanishing lobe sits on the flux bound 0
    (a boundary case: conservative) and the extra lobe's position is free within the fit
    box (a look-elsewhere effect: anti-conservative). The test suite measures the resulting
    false-alarm rate on noise and isolated point sources.

    Examples
    --------
    >>> from skydiff.testing._inputs import sample_call
    >>> result = sample_call("dipole_classifier")(Chi2Classifier())
    >>> result.flag.tolist()
    [True, False, False]
    """

    name = "chi2"
    ConfigClass = Chi2ClassifierConfig
    order = 1.0

    config: Chi2ClassifierConfig

    #: Catalog columns the classifier reads.
    required = ("dipole_chi2dof", "dipole_single_chi2dof", "dipole_n_data", "dipole_dof",
                "dipole_fit_flag")

    def run(self, catalog: Table) -> skydiff.ClassificationResult:
        """Classify every row of ``catalog``.

        Parameters
        ----------
        catalog : astropy.table.Table
            With ``dipole_chi2dof``, ``dipole_single_chi2dof``, ``dipole_n_data``,
            ``dipole_dof`` and ``dipole_fit_flag``.

        Returns
        -------
        skydiff.ClassificationResult
            ``flag`` (bool, one per row), ``score`` (:math:`Z`); metadata ``n_dipoles``.

        Raises
        ------
        skydiff.InputError
            If ``catalog`` is not a Table or lacks a required column.
        """
        _columns(catalog, self.required, self.name)
        config = self.config
        n_data = catalog_column(catalog, "dipole_n_data", np.nan)
        dof = catalog_column(catalog, "dipole_dof", np.nan)
        chi2_dipole = catalog_column(catalog, "dipole_chi2dof", np.nan) * dof
        chi2_single = (catalog_column(catalog, "dipole_single_chi2dof", np.nan)
                       * (n_data - _SINGLE_PARAMS))
        extra = n_data - _SINGLE_PARAMS - dof
        fitted = _fitted(catalog) & (extra > 0)
        delta = np.where(fitted, chi2_single - chi2_dipole, np.nan)
        log_p, z = chi2_significance(delta, np.where(fitted, extra, np.nan))
        with np.errstate(invalid="ignore"):
            flag = (fitted & (log_p < np.log(config.false_alarm))
                    & (catalog_column(catalog, "dipole_chi2dof", np.nan) < config.max_chi2dof))
        return skydiff.ClassificationResult(flag=flag, score=z,
                                            metadata={"n_dipoles": int(flag.sum())})
