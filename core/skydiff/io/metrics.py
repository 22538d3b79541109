"""Metric values as JSON: :func:`write_metrics` and :func:`read_metrics`.

The file is one JSON object with sorted keys::

    {
      "errors": {"residual_footprint_ratio": "BadSubtractionError: ..."},
      "metrics": {"dia_fraction": {"ratio": 0.012}, "source_count": {"n_dia": 14.0}},
      "skydiff_version": "0.1.0"
    }

``metrics`` maps each metric name to its named values; ``errors`` maps the metrics that
failed to their one-line error. JSON has no NaN or infinity: such values are written as
``null`` and read back as NaN. Writes are atomic and refuse to replace an existing file
unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from skydiff.errors import InputError
from skydiff.io._atomic import atomic_path

__all__ = ["read_metrics", "write_metrics"]


def _plain(value: Any, where: str) -> Any:
    """``value`` as JSON data with non-finite floats as None."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item, where) for item in value]
    if hasattr(value, "item") and callable(value.item):  # NumPy scalars
        value = value.item()
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    msg = f"metric value {where} is a {type(value).__name__}; metrics are numbers or strings"
    raise InputError(msg)


def write_metrics(metrics: Mapping[str, Mapping[str, Any]], path: str | os.PathLike[str], *,
                  errors: Mapping[str, str] | None = None, extra: Mapping[str, Any] | None = None,
                  overwrite: bool = False) -> None:
    """Write metric values as JSON (sorted keys, NaN as ``null``), atomically.

    Parameters
    ----------
    metrics : Mapping of str to Mapping of str to float
        ``{metric name: {value name: value}}``, e.g. the ``metrics`` of a
        :class:`~skydiff.PipelineResult`.
    path : str or os.PathLike
        Destination (conventionally ``metrics.json``).
    errors : Mapping of str to str, optional
        ``{metric name: message}`` of the metrics that failed.
    extra : Mapping, optional
        Other top-level entries (JSON-able); they may not be named ``metrics`` or ``errors``.
    overwrite : bool, optional
        Replace an existing file.

    Raises
    ------
    InputError
        If a value is not a number or a string, ``extra`` reuses a reserved key, ``path``
        exists and ``overwrite`` is False, or its directory does not exist.

    Examples
    --------
    >>> import json, math, pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "metrics.json"
    >>> write_metrics({"source_count": {"n": 3.0, "ratio": math.nan}}, path)
    >>> json.loads(path.read_text())["metrics"]
    {'source_count': {'n': 3.0, 'ratio': None}}
    >>> read_metrics(path)["metrics"]["source_count"]["ratio"]
    nan
    """
    from skydiff import __version__

    data: dict[str, Any] = {"skydiff_version": __version__}
    for key in ("metrics", "errors"):
        if extra and key in extra:
            msg = f"extra may not hold the reserved key {key!r}"
            raise InputError(msg)
    data.update(_plain(dict(extra or {}), "extra"))
    data["metrics"] = _plain(dict(metrics), "metrics")
    data["errors"] = _plain(dict(errors or {}), "errors")
    text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _nan_for_null(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _nan_for_null(item) for key, item in value.items()}
    return math.nan if value is None else value


def read_metrics(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a file written by :func:`write_metrics` (``null`` metric values become NaN).

    Returns
    -------
    dict
        The whole JSON object; ``["metrics"]`` holds the values.

    Raises
    ------
    InputError
        If the file is missing or is not such a JSON object.
    """
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = f"cannot read metrics from {os.fspath(path)} ({exc}); check the path"
        raise InputError(msg) from exc
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        msg = f"{os.fspath(path)} is not a skydiff metrics file (no 'metrics' object)"
        raise InputError(msg)
    data["metrics"] = _nan_for_null(data["metrics"])
    return data
