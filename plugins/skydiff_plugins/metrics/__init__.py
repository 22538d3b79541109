"""Quality metrics of a difference-imaging run (``lsst.ip.diffim`` §2.12).

Registered algorithms (role ``metric``, multi-select, run in ``order``)
---------------------------------------------------------------------
``source_count`` (order 0)
    Numbers of science sources, diaSources, sky sources, positive, negative and dipole
    diaSources (:class:`SourceCountMetric`).
``dia_fraction`` (order 1)
    diaSources per science source (:class:`DiaFractionMetric`).
``residual_footprint_ratio`` (order 2)
    Mean and spread of the residual-to-star ratio in the kernel stars' footprints, raising
    :class:`skydiff.BadSubtractionError` above configurable limits
    (:class:`ResidualFootprintRatioMetric`).
``spatial`` (order 3)
    Densities, image medians, mask fractions, PSF widths and kernel sums sampled at
    quasi-random Halton positions, one table row per position (:class:`SpatialMetric`).

Every metric takes a :class:`skydiff.MetricInputs` and returns a :class:`skydiff.MetricResult`;
an input of the wrong type raises :class:`skydiff.InputError`, a missing one gives NaN values
with the reason in ``metadata["notes"]``.
"""

from __future__ import annotations

import skydiff

from ._counts import DiaFractionConfig, DiaFractionMetric, SourceCountConfig, SourceCountMetric
from ._footprint import ResidualFootprintRatioConfig, ResidualFootprintRatioMetric
from ._spatial import SpatialMetric, SpatialMetricConfig, halton_positions, pixel_area_deg2

__all__ = [
    "DiaFractionConfig",
    "DiaFractionMetric",
    "ResidualFootprintRatioConfig",
    "ResidualFootprintRatioMetric",
    "SourceCountConfig",
    "SourceCountMetric",
    "SpatialMetric",
    "SpatialMetricConfig",
    "halton_positions",
    "pixel_area_deg2",
]


@skydiff.hookimpl
def skydiff_register_algorithms(registries: skydiff.Registries) -> None:
    """Register the ``source_count``, ``dia_fraction``, ``residual_footprint_ratio`` and
    ``spatial`` metrics."""
    registries.metric.add(SourceCountMetric)
    registries.metric.add(DiaFractionMetric)
    registries.metric.add(ResidualFootprintRatioMetric)
    registries.metric.add(SpatialMetric)
