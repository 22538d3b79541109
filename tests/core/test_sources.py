"""Tests of skydiff.sources: star detection and measurement against simulator truth."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from astropy.table import Table
from scipy import ndimage
from scipy.spatial import cKDTree

import skydiff
from skydiff.errors import InputError
from skydiff.psf import FWHM_PER_SIGMA
from skydiff.sim import SimulatedPair, simulate_pair
from skydiff.sources import SOURCE_COLUMNS, find_stars, measure_stars

FWHM = 4.0
SHAPE = (768, 768)


@functools.cache
def _pair(psf_model: str = "gaussian") -> SimulatedPair:
    """A star field with cosmic rays, bad columns and saturated stars (cached, read-only)."""
    return simulate_pair(shape=SHAPE, n_stars=700, seed=21, flux_min=500.0, flux_max=5e5,
                         origin=(100, 200),
                         science={"fwhm": FWHM, "psf_model": psf_model, "n_cosmic_rays": 25,
                                  "n_bad_columns": 2, "saturation": 4000.0, "bleed": True})


@functools.cache
def _stars(psf_model: str = "gaussian") -> Table:
    return find_stars(_pair(psf_model).science)


def _truth_snr(pair: SimulatedPair) -> np.ndarray:
    """Optimal (PSF) S/N of every truth star for a Gaussian PSF: F / sqrt(V_sky NEA)."""
    sigma = np.asarray(pair.truth["fwhm_science"]) / FWHM_PER_SIGMA
    nea = 4.0 * math.pi * sigma**2
    return np.asarray(pair.truth["flux_science"]) / np.sqrt(np.median(pair.science.variance)
                                                             * nea)


def _clean_isolated_truth(pair: SimulatedPair, min_snr: float) -> np.ndarray:
    """Truth stars with S/N > min_snr, no other star within 2.5 FWHM, no defect nearby."""
    truth = pair.truth
    x, y = np.asarray(truth["x"]), np.asarray(truth["y"])
    xy = np.column_stack([x, y])
    neighbours = cKDTree(xy).query_ball_point(xy, 2.5 * FWHM, return_length=True)
    defects = ndimage.maximum_filter(pair.science.masked("BAD", "CR", "SAT"), size=17)
    rows = np.clip(np.rint(y).astype(int), 0, SHAPE[0] - 1)
    cols = np.clip(np.rint(x).astype(int), 0, SHAPE[1] - 1)
    inside = (x > 8) & (x < SHAPE[1] - 9) & (y > 8) & (y < SHAPE[0] - 9)
    return ((_truth_snr(pair) > min_snr) & (np.asarray(neighbours) == 1) & inside
            & ~defects[rows, cols])


def _match(stars: Table, pair: SimulatedPair, selection: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    """Distance to, and index of, the nearest detection of every selected truth star."""
    tree = cKDTree(np.column_stack([np.asarray(stars["x"]), np.asarray(stars["y"])]))
    truth = pair.truth[selection]
    return tree.query(np.column_stack([np.asarray(truth["x"]), np.asarray(truth["y"])]))


# ------------------------------------------------------------------------------------------
# table structure


def test_columns_units_order_and_meta() -> None:
    stars = _stars()
    assert tuple(stars.colnames) == SOURCE_COLUMNS
    assert str(stars["x"].unit) == "pix" and str(stars["ixx"].unit) == "pix2"
    snr = np.asarray(stars["snr"])
    assert np.all(np.diff(snr) <= 0)
    np.testing.assert_array_equal(stars["id"], np.arange(1, len(stars) + 1))
    assert stars.meta["x0"] == 100 and stars.meta["y0"] == 200
    assert stars.meta["fwhm"] == pytest.approx(FWHM)
    # x, y are array coordinates (column, row): the light is centred at image[y, x]
    bright = stars[~np.asarray(stars["masked"])][:5]
    image = np.asarray(_pair().science.image, dtype=np.float64) - 100.0
    offsets = np.arange(-3, 4)
    for row in bright:
        r, c = round(float(row["y"])), round(float(row["x"]))
        window = image[r - 3:r + 4, c - 3:c + 4]
        assert (window.sum(axis=0) @ offsets) / window.sum() + c == pytest.approx(row["x"],
                                                                                   abs=0.3)
        assert (window.sum(axis=1) @ offsets) / window.sum() + r == pytest.approx(row["y"],
                                                                                   abs=0.3)


def test_facade_exports() -> None:
    for name in ("find_stars", "measure_stars", "SOURCE_COLUMNS", "DEFAULT_BAD_PLANES"):
        assert getattr(skydiff, name) is getattr(skydiff.sources, name)


# ------------------------------------------------------------------------------------------
# accuracy against truth


def test_completeness_of_isolated_stars_above_snr_20() -> None:
    pair = _pair()
    selection = _clean_isolated_truth(pair, 20.0)
    assert selection.sum() > 100
    distance, _ = _match(_stars(), pair, selection)
    assert np.mean(distance < 0.5) >= 0.99


def test_purity_above_snr_20_and_cosmic_rays_are_masked() -> None:
    pair = _pair()
    stars = _stars()
    clean = stars[(np.asarray(stars["snr"]) > 20) & ~np.asarray(stars["masked"])]
    truth_xy = np.column_stack([np.asarray(pair.truth["x"]), np.asarray(pair.truth["y"])])
    distance, _ = cKDTree(truth_xy).query(np.column_stack([clean["x"], clean["y"]]))
    assert np.mean(distance < 1.0) >= 0.98
    # no unmasked source sits on a cosmic ray
    cosmic = pair.science.masked("CR")
    assert cosmic.any()
    near_cr = ndimage.maximum_filter(cosmic, size=5)
    rows = np.rint(np.asarray(stars["y"])).astype(int)
    cols = np.rint(np.asarray(stars["x"])).astype(int)
    on_cr = near_cr[rows, cols]
    assert on_cr.any()
    assert np.all(np.asarray(stars["masked"])[on_cr])


def test_centroids_at_high_snr() -> None:
    pair = _pair()
    selection = _clean_isolated_truth(pair, 200.0)
    distance, index = _match(_stars(), pair, selection)
    assert selection.sum() >= 10 and np.all(distance < 0.5)
    stars = _stars()[index]
    truth = pair.truth[selection]
    keep = ~np.asarray(stars["saturated"])
    dx = (np.asarray(stars["x"]) - np.asarray(truth["x"]))[keep]
    dy = (np.asarray(stars["y"]) - np.asarray(truth["y"]))[keep]
    assert np.sqrt(np.mean(dx**2)) < 0.05
    assert np.sqrt(np.mean(dy**2)) < 0.05


@pytest.mark.parametrize("psf_model", ["gaussian", "moffat"])
def test_flux_and_fwhm_of_isolated_stars(psf_model: str) -> None:
    pair = _pair(psf_model)
    stars = _stars(psf_model)
    selection = _clean_isolated_truth(pair, 100.0)
    distance, index = _match(stars, pair, selection)
    matched = stars[index[distance < 0.5]]
    truth = pair.truth[selection][distance < 0.5]
    good = ~np.asarray(matched["masked"])
    assert good.sum() > 30
    ratio = (np.asarray(matched["flux"]) / np.asarray(truth["flux_science"]))[good]
    relative_error = (np.asarray(matched["flux_err"]) / np.asarray(matched["flux"]))[good]
    assert abs(np.median(ratio) - 1.0) < 0.01
    # every star within 2 % of its truth flux, beyond its own 3σ photon noise
    assert np.all(np.abs(ratio - 1.0) < 0.02 + 3.0 * relative_error)
    pull = ((np.asarray(matched["flux"]) - np.asarray(truth["flux_science"]))
            / np.asarray(matched["flux_err"]))[good]
    assert 0.7 < np.std(pull) < 1.5
    # per-star FWHM against the simulator's PSF model (adaptive-moment FWHM, like the stars)
    psf = pair.science.psf
    assert psf is not None
    expected = np.array([psf.fwhm(x + 100, y + 200)
                         for x, y in zip(truth["x"][good], truth["y"][good], strict=True)])
    fwhm_ratio = np.asarray(matched["fwhm"])[good] / expected
    assert np.all(np.abs(fwhm_ratio - 1.0) < 0.05)


def test_saturated_and_masked_flags() -> None:
    pair = _pair()
    stars = _stars()
    saturated_truth = np.asarray(pair.truth["saturated_science"])
    assert saturated_truth.sum() >= 3
    distance, index = _match(stars, pair, saturated_truth)
    found = index[distance < 2.0]
    assert found.size >= 3
    assert np.all(stars["saturated"][found]) and np.all(stars["masked"][found])
    # recompute the flags independently from the mask plane on the measurement stamps
    half = math.ceil(1.5 * FWHM) + 1
    science = pair.science
    bad = science.masked(*skydiff.DEFAULT_BAD_PLANES)
    sat = science.masked("SAT")
    footprint = np.ones((2 * half + 1, 2 * half + 1))
    bad_near = ndimage.maximum_filter(bad, footprint=footprint, mode="constant")
    sat_near = ndimage.maximum_filter(sat, footprint=footprint, mode="constant")
    # the stamp is centred on the peak pixel, which is within 1 px of the centroid; compare
    # only sources whose flags cannot change within that pixel
    rows = np.rint(np.asarray(stars["y"])).astype(int)
    cols = np.rint(np.asarray(stars["x"])).astype(int)
    stable = (ndimage.minimum_filter(bad_near, size=3)[rows, cols]
              == ndimage.maximum_filter(bad_near, size=3)[rows, cols])
    assert stable.mean() > 0.8
    np.testing.assert_array_equal(np.asarray(stars["masked"])[stable],
                                  bad_near[rows, cols][stable])
    stable_sat = (ndimage.minimum_filter(sat_near, size=3)[rows, cols]
                  == ndimage.maximum_filter(sat_near, size=3)[rows, cols])
    np.testing.assert_array_equal(np.asarray(stars["saturated"])[stable_sat],
                                  sat_near[rows, cols][stable_sat])


def test_isolation_and_edge_distance() -> None:
    stars = _stars()
    xy = np.column_stack([np.asarray(stars["x"]), np.asarray(stars["y"])])
    counts = cKDTree(xy).query_ball_point(xy, 2.5 * FWHM - 1.5, return_length=True)
    # a source with another *reported* source well inside the radius is never isolated
    assert not np.any(np.asarray(stars["isolated"])[np.asarray(counts) > 1])
    x, y = xy.T
    expected = np.minimum(np.minimum(x, y), np.minimum(SHAPE[1] - 1 - x, SHAPE[0] - 1 - y))
    np.testing.assert_allclose(np.asarray(stars["edge_distance"]), expected)


def test_fwhm_is_estimated_without_a_psf() -> None:
    science = _pair().science.evolve(psf=None)
    stars = find_stars(science, threshold=10.0)
    assert stars.meta["fwhm"] == pytest.approx(FWHM, rel=0.05)
    assert len(stars) > 100


def test_options_max_sources_border_and_threshold() -> None:
    science = _pair().science
    stars = _stars()
    top = find_stars(science, max_sources=10)
    assert len(top) == 10
    assert np.all(np.asarray(top["snr"]) > np.median(np.asarray(stars["snr"])))
    bordered = find_stars(science, border=50)
    assert len(bordered) < len(stars)
    assert np.all(np.asarray(bordered["edge_distance"]) > 48)
    assert len(find_stars(science, threshold=20.0)) < len(stars)
    fixed = find_stars(science.evolve(psf=None), fwhm=FWHM)
    assert len(fixed) == len(stars)


def test_background_none_on_a_sky_subtracted_image() -> None:
    pair = simulate_pair(shape=(256, 256), n_stars=60, seed=3, flux_min=3000.0,
                         science={"fwhm": 3.0, "subtract_sky": True})
    with_mesh = find_stars(pair.science)
    without = find_stars(pair.science, background="none")
    assert abs(len(with_mesh) - len(without)) <= 2
    assert np.median(np.asarray(without["flux"][:20]) / np.asarray(with_mesh["flux"][:20])) \
        == pytest.approx(1.0, abs=0.02)


def test_max_per_cell_measures_the_best_detections_of_every_cell() -> None:
    science = _pair().science
    stars = _stars()
    cell = 128
    thinned = find_stars(science, max_per_cell=3, cell_size=cell)
    rows = np.rint(np.asarray(thinned["y"])).astype(int)
    cols = np.rint(np.asarray(thinned["x"])).astype(int)
    ids = (rows // cell) * 100 + cols // cell
    assert np.bincount(np.unique(ids, return_inverse=True)[1]).max() <= 3
    assert 3 * 16 * 0.8 < len(thinned) <= 3 * 36  # nearly every 128-pixel cell holds three
    # every kept source is a detection of the full run, and the clean isolated ones come first
    tree = cKDTree(np.column_stack([np.asarray(stars["x"]), np.asarray(stars["y"])]))
    distance, index = tree.query(np.column_stack([np.asarray(thinned["x"]),
                                                  np.asarray(thinned["y"])]))
    assert np.all(distance < 0.5)
    usable = np.asarray(stars["isolated"]) & ~np.asarray(stars["masked"])
    s_rows = np.rint(np.asarray(stars["y"])).astype(int)
    s_cols = np.rint(np.asarray(stars["x"])).astype(int)
    s_ids = (s_rows // cell) * 100 + s_cols // cell
    for cell_id in np.unique(ids):
        kept = index[ids == cell_id]
        offered = np.flatnonzero((s_ids == cell_id) & usable)
        expected = min(3, offered.size)
        assert np.sum(usable[kept]) == expected
        # the brightest usable sources of the cell (S/N as a proxy for the detection order)
        best = offered[np.argsort(-np.asarray(stars["snr"])[offered])][:expected]
        assert len(set(best) & set(kept)) >= expected - 1
    # the measurements themselves do not depend on the thinning
    ratio = np.asarray(thinned["flux"]) / np.asarray(stars["flux"])[index]
    assert np.median(np.abs(ratio - 1.0)) < 0.01


def test_results_do_not_depend_on_the_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """The matched filter, the meshes and the measurements run in threads, one per CPU:
    a single thread (OMP_NUM_THREADS=1) gives the same table."""
    science = _pair().science
    parallel = find_stars(science, max_per_cell=4)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    serial = find_stars(science, max_per_cell=4)
    assert len(serial) == len(parallel)
    for name in ("x", "y", "flux", "snr", "fwhm"):
        np.testing.assert_allclose(np.asarray(serial[name]), np.asarray(parallel[name]),
                                   rtol=1e-5, equal_nan=True, err_msg=name)


def test_local_maxima_matches_a_padded_reference() -> None:
    from skydiff.sources import _local_maxima

    rng = np.random.default_rng(17)
    image = rng.integers(0, 4, (40, 57)).astype(np.float32)  # many ties and plateaus
    image[0, :] = rng.integers(0, 6, 57)  # peaks on the border rows and columns
    image[:, -1] = rng.integers(0, 6, 40)
    candidates = np.flatnonzero(image > 0)
    padded = np.pad(image, 1, constant_values=-np.inf)
    rows, cols = np.divmod(candidates, image.shape[1])
    keep = np.ones(candidates.size, dtype=bool)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            if dr == 0 and dc == 0:
                continue
            neighbour = padded[rows + 1 + dr, cols + 1 + dc]
            earlier = dr < 0 or (dr == 0 and dc < 0)
            keep &= (image[rows, cols] > neighbour) if earlier else (
                image[rows, cols] >= neighbour)
    np.testing.assert_array_equal(_local_maxima(image, candidates), candidates[keep])
    view = np.zeros((50, 70), np.float32)[3:43, 5:62]  # a strided view, as the smoothed plane
    view[...] = image
    np.testing.assert_array_equal(_local_maxima(view, candidates), candidates[keep])


# ------------------------------------------------------------------------------------------
# measure_stars


def test_measure_stars_at_truth_positions() -> None:
    pair = _pair()
    selection = _clean_isolated_truth(pair, 100.0)
    truth = pair.truth[selection]
    table = measure_stars(pair.science, truth["x"], truth["y"])
    assert tuple(table.colnames) == SOURCE_COLUMNS
    assert len(table) == len(truth)
    np.testing.assert_array_equal(table["id"], np.arange(1, len(truth) + 1))  # input order
    offset = np.hypot(np.asarray(table["x"]) - np.asarray(truth["x"]),
                      np.asarray(table["y"]) - np.asarray(truth["y"]))
    assert np.median(offset) < 0.05
    ratio = np.asarray(table["flux"]) / np.asarray(truth["flux_science"])
    assert np.median(ratio) == pytest.approx(1.0, abs=0.02)


def test_measure_stars_errors_and_empty_input() -> None:
    science = _pair().science
    with pytest.raises(InputError):
        measure_stars(science, [10.0, 20.0], [10.0])
    with pytest.raises(InputError):
        measure_stars(science, [-5.0], [10.0])
    with pytest.raises(InputError):
        measure_stars(science, [np.nan], [10.0])
    with pytest.raises(InputError):
        measure_stars(np.zeros((5, 5)), [1.0], [1.0])  # type: ignore[arg-type]
    empty = measure_stars(science, [], [])
    assert len(empty) == 0 and tuple(empty.colnames) == SOURCE_COLUMNS


# ------------------------------------------------------------------------------------------
# edge cases


def test_empty_field_gives_an_empty_table() -> None:
    rng = np.random.default_rng(8)
    noise = skydiff.Exposure(rng.normal(0.0, 1.0, (128, 128)), variance=np.ones((128, 128)))
    stars = find_stars(noise, fwhm=3.0, threshold=8.0)
    assert len(stars) == 0
    assert tuple(stars.colnames) == SOURCE_COLUMNS
    flat = skydiff.Exposure(np.zeros((64, 64)), variance=np.ones((64, 64)))
    assert len(find_stars(flat)) == 0


def test_no_finite_pixel_raises() -> None:
    nan = skydiff.Exposure(np.full((32, 32), np.nan), variance=np.ones((32, 32)))
    with pytest.raises(InputError):
        find_stars(nan, fwhm=3.0)
    with pytest.raises(InputError):
        find_stars(np.zeros((32, 32)))  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [
    {"threshold": -1.0}, {"fwhm": 0.0}, {"background": "median"}, {"border": -1},
    {"max_sources": -2}, {"bad_planes": "BAD"}, {"isolation_radius": 0.0},
    {"max_per_cell": 0}, {"max_per_cell": 2, "cell_size": 0}, {"max_per_cell": 1.5},
])
def test_invalid_options(kwargs: dict) -> None:
    science = simulate_pair(shape=(64, 64), n_stars=5, seed=1).science.evolve(psf=None)
    with pytest.raises(InputError):
        find_stars(science, **kwargs)


def test_missing_variance_and_non_finite_pixels() -> None:
    pair = simulate_pair(shape=(128, 128), n_stars=20, seed=9, flux_min=5000.0)
    image = np.array(pair.science.image)
    image[10:20, 10:20] = np.nan
    exposure = skydiff.Exposure(image, variance=np.zeros(image.shape), psf=pair.science.psf)
    stars = find_stars(exposure)
    assert len(stars) >= 10
    assert np.all(np.isfinite(np.asarray(stars["flux"])))
    near_hole = ((np.asarray(stars["x"]) < 26) & (np.asarray(stars["y"]) < 26)
                 & (np.asarray(stars["x"]) > 4) & (np.asarray(stars["y"]) > 4))
    assert np.all(np.asarray(stars["masked"])[near_hole])
