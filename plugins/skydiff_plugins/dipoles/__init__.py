"""Dipoles: a joint PSF-dipole fit and two dipole classifiers.

* ``measurement: dipole_fit`` — a positive and a negative PSF lobe fitted jointly to the
  difference, the science image and the matched template (each plane with its own PSF and
  weighted by its variance plane and its noise correlation, estimated on its sky), with a
  local background in the science and template planes, tied or free lobe fluxes, bounded
  robust least squares, a sandwich covariance with the correlated noise, and a single-PSF
  fit of the difference for comparison (:class:`DipoleFitMeasurement`).
* ``dipole_classifier: sn_flux_ratio`` — the lsst.ip.diffim rule: S/N above 5√2 and
  balanced lobes (:class:`SnFluxRatioClassifier`).
* ``dipole_classifier: chi2`` — the dipole against the single PSF by a χ² test at a given
  false-alarm probability (:class:`Chi2Classifier`).

References
----------
.. [1] Reiss, D. J. 2016, DMTN-007, "Dipole characterization for image differencing",
   https://dmtn-007.lsst.io.
"""

from __future__ import annotations

import skydiff

from ._classify import (
    Chi2Classifier,
    Chi2ClassifierConfig,
    SnFluxRatioClassifier,
    SnFluxRatioConfig,
)
from ._fit import DIPOLE_COLUMNS, DipoleFitConfig, DipoleFitMeasurement

__all__ = [
    "DIPOLE_COLUMNS",
    "Chi2Classifier",
    "Chi2ClassifierConfig",
    "DipoleFitConfig",
    "DipoleFitMeasurement",
    "SnFluxRatioClassifier",
    "SnFluxRatioConfig",
]


@skydiff.hookimpl
def skydiff_register_algorithms(registries: skydiff.Registries) -> None:
    registries.measurement.add(DipoleFitMeasurement)
    registries.dipole_classifier.add(SnFluxRatioClassifier)
    registries.dipole_classifier.add(Chi2Classifier)
