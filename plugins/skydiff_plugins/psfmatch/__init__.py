r"""PSF matching: Alard–Lupton and delta-function kernels, subtraction with and without pre-filter.

Registered algorithms
---------------------
``kernel_basis: al``
    Gaussians × polynomials sized from the two PSF FWHMs (Alard & Lupton 1998).
``kernel_basis: df``
    Delta functions with a finite-difference regularization (Becker et al. 2012).
``subtraction: al``
    ``lsst.ip.diffim``'s ``AlardLuptonSubtractTask``: spatially varying kernel, differential
    background, decorrelation (DMTN-021).
``subtraction: al_preconvolve``
    ``AlardLuptonPreconvolveSubtractTask``: the science image is pre-filtered with its own
    PSF and the template matched to it, giving a score (likelihood) image (DMTN-179); the
    kernel comes from stars or (``kernel_source = "model_psf"``) from the PSF models.
``subtraction: model_psf``
    ``ModelPsfMatchTask`` as a subtraction: the kernel matches the two PSF *models* (fitted
    by the same solver on PSF images on a grid of positions) and is scaled to the
    photometric ratio; the rest is ``al``. For star-poor fields.

The mathematics (bases, the batched per-stamp and spatial least squares, regularization,
candidate rejection) lives in the private modules ``_basis``, ``_solve`` and ``_stats``; the
PSF-model candidates and the photometric scale in ``_model_kernel``.

References
----------
.. [1] Alard, C. & Lupton, R. H. 1998, ApJ 503, 325.
.. [2] Alard, C. 2000, A&AS 144, 363.
.. [3] Becker, A. C. et al. 2012, MNRAS 425, 1341.
.. [4] Reiss, D. J. & Lupton, R. H. 2016, DMTN-021.
.. [5] Reiss, D. J. et al. 2021, DMTN-179.
"""

from __future__ import annotations

import skydiff

from ._al import (
    AlSubtraction,
    AlSubtractionConfig,
    KernelConditionError,
    MatchingConfig,
    PsfMatchConfig,
)
from ._kernel_basis import AlBasisConfig, AlKernelBasis, DfBasisConfig, DfKernelBasis
from ._model_kernel import PsfModelsConfig
from ._model_psf import ModelPsfConfig, ModelPsfSubtraction
from ._preconvolve import AlPreconvolveConfig, AlPreconvolveSubtraction
from ._sources import KernelSourcesConfig, KernelSourceSelection, select_kernel_sources

__all__ = [
    "AlBasisConfig",
    "AlKernelBasis",
    "AlPreconvolveConfig",
    "AlPreconvolveSubtraction",
    "AlSubtraction",
    "AlSubtractionConfig",
    "DfBasisConfig",
    "DfKernelBasis",
    "KernelConditionError",
    "KernelSourceSelection",
    "KernelSourcesConfig",
    "MatchingConfig",
    "ModelPsfConfig",
    "ModelPsfSubtraction",
    "PsfMatchConfig",
    "PsfModelsConfig",
    "select_kernel_sources",
]


@skydiff.hookimpl
def skydiff_register_algorithms(registries: skydiff.Registries) -> None:
    """Register the ``al``/``df`` bases and the ``al``/``al_preconvolve``/``model_psf``
    subtractions."""
    registries.kernel_basis.add(AlKernelBasis)
    registries.kernel_basis.add(DfKernelBasis)
    registries.subtraction.add(AlSubtraction)
    registries.subtraction.add(AlPreconvolveSubtraction)
    registries.subtraction.add(ModelPsfSubtraction)
