"""The dipole classifiers on hand-made catalogs: rules, thresholds, missing columns, NaNs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
from astropy.table import Table

import skydiff
from skydiff_plugins.dipoles import (
    Chi2Classifier,
    Chi2ClassifierConfig,
    SnFluxRatioClassifier,
    SnFluxRatioConfig,
)
from skydiff_plugins.dipoles._classify import chi2_significance


def _sn_table(sn: list[float], pos: list[float], neg: list[float],
              flag: list[bool] | None = None) -> Table:
    n = len(sn)
    return Table({"dipole_sn": np.array(sn, dtype=float),
                  "dipole_pos_flux": np.array(pos, dtype=float),
                  "dipole_neg_flux": np.array(neg, dtype=float),
                  "dipole_fit_flag": np.array(flag or [False] * n)})


def _chi2_table(chi2dof: list[float], single: list[float], n_data: list[int],
                dof: list[int], flag: list[bool] | None = None) -> Table:
    return Table({"dipole_chi2dof": np.array(chi2dof, dtype=float),
                  "dipole_single_chi2dof": np.array(single, dtype=float),
                  "dipole_n_data": np.array(n_data, dtype=np.int64),
                  "dipole_dof": np.array(dof, dtype=np.int64),
                  "dipole_fit_flag": np.array(flag or [False] * len(chi2dof))})


# ------------------------------------------------------------------------------------------
# sn_flux_ratio


def test_sn_rule() -> None:
    threshold = 5.0 * math.sqrt(2.0)
    table = _sn_table(
        sn=[threshold + 0.01, threshold - 0.01, 50.0, 50.0, 50.0, 50.0, np.nan],
        pos=[100.0, 100.0, 650.0, 640.0, 0.5, -100.0, 100.0],
        neg=[100.0, 100.0, 350.0, 360.0, 0.5, 100.0, 100.0])
    result = SnFluxRatioClassifier().run(table)
    # rows: just above S/N; just below; lobe ratio 0.65 (not < 0.65); ratio 0.64; fluxes below
    # min_flux; negative flux counted by absolute value (balanced); NaN S/N
    assert result.flag.tolist() == [True, False, False, True, False, True, False]
    assert np.array_equal(result.score, table["dipole_sn"], equal_nan=True)
    assert result.metadata["n_dipoles"] == 3


def test_sn_rule_never_flags_failed_fits() -> None:
    table = _sn_table(sn=[100.0, 100.0], pos=[500.0, 500.0], neg=[500.0, 500.0],
                      flag=[True, False])
    assert SnFluxRatioClassifier().run(table).flag.tolist() == [False, True]


def test_sn_config() -> None:
    table = _sn_table(sn=[20.0, 20.0], pos=[700.0, 500.0], neg=[300.0, 500.0])
    strict = SnFluxRatioClassifier(SnFluxRatioConfig(min_sn=25.0))
    assert not strict.run(table).flag.any()
    loose = SnFluxRatioClassifier(SnFluxRatioConfig(max_flux_ratio=0.8))
    assert loose.run(table).flag.tolist() == [True, True]


# ------------------------------------------------------------------------------------------
# chi2


def _delta_for(k: int, p: float) -> float:
    return float(scipy.stats.chi2.isf(p, k))


@pytest.mark.parametrize("k", [2, 3])
def test_chi2_threshold(k: int) -> None:
    # n_data = 203: single dof 200, dipole dof 200 - k; the dipole chi2 is 200 - k (chi2dof
    # 1), the single chi2 is that plus Delta chi2 just above / below the 1e-3 quantile.
    threshold = _delta_for(k, 1e-3)
    n_data, dof = 203, 200 - k
    single = [(dof + threshold * f) / 200.0 for f in (1.001, 0.999)]
    table = _chi2_table([1.0, 1.0], single, [n_data] * 2, [dof] * 2)
    result = Chi2Classifier().run(table)
    assert result.flag.tolist() == [True, False]
    # The score is the Gaussian equivalent of p: Z(1e-3) = 3.09
    assert result.score[0] == pytest.approx(scipy.stats.norm.isf(1e-3), abs=0.01)


def test_chi2_rejects_bad_dipole_fits_and_failures() -> None:
    table = _chi2_table(chi2dof=[11.0, 9.0, 1.0], single=[100.0, 100.0, 100.0],
                        n_data=[300] * 3, dof=[295] * 3, flag=[False, False, True])
    result = Chi2Classifier().run(table)
    assert result.flag.tolist() == [False, True, False]  # max_chi2dof 10; failed fit
    assert np.isnan(result.score[2])
    relaxed = Chi2Classifier(Chi2ClassifierConfig(max_chi2dof=20.0)).run(table)
    assert relaxed.flag.tolist() == [True, True, False]


def test_chi2_no_improvement_scores_zero() -> None:
    table = _chi2_table(chi2dof=[1.2], single=[1.0], n_data=[300], dof=[295])
    result = Chi2Classifier().run(table)
    assert not result.flag[0]
    assert result.score[0] == 0.0


def test_chi2_false_alarm_config() -> None:
    # Delta chi2 = 12 with k = 2: p = exp(-6) = 2.5e-3
    table = _chi2_table(chi2dof=[1.0], single=[(295 + 12.0) / 297], n_data=[300], dof=[295])
    assert not Chi2Classifier().run(table).flag[0]
    loose = Chi2Classifier(Chi2ClassifierConfig(false_alarm=1e-2))
    assert loose.run(table).flag[0]


def test_chi2_significance_tail() -> None:
    # Huge Delta chi2 does not underflow: p = exp(-x/2) for k = 2 exactly, and Z ~ sqrt(x)
    delta = np.array([10.0, 1e3, 1e5, np.nan, -4.0])
    log_p, z = chi2_significance(delta, np.array([2.0, 2.0, 2.0, 2.0, 2.0]))
    assert log_p[:3] == pytest.approx(-delta[:3] / 2.0, rel=1e-9)
    assert np.all(np.diff(z[:3]) > 0)
    assert z[2] == pytest.approx(math.sqrt(1e5), rel=0.02)
    assert np.isnan(z[3]) and z[4] == 0.0


# ------------------------------------------------------------------------------------------
# common


@pytest.mark.parametrize(("classifier", "columns"), [
    (SnFluxRatioClassifier, ["dipole_sn", "dipole_neg_flux"]),
    (Chi2Classifier, ["dipole_dof", "dipole_single_chi2dof"]),
])
def test_missing_columns(classifier: type, columns: list[str]) -> None:
    table = (_sn_table([10.0], [1.0], [1.0]) if classifier is SnFluxRatioClassifier
             else _chi2_table([1.0], [2.0], [100], [95]))
    table.remove_columns(columns)
    with pytest.raises(skydiff.InputError) as info:
        classifier().run(table)
    for name in columns:
        assert name in str(info.value)


@pytest.mark.parametrize("classifier", [SnFluxRatioClassifier, Chi2Classifier])
def test_not_a_table(classifier: type) -> None:
    with pytest.raises(skydiff.InputError):
        classifier().run({"dipole_sn": [1.0]})


@pytest.mark.parametrize("classifier", [SnFluxRatioClassifier, Chi2Classifier])
def test_empty_catalog(classifier: type) -> None:
    table = (_sn_table([], [], []) if classifier is SnFluxRatioClassifier
             else _chi2_table([], [], [], []))
    result = classifier().run(table)
    assert result.flag.shape == (0,) and result.flag.dtype == bool
    assert result.score.shape == (0,)
