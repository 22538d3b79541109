"""``skydiff subtract``, ``skydiff demo`` and ``skydiff bench`` end to end (issue 3, item 7-8).

The subtraction runs on a 256x256 pair written by ``skydiff sim`` (fixture ``sim_pair``), in
this process (``cli`` fixture), so that a spy on :func:`skydiff.pipeline.subtract`
(``subtract_calls``) can check what the command line handed to the algorithm and what it got
back. Errors are checked the way a user meets them: exit status 1 and exactly one line on
stderr.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from astropy.io import fits

import skydiff
from skydiff.bench import STAGES
from skydiff.io import read_catalog, read_exposure, read_provenance


def config(*overrides: str) -> skydiff.PipelineConfig:
    pipeline = skydiff.PipelineConfig()
    pipeline.apply_overrides(list(overrides))
    return pipeline


def assert_one_line_error(run: SimpleNamespace, *needles: str) -> None:
    """Exit status 1, nothing on stdout, one ``skydiff: error: ...`` line on stderr."""
    assert run.code == 1, (run.out, run.err)
    assert run.out == ""
    assert run.err.count("\n") == 1 and run.err.endswith("\n"), run.err
    assert run.err.startswith("skydiff: error: "), run.err
    for needle in needles:
        assert needle in run.err, run.err


def hdu_names(path: Path) -> list[str]:
    with fits.open(path) as hdul:
        return [hdu.name for hdu in hdul]


# ------------------------------------------------------------------------------------------
# the difference file


def test_difference_has_planes_psf_and_provenance(sim_pair, cli, subtract_calls, tmp_path,
                                                  sha256) -> None:
    output = tmp_path / "diff.fits"
    run = cli("subtract", sim_pair.science, sim_pair.template, "-o", output)
    assert run.code == 0, run.err
    assert run.err == ""
    assert re.fullmatch(rf"wrote {re.escape(str(output))}; kernel stars used: \d+; "
                        r"kernel sum: \d\.\d{4}\n", run.out), run.out

    names = hdu_names(output)
    assert names[1:5] == ["IMAGE", "MASK", "VARIANCE", "PSF"]
    difference = read_exposure(output)
    (call,) = subtract_calls
    expected = call.result.difference
    assert difference.shape == (256, 256)
    np.testing.assert_array_equal(difference.image, expected.image)
    np.testing.assert_array_equal(difference.variance, expected.variance)
    np.testing.assert_array_equal(difference.mask, expected.mask)
    assert difference.psf is not None
    np.testing.assert_allclose(difference.psf.kernel_image(128.0, 128.0),
                               expected.psf.kernel_image(128.0, 128.0), atol=1e-7)
    good = ~difference.masked()
    assert good.mean() > 0.8
    assert np.all(np.isfinite(difference.image[good]))
    assert np.all(difference.variance[good] > 0)

    provenance = read_provenance(output)
    assert provenance.skydiff_version == skydiff.__version__
    assert provenance.inputs == ((str(sim_pair.science.resolve()), sha256(sim_pair.science)),
                                 (str(sim_pair.template.resolve()), sha256(sim_pair.template)))
    # The recorded configuration is the effective one and loads back into PipelineConfig.
    loaded = skydiff.PipelineConfig.load_toml(provenance.config_toml)
    assert loaded == call.config == skydiff.PipelineConfig()
    # Plugin versions: the built-in plugins that provide the algorithms used.
    for module in ("skydiff_plugins.psfmatch", "skydiff_plugins.decorrelation",
                   "skydiff_plugins.psf_estimation"):
        assert provenance.plugins[module] == skydiff.__version__


def test_config_override_reaches_the_plugin_and_the_provenance(sim_pair, cli, subtract_calls,
                                                               tmp_path) -> None:
    output = tmp_path / "diff.fits"
    run = cli("subtract", sim_pair.science, sim_pair.template, "-o", output,
              "-c", "subtract.al.spatial_kernel_order=2", "-q")
    assert run.code == 0, run.err
    (call,) = subtract_calls
    assert call.config.subtract["al"].spatial_kernel_order == 2
    kernel = call.result.kernel
    assert kernel.order == 2
    assert kernel.spatial_images().shape[0] == 6  # 1, x, y, x², xy, y²
    provenance = read_provenance(output)
    loaded = skydiff.PipelineConfig.load_toml(provenance.config_toml)
    assert loaded == config("subtract.al.spatial_kernel_order=2")
    assert loaded.subtract["al"].spatial_kernel_order == 2


def test_config_file_and_override_are_recorded(sim_pair, cli, subtract_calls,
                                               tmp_path) -> None:
    settings = tmp_path / "pipeline.toml"
    settings.write_text('[subtract]\nname = "al"\n\n[subtract.al]\nmode = "auto"\n')
    output = tmp_path / "diff.fits"
    run = cli("subtract", sim_pair.science, sim_pair.template, "-o", output,
              "--config", settings, "-c", "subtract.al.spatial_bg_order=1", "-q")
    assert run.code == 0, run.err
    effective = config("subtract.al.mode=auto", "subtract.al.spatial_bg_order=1")
    (call,) = subtract_calls
    assert call.config == effective
    assert call.result.metadata["mode"] == "convolveTemplate"  # template sharper: 3 vs 4 px
    assert len(call.result.metadata["background_coefficients"]) == 3
    assert skydiff.PipelineConfig.load_toml(read_provenance(output).config_toml) == effective


# ------------------------------------------------------------------------------------------
# optional products


def test_matched_template_kernel_grid_and_qa(sim_pair, cli, subtract_calls, tmp_path) -> None:
    matplotlib_image = pytest.importorskip("matplotlib.image")
    output, matched, kernel, qa = (tmp_path / name for name in
                                   ("diff.fits", "matched.fits", "kernel.fits", "qa.png"))
    run = cli("subtract", sim_pair.science, sim_pair.template, "-o", output,
              "--matched-template", matched, "--kernel", kernel, "--qa", qa)
    assert run.code == 0, run.err
    assert all(path.name in run.out for path in (output, matched, kernel, qa))
    (call,) = subtract_calls
    result = call.result

    # The matched template: a full exposure, the template convolved to the science PSF and
    # flux scale. At the 20 brightest stars (windows of 13x13 px clear of transients and of
    # the border), S - M - background is noise: rms of it over sqrt(V_S + V_M) at most 2 at
    # every star, where the unmatched S - T leaves 12 sigma at the brightest.
    assert hdu_names(matched)[1:5] == ["IMAGE", "MASK", "VARIANCE", "PSF"]
    matched_exposure = read_exposure(matched)
    np.testing.assert_array_equal(matched_exposure.image, result.matched_image.image)
    truth = read_catalog(sim_pair.truth)
    stars = truth[truth["kind"] == "star"]
    transients = truth[truth["kind"] == "transient"]
    brightest = stars[np.argsort(-np.asarray(stars["flux_science"]))][:20]
    science, template = read_exposure(sim_pair.science), read_exposure(sim_pair.template)
    s_image = np.asarray(science.image, dtype=np.float64)
    residual = s_image - np.asarray(matched_exposure.image, dtype=np.float64) \
        - np.asarray(result.background, dtype=np.float64)
    noise = np.sqrt(np.asarray(science.variance, dtype=np.float64)
                    + np.asarray(matched_exposure.variance, dtype=np.float64))
    raw = s_image - np.asarray(template.image, dtype=np.float64)
    raw_noise = np.sqrt(np.asarray(science.variance, dtype=np.float64)
                        + np.asarray(template.variance, dtype=np.float64))
    matched_rms, raw_rms = [], []
    for row in brightest:
        x, y = float(row["x"]), float(row["y"])
        col, line = round(x), round(y)
        near_transient = np.any(np.hypot(transients["x"] - x, transients["y"] - y) < 10)
        if near_transient or not (12 <= col < 244 and 12 <= line < 244):
            continue
        window = (slice(line - 6, line + 7), slice(col - 6, col + 7))
        matched_rms.append(float(np.sqrt(np.mean((residual[window] / noise[window]) ** 2))))
        raw_rms.append(float(np.sqrt(np.mean((raw[window] / raw_noise[window]) ** 2))))
    assert len(matched_rms) >= 12
    assert max(matched_rms) <= 2.0, matched_rms
    assert raw_rms[0] >= 5.0

    # The kernel on a 5x5 grid: a cube plus the grid positions and sums.
    with fits.open(kernel) as hdul:
        assert [hdu.name for hdu in hdul] == ["KERNEL", "POSITIONS"]
        cube = np.array(hdul["KERNEL"].data)
        positions = np.array(hdul["POSITIONS"].data)
    size = int(result.metadata["kernel_size"])
    assert cube.shape == (25, size, size) and size % 2 == 1
    assert set(positions.dtype.names) >= {"x", "y", "sum"}
    assert sorted(set(positions["x"])) == pytest.approx([0.0, 63.75, 127.5, 191.25, 255.0])
    assert sorted(set(positions["y"])) == pytest.approx([0.0, 63.75, 127.5, 191.25, 255.0])
    np.testing.assert_allclose(cube.sum(axis=(1, 2)), positions["sum"], rtol=1e-5)
    for image, x, y in zip(cube, positions["x"], positions["y"], strict=True):
        np.testing.assert_allclose(image, result.kernel.image_at(x, y), rtol=0, atol=1e-6)
    printed = float(run.out.split("kernel sum: ")[1].split()[0])
    np.testing.assert_allclose(positions["sum"], printed, atol=1e-4)

    # The QA figure: a real PNG, landscape (kernel grid left, residual stamps right).
    assert qa.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib_image.imread(qa)
    assert pixels.ndim == 3 and pixels.shape[1] > pixels.shape[0] >= 300


def test_score_needs_an_algorithm_that_makes_one(sim_pair, cli, tmp_path) -> None:
    output, score = tmp_path / "diff.fits", tmp_path / "score.fits"
    run = cli("subtract", sim_pair.science, sim_pair.template, "-o", output, "--score", score)
    assert_one_line_error(run, "no score image", "subtract.name=al_preconvolve")
    # Nothing half-written: neither the difference nor the score.
    assert not output.exists() and not score.exists()
    assert list(tmp_path.iterdir()) == []

    run = cli("subtract", sim_pair.science, sim_pair.template, "-o", output, "--score", score,
              "-c", "subtract.name=al_preconvolve", "-q")
    assert run.code == 0, run.err
    assert hdu_names(score)[1:5] == ["IMAGE", "MASK", "VARIANCE", "PSF"]
    score_exposure = read_exposure(score)
    assert score_exposure.shape == (256, 256)
    good = ~score_exposure.masked()
    assert good.mean() > 0.8 and np.all(np.isfinite(score_exposure.image[good]))
    recorded = skydiff.PipelineConfig.load_toml(read_provenance(score).config_toml)
    assert recorded.subtract.name == "al_preconvolve"


# ------------------------------------------------------------------------------------------
# plain images with companions


@pytest.fixture(scope="module")
def plain_pair(sim_pair: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory
               ) -> SimpleNamespace:
    """The simulated pair as plain single-HDU images plus companion files.

    ``science_sigma`` is deliberately *twice* the true noise, so that the variance rescaling
    (factor 1/4) shows the companion reached the algorithm; ``template_weight`` is the true
    inverse variance; ``science_mask`` flags a 10x12 block; ``science_psf`` is the true PSF.
    """
    folder = tmp_path_factory.mktemp("plain")
    science, template = read_exposure(sim_pair.science), read_exposure(sim_pair.template)
    mask = np.zeros(science.shape, dtype=np.int16)
    mask[100:110, 40:52] = 4
    files = {
        "science": np.asarray(science.image),
        "template": np.asarray(template.image),
        "science_sigma": 2.0 * np.sqrt(np.asarray(science.variance, dtype=np.float64)),
        "template_weight": 1.0 / np.asarray(template.variance, dtype=np.float64),
        "science_mask": mask,
        "science_psf": np.asarray(science.psf.kernel_image(128.0, 128.0)),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = folder / f"{name}.fits"
        fits.PrimaryHDU(data).writeto(paths[name])
    return SimpleNamespace(folder=folder, arrays=files, true_science=science,
                           true_template=template, **paths)


def test_companions_are_honoured(plain_pair, cli, subtract_calls, tmp_path) -> None:
    p = plain_pair
    output = tmp_path / "diff.fits"
    run = cli("subtract", p.science, p.template, "-o", output,
              "--science-psf", p.science_psf, "--science-sigma", p.science_sigma,
              "--template-weight", p.template_weight, "--science-mask", p.science_mask, "-q")
    assert run.code == 0, run.err
    (call,) = subtract_calls
    science, template, result = call.science, call.template, call.result
    # What the command line built from the files:
    np.testing.assert_allclose(science.variance, p.arrays["science_sigma"] ** 2, rtol=1e-6)
    np.testing.assert_allclose(template.variance, 1.0 / p.arrays["template_weight"],
                               rtol=1e-6)
    flagged = p.arrays["science_mask"] != 0
    np.testing.assert_array_equal(science.masked("BAD"), flagged)
    psf_image = p.arrays["science_psf"]
    np.testing.assert_allclose(science.psf.kernel_image(128.0, 128.0),
                               psf_image / psf_image.sum(), atol=1e-9)
    assert template.psf is None
    # ... and what the algorithm made of it:
    meta = result.metadata
    assert meta["science_psf"] == "given"
    assert meta["template_psf"].startswith("estimated:")
    assert meta["fwhm_science"] == pytest.approx(4.0, rel=0.02)
    # The sigma map says twice the true noise: the measured-noise rescaling divides the
    # variance by ~4; the true weight map needs no correction.
    assert meta["variance_scale_science"] == pytest.approx(0.25, rel=0.10)
    assert meta["variance_scale_template"] == pytest.approx(1.0, rel=0.10)
    # The bad block is flagged in the written difference.
    written = read_exposure(output)
    assert written.masked("BAD")[flagged].all()
    assert read_provenance(output).inputs[0][0] == str(p.science.resolve())


def test_companion_files_are_recorded_in_the_provenance(plain_pair, cli, tmp_path,
                                                        sha256) -> None:
    p = plain_pair
    output = tmp_path / "diff.fits"
    run = cli("subtract", p.science, p.template, "-o", output,
              "--science-psf", p.science_psf, "--science-sigma", p.science_sigma,
              "--template-weight", p.template_weight, "--science-mask", p.science_mask, "-q")
    assert run.code == 0, run.err
    recorded = dict(read_provenance(output).inputs)
    for path in (p.science, p.template, p.science_psf, p.science_sigma, p.template_weight,
                 p.science_mask):
        assert recorded.get(str(path.resolve())) == sha256(path), path.name


# ------------------------------------------------------------------------------------------
# refusals and input errors


def test_existing_output_is_not_replaced_without_overwrite(sim_pair, cli, tmp_path) -> None:
    output = tmp_path / "diff.fits"
    output.write_bytes(b"precious")
    run = cli("subtract", sim_pair.science, sim_pair.template, "-o", output)
    assert_one_line_error(run, str(output), "--overwrite")
    assert output.read_bytes() == b"precious"
    # Also for the optional products, before any work is done.
    matched = tmp_path / "matched.fits"
    matched.write_bytes(b"also precious")
    run = cli("subtract", sim_pair.science, sim_pair.template, "-o", tmp_path / "new.fits",
              "--matched-template", matched)
    assert_one_line_error(run, str(matched), "--overwrite")
    assert matched.read_bytes() == b"also precious"
    assert not (tmp_path / "new.fits").exists()

    run = cli("subtract", sim_pair.science, sim_pair.template, "-o", output, "--overwrite",
              "-q")
    assert run.code == 0, run.err
    assert read_exposure(output).shape == (256, 256)


@pytest.mark.parametrize("option", ["-o", "--matched-template", "--kernel"])
def test_output_equal_to_an_input_is_refused(sim_pair, cli, tmp_path, sha256, option) -> None:
    science, template = tmp_path / "science.fits", tmp_path / "template.fits"
    shutil.copyfile(sim_pair.science, science)
    shutil.copyfile(sim_pair.template, template)
    before = sha256(science), sha256(template)
    args = ["subtract", science, template, "--overwrite"]
    args += ["-o", science] if option == "-o" else ["-o", tmp_path / "diff.fits", option,
                                                    template]
    run = cli(*args)
    assert_one_line_error(run, "is an input")
    assert (sha256(science), sha256(template)) == before
    assert not (tmp_path / "diff.fits").exists()


@pytest.mark.parametrize("damage", ["truncated", "not-fits", "empty", "missing"])
def test_damaged_input_is_a_one_line_error(sim_pair, cli, tmp_path, damage) -> None:
    broken = tmp_path / "science.fits"
    if damage == "truncated":
        broken.write_bytes(sim_pair.science.read_bytes()[:2880 * 4 + 1000])
    elif damage == "not-fits":
        broken.write_text("SIMPLE = this is not a FITS file\n" * 200)
    elif damage == "empty":
        broken.write_bytes(b"")
    output = tmp_path / "diff.fits"
    run = cli("subtract", broken, sim_pair.template, "-o", output)
    assert_one_line_error(run, "science.fits")
    assert not output.exists()


def test_companion_of_the_wrong_shape_is_a_one_line_error(plain_pair, cli, tmp_path) -> None:
    small = tmp_path / "small_sigma.fits"
    fits.PrimaryHDU(np.ones((100, 100), dtype=np.float32)).writeto(small)
    run = cli("subtract", plain_pair.science, plain_pair.template, "-o", tmp_path / "d.fits",
              "--science-sigma", small)
    assert_one_line_error(run, "small_sigma.fits", "(100, 100)")


# ------------------------------------------------------------------------------------------
# skydiff demo and skydiff bench


def _demo_report(out: str) -> list[tuple[float, float, float]]:
    """(true flux, measured flux, S/N) of every transient line of the demo report."""
    rows = []
    for line in out.splitlines():
        match = re.fullmatch(r"\s*\(\s*\S+,\s*\S+\)\s+(\S+) ->\s+(\S+) ±\s+\S+\s+S/N\s+(\S+)",
                             line)
        if match:
            rows.append(tuple(float(value) for value in match.groups()))
    return rows


def _check_demo_outputs(folder: Path, out: str) -> list[tuple[float, float, float]]:
    for name in ("science.fits", "template.fits", "difference.fits", "truth.ecsv"):
        assert (folder / name).is_file(), name
    truth = read_catalog(folder / "truth.ecsv")
    n_transients = int(np.sum(truth["kind"] == "transient"))
    assert "injected transients" in out
    rows = _demo_report(out)
    assert len(rows) == n_transients == 10
    summary = re.search(r"(\d+) of (\d+) transients recovered at S/N > 5", out)
    assert summary is not None and int(summary.group(2)) == n_transients
    assert int(summary.group(1)) == sum(snr > 5 for _, _, snr in rows)
    assert read_exposure(folder / "difference.fits").shape == (256, 256)
    return rows


def test_demo_at_size_256_runs_and_reports(cli, tmp_path) -> None:
    outdir = tmp_path / "demo"
    run = cli("demo", outdir, "--size", "256")
    assert run.code == 0, run.err
    _check_demo_outputs(outdir, run.out)


# Seed 2 has transients at sub-pixel offsets of ~0.4 px (the PSF must be shifted, not
# rounded); seed 3 has one 19 px from the edge (the PSF stamp must be clipped to the image).
@pytest.mark.parametrize("seed", [2, 3])
def test_demo_measures_every_transient(cli, tmp_path, seed) -> None:
    # Seeds 2 and 3 subtract cleanly; every injected transient (3000-20000 counts, S/N > 25)
    # must be measured and recovered, its flux within 5 sigma or 5 % of the truth.
    outdir = tmp_path / "demo"
    run = cli("demo", outdir, "--size", "256", "--seed", str(seed))
    assert run.code == 0, run.err
    rows = _check_demo_outputs(outdir, run.out)
    for true_flux, flux, snr in rows:
        assert np.isfinite(flux) and snr > 5, (true_flux, flux, snr)
        error = flux / snr
        assert abs(flux - true_flux) <= max(5 * error, 0.05 * true_flux), (true_flux, flux)


def test_bench_writes_the_documented_json(cli, tmp_path) -> None:
    path = tmp_path / "bench.json"
    run = cli("bench", "--size", "256", "512", "--json", path)
    assert run.code == 0, run.err
    for stage in STAGES:
        assert stage in run.out
    data = json.loads(path.read_text())
    # The keys documented in docs/api/bench.md (BenchResult.to_dict / StageResult.to_dict).
    assert sorted(data) == ["exposure_mb", "exposure_nbytes", "machine", "notes", "repeat",
                            "rfft2_s", "rfft2_samples", "seed", "size", "stages", "targets"]
    assert data["size"] == [256, 512]
    assert data["rfft2_s"] > 0
    assert data["exposure_nbytes"] == 256 * 512 * 12  # float32 image + uint32 mask + float32
    assert [stage["name"] for stage in data["stages"]] == list(STAGES)
    for stage in data["stages"]:
        assert set(stage) == {"name", "wall_s", "cpu_s", "peak_bytes", "rfft2_ratio",
                              "memory_ratio", "samples", "source", "note", "peak_mb",
                              "skipped"}
        assert stage["skipped"] is False and stage["wall_s"] > 0
        assert stage["rfft2_ratio"] == pytest.approx(stage["wall_s"] / data["rfft2_s"])
        assert stage["peak_bytes"] is not None and stage["peak_bytes"] > 0
    assert set(data["targets"]) == {"rfft2_ratio", "rfft2_target", "time_ok", "memory_ratio",
                                    "memory_target", "memory_ok"}
    assert data["targets"]["rfft2_target"] == 40 and data["targets"]["memory_target"] == 12
    # An existing JSON file is not replaced without --overwrite.
    run = cli("bench", "--size", "256", "512", "--json", path)
    assert_one_line_error(run, "--overwrite")
