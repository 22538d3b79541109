"""Tests of skydiff.sim: determinism, noise model, rendering, geometry, truth, masks, lsst port.

Tolerances are statistical: for N independent unit normals the sample mean has standard error
1/sqrt(N) and the sample standard deviation 1/sqrt(2N); we allow three of those.
"""

from __future__ import annotations

import math

import attrs
import numpy as np
import pytest

from skydiff.errors import ConfigError, InputError
from skydiff.psf import GaussianPsf, ImagePsf, PolynomialPsf, psf_fwhm_from_image
from skydiff.sim import (
    STREAMS,
    EpochConfig,
    SimConfig,
    SimulatedPair,
    fwhm_at,
    make_test_image,
    render_stars,
    simulate_exposure,
    simulate_pair,
)

# Small, quiet default for most tests: no defects, moderate sky.
BASE = SimConfig(shape=(192, 224), n_stars=60)


def _chi(
    pair: SimulatedPair, epoch: str, exclude: tuple[str, ...] = ("SAT", "CR", "BAD")
) -> np.ndarray:
    exp = pair.exposure(epoch)
    good = ~exp.masked(*exclude)
    resid = exp.image.astype(np.float64) - pair.model(epoch).astype(np.float64)
    return resid[good] / np.sqrt(exp.variance[good].astype(np.float64))


def _centroid(image: np.ndarray, x: float, y: float, half: int) -> tuple[float, float]:
    """First moments in a (2 half + 1)^2 box around the nearest pixel."""
    ic, jc = round(x), round(y)
    box = image[jc - half : jc + half + 1, ic - half : ic + half + 1].astype(np.float64)
    rr, cc = np.mgrid[jc - half : jc + half + 1, ic - half : ic + half + 1]
    total = box.sum()
    return float((box * cc).sum() / total), float((box * rr).sum() / total)


def _isolated(truth, min_sep: float) -> np.ndarray:
    x = np.asarray(truth["x"])
    y = np.asarray(truth["y"])
    d = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :])
    np.fill_diagonal(d, np.inf)
    return d.min(axis=1) > min_sep


# ------------------------------------------------------------------------------------------
# determinism and streams


def test_same_seed_identical_different_seed_differs():
    cfg = BASE.evolve(
        n_transients=3, n_variables=2, n_dipoles=2, science={"n_cosmic_rays": 5, "n_bad_columns": 1}
    )
    a = simulate_pair(cfg, seed=11)
    b = simulate_pair(cfg, seed=11)
    c = simulate_pair(cfg, seed=12)
    assert a == b
    assert np.array_equal(a.science.image, b.science.image)
    assert np.array_equal(a.template.mask, b.template.mask)
    assert not np.array_equal(a.science.image, c.science.image)
    assert not np.array_equal(np.asarray(a.truth["x"]), np.asarray(c.truth["x"]))


def test_streams_are_independent_and_exposure_matches_pair():
    cfg = BASE.evolve(n_transients=4)
    with_tr = simulate_pair(cfg, seed=5)
    without = simulate_pair(cfg, seed=5, n_transients=0)
    # Transients live in the science only and in their own stream: the template is untouched.
    assert with_tr.template == without.template
    assert not np.array_equal(with_tr.science.image, without.science.image)
    # Adding cosmic rays to the science changes neither the stars nor the noise elsewhere.
    with_cr = simulate_pair(cfg, seed=5, science={"n_cosmic_rays": 3})
    clean = ~with_cr.science.masked("CR")
    assert np.array_equal(with_cr.science.image[clean], with_tr.science.image[clean])
    # One epoch alone reproduces that epoch of the pair.
    one = simulate_exposure(cfg, epoch="template", seed=5)
    assert one.exposure == with_tr.template
    assert len(STREAMS) == 8


# ------------------------------------------------------------------------------------------
# noise model


@pytest.mark.parametrize(
    ("epoch_changes", "label"),
    [
        ({"sky_level": 200.0, "gain": 2.0, "read_noise": 6.0}, "gaussian-approx"),
        ({"sky_level": 3.0, "gain": 1.5, "read_noise": 2.0}, "exact-poisson"),
        ({"sky_level": 50.0, "poisson": False, "read_noise": 4.0}, "read-only"),
    ],
)
def test_normalised_residuals_are_unit_normal(epoch_changes, label):
    cfg = SimConfig(shape=(256, 256), n_stars=80, science=epoch_changes, template=epoch_changes)
    pair = simulate_pair(cfg, seed=21)
    for epoch in ("science", "template"):
        chi = _chi(pair, epoch)
        n = chi.size
        assert abs(chi.mean()) < 3.0 / math.sqrt(n), (label, epoch)
        assert abs(chi.std() - 1.0) < 3.0 / math.sqrt(2.0 * n), (label, epoch)


