"""``skydiff subtract ... -c subtract.name=zogy --score S.fits`` on a small simulated pair.

The pair is written as skydiff multi-extension FITS exposures (image, mask, variance, PSF,
calibration) to ``tmp_path``; the command runs in this process (:func:`skydiff.cli.main`) and
its outputs are read back: the difference and the score with their planes and PSFs, the same
numbers as the API computes, and the provenance recording the zogy configuration.
"""

from __future__ import annotations

import numpy as np
import pytest

import skydiff
from skydiff.cli import main
from skydiff.io import read_exposure, read_provenance, write_exposure
from skydiff.sim import simulate_pair


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zogy_cli")
    pair = simulate_pair(shape=(192, 192), n_stars=60, flux_min=3000, flux_max=1e5, seed=61,
                         n_transients=2, science={"fwhm": 3.0}, template={"fwhm": 2.4})
    science, template = folder / "science.fits", folder / "template.fits"
    write_exposure(pair.science, science)
    write_exposure(pair.template, template)
    return pair, science, template


def test_cli_zogy_writes_difference_and_score(files, tmp_path, capsys):
    pair, science, template = files
    output, score = tmp_path / "diff.fits", tmp_path / "score.fits"
    code = main(["subtract", str(science), str(template), "-o", str(output),
                 "-c", "subtract.name=zogy", "--score", str(score), "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err == ""
    difference = read_exposure(output)
    written_score = read_exposure(score)
    assert difference.shape == written_score.shape == (192, 192)
    assert difference.psf is not None and written_score.psf is not None
    # the command line computes what the API computes on the same files
    config = skydiff.PipelineConfig()
    config.apply_overrides(["subtract.name=zogy"])
    expected = skydiff.subtract(read_exposure(science), read_exposure(template), config)
    np.testing.assert_array_equal(difference.mask, expected.difference.mask)
    np.testing.assert_allclose(difference.image, expected.difference.image, rtol=0,
                               atol=1e-5 * float(np.sqrt(np.median(difference.variance))))
    np.testing.assert_allclose(written_score.variance, expected.score.variance, rtol=1e-6)
    # the transients are the most significant pixels of S_corr = score / sqrt(variance)
    good = ~written_score.masked()
    z = np.where(good, written_score.image / np.sqrt(written_score.variance), 0.0)
    for source in pair.truth[pair.truth["kind"] == "transient"]:
        row, col = round(float(source["y"])), round(float(source["x"]))
        assert z[row - 2:row + 3, col - 2:col + 3].max() > 10
    assert np.abs(z[good]).max() < 1.5 * z.max()
    provenance = read_provenance(score)
    loaded = skydiff.PipelineConfig.load_toml(provenance.config_toml)
    assert loaded.subtract.name == "zogy"


def test_cli_zogy_without_matched_image_refuses_matched_template(files, tmp_path, capsys):
    _, science, template = files
    code = main(["subtract", str(science), str(template), "-o", str(tmp_path / "d.fits"),
                 "-c", "subtract.name=zogy", "-c", "subtract.zogy.keep_matched_image=false",
                 "--matched-template", str(tmp_path / "m.fits"), "-q"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("skydiff: error: ") and err.count("\n") == 1
    assert "matched" in err
