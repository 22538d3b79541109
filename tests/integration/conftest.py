"""Fixtures of the integration tests: the real pairs' files, a pair written by ``skydiff sim``,
in-process ``skydiff`` runs and a spy on :func:`skydiff.pipeline.subtract`.

The data-directory fixture ``data_dir`` (``../shared/data``, skipped when absent) lives in
``tests/conftest.py``. Test modules use ``--import-mode=importlib`` and cannot import each other
or this file, so everything shared is a fixture.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import skydiff.pipeline
from skydiff.cli import main


def _existing(folder: Path, **names: str) -> SimpleNamespace:
    """A namespace of the files ``folder / name``; skips the test when one is missing."""
    paths = {key: folder / name for key, name in names.items()}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        pytest.skip(f"real data not found: {', '.join(missing)}")
    return SimpleNamespace(folder=folder, **paths)


@pytest.fixture(scope="session")
def jwst_files(data_dir: Path) -> SimpleNamespace:
    """JWST NIRCam F200W, Abell 2744: Nov 2022 (science) and June 2022 (template), one grid."""
    return _existing(
        data_dir / "jwst_nircam_a2744_f200w",
        science="science_jw02561001002-02561-o001_t003_nircam_clear-f200w_i2d_stamp.fits",
        template="template_jw01324001001-01324-o001_t001_nircam_clear-f200w_i2d_stamp.fits",
        science_psf="science_psf_webbpsf.fits",
        template_psf="template_psf_webbpsf.fits",
        science_sigma="science_noise_sigma.fits",
        template_sigma="template_noise_sigma.fits",
        sfft_snr="reference_output_sfft_decorrelated_snr.fits",
    )


@pytest.fixture(scope="session")
def decam_files(data_dir: Path) -> SimpleNamespace:
    """DECam i-band median stacks, 2018 (science, FWHM ~5.2 px) and 2016 (template, ~3.8 px)."""
    return _existing(
        data_dir / "decam_i_256_seeing",
        science="science_stack_DEC-OBS04.fits",
        template="template_stack_DEC-OBS18.fits",
        reference_kernel="reference_output_FinalMatchKernel.fits",
        reference_difference="reference_output_FinalDifference.fits",
        reference_decorrelated="reference_output_FinalDifference.DeCorr.fits",
    )


@pytest.fixture(scope="session")
def toros_files(data_dir: Path) -> SimpleNamespace:
    """TOROS: two raw uint16 60 s exposures 74 s apart (frame 004 resampled onto frame 003)."""
    return _existing(
        data_dir / "toros_eso085_030_1min",
        frame_004="aligned_eso085-030-004.fits",
        frame_005="aligned_eso085-030-005.fits",
    )


@pytest.fixture(scope="session")
def legacypipe_files(data_dir: Path) -> SimpleNamespace:
    """DECam z 41x51 cut-outs of three epochs on different CCD grids, with oow/ood/PSFEx."""
    names = {}
    for epoch, stem, ccd in (("e2014", "140818_232043", "N12"), ("e2015", "150412_073257", "N11"),
                             ("e2018", "180218_090701", "N10")):
        for kind in ("i", "w", "d"):
            names[f"{epoch}_{kind}"] = f"c4d_{stem}_oo{kind}_z_ls9.{ccd}.fits"
        names[f"{epoch}_psf"] = f"c4d_{stem}_ooi_z_ls9-{ccd}-psfex.fits"
    return _existing(data_dir / "decam_legacypipe_tiny", **names)


@pytest.fixture(scope="session")
def sha256() -> Callable[[Path], str]:
    """``sha256(path)``: the hexadecimal SHA-256 digest of a file."""
    def digest(path: Path) -> str:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return digest


@pytest.fixture(scope="session")
def manifest_sha256() -> Callable[[Path], str]:
    """``manifest_sha256(path)``: the digest the data set's ``MANIFEST.txt`` records."""
    def lookup(path: Path) -> str:
        path = Path(path)
        for line in (path.parent / "MANIFEST.txt").read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[2] == f"./{path.name}":
                return parts[1]
        pytest.fail(f"{path.name} is not listed in {path.parent / 'MANIFEST.txt'}")
    return lookup


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., SimpleNamespace]:
    """``cli(*args)`` runs ``skydiff ARGS`` in this process; returns ``code``, ``out``, ``err``."""
    def run(*args: str | Path) -> SimpleNamespace:
        capsys.readouterr()
        code = main([str(arg) for arg in args])
        out, err = capsys.readouterr()
        return SimpleNamespace(code=code, out=out, err=err)
    return run


@pytest.fixture
def subtract_calls(monkeypatch: pytest.MonkeyPatch) -> list[SimpleNamespace]:
    """Every call of :func:`skydiff.pipeline.subtract` made during the test, with its result.

    ``skydiff subtract`` imports ``subtract`` from :mod:`skydiff.pipeline` when it runs, so the
    spy sees the exposures the command line built from the files and companions, the effective
    configuration, and the result object the output files were written from.
    """
    calls: list[SimpleNamespace] = []
    real = skydiff.pipeline.subtract

    def spy(science: Any, template: Any, config: Any = None, **kwargs: Any) -> Any:
        result = real(science, template, config, **kwargs)
        calls.append(SimpleNamespace(science=science, template=template, config=config,
                                     result=result))
        return result

    monkeypatch.setattr(skydiff.pipeline, "subtract", spy)
    return calls


@pytest.fixture(scope="session")
def sim_pair(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A 256x256 pair written by ``skydiff sim`` (200 stars, 10 transients, seed 3).

    Read-only for the tests: each test writes its outputs to its own ``tmp_path``.
    """
    folder = tmp_path_factory.mktemp("sim")
    code = main(["sim", str(folder), "--shape", "256", "256", "--n-stars", "200", "--seed", "3",
                 "-q"])
    assert code == 0
    return SimpleNamespace(folder=folder, science=folder / "science.fits",
                           template=folder / "template.fits", truth=folder / "truth.ecsv")


@pytest.fixture(scope="session")
def documented_columns() -> set[str]:
    """The default catalog's columns from skydiff.CATALOG_COLUMNS, placeholders expanded."""
    config = skydiff.PipelineConfig().detect
    planes = [name.lower() for name in config.measurement["pixel_flags"].planes]
    radii = [f"{radius:g}".replace(".", "_") if "." in f"{radius:g}"
             else f"{radius:g}_0" for radius in config.measurement["aperture_flux"].radii]
    names = list(config.dipole_classifier.names)
    columns: set[str] = set()
    for column in skydiff.CATALOG_COLUMNS:
        for placeholder, values in (("<plane>", planes), ("<r>", radii), ("<name>", names)):
            if placeholder in column.name:
                columns.update(column.name.replace(placeholder, value) for value in values)
                break
        else:
            columns.add(column.name)
    return columns
