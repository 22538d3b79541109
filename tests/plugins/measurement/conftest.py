"""Simulated difference images with injected PSF sources for the measurement plugin tests.

Sources are rendered analytically (circular or elliptical Gaussians sampled at pixel centres,
the convention of :class:`skydiff.GaussianPsf`), independently of
:func:`skydiff.photometry.psf_stamps`, so the PSF models the plugins build are tested
against an exact truth. Noise is Gaussian with a known variance plane.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs
import numpy as np
import pytest
from astropy.table import Table

import skydiff

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


class VaryingGaussianPsf:
    """A circular Gaussian PSF whose width changes linearly across the field (parent pixels)."""

    def __init__(self, sigma0: float, gradient: tuple[float, float], *, size: int = 25,
                 position: tuple[float, float] = (0.0, 0.0)) -> None:
        self.sigma0 = sigma0
        self.gradient = gradient
        self.size = size
        self.position = position

    def sigma(self, x: Any, y: Any) -> Any:
        return self.sigma0 + self.gradient[0] * np.asarray(x) + self.gradient[1] * np.asarray(y)

    @property
    def average_position(self) -> tuple[float, float]:
        return self.position

    def kernel_image(self, x: float | None = None, y: float | None = None) -> np.ndarray:
        x = self.position[0] if x is None else x
        y = self.position[1] if y is None else y
        return skydiff.GaussianPsf(float(self.sigma(x, y)), size=self.size).kernel_image()

    def fwhm(self, x: float | None = None, y: float | None = None) -> float:
        x = self.position[0] if x is None else x
        y = self.position[1] if y is None else y
        return FWHM_PER_SIGMA * float(self.sigma(x, y))


def render(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, flux: np.ndarray,
           xx: np.ndarray, yy: np.ndarray, xy: np.ndarray | None = None) -> np.ndarray:
    """Sum of unit-integral elliptical Gaussians (covariance xx, yy, xy) sampled at pixel
    centres, times ``flux`` (loop over the few hundred sources of a test)."""
    image = np.zeros(shape, dtype=np.float64)
    xy = np.zeros_like(xx) if xy is None else xy
    for k in range(x.size):
        half = math.ceil(7.0 * math.sqrt(max(xx[k], yy[k])))
        r0, r1 = max(int(y[k]) - half, 0), min(int(y[k]) + half + 2, shape[0])
        c0, c1 = max(int(x[k]) - half, 0), min(int(x[k]) + half + 2, shape[1])
        dy = np.arange(r0, r1)[:, None] - y[k]
        dx = np.arange(c0, c1)[None, :] - x[k]
        det = xx[k] * yy[k] - xy[k] ** 2
        q = (yy[k] * dx * dx - 2.0 * xy[k] * dx * dy + xx[k] * dy * dy) / det
        image[r0:r1, c0:c1] += flux[k] * np.exp(-0.5 * q) / (2.0 * math.pi * math.sqrt(det))
    return image


@attrs.frozen
class Scene:
    """A simulated difference image, its truth and a detection-like catalog."""

    exposure: skydiff.Exposure
    truth: Table
    catalog: Table
    footprints: np.ndarray

    def inputs(self, catalog: Table | None = None, **changes: Any) -> skydiff.MeasurementInputs:
        fields = {"catalog": self.catalog if catalog is None else catalog,
                  "difference": self.exposure, "footprints": self.footprints}
        fields.update(changes)
        return skydiff.MeasurementInputs(**fields)


def make_scene(*, seed: int, psf: str = "constant", shape: tuple[int, int] = (400, 400),
               spacing: int = 20, noise: float = 10.0, snr: tuple[float, float] = (20.0, 100.0),
               negative_fraction: float = 0.5, jitter: float = 1.0,
               origin: tuple[int, int] = (0, 0)) -> Scene:
    """Point sources on a jittered grid, S/N log-uniform in ``snr``, half of them negative.

    ``psf`` is ``"constant"`` (GaussianPsf sigma 1.5) or ``"varying"`` (sigma from 1.3 to 2.1
    across the field). The variance plane grows from ``noise**2`` to ``1.5 noise**2`` with x.
    The catalog positions are the true ones plus uniform offsets within +-``jitter`` pixels
    (detection peaks), and footprints are disks of radius 5 around the true positions.
    """
    rng = np.random.default_rng(seed)
    height, width = shape
    gx, gy = np.meshgrid(np.arange(spacing, width - spacing + 1, spacing, dtype=float),
                         np.arange(spacing, height - spacing + 1, spacing, dtype=float))
    n = gx.size
    x = gx.ravel() + rng.uniform(-2.0, 2.0, n)
    y = gy.ravel() + rng.uniform(-2.0, 2.0, n)
    x0, y0 = origin
    if psf == "constant":
        model: Any = skydiff.GaussianPsf(1.5)
    else:
        model = VaryingGaussianPsf(1.3, (0.8 / width, 0.0))
    sigma = np.asarray(model.sigma * np.ones(n) if psf == "constant"
                       else model.sigma(x + x0, y + y0), dtype=float)
    variance = noise**2 * (1.0 + 0.5 * np.arange(width)[None, :] / width) * np.ones((height, 1))
    local_noise = noise * np.sqrt(1.0 + 0.5 * x / width)
    target = np.exp(rng.uniform(math.log(snr[0]), math.log(snr[1]), n))
    sign = np.where(rng.uniform(size=n) < negative_fraction, -1.0, 1.0)
    # PSF-fit S/N of a Gaussian on a flat background: F / (sigma_pix sqrt(4 pi sigma^2)).
    flux = sign * target * local_noise * np.sqrt(4.0 * math.pi * sigma**2)
    image = render(shape, x, y, flux, sigma**2, sigma**2)
    image += rng.normal(size=shape) * np.sqrt(variance)
    exposure = skydiff.Exposure.from_arrays(image.astype(np.float32),
                                            variance=variance.astype(np.float32), psf=model,
                                            origin=origin)
    truth = Table({"x": x, "y": y, "flux": flux, "sigma": sigma, "snr": target})
    det_x = x + rng.uniform(-jitter, jitter, n)
    det_y = y + rng.uniform(-jitter, jitter, n)
    ids = np.arange(1, n + 1, dtype=np.int64)
    rows, cols = np.indices(shape)
    footprints = np.zeros(shape, dtype=np.int32)
    for k in range(n):  # loop over sources
        footprints[(rows - y[k]) ** 2 + (cols - x[k]) ** 2 <= 25.0] = ids[k]
    catalog = Table({
        "id": ids, "x": det_x, "y": det_y, "peak_value": flux / (2 * math.pi * sigma**2),
        "significance": sign * target, "is_negative": sign < 0,
        "sky_source": np.zeros(n, dtype=bool),
    })
    return Scene(exposure, truth, catalog, footprints)


def with_columns(catalog: Table, columns: Table, *, move: bool = False) -> Table:
    """A copy of ``catalog`` with the measured columns added (and x, y set to the centroid)."""
    out = catalog.copy()
    for name in columns.colnames:
        out[name] = columns[name]
    if move:
        out["x"] = columns["centroid_x"]
        out["y"] = columns["centroid_y"]
    return out


@pytest.fixture
def scene_factory() -> Callable[..., Scene]:
    """:func:`make_scene`."""
    return make_scene


@pytest.fixture
def add_columns() -> Callable[..., Table]:
    """:func:`with_columns`."""
    return with_columns


@pytest.fixture
def gaussian_renderer() -> Callable[..., np.ndarray]:
    """:func:`render`."""
    return render


@pytest.fixture
def varying_psf() -> type[VaryingGaussianPsf]:
    """:class:`VaryingGaussianPsf`."""
    return VaryingGaussianPsf
