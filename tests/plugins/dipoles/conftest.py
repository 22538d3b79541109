"""Simulated science/template/difference triplets with detection-like catalogs for dipole tests.

Stars are circular Gaussians of width ``sigma`` sampled at pixel centres (the same image as
:class:`skydiff.GaussianPsf`, whose Fourier-shifted samples the dipole model uses; for
``sigma = 1.5`` the aliasing error is ~1e-5 of the peak). Noise is Gaussian with the expected
Poisson variance ``sky + model`` (times ``template_noise**2`` on the template); the variance
planes hold exactly these variances.

* :func:`make_field`: the difference is ``science - template`` with the summed variance, all
  with the same PSF (an ideally PSF-matched pair, independent pixels).
* :func:`make_matched_field`: the template has a narrower PSF and is PSF-matched to the
  science by a real convolution with a Gaussian kernel, so its noise is correlated between
  pixels; optionally the difference is decorrelated (DMTN-021), which gives it a PSF of its
  own and correlates its noise with the science and template planes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs
import numpy as np
import pytest
import scipy.signal
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
    footprints, catalog = _detections(difference.image, xs + shift[0] / 2.0,
                                      ys + shift[1] / 2.0, radius)
    return Field(science=science, template=template, difference=difference, catalog=catalog,
                 footprints=footprints, x=xs, y=ys, science_flux=np.array(f_sci),
                 template_flux=np.array(f_tmp), shift=shift)


def _detections(image: np.ndarray, mid_x: np.ndarray, mid_y: np.ndarray, radius: float
                ) -> tuple[np.ndarray, Table]:
    """Disk footprints around the midpoints (ids 1..n) and a detection-like catalog."""
    shape = image.shape
    rows, cols = np.indices(shape)
    footprints = np.zeros(shape, dtype=np.int32)
    n = mid_x.size
    peaks = np.full((n, 4), np.nan)
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
    return footprints, catalog


def _gaussian_kernel(sigma: float) -> np.ndarray:
    """A unit-sum Gaussian sampled at integer offsets, odd side ~8 sigma."""
    half = max(int(np.ceil(4.0 * sigma)), 1)
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    profile = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = np.outer(profile, profile)
    return kernel / kernel.sum()


def _transfer(kernel: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The DFT of a centred odd ``kernel`` placed with its centre at pixel (0, 0) of ``shape``."""
    canvas = np.zeros(shape)
    half = kernel.shape[0] // 2
    offsets = np.arange(-half, half + 1)
    canvas[np.ix_(offsets % shape[0], offsets % shape[1])] = kernel
    return np.fft.fft2(canvas)


def _circular(image: np.ndarray, transfer: np.ndarray) -> np.ndarray:
    """``image`` convolved (periodically) with the kernel whose DFT is ``transfer``."""
    return np.real(np.fft.ifft2(np.fft.fft2(image) * transfer))


def _centred(transfer: np.ndarray, side: int) -> np.ndarray:
    """The kernel of DFT ``transfer`` as an odd ``side`` image centred on its middle pixel."""
    kernel = np.real(np.fft.ifft2(transfer))
    half = side // 2
    offsets = np.arange(-half, half + 1)
    return kernel[np.ix_(offsets % transfer.shape[0], offsets % transfer.shape[1])]


