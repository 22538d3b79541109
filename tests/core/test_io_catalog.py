"""Tests of skydiff.io catalogs: ECSV (default), FITS and Parquet, written atomically."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import astropy.units as u
import numpy as np
import pytest
from astropy.table import QTable, Table

import skydiff.io.catalog as catalog_module
from skydiff.errors import InputError
from skydiff.io import read_catalog, write_catalog


def make_catalog(seed: int) -> Table:
    rng = np.random.default_rng(seed)
    n = 25
    table = Table()
    table["id"] = np.arange(n, dtype=np.int64)
    table["x"] = rng.uniform(0, 100, n).astype(np.float32)
    table["y"] = rng.uniform(0, 100, n)
    table["psf_flux"] = rng.normal(1000.0, 50.0, n) * u.nJy
    table["psf_flux"].description = "PSF flux"
    table["is_dipole"] = rng.random(n) > 0.5
    table["band"] = ["g", "r", "i", "z", "y"] * 5
    table.meta["visit"] = 1234
    table.meta["algorithm"] = "al"
    return table


def assert_tables_equal(read: Table, expected: Table) -> None:
    assert read.colnames == expected.colnames
    for name in expected.colnames:
        np.testing.assert_array_equal(np.asarray(read[name]), np.asarray(expected[name]))
        assert read[name].unit == expected[name].unit, name
    assert read["x"].dtype == np.dtype(np.float32)  # native byte order, even from FITS


@pytest.mark.parametrize("suffix", [".ecsv", ".fits", ".dat"])
def test_round_trip(tmp_path: Path, suffix: str) -> None:
    table = make_catalog(301)
    path = tmp_path / f"sources{suffix}"
    write_catalog(table, path)
    read = read_catalog(path)
    assert_tables_equal(read, table)
    # FITS keywords are upper case.
    assert read.meta["VISIT" if suffix == ".fits" else "visit"] == 1234
    if suffix != ".fits":
        assert read["psf_flux"].description == "PSF flux"


def test_unknown_suffix_defaults_to_ecsv(tmp_path: Path) -> None:
    path = tmp_path / "sources.cat"
    write_catalog(make_catalog(302), path)
    assert path.read_text().startswith("# %ECSV")


def test_explicit_format_overrides_the_suffix(tmp_path: Path) -> None:
    path = tmp_path / "sources.txt"
    write_catalog(make_catalog(303), path, format="fits")
    assert path.read_bytes().startswith(b"SIMPLE  =")
    assert_tables_equal(read_catalog(path, format="fits"), make_catalog(303))


def test_qtable_is_accepted_and_not_modified(tmp_path: Path) -> None:
    table = QTable(make_catalog(304))
    before = table.copy()
    write_catalog(table, tmp_path / "q.ecsv")
    assert (table == before).all()
    assert read_catalog(tmp_path / "q.ecsv")["psf_flux"].unit == u.nJy


def test_overwrite_refused_then_allowed(tmp_path: Path) -> None:
    path = tmp_path / "sources.ecsv"
    write_catalog(make_catalog(305), path)
    original = path.read_text()
    with pytest.raises(InputError, match="exists; pass overwrite=True"):
        write_catalog(make_catalog(306), path)
    assert path.read_text() == original
    write_catalog(make_catalog(306), path, overwrite=True)
    assert_tables_equal(read_catalog(path), make_catalog(306))


def test_failed_write_leaves_the_original(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    path = tmp_path / "sources.ecsv"
    write_catalog(make_catalog(307), path)
    original = path.read_text()

    def failing_write(self: Table, target: Any, *args: Any, **kwargs: Any) -> None:
        Path(target).write_text("# %ECSV 1.0\n# partial")
        msg = "disk full"
        raise OSError(msg)

    monkeypatch.setattr(Table, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        write_catalog(make_catalog(308), path, overwrite=True)
    assert path.read_text() == original
    assert [p.name for p in tmp_path.iterdir()] == ["sources.ecsv"]


def test_parquet_without_pyarrow_says_how_to_install(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(catalog_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "pyarrow" else real_find_spec(name, *a))
    with pytest.raises(InputError, match=r"pip install pyarrow"):
        write_catalog(make_catalog(309), tmp_path / "s.parquet")
    with pytest.raises(InputError, match=r"pip install pyarrow"):
        write_catalog(make_catalog(309), tmp_path / "s.ecsv", format="parquet")
    assert list(tmp_path.iterdir()) == []


def test_parquet_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    table = make_catalog(310)
    write_catalog(table, tmp_path / "s.parquet")
    assert_tables_equal(read_catalog(tmp_path / "s.parquet"), table)


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown catalog format 'csv'"):
        write_catalog(make_catalog(311), tmp_path / "a.csv", format="csv")
    with pytest.raises(InputError, match="needs an astropy Table, got dict"):
        write_catalog({"a": [1]}, tmp_path / "a.ecsv")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="does not exist; check the path"):
        read_catalog(tmp_path / "missing.ecsv")
    with pytest.raises(InputError, match="is a directory"):
        read_catalog(tmp_path)
    (tmp_path / "junk.fits").write_bytes(b"not fits at all" * 10)
    with pytest.raises(InputError, match="is not a readable fits table"):
        read_catalog(tmp_path / "junk.fits")
    (tmp_path / "junk.ecsv").write_text("# %ECSV 1.0\n# ---\n# datatype: [oops\n")
    with pytest.raises(InputError, match="is not a readable ecsv table"):
        read_catalog(tmp_path / "junk.ecsv")
    with pytest.raises(InputError, match="does not exist; create it first"):
        write_catalog(make_catalog(312), tmp_path / "no" / "dir.ecsv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.ecsv", "junk.fits"]
