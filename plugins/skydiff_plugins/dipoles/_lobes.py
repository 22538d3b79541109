r"""Unit-flux PSF lobes at arbitrary sub-pixel positions on a fixed stamp, with derivatives.

A lobe at :math:`(x, y)` is the sampled PSF image :math:`P` (odd side :math:`K`, unit sum)
moved by the Fourier shift theorem onto the stamp grid:

.. math::

    M(x, y) = \mathcal F^{-1}\!\left[\hat P(u, v)\,
              e^{-2\pi i\,(u\,\delta_x + v\,\delta_y)}\right],
    \qquad (\delta_x, \delta_y) = (x - c_0, y - r_0),

where :math:`(r_0, c_0)` is the image pixel at the stamp centre. This is the band-limited
(sinc) interpolation of the sampled PSF, exact for a band-limited PSF, and its derivatives
with respect to the lobe position are exact too:

.. math::

    \frac{\partial M}{\partial x} = \mathcal F^{-1}\!\left[-2\pi i\,u\,\hat P\,
    e^{-2\pi i\,(u\,\delta_x + v\,\delta_y)}\right],

and likewise for :math:`y` with :math:`v`. The canvas is odd-sized (no Nyquist row or
column, so real shifts stay exactly real) and padded so that a lobe anywhere within the
stamp plus ``reach`` pixels never wraps onto the stamp. The shift keeps the sum of the PSF
over the canvas, so the flux of a lobe is its total flux even when part of it falls outside
the stamp.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.fft

__all__ = ["ShiftedPsf"]


def odd_fast_length(minimum: int) -> int:
    """The smallest odd length >= ``minimum`` with a fast real FFT (5-smooth times 7s)."""
    length = scipy.fft.next_fast_len(max(int(minimum), 1), real=True)
    while length % 2 == 0:
        length = scipy.fft.next_fast_len(length + 1, real=True)
    return int(length)


class ShiftedPsf:
    """Unit-flux PSF images on an ``(side, side)`` stamp for arbitrary lobe positions.

    Parameters
    ----------
    kernel : ndarray of shape (K, K)
        The PSF image (odd ``K``, unit sum, centred on ``[K // 2, K // 2]``).
    side : int
        Odd side of the stamp.
    centre : tuple of int
        ``(row, col)`` image pixel of the stamp centre ``[side // 2, side // 2]``.
    reach : float
        How far (pixels) beyond the stamp half-width a lobe may move.
    """

    def __init__(self, kernel: np.ndarray, *, side: int, centre: tuple[int, int],
                 reach: float) -> None:
        size = kernel.shape[0]
        # A lobe at offset |delta| <= side // 2 + reach from the centre covers canvas pixels up
        # to n // 2 + delta + size // 2; what passes the canvas edge wraps to the low end and
        # must stay below the stamp's first pixel n // 2 - side // 2, i.e.
        # n > side // 2 + delta + size // 2. A full extra PSF width keeps the (tiny) far
        # ringing of the interpolant off the stamp too.
        n = odd_fast_length(side + size + math.ceil(max(reach, 0.0)) + 2)
        canvas = np.zeros((n, n), dtype=np.float64)
        start = n // 2 - size // 2
        canvas[start:start + size, start:start + size] = kernel
        self._spectrum = scipy.fft.rfft2(canvas)
        self._fy = scipy.fft.fftfreq(n)[:, None]
        self._fx = scipy.fft.rfftfreq(n)[None, :]
        self._n = n
        self._lo = n // 2 - side // 2
        self._side = side
        self._row = float(centre[0])
        self._col = float(centre[1])

    def images(self, xs: np.ndarray, ys: np.ndarray, *, derivatives: bool = False
               ) -> np.ndarray:
        """The lobes at ``(xs, ys)`` (image pixels), optionally with their position gradients.

        Parameters
        ----------
        xs, ys : ndarray of shape (m,)
            Lobe positions (column, row) in the image grid.
        derivatives : bool, optional
            Also return :math:`\\partial M/\\partial x` and :math:`\\partial M/\\partial y`.

        Returns
        -------
        ndarray of shape (m, side, side), or (m, 3, side, side) with derivatives
            ``[..., 0, :, :]`` the lobe, ``1`` its x derivative, ``2`` its y derivative.
        """
        dx = np.asarray(xs, dtype=np.float64) - self._col
        dy = np.asarray(ys, dtype=np.float64) - self._row
        ramp_y = np.exp(-2j * np.pi * self._fy[None] * dy[:, None, None])
        ramp_x = np.exp(-2j * np.pi * self._fx[None] * dx[:, None, None])
        spectra = self._spectrum[None] * ramp_y * ramp_x
        if derivatives:
            spectra = np.stack([spectra, -2j * np.pi * self._fx * spectra,
                                -2j * np.pi * self._fy * spectra], axis=1)
        shifted = scipy.fft.irfft2(spectra, s=(self._n, self._n), axes=(-2, -1))
        lo, side = self._lo, self._side
        return shifted[..., lo:lo + side, lo:lo + side]
