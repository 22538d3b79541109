"""Simulated difference images for the ``threshold`` detector tests."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import skydiff
from skydiff.sim import render_stars

#: FWHM (pixels) of the PSF of the simulated difference images.
FWHM = 3.0


def optimal_flux(snr: float, *, sigma: float = 1.0, fwhm: float = FWHM) -> float:
    r"""Flux of a point source of optimal S/N ``snr``: :math:`\nu\,\sigma\sqrt{\mathrm{NEA}}`.

    :math:`\mathrm{NEA} = 1 / \sum P^2` of the (pixel-sampled) Gaussian PSF image.
    """
    kernel = skydiff.GaussianPsf.from_fwhm(fwhm).kernel_image()
    return snr * sigma * math.sqrt(1.0 / float((kernel**2).sum()))


def make_difference(shape: tuple[int, int], *, seed: int, x: Any = (), y: Any = (),
                    flux: Any = (), sigma: float = 1.0, fwhm: float = FWHM,
                    background: np.ndarray | None = None, mask: np.ndarray | None = None,
                    psf: bool = True) -> skydiff.Exposure:
    """White Gaussian noise of standard deviation ``sigma`` plus Gaussian point sources.

    The variance plane is ``sigma**2`` everywhere; the PSF is the Gaussian the sources were
    rendered with (sampled at pixel centres, like :class:`skydiff.GaussianPsf`).
    """
    rng = np.random.default_rng(seed)
    image = (sigma * rng.standard_normal(shape)).astype(np.float32)
    if len(np.atleast_1d(x)):
        image += render_stars(shape, np.atleast_1d(x), np.atleast_1d(y),
                              np.atleast_1d(flux), fwhm=fwhm)
    if background is not None:
        image += background.astype(np.float32)
    variance = np.full(shape, sigma**2, dtype=np.float32)
    return skydiff.Exposure(image, mask=mask, variance=variance,
                            psf=skydiff.GaussianPsf.from_fwhm(fwhm) if psf else None)


def grid_positions(shape: tuple[int, int], spacing: float, *, seed: int,
                   margin: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
    """Positions on a square grid with uniform sub-pixel jitter of ±0.5 pixel."""
    rng = np.random.default_rng(seed)
    rows = np.arange(margin, shape[0] - margin, spacing)
    cols = np.arange(margin, shape[1] - margin, spacing)
    yy, xx = np.meshgrid(rows, cols, indexing="ij")
    x = xx.ravel() + rng.uniform(-0.5, 0.5, xx.size)
    y = yy.ravel() + rng.uniform(-0.5, 0.5, yy.size)
    return x, y


def match(catalog: Any, x: np.ndarray, y: np.ndarray, radius: float = 2.0
          ) -> np.ndarray:
    """Index of the catalog row whose peak is within ``radius`` of each position (-1: none)."""
    if len(catalog) == 0:
        return np.full(np.size(x), -1)
    cx = np.asarray(catalog["x"])
    cy = np.asarray(catalog["y"])
    distance = np.hypot(cx[None, :] - np.asarray(x)[:, None],
                        cy[None, :] - np.asarray(y)[:, None])
    nearest = distance.argmin(axis=1)
    return np.where(distance[np.arange(nearest.size), nearest] <= radius, nearest, -1)


@pytest.fixture
def helpers() -> Any:
    """The helper functions of this module, as attributes."""

    class Helpers:
        optimal_flux = staticmethod(optimal_flux)
        make_difference = staticmethod(make_difference)
        grid_positions = staticmethod(grid_positions)
        match = staticmethod(match)

    return Helpers
