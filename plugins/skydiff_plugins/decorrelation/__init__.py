r"""Decorrelation of PSF-matched difference images (role ``decorrelation``).

Convolving one image of a pair with the PSF-matching kernel :math:`\kappa` correlates the noise
of the difference :math:`D = u - \kappa\otimes c`: its power spectrum is
:math:`\sigma^2_u + \sigma^2_c|\hat\kappa(k)|^2` instead of flat, so pixel-based detection
thresholds are wrong. The plugins here undo that:

``none``
    the difference (and score) unchanged;
``dmtn021``
    one global whitening filter :math:`\hat\phi = \sqrt{(\sigma^2_u + \sigma^2_c k_\Sigma^2) /
    (\sigma^2_u + \sigma^2_c|\hat\kappa|^2)}` with the kernel at the image centre (Reiss &
    Lupton, DMTN-021), variance planes per DMTN-179 §5 and an updated, spatially varying
    PSF (:math:`\phi\otimes P(x, y)`: a PolynomialPsf stays a PolynomialPsf);
``dmtn021_spatial``
    the same per cell of a grid, with the local kernel and variances, blended without seams by
    :func:`skydiff.map_reduce`;
``score``
    the DMTN-179 likelihood correction giving a ZOGY-equivalent score image (Zackay, Ofek &
    Gal-Yam 2016) from a pre-convolution subtraction or from a plain difference.

All take ``run(science, template, subtraction)`` with the original (unmatched) science and
template exposures and the :class:`~skydiff.SubtractionResult`, and return a
:class:`~skydiff.DecorrelationResult`; inputs are never modified.

References
----------
.. [1] Reiss, D. J. & Lupton, R. H. 2016, DMTN-021, https://dmtn-021.lsst.io.
.. [2] Reiss, D. J. et al. 2021, DMTN-179, https://dmtn-179.lsst.io.
.. [3] Zackay, B., Ofek, E. O. & Gal-Yam, A. 2016, ApJ 830, 27.
"""

from __future__ import annotations

import skydiff

from ._decorrelators import (
    DecorrelationConfig,
    Dmtn021Decorrelator,
    NoDecorrelation,
    NoDecorrelationConfig,
    ScoreDecorrelator,
    ScoreDecorrelatorConfig,
    SpatialDecorrelationConfig,
    SpatialDmtn021Decorrelator,
)

__all__ = [
    "DecorrelationConfig",
    "Dmtn021Decorrelator",
    "NoDecorrelation",
    "NoDecorrelationConfig",
    "ScoreDecorrelator",
    "ScoreDecorrelatorConfig",
    "SpatialDecorrelationConfig",
    "SpatialDmtn021Decorrelator",
]


@skydiff.hookimpl
def skydiff_register_algorithms(registries: skydiff.Registries) -> None:
    registries.decorrelation.add(NoDecorrelation)
    registries.decorrelation.add(Dmtn021Decorrelator)
    registries.decorrelation.add(SpatialDmtn021Decorrelator)
    registries.decorrelation.add(ScoreDecorrelator)
