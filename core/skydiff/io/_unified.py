"""Unified-I/O descriptors for :class:`skydiff.exposure.Exposure`.

``Exposure.read`` and ``Exposure.write`` are :class:`astropy.io.registry.UnifiedReadWriteMethod`
descriptors built from :class:`ExposureRead` and :class:`ExposureWrite`. They use a
skydiff-private :class:`astropy.io.registry.UnifiedIORegistry` (:data:`registry`), so skydiff's
formats never leak into astropy's global registry.

This module must not import :mod:`skydiff.exposure` at import time (``exposure.py`` imports it);
the readers and writers live in :mod:`skydiff.io.fits` and are registered on first use.
"""

from __future__ import annotations

import importlib
import os
import threading
from typing import Any

from astropy.io.registry import IORegistryError, UnifiedIORegistry, UnifiedReadWrite

from skydiff.errors import InputError

__all__ = ["ExposureRead", "ExposureWrite", "ensure_registered", "registry"]

#: The skydiff-private unified I/O registry holding the exposure formats.
registry = UnifiedIORegistry()

_REGISTERED = threading.Event()


def ensure_registered() -> None:
    """Register skydiff's exposure readers and writers in :data:`registry` (idempotent).

    :func:`skydiff.io.fits.register_formats` registers the formats ``"skydiff-mef"`` (read and
    write) and ``"fits-image"`` (read), with identifiers.
    """
    if not _REGISTERED.is_set():
        fits_module = importlib.import_module("skydiff.io.fits")
        fits_module.register_formats(registry)
        _REGISTERED.set()


def _identify(cls: type, path: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """The one format that can read ``path``; InputError when none (or several) can."""
    if not isinstance(path, str | os.PathLike):
        msg = f"Exposure.read needs a file path, got {type(path).__name__}; pass a str or Path"
        raise InputError(msg)
    path = os.fspath(path)
    formats = registry.identify_format("read", cls, path, None, args, kwargs)
    if len(formats) == 1:
        return str(formats[0])
    if not os.path.exists(path):
        msg = f"{path} does not exist; check the path"
        raise InputError(msg)
    if os.path.isdir(path):
        msg = f"{path} is a directory; give the path of a FITS file"
        raise InputError(msg)
    choices = ", ".join(repr(f) for f in (formats or ("skydiff-mef", "fits-image")))
    msg = f"cannot tell how to read {path}; pass format= (one of {choices})"
    raise InputError(msg)


class ExposureRead(UnifiedReadWrite):
    """Read an :class:`~skydiff.exposure.Exposure` from a file.

    Examples
    --------
    >>> exp = Exposure.read("calexp.fits")                        # doctest: +SKIP
    >>> exp = Exposure.read("image.fits", format="fits-image",
    ...                     weight="image-oow.fits", saturation=65535)  # doctest: +SKIP
    >>> Exposure.read.list_formats()                              # doctest: +SKIP

    Parameters
    ----------
    *args : tuple
        Positional arguments passed to the reader; the first is the file name.
    format : str, optional
        ``"skydiff-mef"`` (the multi-extension layout written by skydiff) or ``"fits-image"``
        (a plain FITS image plus optional companions). Identified automatically when omitted.
    **kwargs : dict
        Keyword arguments passed to the reader (see :func:`skydiff.io.read_exposure`).

    Returns
    -------
    skydiff.exposure.Exposure
        The exposure read.
    """

    def __init__(self, instance: Any, cls: type) -> None:
        super().__init__(instance, cls, "read", registry=registry)

    def __call__(self, *args: Any, format: str | None = None, **kwargs: Any) -> Any:
        """Read the exposure; see the class docstring."""
        ensure_registered()
        if not args:
            msg = "Exposure.read needs the path of the file to read"
            raise InputError(msg)
        if format is None:
            # Identify here rather than in the registry, which would hand the reader an open
            # file object instead of the path (needed for messages and companions).
            format = _identify(self._cls, args[0], args, kwargs)
        try:
            return self.registry.read(self._cls, *args, format=format, **kwargs)
        except IORegistryError as exc:
            reason = str(exc).splitlines()[0].rstrip(".")
            msg = (f"cannot read {args[0]} as {format!r} ({reason}); pass a format listed by "
                   "Exposure.read.list_formats()")
            raise InputError(msg) from exc

    def help(self, format: str | None = None, out: Any = None) -> None:
        """Print the documentation of the reader for ``format`` (all formats when None)."""
        ensure_registered()
        super().help(format=format, out=out)

    def list_formats(self, out: Any = None) -> Any:
        """Print the list of formats ``Exposure.read`` understands."""
        ensure_registered()
        return super().list_formats(out=out)


class ExposureWrite(UnifiedReadWrite):
    """Write this :class:`~skydiff.exposure.Exposure` to a file.

    Examples
    --------
    >>> exposure.write("diffim.fits", overwrite=True)             # doctest: +SKIP

    Parameters
    ----------
    *args : tuple
        Positional arguments passed to the writer; the first is the file name.
    format : str, optional
        Only ``"skydiff-mef"`` can be written; identified from a FITS suffix when omitted.
    **kwargs : dict
        Keyword arguments passed to the writer (see :func:`skydiff.io.write_exposure`), e.g.
        ``overwrite=True`` or ``provenance=...``.
    """

    def __init__(self, instance: Any, cls: type) -> None:
        super().__init__(instance, cls, "write", registry=registry)

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        """Write the exposure; see the class docstring."""
        ensure_registered()
        try:
            self.registry.write(self._instance, *args, **kwargs)
        except IORegistryError as exc:
            target = args[0] if args else "<no path>"
            reason = str(exc).splitlines()[0].rstrip(".")
            msg = f"cannot write {target} ({reason}); use a .fits name or format='skydiff-mef'"
            raise InputError(msg) from exc

    def help(self, format: str | None = None, out: Any = None) -> None:
        """Print the documentation of the writer for ``format`` (all formats when None)."""
        ensure_registered()
        super().help(format=format, out=out)

    def list_formats(self, out: Any = None) -> Any:
        """Print the list of formats ``Exposure.write`` understands."""
        ensure_registered()
        return super().list_formats(out=out)
