"""Reading and writing source catalogs (astropy :class:`~astropy.table.Table`).

Catalogs keep their units, column descriptions and table metadata. The format follows the
file suffix unless given:

==========================  ===========  =====================================================
suffix                      format       notes
==========================  ===========  =====================================================
``.ecsv`` (and any other)   ``ecsv``     default; text, lossless (units, dtypes, metadata)
``.fits``, ``.fit``, ...    ``fits``     binary table; metadata limited to FITS keywords
``.parquet``, ``.pq``       ``parquet``  needs the optional ``pyarrow`` package
==========================  ===========  =====================================================

Writes are atomic (temporary file in the same directory, then rename) and refuse to replace
an existing file unless ``overwrite=True``.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

from astropy.table import Table

from skydiff.errors import InputError
from skydiff.io._atomic import atomic_path
from skydiff.io._fitsfile import log_warnings, source_name

__all__ = ["CATALOG_FORMATS", "read_catalog", "write_catalog"]

#: Catalog format name → astropy unified-I/O format.
CATALOG_FORMATS: dict[str, str] = {"ecsv": "ascii.ecsv", "fits": "fits", "parquet": "parquet"}

_SUFFIXES: dict[str, str] = {
    ".ecsv": "ecsv", ".fits": "fits", ".fit": "fits", ".fts": "fits", ".fits.gz": "fits",
    ".parquet": "parquet", ".pq": "parquet",
}
_ALIASES: dict[str, str] = {"ascii.ecsv": "ecsv", "ecsv": "ecsv", "fits": "fits",
                            "parquet": "parquet"}


def _format_for(path: str | os.PathLike[str], format: str | None) -> str:
    """The catalog format name (``ecsv``, ``fits``, ``parquet``) for ``path``."""
    if format is not None:
        key = str(format).lower()
        if key not in _ALIASES:
            msg = (f"unknown catalog format {format!r}; use one of "
                   f"{', '.join(CATALOG_FORMATS)}")
            raise InputError(msg)
        name = _ALIASES[key]
    else:
        lower = os.fspath(path).lower()
        name = next((fmt for suffix, fmt in _SUFFIXES.items() if lower.endswith(suffix)),
                    "ecsv")
    if name == "parquet" and importlib.util.find_spec("pyarrow") is None:
        msg = (f"Parquet catalogs need the pyarrow package, which is not installed; install it "
               f"(pip install pyarrow) or use .ecsv or .fits for {os.fspath(path)}")
        raise InputError(msg)
    return name


def write_catalog(table: Table, path: str | os.PathLike[str], *, format: str | None = None,
                  overwrite: bool = False) -> None:
    """Write a catalog atomically.

    Parameters
    ----------
    table : astropy.table.Table
        The catalog (any astropy table, including ``QTable``); it is not modified.
    path : str or os.PathLike
        Destination file.
    format : {"ecsv", "fits", "parquet"}, optional
        File format; default from the suffix of ``path`` (ECSV when it is not recognised).
    overwrite : bool, optional
        Replace an existing file.

    Raises
    ------
    InputError
        If ``path`` exists and ``overwrite`` is False, its directory does not exist, the
        format is unknown, Parquet is asked for without pyarrow installed, or the table
        cannot be stored in that format.

    See Also
    --------
    read_catalog

    Examples
    --------
    >>> write_catalog(sources, "sources.ecsv", overwrite=True)             # doctest: +SKIP
    """
    if not isinstance(table, Table):
        msg = f"write_catalog needs an astropy Table, got {type(table).__name__}; wrap it in Table"
        raise InputError(msg)
    name = _format_for(path, format)
    with atomic_path(path, overwrite=overwrite) as tmp:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                table.write(tmp, format=CATALOG_FORMATS[name])
            except (TypeError, ValueError, NotImplementedError) as exc:
                msg = (f"cannot write the catalog as {name} to {source_name(path)} "
                       f"({' '.join(str(exc).split())}); try the lossless .ecsv format")
                raise InputError(msg) from exc
        log_warnings(caught, source_name(path))


def read_catalog(path: str | os.PathLike[str], *, format: str | None = None) -> Table:
    """Read a catalog written by :func:`write_catalog` (or any ECSV/FITS/Parquet table).

    Parameters
    ----------
    path : str or os.PathLike
        The file.
    format : {"ecsv", "fits", "parquet"}, optional
        File format; default from the suffix (ECSV when it is not recognised).

    Returns
    -------
    astropy.table.Table
        The catalog, with units and metadata; text columns are ``str`` (FITS byte strings
        are decoded) and numbers are in native byte order.

    Raises
    ------
    InputError
        If the file is missing or is not a readable table in that format, or Parquet is
        asked for without pyarrow installed.

    See Also
    --------
    write_catalog

    Examples
    --------
    >>> read_catalog("sources.ecsv")["psf_flux"].unit                     # doctest: +SKIP
    Unit("nJy")
    """
    file = Path(path).expanduser()
    if not file.is_file():
        what = "is a directory" if file.is_dir() else "does not exist"
        msg = f"catalog {os.fspath(path)} {what}; check the path"
        raise InputError(msg)
    name = _format_for(path, format)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            table = Table.read(file, format=CATALOG_FORMATS[name])
        except Exception as exc:  # astropy's readers raise many types on malformed files
            msg = (f"catalog {os.fspath(path)} is not a readable {name} table "
                   f"({' '.join(str(exc).split())[:160]}); check the file or pass format=")
            raise InputError(msg) from exc
    log_warnings(caught, source_name(path))
    table.convert_bytestring_to_unicode()
    for name in table.colnames:
        column = table[name]
        dtype = getattr(column, "dtype", None)
        if dtype is not None and dtype.fields is None and not dtype.isnative:
            table.replace_column(name, column.astype(dtype.newbyteorder("=")))
    return table
