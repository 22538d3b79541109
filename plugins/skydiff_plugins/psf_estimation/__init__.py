"""PSF estimators: build a PSF model from the stars of an exposure that has none.

* ``empirical`` — a spatially varying pixel-basis model (PSFEx-like): every pixel of the PSF
  image is a Chebyshev polynomial of the position, fitted by weighted least squares to
  recentred, normalised stamps of bright isolated stars (:class:`EmpiricalPsfEstimator`).
* ``gaussian_moments`` — the fallback: a circular Gaussian with the median adaptive second
  moments of the good stars; works with a single star (:class:`GaussianMomentsPsfEstimator`).
"""

from __future__ import annotations

import skydiff

from ._empirical import EmpiricalPsfConfig, EmpiricalPsfEstimator
from ._moments import GaussianMomentsPsfConfig, GaussianMomentsPsfEstimator

__all__ = [
    "EmpiricalPsfConfig",
    "EmpiricalPsfEstimator",
    "GaussianMomentsPsfConfig",
    "GaussianMomentsPsfEstimator",
]


@skydiff.hookimpl
def skydiff_register_algorithms(registries: skydiff.Registries) -> None:
    registries.psf_estimator.add(EmpiricalPsfEstimator)
    registries.psf_estimator.add(GaussianMomentsPsfEstimator)
