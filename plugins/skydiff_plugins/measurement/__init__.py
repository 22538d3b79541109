"""Built-in measurement plugins: per-source columns measured on the difference image.

In execution order:

* ``centroid`` (0) — sign-aware Gaussian-windowed centroid with errors
  (:class:`CentroidMeasurement`);
* ``pixel_flags`` (1) — mask planes in the footprint and at the centre
  (:class:`PixelFlagsMeasurement`);
* ``psf_flux`` (2) — weighted linear PSF fit (:class:`PsfFluxMeasurement`);
* ``aperture_flux`` (2) — circular apertures with fractional pixel overlaps
  (:class:`ApertureFluxMeasurement`);
* ``shape`` (2) — adaptive Gaussian second moments (:class:`ShapeMeasurement`);
* ``forced_psf`` (4) — PSF fits at the catalog positions on the science image and on the
  matched template (:class:`ForcedPsfMeasurement`).

Each returns one row per input source, only new columns, and a ``<name>_flag`` column; a
source that cannot be measured is flagged, never raised on. They share the stamp helpers of
:mod:`skydiff.photometry`.
"""

from __future__ import annotations

import skydiff

from ._aperture import ApertureFluxConfig, ApertureFluxMeasurement
from ._centroid import CentroidConfig, CentroidMeasurement
from ._pixel_flags import PixelFlagsConfig, PixelFlagsMeasurement
from ._psf_flux import ForcedPsfConfig, ForcedPsfMeasurement, PsfFluxConfig, PsfFluxMeasurement
from ._shape import ShapeConfig, ShapeMeasurement

__all__ = [
    "ApertureFluxConfig",
    "ApertureFluxMeasurement",
    "CentroidConfig",
    "CentroidMeasurement",
    "ForcedPsfConfig",
    "ForcedPsfMeasurement",
    "PixelFlagsConfig",
    "PixelFlagsMeasurement",
    "PsfFluxConfig",
    "PsfFluxMeasurement",
    "ShapeConfig",
    "ShapeMeasurement",
]


@skydiff.hookimpl
def skydiff_register_algorithms(registries: skydiff.Registries) -> None:
    registries.measurement.add(CentroidMeasurement)
    registries.measurement.add(PixelFlagsMeasurement)
    registries.measurement.add(PsfFluxMeasurement)
    registries.measurement.add(ApertureFluxMeasurement)
    registries.measurement.add(ShapeMeasurement)
    registries.measurement.add(ForcedPsfMeasurement)