def make_matched_field(*, seed: int, x: Any, y: Any, flux: float,
                       shift: tuple[float, float] = (1.0, 0.0),
                       shape: tuple[int, int] = (80, 80), sigma: float = 1.5,
                       template_sigma: float = 1.2, sky: float = 200.0,
                       decorrelate: bool = False, radius: float = 6.0) -> Field:
    r"""A triplet whose template was PSF-matched by a real convolution (correlated noise).

    The raw template (PSF width ``template_sigma``, stars at (x, y)) gets independent noise
    of variance ``sky + model`` and is convolved (periodically, by FFT) with the Gaussian
    kernel :math:`K` of width :math:`\sqrt{\sigma^2 - \sigma_t^2}`: the matched template
    :math:`t = K \otimes T`, variance plane :math:`K^2 \otimes V_T`, PSF the sampled
    template PSF convolved with :math:`K` (an :class:`skydiff.ImagePsf`, close to the
    science's Gaussian of width ``sigma``). The science (stars at (x, y) + shift, flux
    ``flux`` in both epochs) has independent noise. The difference is :math:`s - t` with
    variance :math:`V_s + V_t` and the science PSF, or with ``decorrelate`` the DMTN-021
    decorrelated :math:`\phi \otimes (s - t)`,
    :math:`\hat\phi = \sqrt{(\sigma_s^2 + \sigma_T^2) / (\sigma_s^2 + \sigma_T^2
    |\hat K|^2)}` with the sky variances :math:`\sigma^2` = ``sky``, whose variance plane
    is the exact :math:`\phi^2 \otimes V_s + (\phi \otimes K)^2 \otimes V_T` and whose
    PSF is :math:`\phi \otimes P_s`. Sources must stay ~15 px from the border (the
    convolutions wrap around).
    """
    rng = np.random.default_rng(seed)
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    fluxes = np.full(xs.shape, float(flux))
    model_sci = _render(shape, xs + shift[0], ys + shift[1], fluxes, sigma)
    model_raw = _render(shape, xs, ys, fluxes, template_sigma)
    var_sci = sky + model_sci
    var_raw = sky + model_raw
    sci = model_sci + sky + rng.normal(size=shape) * np.sqrt(var_sci)
    raw = model_raw + sky + rng.normal(size=shape) * np.sqrt(var_raw)
    kernel = _gaussian_kernel(math.sqrt(sigma**2 - template_sigma**2))
    k_hat = _transfer(kernel, shape)
    matched = _circular(raw, k_hat)
    var_matched = _circular(var_raw, _transfer(kernel**2, shape))
    template_psf = skydiff.GaussianPsf(template_sigma).kernel_image()
    matched_psf = skydiff.ImagePsf(scipy.signal.convolve2d(template_psf, kernel))
    science_psf = skydiff.GaussianPsf(sigma)
    diff = sci - matched
    var_diff = var_sci + var_matched
    diff_psf: Any = science_psf
    if decorrelate:
        phi_hat = np.sqrt(2.0 * sky / (sky + sky * np.abs(k_hat) ** 2))
        phi = np.real(np.fft.ifft2(phi_hat))
        diff = _circular(diff, phi_hat)
        var_diff = (_circular(var_sci, np.fft.fft2(phi**2))
                    + _circular(var_raw, np.fft.fft2(np.real(np.fft.ifft2(phi_hat * k_hat))
                                                     ** 2)))
        side = 4 * int(np.ceil(4.0 * sigma)) + 1
        kernel_side = science_psf.kernel_image().shape[0]
        padded = np.pad(science_psf.kernel_image(), (side - kernel_side) // 2)
        small_phi = np.sqrt(2.0 / (1.0 + np.abs(_transfer(kernel, (side, side))) ** 2))
        diff_psf = skydiff.ImagePsf(_centred(_transfer(padded, (side, side)) * small_phi,
                                             side))
    science = skydiff.Exposure.from_arrays(sci, variance=var_sci, psf=science_psf)
    template = skydiff.Exposure.from_arrays(matched, variance=var_matched, psf=matched_psf)
    difference = skydiff.Exposure.from_arrays(diff, variance=var_diff, psf=diff_psf)
    footprints, catalog = _detections(difference.image, xs + shift[0] / 2.0,
                                      ys + shift[1] / 2.0, radius)
    return Field(science=science, template=template, difference=difference, catalog=catalog,
                 footprints=footprints, x=xs, y=ys, science_flux=fluxes,
                 template_flux=fluxes.copy(), shift=shift)


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
def matched_field_factory() -> Callable[..., Field]:
    """:func:`make_matched_field`."""
    return make_matched_field


@pytest.fixture(scope="session")
def grid_positions() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """:func:`grid`."""
    return grid


@pytest.fixture(scope="session")
def run_measure() -> Callable[[skydiff.Measurement, skydiff.MeasurementInputs], Table]:
    """:func:`measure`."""
    return measure
