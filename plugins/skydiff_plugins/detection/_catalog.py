"""The detection catalog: column names, dtypes and the empty catalog."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from astropy.table import Table

__all__ = ["CATALOG_COLUMNS", "empty_catalog", "make_catalog"]

#: ``(name, dtype)`` of every column of the detection catalog, in order.
CATALOG_COLUMNS: tuple[tuple[str, type], ...] = (
    ("id", np.int64),
    ("x", np.float64),
    ("y", np.float64),
    ("peak_value", np.float64),
    ("significance", np.float64),
    ("is_negative", np.bool_),
    ("footprint_area", np.int64),
    ("n_peaks", np.int64),
    ("pos_peak_x", np.float64),
    ("pos_peak_y", np.float64),
    ("neg_peak_x", np.float64),
    ("neg_peak_y", np.float64),
)


def make_catalog(columns: Mapping[str, np.ndarray]) -> Table:
    """A catalog with exactly :data:`CATALOG_COLUMNS`, each cast to its dtype."""
    return Table({name: np.asarray(columns[name], dtype=dtype)
                  for name, dtype in CATALOG_COLUMNS})


def empty_catalog() -> Table:
    """The catalog of no detection: every column, zero rows."""
    return make_catalog({name: np.zeros(0, dtype=dtype) for name, dtype in CATALOG_COLUMNS})
