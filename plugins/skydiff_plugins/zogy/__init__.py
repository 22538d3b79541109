r"""The ``zogy`` subtraction: proper image subtraction (Zackay, Ofek & Gal-Yam 2016).

Registered algorithm
--------------------
``subtraction: zogy``
    The proper difference :math:`D` (science flux units) with its PSF :math:`P_D`, the
    score :math:`S` whose variance plane holds the source-noise and astrometric terms (so
    that ``score.image / sqrt(score.variance)`` is the corrected score
    :math:`S_\mathrm{corr}`), exact variance propagation, a grid of PSF cells blended
    without seams for PSFs that vary across the field, filled bad pixels, recentred PSFs,
    and the flux ratio and registration measured on matched stars when needed
    (:class:`ZogySubtraction`).

The private modules hold the Fourier filters (``_filters``), the grid (``_grid``), the
matched-star measurements (``_stars``) and the input preparation (``_prepare``).

References
----------
.. [1] Zackay, B., Ofek, E. O. & Gal-Yam, A. 2016, ApJ 830, 27.
.. [2] Reiss, D. J. et al. 2021, DMTN-179, "Image differencing and decorrelation: numerical
   details".
"""

from __future__ import annotations

import skydiff

from ._zogy import FluxScalingError, ZogyConfig, ZogySubtraction

__all__ = ["FluxScalingError", "ZogyConfig", "ZogySubtraction"]


@skydiff.hookimpl
def skydiff_register_algorithms(registries: skydiff.Registries) -> None:
    """Register the ``zogy`` subtraction."""
    registries.subtraction.add(ZogySubtraction)
