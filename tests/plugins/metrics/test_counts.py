"""The ``source_count`` and ``dia_fraction`` metrics on hand-made catalogs (exact numbers)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.table import Table

import skydiff
from skydiff.sim import make_test_image
from skydiff_plugins.metrics import (
    DiaFractionConfig,
    DiaFractionMetric,
    SourceCountConfig,
    SourceCountMetric,
)


def catalog(n_real: int = 7, n_sky: int = 3, negative=(1, 4), dipole=(2,),
            sky_column: bool = True) -> Table:
    """``n_real`` diaSources (rows ``negative`` negative, ``dipole`` dipoles) then sky rows."""
    n = n_real + n_sky
    table = Table({"id": np.arange(1, n + 1, dtype=np.int64),
                   "x": np.linspace(5.0, 50.0, n), "y": np.linspace(7.0, 40.0, n)})
    is_negative = np.zeros(n, dtype=bool)
    is_negative[list(negative)] = True
    is_negative[n_real:] = True  # sky rows may carry anything: they must not be counted
    table["is_negative"] = is_negative
    is_dipole = np.zeros(n, dtype=bool)
    is_dipole[list(dipole)] = True
    is_dipole[n_real:] = True
    table["is_dipole"] = is_dipole
    if sky_column:
        table["sky_source"] = np.arange(n) >= n_real
    return table


def science_sources(n: int = 20, n_sky: int = 2) -> Table:
    table = Table({"x": np.arange(n, dtype=np.float64), "y": np.arange(n, dtype=np.float64)})
    table["sky_source"] = np.arange(n) >= n - n_sky
    return table


def test_source_count_exact_and_sky_sources_excluded():
    """7 diaSources (2 negative, 1 dipole) + 3 sky rows; 20 science rows of which 2 sky."""
    inputs = skydiff.MetricInputs(catalog=catalog(), science_sources=science_sources())
    result = SourceCountMetric().run(inputs)
    assert result.values == {"n_science_sources": 18, "n_dia_sources": 7, "n_sky_sources": 3,
                             "n_positive": 5, "n_negative": 2, "n_dipoles": 1}
    assert result.metadata["science_sources_from"] == "science_sources"
    assert result.metadata["notes"] == []


def test_dia_fraction_exact():
    """7 diaSources over 18 science sources, sky rows of both tables ignored."""
    inputs = skydiff.MetricInputs(catalog=catalog(), science_sources=science_sources())
    result = DiaFractionMetric().run(inputs)
    assert result.values["dia_fraction"] == 7 / 18
    assert result.values["n_dia_sources"] == 7
    assert result.values["n_science_sources"] == 18
    assert result.metadata["notes"] == []


def test_catalog_without_sky_column_counts_every_row():
    table = catalog(n_real=5, n_sky=0, negative=(0,), dipole=(), sky_column=False)
    result = SourceCountMetric().run(skydiff.MetricInputs(catalog=table))
    assert result.values["n_dia_sources"] == 5
    assert result.values["n_sky_sources"] == 0
    assert (result.values["n_positive"], result.values["n_negative"]) == (4, 1)
    assert result.values["n_dipoles"] == 0


def test_missing_columns_and_inputs_give_nan_with_notes():
    """No is_negative / is_dipole, no science input: NaN counts, each with a note."""
    table = Table({"x": [1.0, 2.0], "y": [3.0, 4.0], "sky_source": [False, True]})
    result = SourceCountMetric().run(skydiff.MetricInputs(catalog=table))
    values = result.values
    assert values["n_dia_sources"] == 1 and values["n_sky_sources"] == 1
    for key in ("n_science_sources", "n_positive", "n_negative", "n_dipoles"):
        assert math.isnan(values[key]), key
    notes = " ".join(result.metadata["notes"])
    assert "is_negative" in notes and "is_dipole" in notes and "n_science_sources" in notes
    empty = SourceCountMetric().run(skydiff.MetricInputs())
    assert all(math.isnan(v) for v in empty.values.values())


def test_dia_fraction_nan_without_science_sources():
    """Zero science sources (only sky rows) → NaN with a note; no catalog → NaN too."""
    inputs = skydiff.MetricInputs(catalog=catalog(), science_sources=science_sources(3, 3))
    result = DiaFractionMetric().run(inputs)
    assert result.values["n_science_sources"] == 0
    assert math.isnan(result.values["dia_fraction"])
    assert any("no science sources" in note for note in result.metadata["notes"])
    no_catalog = DiaFractionMetric().run(skydiff.MetricInputs(science_sources=science_sources()))
    assert math.isnan(no_catalog.values["dia_fraction"])
    assert no_catalog.values["n_science_sources"] == 18
    assert not any("dipole" in note for note in no_catalog.metadata["notes"])


def test_dia_fraction_zero_when_catalog_has_only_sky_sources():
    inputs = skydiff.MetricInputs(catalog=catalog(n_real=0, n_sky=4, negative=(), dipole=()),
                                  science_sources=science_sources(10, 0))
    assert DiaFractionMetric().run(inputs).values["dia_fraction"] == 0.0


@pytest.fixture(scope="module")
def star_image():
    """makeTestImage: 20 stars of flux 500-1000, σ_PSF 2, noise 1 (matched-filter S/N ≥ 33)."""
    return make_test_image(psf_sigma=2.0, noise_level=1.0, flux_level=500.0, n_src=20)


def test_science_sources_found_on_the_science_image(star_image):
    """Without science_sources, find_stars at the threshold counts the 20 planted stars.

    Every star has matched-filter S/N ≥ 33 and they are ≥ 10.6 px (2.2 FWHM) apart, so all 20
    are found at S/N 5; at S/N 50 only the brighter part of the flux range remains.
    """
    science = star_image.exposure
    inputs = skydiff.MetricInputs(science=science, catalog=catalog())
    result = SourceCountMetric().run(inputs)
    assert result.values["n_science_sources"] == 20
    assert result.metadata["science_sources_from"] == "find_stars"
    config = DiaFractionConfig()
    config.update(detection_threshold=50.0)
    strict = DiaFractionMetric(config).run(inputs)
    assert 0 < strict.values["n_science_sources"] < 20
    assert strict.values["dia_fraction"] == 7 / strict.values["n_science_sources"]


def test_wrong_input_types_raise_input_error():
    science = skydiff.Exposure.from_arrays(np.zeros((20, 20)), variance=np.ones((20, 20)))
    for metric in (SourceCountMetric(), DiaFractionMetric()):
        with pytest.raises(skydiff.InputError, match="catalog"):
            metric.run(skydiff.MetricInputs(catalog=np.zeros((3, 3))))  # type: ignore[arg-type]
        with pytest.raises(skydiff.InputError, match="science"):
            metric.run(skydiff.MetricInputs(science=np.zeros((20, 20))))  # type: ignore[arg-type]
        with pytest.raises(skydiff.InputError, match="MetricInputs"):
            metric.run({"catalog": catalog()})  # type: ignore[arg-type]
        small = science.cutout(slice(0, 10), slice(0, 10))
        with pytest.raises(skydiff.InputError, match="pixel grid"):
            metric.run(skydiff.MetricInputs(science=science, difference=small))


def test_inputs_are_not_modified():
    table, sources = catalog(), science_sources()
    before = (table.copy(), sources.copy())
    SourceCountMetric(SourceCountConfig()).run(
        skydiff.MetricInputs(catalog=table, science_sources=sources))
    assert table.colnames == before[0].colnames and all(table == before[0])
    assert sources.colnames == before[1].colnames and all(sources == before[1])