def test_variance_plane_is_the_model_variance():
    ep = {"sky_level": 120.0, "gain": 2.5, "read_noise": 7.0, "sky_gradient": (20.0, -10.0)}
    pair = simulate_pair(SimConfig(shape=(64, 80), n_stars=10, science=ep), seed=2)
    expected = pair.science_model / 2.5 + (7.0 / 2.5) ** 2
    np.testing.assert_allclose(pair.science.variance, expected, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# rendering


@pytest.mark.parametrize(
    "kwargs",
    [
        {"model": "gaussian"},
        {"model": "gaussian", "integrate": True},
        {"model": "gaussian", "ellipticity": 0.3, "position_angle": 30.0},
        {"model": "gaussian", "ellipticity": 0.3, "position_angle": 30.0, "integrate": True},
        {"model": "moffat", "beta": 2.5},
        {"model": "moffat", "beta": 3.5, "ellipticity": 0.2, "integrate": True},
    ],
)
def test_flux_conservation_per_star(kwargs):
    rng = np.random.default_rng(7)
    n = 25
    x = rng.uniform(40, 60, n)
    y = rng.uniform(40, 60, n)
    flux = rng.uniform(100.0, 1e5, n)
    fwhm = rng.uniform(2.0, 6.0, n)
    sums = [
        render_stars((100, 100), [x[i]], [y[i]], [flux[i]], fwhm=fwhm[i], **kwargs).sum()
        for i in range(n)
    ]
    np.testing.assert_allclose(sums, flux, rtol=5e-3)
    # All at once (vectorised path, per-star widths): the total is conserved too.
    total = render_stars((100, 100), x, y, flux, fwhm=fwhm, **kwargs).sum(dtype=np.float64)
    assert total == pytest.approx(flux.sum(), rel=5e-3)


def test_noiseless_pair_conserves_source_flux():
    quiet = {"sky_level": 0.0, "read_noise": 0.0, "poisson": False}
    cfg = SimConfig(
        shape=(160, 160),
        n_stars=0,
        n_transients=4,
        n_variables=3,
        n_dipoles=3,
        source_margin=24.0,
        flux_scale=1.7,
        science=quiet,
        template=dict(quiet, psf_model="moffat"),
    )
    pair = simulate_pair(cfg, seed=3)
    assert np.array_equal(pair.science.image, pair.science_model)
    flux_s = pair.science_model.sum(dtype=np.float64)
    flux_t = pair.template_model.sum(dtype=np.float64)
    assert flux_s == pytest.approx(float(np.sum(pair.truth["flux_science"])), rel=5e-3)
    assert flux_t == pytest.approx(float(np.sum(pair.truth["flux_template"])), rel=5e-3)


def test_attached_psf_reproduces_rendered_star():
    # Round Gaussian -> GaussianPsf; Moffat -> ImagePsf; both exactly the rendered profile.
    cfg = BASE.evolve(template={"psf_model": "moffat", "moffat_beta": 3.0})
    pair = simulate_pair(cfg, seed=1)
    assert isinstance(pair.science.psf, GaussianPsf)
    assert isinstance(pair.template.psf, ImagePsf)
    for epoch, model in (("science", "gaussian"), ("template", "moffat")):
        kernel = pair.exposure(epoch).psf.kernel_image()
        size = kernel.shape[0]
        star = render_stars(
            (size, size),
            [size // 2],
            [size // 2],
            [1.0],
            fwhm=cfg.epoch(epoch).fwhm,
            model=model,
            beta=3.0,
        )
        np.testing.assert_allclose(star, kernel, atol=1e-6)
    assert pair.science.psf.fwhm() == pytest.approx(cfg.science.fwhm, rel=1e-9)


def test_pixel_integrated_profiles_are_broader_and_modelled_by_their_image():
    cfg = BASE.evolve(science={"pixel_integrated": True, "fwhm": 3.0})
    pair = simulate_pair(cfg, seed=6)
    psf = pair.science.psf
    assert isinstance(psf, ImagePsf)
    sigma = 3.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    # Box-convolving a Gaussian adds 1/12 px^2 to its variance.
    assert psf.fwhm() == pytest.approx(2.3548200450309493 * math.sqrt(sigma**2 + 1 / 12), rel=1e-3)
    with pytest.raises(InputError):
        render_stars((10, 10), [1.0, 2.0], [1.0], [1.0, 2.0], fwhm=2.0)
    with pytest.raises(InputError):
        render_stars((10, 10), [1.0], [1.0], [1.0], fwhm=0.0)


# ------------------------------------------------------------------------------------------
# geometry


def test_subpixel_offset_of_an_isolated_bright_star():
    dx, dy = 0.37, -0.21
    cfg = SimConfig(
        shape=(200, 200), n_stars=12, flux_min=1e6, flux_max=1e6, offset=(dx, dy), template_border=5
    )
    pair = simulate_pair(cfg, seed=4)
    truth = pair.truth
    sci_sky = pair.science.image - cfg.science.sky_level
    tmp_sky = pair.template.image - cfg.template.sky_level
    half = 12
    inside = (
        (truth["x"] > 20)
        & (truth["x"] < 180)
        & (truth["y"] > 20)
        & (truth["y"] < 180)
        & _isolated(truth, 3 * half)
    )
    assert inside.sum() >= 1
    row = truth[np.flatnonzero(inside)[0]]
    xs, ys = _centroid(sci_sky, row["x"], row["y"], half)
    xt, yt = _centroid(tmp_sky, row["x_template"], row["y_template"], half)
    b = cfg.template_border
    assert xs - (xt - b) == pytest.approx(dx, abs=0.02)
    assert ys - (yt - b) == pytest.approx(dy, abs=0.02)
    # And the centroid is the truth position.
    assert xs == pytest.approx(row["x"], abs=0.02)
    assert yt == pytest.approx(row["y_template"], abs=0.02)


def test_wcs_maps_truth_positions_to_the_same_sky():
    cfg = BASE.evolve(offset=(0.4, -0.3), template_border=7)
    pair = simulate_pair(cfg, seed=8)
    t = pair.truth
    sky_s = pair.science.wcs.pixel_to_world(np.asarray(t["x"]), np.asarray(t["y"]))
    sky_t = pair.template.wcs.pixel_to_world(
        np.asarray(t["x_template"]), np.asarray(t["y_template"])
    )
    assert sky_s.separation(sky_t).arcsec.max() < 1e-6
    assert pair.template.origin == (cfg.origin[0] - 7, cfg.origin[1] - 7)
    assert pair.template.shape == (cfg.shape[0] + 14, cfg.shape[1] + 14)


def test_spatially_varying_fwhm_matches_the_gradient():
    g = 0.2
    quiet = {
        "sky_level": 0.0,
        "read_noise": 0.0,
        "poisson": False,
        "fwhm": 4.0,
        "fwhm_gradient": (g, 0.0),
    }
    cfg = SimConfig(shape=(200, 400), n_stars=12, flux_min=1e4, flux_max=1e4, science=quiet)
    pair = simulate_pair(cfg, seed=2)
    truth = pair.truth
    ok = _isolated(truth, 36.0)
    x = np.asarray(truth["x"])
    y = np.asarray(truth["y"])
    ok &= (x > 20) & (x < 380) & (y > 20) & (y < 180)
    left = np.flatnonzero(ok & (x < 100))
    right = np.flatnonzero(ok & (x > 300))
    assert left.size and right.size
    measured = {}
    for name, idx in (("left", left[np.argmin(x[left])]), ("right", right[np.argmax(x[right])])):
        ic, jc = round(x[idx]), round(y[idx])
        stamp = pair.science_model[jc - 18 : jc + 19, ic - 18 : ic + 19]
        measured[name] = (psf_fwhm_from_image(stamp), x[idx])
    for fw, xpos in measured.values():
        expected = 4.0 * (1.0 + g * (2.0 * xpos / 399.0 - 1.0))
        assert fw == pytest.approx(expected, rel=0.05)
    (fw_l, x_l), (fw_r, x_r) = measured["left"], measured["right"]
    slope = (fw_r - fw_l) / (x_r - x_l)
    assert slope == pytest.approx(4.0 * g * 2.0 / 399.0, rel=0.05)
    # The attached polynomial PSF model follows the same gradient.
    psf = pair.science.psf
    assert isinstance(psf, PolynomialPsf)
    assert psf.fwhm(0.0, 100.0) == pytest.approx(4.0 * (1 - g), rel=0.05)
    assert psf.fwhm(399.0, 100.0) == pytest.approx(4.0 * (1 + g), rel=0.05)
    np.testing.assert_allclose(
        truth["fwhm_science"], fwhm_at(cfg, "science", truth["x"], truth["y"])
    )


# ------------------------------------------------------------------------------------------
# truth table


def test_truth_table_is_consistent():
    cfg = BASE.evolve(
        n_transients=5,
        n_variables=4,
        n_dipoles=3,
        flux_scale=1.3,
        offset=(0.25, 0.1),
        template_border=4,
        dipole_offset=(2.0, -1.0),
        variable_fraction=0.4,
    )
    pair = simulate_pair(cfg, seed=13)
    t = pair.truth
    kinds = np.asarray(t["kind"])
    assert {k: int((kinds == k).sum()) for k in ("star", "transient", "variable", "dipole")} == {
        "star": 60,
        "transient": 5,
        "variable": 4,
        "dipole": 3,
    }
    assert t["x"].unit == "pix" and t["flux_science"].unit == "adu"
    tr = t[kinds == "transient"]
    assert np.all(tr["flux_template"] == 0) and np.all(tr["flux_science"] > 0)
    st = t[kinds == "star"]
    np.testing.assert_allclose(st["flux_science"], 1.3 * st["flux_template"])
    np.testing.assert_allclose(st["x"] - (st["x_template"] - 4), 0.25)
    var = t[kinds == "variable"]
    ratio = np.asarray(var["flux_science"] / (1.3 * var["flux_template"]))
    np.testing.assert_allclose(np.abs(ratio - 1.0), 0.4)
    dip = t[kinds == "dipole"]
    np.testing.assert_allclose(dip["x"] - (dip["x_template"] - 4), 0.25 + 2.0)
    np.testing.assert_allclose(dip["y"] - (dip["y_template"] - 4), 0.1 - 1.0)
    # Transients are absent from the template: its model equals that of a pair without them.
    without = simulate_pair(cfg, seed=13, n_transients=0)
    assert np.array_equal(pair.template_model, without.template_model)
    assert not np.array_equal(pair.science_model, without.science_model)
    # Photometric calibrations carry the flux scale: same nJy in both epochs.
    assert pair.template.photo_calib.scale == pytest.approx(1.3 * pair.science.photo_calib.scale)


# ------------------------------------------------------------------------------------------
# masks


def test_saturation_masks_exactly_the_pixels_at_level():
    level = 20000.0
    cfg = BASE.evolve(
        flux_min=2e4, flux_max=2e6, science={"saturation": level}, template={"saturation": level}
    )
    pair = simulate_pair(cfg, seed=17)
    for epoch in ("science", "template"):
        exp = pair.exposure(epoch)
        sat = exp.masked("SAT")
        assert sat.any()
        assert np.array_equal(sat, exp.image >= np.float32(level))
        assert exp.image.max() == np.float32(level)
    assert pair.truth["saturated"].any()
    assert np.array_equal(
        np.asarray(pair.truth["saturated"]),
        np.asarray(pair.truth["saturated_science"] | pair.truth["saturated_template"]),
    )


def test_bleed_extends_saturation_along_columns():
    level = 20000.0
    cfg = BASE.evolve(flux_min=2e5, flux_max=2e6)
    plain = simulate_pair(cfg, seed=17, science={"saturation": level})
    bled = simulate_pair(cfg, seed=17, science={"saturation": level, "bleed": True})
    sat0 = plain.science.masked("SAT")
    sat1 = bled.science.masked("SAT")
    assert np.all(sat1[sat0]) and sat1.sum() > sat0.sum()
    # Bleeding is vertical: every saturated column of the bled image was saturated before.
    assert np.array_equal(np.flatnonzero(sat1.any(axis=0)), np.flatnonzero(sat0.any(axis=0)))
    assert np.array_equal(sat1, bled.science.image >= np.float32(level))


def test_cosmic_rays_bad_columns_and_edges_are_masked():
    cfg = BASE.evolve(
        edge_width=3,
        science={"n_cosmic_rays": 15, "n_bad_columns": 2, "cosmic_ray_flux": (500.0, 2000.0)},
    )
    pair = simulate_pair(cfg, seed=19)
    sci = pair.science
    cr = sci.masked("CR") & ~sci.masked("BAD")
    assert 15 <= sci.masked("CR").sum() <= 15 * 8
    excess = (sci.image - pair.science_model)[cr] / np.sqrt(sci.variance[cr])
    assert np.all(excess > 10.0)
    bad = sci.masked("BAD")
    bad_cols = np.flatnonzero(bad.all(axis=0))
    assert bad_cols.size == 2 and bad.sum() == 2 * cfg.shape[0]
    assert np.all(sci.image[:, bad_cols] == 0.0)
    edge = sci.masked("EDGE")
    assert edge[:3].all() and edge[:, -3:].all() and not edge[3:-3, 3:-3].any()
    # The template got none of the science's defects.
    assert not pair.template.masked("CR", "BAD").any()


# ------------------------------------------------------------------------------------------
# config


def test_config_validation_and_overrides():
    with pytest.raises(ConfigError, match="fwhm"):
        EpochConfig(fwhm=-1.0)
    with pytest.raises(ConfigError, match="fwhm_gradient"):
        EpochConfig(fwhm_gradient=(0.6, 0.5))
    with pytest.raises(ConfigError, match="sky"):
        EpochConfig(sky_level=1.0, sky_gradient=(5.0, 0.0))
    with pytest.raises(ConfigError, match="flux_min"):
        SimConfig(flux_min=10.0, flux_max=1.0)
    with pytest.raises(ConfigError, match="valid fields"):
        simulate_pair(shape=(32, 32), n_star=3)
    with pytest.raises(ConfigError, match="seed"):
        simulate_pair(shape=(32, 32), seed=-1)
    with pytest.raises(ConfigError):
        SimConfig(n_stars=True)
    cfg = SimConfig(template={"fwhm": 2.5})
    assert cfg.template.fwhm == 2.5 and cfg.template.mjd == 59000.0
    changed = cfg.evolve(template={"read_noise": 1.0})
    assert changed.template.fwhm == 2.5 and changed.template.read_noise == 1.0
    assert SimConfig.from_dict(changed.to_dict()) == changed
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        cfg.n_stars = 3


# ------------------------------------------------------------------------------------------
# lsst makeTestImage port


def test_make_test_image_follows_lsst_semantics():
    sci = make_test_image(psf_sigma=2.4, noise_level=1.0, noise_seed=6)
    tmp = make_test_image(psf_sigma=2.0, noise_level=1.0, noise_seed=7, template_border=20)
    # Same stars (positions and fluxes) in both; template grown by the border.
    np.testing.assert_allclose(sci.truth["x_parent"], tmp.truth["x_parent"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(sci.truth["y_parent"], tmp.truth["y_parent"], rtol=0, atol=1e-9)
    np.testing.assert_array_equal(sci.truth["flux"], tmp.truth["flux"])
    assert tmp.exposure.shape == (296, 296) and tmp.exposure.origin == (12345 - 20, 67890 - 20)
    assert np.all((sci.truth["flux"] >= 500) & (sci.truth["flux"] <= 1000))
    # Gaussian PSF of the given sigma, stars sum to their flux.
    assert isinstance(sci.exposure.psf, GaussianPsf) and sci.exposure.psf.sigma == 2.4
    assert sci.model.sum(dtype=np.float64) == pytest.approx(
        float(sci.truth["flux"].sum()), rel=1e-4
    )
    # White noise of the configured level (mean removed exactly), lsst variance plane.
    noise = sci.exposure.image.astype(np.float64) - sci.model
    assert abs(noise.mean()) < 1e-4
    assert noise.std() == pytest.approx(1.0, rel=0.05)
    np.testing.assert_allclose(sci.exposure.variance, np.sqrt(np.abs(sci.model)) + 1.0, rtol=1e-6)
    # Detection emulation: DETECTED on the stars, EDGE border of int(7 sigma + 0.5) pixels.
    det = sci.exposure.masked("DETECTED")
    xs = np.round(np.asarray(sci.truth["x"])).astype(int)
    ys = np.round(np.asarray(sci.truth["y"])).astype(int)
    assert det[ys, xs].all()
    edge = sci.exposure.masked("EDGE")
    w = int(7 * 2.4 + 0.5)
    assert edge[:w].all() and not edge[w:-w, w:-w].any()
    # Noise std with a different level, over undetected pixels.
    loud = make_test_image(noise_level=5.0, noise_seed=3)
    quiet = ~loud.exposure.masked("DETECTED", "EDGE")
    resid = (loud.exposure.image - loud.model)[quiet]
    assert resid.std() == pytest.approx(5.0, rel=0.05)


def test_make_test_image_background_and_calibration():
    plain = make_test_image(noise_level=1.0, detect=False)
    bg = make_test_image(noise_level=1.0, detect=False, background=[2.2, 2.1, 2.0], calibration=2.0)
    assert bg.exposure.photo_calib.scale == 2.0
    diff = bg.exposure.image * 2.0 - plain.exposure.image
    # Linear Chebyshev background: 2.2 + 2.1 u + 2.0 v over the image box.
    assert diff.mean() == pytest.approx(2.2, abs=1e-3)
    assert diff[:, -1].mean() - diff[:, 0].mean() == pytest.approx(2 * 2.1 * 255 / 256, rel=1e-3)
    np.testing.assert_allclose(bg.exposure.variance * 4.0, plain.exposure.variance, rtol=1e-6)
    with pytest.raises(ConfigError, match="Chebyshev"):
        make_test_image(background=[1.0, 2.0])
