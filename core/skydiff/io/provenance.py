"""Provenance of skydiff output files: software version, plugins, configuration and inputs.

Every exposure skydiff writes records how it was made, in the primary header of the FITS file
(and, for the configuration, in a ``PROVCONF`` extension):

============  ==========================================================================
keyword       meaning
============  ==========================================================================
``SKDFMT``    version of the skydiff multi-extension layout (currently 1)
``SKDVER``    skydiff version that wrote the file
``NPLUGIN``   number of plugins listed
``PLUGn``     ``"name=version"`` of plugin ``n`` (1-based, sorted by name)
``NINPUT``    number of input files listed
``INPUTn``    absolute path of input file ``n`` (long values use ``CONTINUE`` cards)
``INSHAn``    SHA-256 checksum (hexadecimal) of input file ``n``
============  ==========================================================================

The effective configuration, as TOML text, is stored byte-exact (UTF-8) in the one row of the
``TOML`` column (``nB``, unsigned bytes) of a binary-table extension named ``PROVCONF``; the
column holds bytes rather than characters because FITS character columns lose trailing
whitespace. The extension is present only when the configuration text is not empty.

Characters outside printable ASCII (and ``%``) in names and paths are percent-encoded in the
header, because FITS headers are ASCII; :func:`read_provenance` decodes them.
"""

from __future__ import annotations

import importlib
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import attrs
import numpy as np
import tomli_w
from astropy.io import fits

import skydiff
from skydiff.errors import InputError
from skydiff.io._atomic import sha256_file
from skydiff.io._fitsfile import load_fits

__all__ = ["FORMAT_VERSION", "Provenance", "read_provenance"]

#: Version of the skydiff multi-extension FITS layout written in ``SKDFMT``.
FORMAT_VERSION = 1

#: Name of the extension holding the effective configuration.
CONFIG_EXTNAME = "PROVCONF"

