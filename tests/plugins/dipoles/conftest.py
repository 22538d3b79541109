"""Simulated science/template/difference triplets with detection-like catalogs for dipole tests.

Stars are circular Gaussians of width ``sigma`` sampled at pixel centres (the same image as
:class:`skydiff.GaussianPsf`, whose Fourier-shifted samples the dipole model uses; for
``sigma = 1.5`` the aliasing error is ~1e-5 of the peak). Noise is Gaussian with the expected
Poisson variance ``sky + model`` (times ``template_noise**2`` on the template); the variance
planes hold exactly these variances, and the difference is ``science - template`` with the
summed variance, all with the same PSF (an ideally PSF-matched pair).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import numpy as np
import pytest
from astropy.table import Table, hstack

import skydiff


@attrs.frozen
class Field:
    """A simulated triplet, its truth and a detection-like catalog with footprints."""

    science: skydiff.Exposure
    template: skydiff.Exposure
    difference: skydiff.Exposure
    catalog: Table
    footprints: np.ndarray
    x: np.ndarray
    y: np.ndarray
    science_flux: np.ndarray
    template_flux: np.ndarray
    shift: tuple[float, float]

    def inputs(self, *, science: bool = True, template: bool = True,
               catalog: Table | None = None) -> skydiff.MeasurementInputs:
        """The measurement inputs (optionally without the science image or the template)."""
        return skydiff.MeasurementInputs(
            catalog=self.catalog if catalog is None else catalog, difference=self.difference,
            footprints=self.footprints, science=self.science if science else None,
            template=self.template if template else None)


def _render(shape: tuple[int, int], xs: np.ndarray, ys: np.ndarray, fluxes: np.ndarray,
            sigma: float) -> np.ndarray:
    rows = np.arange(shape[0], dtype=np.float64)
    cols = np.arange(shape[1], dtype=np.float64)
    gy = np.exp(-0.5 * ((rows[None, :] - ys[:, None]) / sigma) ** 2)
    gx = np.exp(-0.5 * ((cols[None, :] - xs[:, None]) / sigma) ** 2)
    return np.einsum("n,nr,nc->rc", fluxes / (2.0 * np.pi * sigma**2), gy, gx)


def make_field(*, seed: int, x: Any, y: Any, science_flux: Any, template_flux: Any,
               shift: tuple[float, float] = (0.0, 0.0), shape: tuple[int, int] = (80, 80),
               sigma: float = 1.5, sky: float = 200.0, template_noise: float = 1.0,
               radius: float = 6.0) -> Field:
    """Simulate a triplet: template sources at (x, y), science sources at (x, y) + shift.

    Footprints are disks of ``radius`` around the midpoints (x, y) + shift / 2 (ids 1..n);
    ``pos_peak_*`` / ``neg_peak_*`` are the largest / smallest difference pixel inside them,
    as a detector merging positive and negative peaks would report.
    """
    rng = np.random.default_rng(seed)
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    f_sci = np.broadcast_to(np.asarray(science_flux, dtype=np.float64), xs.shape)
    f_tmp = np.broadcast_to(np.asarray(template_flux, dtype=np.float64), xs.shape)
    model_sci = _render(shape, xs + shift[0], ys + shift[1], f_sci, sigma)
    model_tmp = _render(shape, xs, ys, f_tmp, sigma)
    var_sci = sky + model_sci
    var_tmp = (sky + model_tmp) * template_noise**2
    sci = model_sci + sky + rng.normal(size=shape) * np.sqrt(var_sci)
    tmp = model_tmp + sky + rng.normal(size=shape) * np.sqrt(var_tmp)
    psf = skydiff.GaussianPsf(sigma)
    science = skydiff.Exposure.from_arrays(sci, variance=var_sci, psf=psf)
    template = skydiff.Exposure.from_arrays(tmp, variance=var_tmp, psf=psf)
    difference = skydiff.Exposure.from_arrays(science.image.astype(np.float64)
                                              - template.image.astype(np.float64),
                                              variance=var_sci + var_tmp, psf=psf)
    mid_x, mid_y = xs + shift[0] / 2.0, ys + shift[1] / 2.0
    rows, cols = np.indices(shape)
    footprints = np.zeros(shape, dtype=np.int32)
    n = xs.size
    peaks = np.full((n, 4), np.nan)
    image = difference.image
    for k in range(n):  # loop over sources
        disk = ((cols - mid_x[k]) ** 2 + (rows - mid_y[k]) ** 2 <= radius**2) & (footprints == 0)
        footprints[disk] = k + 1
        values = np.where(disk, image, np.nan)
        r_max, c_max = np.unravel_index(np.nanargmax(values), shape)
        r_min, c_min = np.unravel_index(np.nanargmin(values), shape)
        peaks[k] = (c_max, r_max, c_min, r_min)
    footprints.setflags(write=False)
    catalog = Table({
        "id": np.arange(1, n + 1, dtype=np.int64), "x": mid_x, "y": mid_y,
        "pos_peak_x": peaks[:, 0], "pos_peak_y": peaks[:, 1],
        "neg_peak_x": peaks[:, 2], "neg_peak_y": peaks[:, 3],
        "footprint_area": np.bincount(footprints.ravel(), minlength=n + 1)[1:].astype(np.int64),
        "sky_source": np.zeros(n, dtype=bool),
    })
    return Field(science=science, template=template, difference=difference, catalog=catalog,
                 footprints=footprints, x=xs, y=ys, science_flux=np.array(f_sci),
                 template_flux=np.array(f_tmp), shift=shift)


def grid(n_side: int, *, start: float, step: float, offset: float = 0.3
         ) -> tuple[np.ndarray, np.ndarray]:
    """Positions on an ``n_side`` x ``n_side`` grid (sub-pixel ``offset`` from integers)."""
    axis = start + step * np.arange(n_side) + offset
    xs, ys = np.meshgrid(axis, axis)
    return xs.ravel(), ys.ravel()


def measure(plugin: skydiff.Measurement, inputs: skydiff.MeasurementInputs) -> Table:
    """Run ``plugin`` and return the input catalog with its columns appended."""
    result = plugin.run(inputs)
    return hstack([inputs.catalog, result.columns])


@pytest.fixture(scope="session")
def field_factory() -> Callable[..., Field]:
    """:func:`make_field`."""
    return make_field


@pytest.fixture(scope="session")
def grid_positions() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """:func:`grid`."""
    return grid


@pytest.fixture(scope="session")
def run_measure() -> Callable[[skydiff.Measurement, skydiff.MeasurementInputs], Table]:
    """:func:`measure`."""
    return measure
