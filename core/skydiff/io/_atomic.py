"""Atomic file replacement and file checksums shared by the FITS and catalog writers.

A writer never writes its target directly: it writes a temporary file in the target's
directory and renames it over the target only once the write has succeeded, so a crash or an
exception mid-write leaves either the old file or no file, never a truncated one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path

from skydiff.errors import InputError

__all__ = ["atomic_path", "check_not_input", "sha256_file"]

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The SHA-256 checksum of a file, as 64 lower-case hexadecimal digits.

    Parameters
    ----------
    path : str or os.PathLike
        The file.

    Returns
    -------
    str
        Hexadecimal digest.

    Raises
    ------
    InputError
        If the file does not exist or cannot be read.
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(_CHUNK), b""):
                digest.update(block)
    except OSError as exc:
        msg = f"cannot read {os.fspath(path)!s} to checksum it ({exc.strerror}); check the path"
        raise InputError(msg) from exc
    return digest.hexdigest()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def check_not_input(target: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]]
                    ) -> None:
    """Refuse to write ``target`` when it is one of the ``inputs`` (symlinks resolved).

    Parameters
    ----------
    target : str or os.PathLike
        The path about to be written.
    inputs : iterable of str or os.PathLike
        The input files of the computation that produced the output.

    Raises
    ------
    InputError
        If ``target`` names the same file as one of ``inputs``.
    """
    target_path = Path(target)
    for item in inputs:
        if _same_file(target_path, Path(item)):
            msg = (f"refusing to write {os.fspath(target)}: it is an input of this result "
                   f"({os.fspath(item)}); choose another output path")
            raise InputError(msg)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Context manager yielding a temporary path that replaces ``path`` on success.

    The temporary file lives in the directory of ``path`` (so that the final rename is atomic)
    under a hidden unique name ending with the name of ``path``. When the ``with`` block
    exits normally the temporary file is renamed to ``path``; when it raises, the temporary
    file is removed and ``path`` is left exactly as it was.

    Parameters
    ----------
    path : str or os.PathLike
        The final destination.
    overwrite : bool, optional
        Replace ``path`` if it exists. When False (default) an existing file is never
        replaced, even if it appears while the block runs (the final step is a no-clobber
        hard link where the file system supports it).

    Yields
    ------
    pathlib.Path
        A path that does not exist yet, in the same directory as ``path``; write the file
        there.

    Raises
    ------
    InputError
        If ``path`` exists and ``overwrite`` is False, if ``path`` is a directory, if its
        directory does not exist, or if the block did not create the temporary file.

    Examples
    --------
    >>> with atomic_path("result.txt", overwrite=True) as tmp:      # doctest: +SKIP
    ...     tmp.write_text("done")
    """
    target = Path(path)
    if target.is_dir():
        msg = f"cannot write {target}: it is a directory; give a file name"
        raise InputError(msg)
    parent = target.parent
    if not parent.is_dir():
        msg = f"cannot write {target}: directory {parent} does not exist; create it first"
        raise InputError(msg)
    if target.exists() and not overwrite:
        msg = f"{target} exists; pass overwrite=True (--overwrite) to replace it"
        raise InputError(msg)
    # Hidden, unique, and ending like the target so that writers choosing the encoding from
    # the suffix (``.fits.gz`` → gzip) write what the target name promises.
    tmp = parent / f".tmp-{secrets.token_hex(6)}-{target.name}"
    try:
        yield tmp
        if not tmp.exists():
            msg = f"nothing was written to the temporary file for {target}; nothing to commit"
            raise InputError(msg)
        with open(tmp, "rb+") as stream:
            os.fsync(stream.fileno())
        _commit(tmp, target, overwrite=overwrite)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _commit(tmp: Path, target: Path, *, overwrite: bool) -> None:
    """Move ``tmp`` onto ``target`` atomically (no-clobber when ``overwrite`` is False)."""
    if overwrite:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)
    except FileExistsError:
        msg = f"{target} exists; pass overwrite=True (--overwrite) to replace it"
        raise InputError(msg) from None
    except OSError:
        # The file system has no hard links: fall back to check-then-rename.
        if target.exists():
            msg = f"{target} exists; pass overwrite=True (--overwrite) to replace it"
            raise InputError(msg) from None
        os.replace(tmp, target)