_PLUGIN_KEY = re.compile(r"^PLUG(\d+)$")
_INPUT_KEY = re.compile(r"^INPUT(\d+)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: Primary-header keywords owned by the provenance block (removed from exposure metadata).
PROVENANCE_KEYS = re.compile(r"^(SKDFMT|SKDVER|NPLUGIN|NINPUT|PLUG\d+|INPUT\d+|INSHA\d+)$")


def _encode(text: str) -> str:
    """Percent-encode characters a FITS header cannot hold (and ``%`` itself)."""
    return "".join(c if 32 <= ord(c) < 127 and c != "%" else quote(c, safe="") for c in text)


def _to_plugins(value: Mapping[str, Any] | Iterable[tuple[str, Any]] | None) -> dict[str, str]:
    items = value.items() if isinstance(value, Mapping) else (value or ())
    plugins: dict[str, str] = {}
    for item in items:
        try:
            if isinstance(item, str | bytes):
                raise TypeError(item)
            name, version = item
        except (TypeError, ValueError):
            msg = (f"provenance plugins must be name → version pairs, got {item!r}; "
                   "pass a mapping such as {'al': '1.0'}")
            raise InputError(msg) from None
        name = str(name)
        if not name or "=" in name:
            msg = f"invalid plugin name {name!r} in provenance; names are non-empty, without '='"
            raise InputError(msg)
        plugins[name] = "" if version is None else str(version)
    return dict(sorted(plugins.items()))


def _to_inputs(value: Iterable[tuple[str | os.PathLike[str], str]]) -> tuple[tuple[str, str], ...]:
    inputs = []
    for item in value:
        try:
            if isinstance(item, str | bytes | os.PathLike):
                raise TypeError(item)
            path, digest = item
        except (TypeError, ValueError):
            msg = (f"provenance inputs must be (path, sha256) pairs, got {item!r}; "
                   "use Provenance.collect(inputs=[...]) to checksum files")
            raise InputError(msg) from None
        digest = str(digest).lower()
        if not _SHA256.match(digest):
            msg = f"provenance checksum of {path} is not a SHA-256 hex digest: {digest!r}"
            raise InputError(msg)
        inputs.append((os.fspath(path), digest))
    return tuple(inputs)


def _config_text(config: Any) -> str:
    """TOML text of ``config`` (a skydiff Config, a mapping, TOML text or None)."""
    if config is None:
        return ""
    if isinstance(config, str):
        try:
            tomllib.loads(config)
        except tomllib.TOMLDecodeError as exc:
            msg = f"provenance config text is not valid TOML ({exc}); pass config.dump_toml()"
            raise InputError(msg) from exc
        return config
    dump = getattr(config, "dump_toml", None)
    if callable(dump):
        return str(dump())
    if isinstance(config, Mapping):
        try:
            return tomli_w.dumps(dict(config))
        except TypeError as exc:
            msg = f"provenance config mapping cannot be written as TOML ({exc}); use plain values"
            raise InputError(msg) from exc
    msg = (f"cannot record a {type(config).__name__} as configuration; pass a skydiff Config, "
           "a mapping or TOML text")
    raise InputError(msg)


def _loaded_plugins() -> dict[str, str]:
    """Names and versions of the plugins known to skydiff's default plugin manager."""
    try:
        manager_module = importlib.import_module("skydiff._manager")
    except ImportError:
        return {}
    listing = manager_module.get_manager().plugins()
    plugins: dict[str, str] = {}
    for entry in listing:
        name = getattr(entry, "name", None)
        version = getattr(entry, "version", None)
        if name is None:
            name, version = entry[0], entry[2]
        plugins[str(name)] = "" if version is None else str(version)
    return plugins


@attrs.frozen
class Provenance:
    """How an output file was made.

    Parameters
    ----------
    skydiff_version : str, optional
        Version of skydiff that produced the output (default: the running version).
    plugins : Mapping[str, str], optional
        Plugin name → version of every plugin that took part (or was loaded).
    config_toml : str, optional
        The effective configuration as TOML text (empty when there was none).
    inputs : sequence of (str, str), optional
        ``(path, sha256)`` of every input file.

    Raises
    ------
    InputError
        If a plugin entry or an input entry is malformed (e.g. a checksum that is not a
        SHA-256 hex digest).

    See Also
    --------
    read_provenance, skydiff.io.write_exposure

    Examples
    --------
    >>> prov = Provenance(plugins={"al": "0.1.0"}, config_toml='mode = "auto"\\n')
    >>> prov.plugins
    {'al': '0.1.0'}
    """

    skydiff_version: str = attrs.field(default=skydiff.__version__, converter=str)
    plugins: Mapping[str, str] = attrs.field(factory=dict, converter=_to_plugins, hash=False)
    config_toml: str = attrs.field(default="", converter=str)
    inputs: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_to_inputs)

    @classmethod
    def collect(cls, *, config: Any = None,
                inputs: Iterable[str | os.PathLike[str]] = (),
                plugins: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
                ) -> Provenance:
        """Gather the provenance of a computation about to be written.

        Parameters
        ----------
        config : skydiff.Config, Mapping, str or None, optional
            The effective configuration: a config object (its ``dump_toml()`` is recorded), a
            TOML-able mapping, or TOML text.
        inputs : iterable of path, optional
            Input files; each is recorded with its absolute path and SHA-256 checksum.
        plugins : Mapping[str, str] or iterable of (name, version), optional
            The plugins involved. When None, every plugin known to skydiff's default plugin
            manager is recorded.

        Returns
        -------
        Provenance
            The provenance record.

        Raises
        ------
        InputError
            If an input file cannot be read or the configuration cannot be written as TOML.
        """
        files = []
        for item in inputs:
            path = Path(item).expanduser()
            if not path.is_file():
                msg = f"provenance input {path} is not a file; pass the paths of existing inputs"
                raise InputError(msg)
            files.append((str(path.resolve()), sha256_file(path)))
        return cls(
            skydiff_version=skydiff.__version__,
            plugins=_loaded_plugins() if plugins is None else plugins,
            config_toml=_config_text(config),
            inputs=files,
        )

    @property
    def input_paths(self) -> tuple[str, ...]:
        """The paths of the input files."""
        return tuple(path for path, _ in self.inputs)

    def to_header(self) -> fits.Header:
        """The primary-header cards of this record (see the module docstring)."""
        header = fits.Header()
        header["SKDFMT"] = (FORMAT_VERSION, "skydiff multi-extension layout version")
        header["SKDVER"] = (_encode(self.skydiff_version), "skydiff version")
        header["NPLUGIN"] = (len(self.plugins), "number of PLUGn cards")
        for index, (name, version) in enumerate(self.plugins.items(), start=1):
            header[f"PLUG{index}"] = (_encode(f"{name}={version}"), "plugin name=version")
        header["NINPUT"] = (len(self.inputs), "number of INPUTn/INSHAn cards")
        for index, (path, digest) in enumerate(self.inputs, start=1):
            header[f"INPUT{index}"] = (_encode(path), "input file")
            header[f"INSHA{index}"] = digest  # 64 digits: no room for a comment
        return header

    def config_hdu(self) -> fits.BinTableHDU | None:
        """The ``PROVCONF`` extension holding :attr:`config_toml`, or None when it is empty."""
        if not self.config_toml:
            return None
        raw = np.frombuffer(self.config_toml.encode("utf-8"), dtype=np.uint8)
        column = fits.Column(name="TOML", format=f"{raw.size}B", array=raw.reshape(1, -1))
        hdu = fits.BinTableHDU.from_columns([column], name=CONFIG_EXTNAME)
        hdu.header["TOMLLEN"] = (raw.size, "bytes of UTF-8 TOML text in column TOML")
        return hdu

    @classmethod
    def from_hdulist(cls, hdul: fits.HDUList, *, source: str) -> Provenance:
        """Parse the provenance of an opened skydiff file.

        Parameters
        ----------
        hdul : astropy.io.fits.HDUList
            The opened file.
        source : str
            File name used in error messages.

        Returns
        -------
        Provenance
            The record.

        Raises
        ------
        InputError
            If the file has no skydiff provenance or the provenance cards are inconsistent.
        """
        header = hdul[0].header
        if "SKDVER" not in header:
            msg = f"{source} has no skydiff provenance (no SKDVER keyword); it was not written " \
                  "by skydiff"
            raise InputError(msg)
        plugins: dict[str, str] = {}
        inputs: list[tuple[str, str]] = []
        for key in header:
            if _PLUGIN_KEY.match(key):
                name, sep, version = unquote(str(header[key])).partition("=")
                if not sep:
                    msg = f"{source}: provenance card {key} is not 'name=version'; file damaged?"
                    raise InputError(msg)
                plugins[name] = version
            elif match := _INPUT_KEY.match(key):
                sha_key = f"INSHA{match.group(1)}"
                if sha_key not in header:
                    msg = f"{source}: provenance card {key} has no {sha_key}; file damaged?"
                    raise InputError(msg)
                inputs.append((unquote(str(header[key])), str(header[sha_key])))
        for key, found in (("NPLUGIN", len(plugins)), ("NINPUT", len(inputs))):
            if key in header and header[key] != found:
                msg = f"{source}: {key}={header[key]} but {found} cards found; file damaged?"
                raise InputError(msg)
        config_toml = ""
        if CONFIG_EXTNAME in hdul:
            table = hdul[CONFIG_EXTNAME]
            raw = np.asarray(table.data["TOML"][0], dtype=np.uint8).tobytes()
            length = int(table.header.get("TOMLLEN", len(raw)))
            try:
                config_toml = raw[:length].decode("utf-8")
            except UnicodeDecodeError as exc:
                msg = f"{source}: the {CONFIG_EXTNAME} configuration is not UTF-8; file damaged?"
                raise InputError(msg) from exc
        return cls(skydiff_version=unquote(str(header["SKDVER"])), plugins=plugins,
                   config_toml=config_toml, inputs=inputs)


def read_provenance(path: str | os.PathLike[str]) -> Provenance:
    """Read the provenance recorded in a FITS file written by skydiff.

    Parameters
    ----------
    path : str or os.PathLike
        A file written by :func:`skydiff.io.write_exposure`.

    Returns
    -------
    Provenance
        The skydiff version, plugins, effective configuration and inputs recorded.

    Raises
    ------
    InputError
        If the file is missing, is not a readable FITS file, or carries no skydiff provenance.

    Examples
    --------
    >>> read_provenance("diffim.fits").config_toml            # doctest: +SKIP
    '[subtract]\\nname = "al"\\n'
    """
    hdul = load_fits(path)
    return Provenance.from_hdulist(hdul, source=os.fspath(path))
