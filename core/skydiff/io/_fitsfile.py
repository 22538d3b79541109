"""Opening FITS files defensively: every failure becomes a one-line :class:`InputError`.

astropy reports damaged files in several ways — exceptions of various types at open time or at
first data access, or only a warning ("File may have been truncated") — and reports harmless
repairs of non-standard headers as warnings. :func:`load_fits` opens a file read-only, loads all
of it eagerly while recording warnings, turns damage into :class:`~skydiff.errors.InputError`
and logs the harmless repairs on the ``skydiff.io`` logger. Callers then work on in-memory HDUs.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from astropy.io import fits

from skydiff.errors import InputError

__all__ = ["describe_hdus", "load_fits", "log", "log_warnings", "source_name"]

log = logging.getLogger("skydiff.io")

_DAMAGE_WORDS = ("truncated", "smaller than the expected", "checksum", "corrupt")


def source_name(path: str | os.PathLike[str]) -> str:
    """The path as a string, for messages."""
    return os.fspath(path)


def log_warnings(caught: list[warnings.WarningMessage], source: str) -> None:
    """Log recorded (harmless) warnings about ``source`` at INFO level on ``skydiff.io``."""
    for item in caught:
        text = " ".join(str(item.message).split())
        log.info("%s: %s: %s", source, item.category.__name__, text)


def _check_path(path: str | os.PathLike[str], what: str) -> Path:
    if not isinstance(path, str | os.PathLike):
        msg = f"{what} must be a file path, got {type(path).__name__}; pass a str or Path"
        raise InputError(msg)
    resolved = Path(path).expanduser()
    if not resolved.exists():
        msg = f"{what} {os.fspath(path)} does not exist; check the path"
        raise InputError(msg)
    if resolved.is_dir():
        msg = f"{what} {os.fspath(path)} is a directory; give the path of a FITS file"
        raise InputError(msg)
    return resolved


def load_fits(path: str | os.PathLike[str], *, what: str = "FITS file") -> fits.HDUList:
    """Read a whole FITS file into memory, read-only, and close it.

    Headers are verified with astropy's ``silentfix`` (non-standard cards are repaired in
    memory, never in the file), every data array is loaded, and the file is closed before
    returning, so later use of the HDUs touches neither the file nor the warnings machinery.

    Parameters
    ----------
    path : str or os.PathLike
        The file (gzip-compressed and tile-compressed files are understood).
    what : str, optional
        What the file is, for messages (e.g. ``"weight map"``).

    Returns
    -------
    astropy.io.fits.HDUList
        The HDUs, fully loaded in memory.

    Raises
    ------
    InputError
        If the file is missing, is a directory, is not FITS, holds no HDU, or is truncated or
        corrupt.
    """
    resolved = _check_path(path, what)
    source = source_name(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hdul = fits.open(resolved, mode="readonly", memmap=False, lazy_load_hdus=False,
                             checksum=True)
        except Exception as exc:  # astropy raises OSError, ValueError, TypeError, ...
            msg = (f"{what} {source} is not a readable FITS file ({_reason(exc)}); "
                   "check that it is FITS and not truncated")
            raise InputError(msg) from exc
        try:
            hdul.verify("silentfix+ignore")
            for hdu in hdul:
                for card in hdu.header.cards:
                    _ = card.value
                _ = hdu.data
        except Exception as exc:
            msg = (f"{what} {source} is truncated or corrupt ({_reason(exc)}); "
                   "re-create or re-download it")
            raise InputError(msg) from exc
        finally:
            hdul.close()
    # Checksum mismatches are damage in files skydiff wrote; other writers often leave stale
    # CHECKSUM cards after editing headers, so there a mismatch is only logged.
    strict = len(hdul) > 0 and "SKDFMT" in hdul[0].header
    damage = [item for item in caught
              if any(word in str(item.message).lower() for word in _DAMAGE_WORDS)
              and (strict or "checksum" not in str(item.message).lower())]
    if damage:
        msg = (f"{what} {source} is truncated or corrupt ({_reason(damage[0].message)}); "
               "re-create or re-download it")
        raise InputError(msg)
    if len(hdul) == 0:
        msg = f"{what} {source} holds no HDU; check that it is a FITS file"
        raise InputError(msg)
    log_warnings(caught, source)
    return hdul


def _reason(exc: BaseException | Warning | str) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def describe_hdus(hdul: fits.HDUList) -> str:
    """A short listing ``0:PRIMARY(0-D), 1:SCI(2-D 900x900)`` for error messages."""
    parts = []
    for index, hdu in enumerate(hdul):
        shape = getattr(hdu.data, "shape", None) if hdu.is_image else None
        kind = "table" if not hdu.is_image else (
            "no data" if not shape else f"{len(shape)}-D {'x'.join(map(str, shape))}")
        parts.append(f"{index}:{hdu.name or '?'}({kind})")
    return ", ".join(parts)
