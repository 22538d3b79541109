r"""Detection on difference and score images (role ``detection``).

``threshold``
    :class:`ThresholdDetector`, the detection steps of ``lsst.ip.diffim``
    ``DetectAndMeasureTask``: a two-pass background (fine mesh on a copy to find and mask
    the sources, then a coarse mesh that is subtracted), the matched filter of a difference
    image with its own PSF, :math:`\nu = (D \star P)/\sqrt{V \star P^2}` (a score image is
    used as is, :math:`\nu = \mathrm{score}/\sqrt{V}`), positive and negative thresholds,
    isotropically grown footprints merged where they touch, peaks, deblending of each
    footprint into children at its significant peaks (a close positive/negative pair is one
    dipole child), rejection of detections peaking on bad pixels, and cosmic-ray masking
    with the ``findCosmicRays`` criteria.

The catalog has the columns of :data:`CATALOG_COLUMNS`; see :class:`ThresholdDetector`.
"""

from __future__ import annotations

import skydiff

from ._catalog import CATALOG_COLUMNS
from ._config import ThresholdDetectorConfig
from ._threshold import ThresholdDetector

__all__ = ["CATALOG_COLUMNS", "ThresholdDetector", "ThresholdDetectorConfig"]


@skydiff.hookimpl
def skydiff_register_algorithms(registries: skydiff.Registries) -> None:
    registries.detection.add(ThresholdDetector)
