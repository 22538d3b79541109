"""``skydiff run``, ``skydiff detect`` and ``skydiff demo`` end to end, with the real plugins.

The pair (256x256) is simulated once per module and written to FITS: 150 stars, five
transients and three variable stars, one of them fading, all at least 36 px apart (seed 32 was
chosen for that, so no two changing sources share a footprint). ``skydiff run`` on it runs once
per module (``run_dir``); the other tests read its outputs or check the command line's
argument handling, which fails before any pixel is touched.
"""

from __future__ import annotations

import contextlib
import doctest
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from astropy import units as u

import skydiff
from skydiff.cli import main
from skydiff.io import read_catalog, read_exposure, write_catalog, write_exposure
from skydiff.pipeline import DEFAULT_METRICS, PipelineConfig
from skydiff.sim import simulate_pair

FLUX_SCALE = 0.9
OUTPUTS = {"difference.fits", "matched_template.fits", "catalog.ecsv", "sources.reg",
           "metrics.json", "qa.png", "config.toml"}


def call(*args: str | Path) -> SimpleNamespace:
    """Run ``skydiff ARGS`` in this process; return ``code``, ``out`` and ``err``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(arg) for arg in args])
    return SimpleNamespace(code=code, out=out.getvalue(), err=err.getvalue())


def assert_one_line_error(run: SimpleNamespace, *needles: str) -> None:
    assert run.code == 1, (run.out, run.err)
    assert run.err.count("\n") == 1 and run.err.startswith("skydiff: error: "), run.err
    for needle in needles:
        assert needle in run.err, run.err


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    folder = tmp_path_factory.mktemp("pair")
    pair = simulate_pair(shape=(256, 256), n_stars=150, n_transients=5,
                         transient_flux=(5000.0, 15000.0), n_variables=3,
                         variable_flux=(8000.0, 15000.0), variable_fraction=0.5,
                         offset=(0.3, -0.2), flux_scale=FLUX_SCALE, seed=32,
                         science={"fwhm": 3.5}, template={"fwhm": 2.5})
    files = SimpleNamespace(folder=folder, science=folder / "science.fits",
                            template=folder / "template.fits", truth=pair.truth)
    write_exposure(pair.science, files.science)
    write_exposure(pair.template, files.template)
    write_catalog(pair.truth, folder / "truth.ecsv")
    return files


@pytest.fixture(scope="module")
def run_dir(pair_files: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory
            ) -> SimpleNamespace:
    """``skydiff run SCIENCE TEMPLATE -o OUTDIR`` (two positionals, default pipeline)."""
    outdir = tmp_path_factory.mktemp("run") / "out"
    result = call("run", pair_files.science, pair_files.template, "-o", outdir)
    return SimpleNamespace(outdir=outdir, **vars(result))


# --------------------------------------------------------------------------------------------
# skydiff run


def test_run_writes_every_output(run_dir: SimpleNamespace) -> None:
    assert run_dir.code == 0, run_dir.err
    outdir = run_dir.outdir
    assert {path.name for path in outdir.iterdir()} == OUTPUTS  # al makes no score image
    lines = run_dir.out.splitlines()
    assert lines[0].startswith(f"wrote {outdir}: difference.fits")
    assert re.fullmatch(r"detections \(on the difference\): \d+ sources \(\d+ positive, \d+ "
                        r"negative, \d+ dipoles\) \+ 100 sky sources", lines[2]), lines[2]
    for name in DEFAULT_METRICS:
        assert any(line.startswith(f"  {name}: ") for line in lines), name

    catalog = read_catalog(outdir / "catalog.ecsv")
    assert catalog["x"].unit == u.pix and catalog["ra"].unit == u.deg
    assert all(catalog[name].description for name in catalog.colnames)
    assert np.count_nonzero(catalog["sky_source"]) == 100
    assert np.all(np.isfinite(catalog["ra"]))
    difference = read_exposure(outdir / "difference.fits")
    assert difference.shape == (256, 256) and difference.psf is not None
    assert np.count_nonzero(difference.masked("DETECTED")) > 0
    metrics = json.loads((outdir / "metrics.json").read_text())
    assert sorted(metrics["metrics"]) == sorted(DEFAULT_METRICS)
    assert metrics["errors"] == {}
    assert metrics["metrics"]["source_count"]["n_sky_sources"] == 100
    # The recorded configuration is the effective one (here: the defaults).
    assert PipelineConfig.load_toml(outdir / "config.toml") == PipelineConfig()
    regions = (outdir / "sources.reg").read_text().splitlines()
    circles = [line for line in regions if line.startswith("circle(")]
    assert len(circles) == np.count_nonzero(~catalog["sky_source"])
    first = catalog[~catalog["sky_source"]][0]
    assert circles[0].startswith(f"circle({first['x'] + 1:.3f},{first['y'] + 1:.3f},")
    assert (outdir / "qa.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_recovers_transients_and_the_fading_star(run_dir: SimpleNamespace,
                                                     pair_files: SimpleNamespace) -> None:
    # Transients of 5000-15000 ADU on a difference of sigma ~ 15 ADU/px with a 3.5 px FWHM
    # PSF have S/N ~ F / (15 sqrt(4 pi sigma^2)) = F / 79 > 60: each must be detected within
    # 1 px with S/N > 5 and a PSF flux within 5 sigma or 5 % of the truth. The variables
    # change by 50 % of 8000-15000 ADU (S/N > 25): the fading one must be a negative source,
    # the brightening ones positive.
    catalog = read_catalog(run_dir.outdir / "catalog.ecsv")
    real = catalog[~catalog["sky_source"]]
    truth = pair_files.truth
    changing = truth[(truth["kind"] == "transient") | (truth["kind"] == "variable")]
    n_fading = 0
    for source in changing:
        distance = np.hypot(real["x"] - source["x"], real["y"] - source["y"])
        row = real[int(np.argmin(distance))]
        expected = float(source["flux_science"] - FLUX_SCALE * source["flux_template"])
        assert distance.min() < 1.0, (source["kind"], source["x"], source["y"])
        assert abs(row["snr"]) > 5
        error = float(row["psf_flux_err"])
        tolerance = max(5 * error, 0.05 * abs(expected))
        if source["kind"] == "transient":
            assert abs(row["psf_flux"] - expected) <= tolerance, (expected, row["psf_flux"])
        fading = expected < 0
        n_fading += fading
        assert bool(row["is_negative"]) == fading and (row["snr"] < 0) == fading
        assert not row["is_dipole"]
    assert n_fading == 1


def test_three_positionals_read_the_pipeline_file(pair_files: SimpleNamespace,
                                                   tmp_path: Path) -> None:
    pipeline = tmp_path / "pipeline.toml"
    pipeline.write_text("[detect]\nn_sky_sources = 7\n\n[metrics]\n"
                        'names = ["source_count"]\n')
    outdir = tmp_path / "out"
    result = call("run", pipeline, pair_files.science, pair_files.template, "-o", outdir,
                  "-c", "detect.sky_source_radius=5.0", "--no-qa")
    assert result.code == 0, result.err
    assert not (outdir / "qa.png").exists()
    catalog = read_catalog(outdir / "catalog.ecsv")
    assert np.count_nonzero(catalog["sky_source"]) == 7
    metrics = json.loads((outdir / "metrics.json").read_text())
    assert list(metrics["metrics"]) == ["source_count"]
    effective = PipelineConfig.load_toml(outdir / "config.toml")
    assert effective.detect.n_sky_sources == 7 and effective.detect.sky_source_radius == 5.0
    assert effective.metrics.names == ("source_count",)


@pytest.mark.parametrize(("files", "needle"), [
    (["science.fits"], "got 1 file"),
    (["a.toml", "science.fits", "template.fits", "extra.fits"], "got 4 file"),
    (["pipeline.toml", "science.fits"], "only one image follows"),
    (["science.fits", "template.fits", "other.fits"], "looks like a FITS image"),
])
def test_positional_mistakes_are_one_line_errors(files: list[str], needle: str,
                                                 tmp_path: Path) -> None:
    result = call("run", *[tmp_path / name for name in files], "-o", tmp_path / "out")
    assert_one_line_error(result, needle)
    assert not (tmp_path / "out").exists()


def test_pipeline_file_given_twice(pair_files: SimpleNamespace, tmp_path: Path) -> None:
    pipeline = tmp_path / "p.toml"
    pipeline.write_text("")
    result = call("run", pipeline, pair_files.science, pair_files.template, "--config",
                  pipeline, "-o", tmp_path / "out")
    assert_one_line_error(result, "given twice")


def test_run_refuses_to_overwrite(run_dir: SimpleNamespace, pair_files: SimpleNamespace
                                  ) -> None:
    before = {path.name: path.stat().st_mtime_ns for path in run_dir.outdir.iterdir()}
    result = call("run", pair_files.science, pair_files.template, "-o", run_dir.outdir)
    assert_one_line_error(result, "already exists", "--overwrite")
    after = {path.name: path.stat().st_mtime_ns for path in run_dir.outdir.iterdir()}
    assert after == before


def test_bad_config_key_is_a_one_line_error(pair_files: SimpleNamespace, tmp_path: Path
                                            ) -> None:
    result = call("run", pair_files.science, pair_files.template, "-o", tmp_path / "out",
                  "-c", "detect.no_such_key=1")
    assert_one_line_error(result, "detect.no_such_key", "valid keys")
    result = call("run", pair_files.science, pair_files.template, "-o", tmp_path / "out",
                  "-c", "detect.measurement.names=[\"psf_flux\", \"bogus\"]")
    assert_one_line_error(result, "bogus", "valid names")
    assert not (tmp_path / "out").exists()


def test_bad_subtraction_writes_everything_then_fails(pair_files: SimpleNamespace,
                                                     tmp_path: Path) -> None:
    # A limit no real subtraction meets makes residual_footprint_ratio raise.
    strict = "metrics.residual_footprint_ratio.max_mean=1e-9"
    outdir = tmp_path / "bad"
    result = call("run", pair_files.science, pair_files.template, "-o", outdir, "--no-qa",
                  "-c", strict)
    assert result.code == 1
    assert result.err.count("\n") == 1 and result.err.startswith("skydiff: error: ")
    assert "FAILED: BadSubtractionError" in result.out  # the summary was printed first
    assert {path.name for path in outdir.iterdir()} == OUTPUTS - {"qa.png"}
    metrics = json.loads((outdir / "metrics.json").read_text())
    assert "BadSubtractionError" in metrics["errors"]["residual_footprint_ratio"]
    assert sorted(metrics["metrics"]) == sorted(DEFAULT_METRICS)
    lenient = call("run", pair_files.science, pair_files.template, "-o", tmp_path / "ok",
                   "--no-qa", "-c", strict, "-c", "fail_on_bad_subtraction=false")
    assert lenient.code == 0, lenient.err
    assert "FAILED: BadSubtractionError" in lenient.out


# --------------------------------------------------------------------------------------------
# skydiff detect


def test_detect_on_the_run_difference(run_dir: SimpleNamespace, pair_files: SimpleNamespace,
                                      tmp_path: Path) -> None:
    outdir = run_dir.outdir
    output = tmp_path / "sources.fits"
    regions = tmp_path / "sources.reg"
    result = call("detect", outdir / "difference.fits", "-o", output, "--science",
                  pair_files.science, "--template", outdir / "matched_template.fits",
                  "--regions", regions, "-c", "detect.n_sky_sources=10")
    assert result.code == 0, result.err
    assert re.fullmatch(rf"wrote {re.escape(str(output))}, {re.escape(str(regions))}; \d+ "
                        r"sources \(\d+ positive, \d+ negative, \d+ dipoles\) \+ 10 sky "
                        r"sources\n", result.out), result.out
    catalog = read_catalog(output)  # FITS, chosen by the suffix
    run_catalog = read_catalog(outdir / "catalog.ecsv")
    # The same difference, detected again, gives the same sources (the background was
    # already subtracted and DETECTED is reset from the new footprints).
    assert np.count_nonzero(~catalog["sky_source"]) == np.count_nonzero(
        ~run_catalog["sky_source"])
    assert np.count_nonzero(catalog["sky_source"]) == 10
    # FITS keeps units, except that a dimensionless one (the simulation has no BUNIT) is
    # written as none.
    assert catalog["x"].unit == u.pix and catalog["shape_xx"].unit == u.pix**2
    assert run_catalog["psf_flux"].unit == u.dimensionless_unscaled
    assert catalog["psf_flux"].unit in (None, u.dimensionless_unscaled)
    assert np.all(np.isfinite(catalog["forced_template_flux"][~catalog["sky_source"]]))
    assert regions.read_text().startswith("# Region file format: DS9")


def test_detect_formats_score_and_errors(run_dir: SimpleNamespace, tmp_path: Path) -> None:
    diff = run_dir.outdir / "difference.fits"
    text = tmp_path / "catalog.txt"
    result = call("detect", diff, "-o", text, "--format", "ecsv", "--score", diff,
                  "-c", "detect.n_sky_sources=0")
    assert result.code == 0, result.err
    catalog = read_catalog(text, format="ecsv")
    assert catalog.meta["detected_on"] == "score"
    assert catalog.meta["image"] == str(diff)
    assert "sky" not in result.out.split(";")[0]
    again = call("detect", diff, "-o", text)
    assert_one_line_error(again, "already exists", "--overwrite")
    unprefixed = call("detect", diff, "-o", tmp_path / "x.ecsv", "-c", "n_sky_sources=3")
    assert_one_line_error(unprefixed, "n_sky_sources", "detect")
    missing = call("detect", tmp_path / "nope.fits", "-o", tmp_path / "y.ecsv")
    assert_one_line_error(missing, "nope.fits")
    same = call("detect", diff, "-o", diff, "--overwrite")
    assert_one_line_error(same, "is an input")


def test_detect_a_plain_image_with_a_psf_file(run_dir: SimpleNamespace, tmp_path: Path
                                              ) -> None:
    from astropy.io import fits

    difference = read_exposure(run_dir.outdir / "difference.fits")
    plain, psf = tmp_path / "plain.fits", tmp_path / "psf.fits"
    fits.PrimaryHDU(np.asarray(difference.image)).writeto(plain)
    fits.PrimaryHDU(difference.psf.kernel_image(128.0, 128.0)).writeto(psf)
    without = call("detect", plain, "-o", tmp_path / "a.ecsv")
    assert_one_line_error(without, "PSF")
    result = call("detect", plain, "--psf", psf, "-o", tmp_path / "b.ecsv")
    assert result.code == 0, result.err
    catalog = read_catalog(tmp_path / "b.ecsv")
    run_catalog = read_catalog(run_dir.outdir / "catalog.ecsv")
    # Every source of the run is found again on the plain image (within 1 px).
    for row in run_catalog[~run_catalog["sky_source"]]:
        assert np.hypot(catalog["x"] - row["x"], catalog["y"] - row["y"]).min() < 1.0


# --------------------------------------------------------------------------------------------
# the Python twin and the demo


def test_run_pipeline_matches_the_command_line(run_dir: SimpleNamespace,
                                               pair_files: SimpleNamespace) -> None:
    science = read_exposure(pair_files.science)
    template = read_exposure(pair_files.template)
    result = skydiff.pipeline.run_pipeline(science, template)
    catalog = read_catalog(run_dir.outdir / "catalog.ecsv")
    assert len(result.detection.catalog) == len(catalog)
    np.testing.assert_allclose(np.asarray(result.detection.catalog["psf_flux"]),
                               np.asarray(catalog["psf_flux"]), rtol=1e-12, equal_nan=True)


def test_demo_reports_detections_against_the_truth(tmp_path: Path) -> None:
    outdir = tmp_path / "demo"
    result = call("demo", "-o", outdir, "--size", "256", "--seed", "2", "--no-qa")
    assert result.code == 0, result.err
    names = {path.name for path in outdir.iterdir()}
    assert names == (OUTPUTS - {"qa.png"}) | {"science.fits", "template.fits", "truth.ecsv"}
    summary = re.search(r"(\d+) of 10 transients recovered at S/N > 5", result.out)
    # Seed 2 has its ten transients far from each other and from the variables (each is
    # > 25 sigma): all are detected.
    assert summary is not None and summary.group(1) == "10", result.out
    assert "variable stars" in result.out and "sky sources: 100" in result.out
    both = call("demo", tmp_path / "a", "-o", tmp_path / "b", "--size", "256")
    assert_one_line_error(both, "once")


@pytest.mark.parametrize("module", ["skydiff.detect", "skydiff.pipeline", "skydiff.io.regions",
                                    "skydiff.io.metrics"])
def test_module_examples(module: str) -> None:
    """The docstring examples of the modules of this step run (with the real plugins)."""
    import importlib

    results = doctest.testmod(importlib.import_module(module),
                              optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert results.failed == 0
