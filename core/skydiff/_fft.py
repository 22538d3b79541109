r"""Private FFT engine behind :mod:`skydiff.convolve`: one padded transform, many small kernels.

:class:`FFTConvolver` convolves ``float32`` planes of shape ``(H, W)`` with small odd-sized
kernels through zero-padded real FFTs of :mod:`scipy.fft` (all cores, ``complex64``). What
makes it cheaper than ``irfft2(rfft2(image, s) * rfft2(kernel, s))``:

* **Kernel spectra without a full-size FFT.** A kernel occupies only ``k_r`` rows of the padded
  array, so its 2-D transform factorises into a short real FFT of each of its rows along axis 1
  followed by a DFT along axis 0 that is a dense matrix product,

  .. math::

      \hat K[u, v] = \sum_{i=0}^{k_r-1} e^{-2\pi i\,u i / P_r}\,
      \big(\mathcal F_1 K\big)[i, v].

  Rows :math:`u` and :math:`P_r - u` share the cosines and sines of the phase
  :math:`\theta = 2\pi u i / P_r`: with :math:`Y = \cos(\theta)\,\mathcal F_1 K` and
  :math:`Z = -i\sin(\theta)\,\mathcal F_1 K`, row :math:`u` is :math:`Y + Z` and row
  :math:`P_r - u` is :math:`Y - Z`. Only half the rows are computed, as real ``float32`` GEMMs
  of inner dimension :math:`k_r` on the interleaved real and imaginary parts: half the
  arithmetic of one ``complex64`` GEMM over all rows, a few milliseconds on a 2048×4096 frame
  for a 21-row kernel (less than a fifth of a full-frame FFT). The products run by blocks of
  a few rows, each small enough that OpenBLAS computes it on the calling thread (a larger
  product wakes its thread pool, whose threads spin for ~0.1 s afterwards and slow down the
  FFTs that follow on a small machine; complex GEMMs do so from about 2**16 multiply-adds),
  shared out among threads of the engine. The multiplication by the image spectrum is
  applied to each block while it is in cache (:meth:`FFTConvolver.kernel_spectrum` with
  ``times=``).
* **Inverse in two steps, grouped.** The inverse 2-D transform is an inverse FFT along axis 0
  followed by a real inverse FFT along axis 1. A weight that depends on the row only commutes
  with the second step, so spatial terms sharing a column factor share it
  (:meth:`FFTConvolver.convolve_terms`). The weighting and summing passes run by blocks of
  rows that stay in cache, shared out among threads (NumPy releases the GIL).
* **Smaller padding.** For a "same"-shape output only :math:`k//2` zero rows/columns are
  needed (not :math:`k - 1`): with the kernel stored at rows :math:`[0, k_r)` of a circular
  array of :math:`P_r \ge H + k_r // 2` rows, the wrapped contributions of the circular
  convolution fall on zero padding for every output row :math:`r \in [k_r//2, k_r//2 + H)`.
  Axis 0 is padded to :func:`scipy.fft.next_fast_len` and axis 1 (the real axis) to
  ``next_fast_len(..., real=True)``.
* **No fresh full-frame allocations per transform.** Every 35 MB array obtained from the
  allocator is mapped and zeroed page by page by the kernel on first touch, about a quarter
  of an FFT's cost on a 2048×4096 frame. The transforms therefore write into buffers owned
  by the engine, through the ``out=`` argument of SciPy's pocketfft binding
  (``scipy.fft._pocketfft.pypocketfft``, stable since SciPy 1.4). That module is private to
  SciPy: it is probed once at import, and if it is missing or misbehaves the engine falls
  back to the public :mod:`scipy.fft` functions (same results, more allocations).

Nothing here is public API; :mod:`skydiff.convolve` documents the behaviour.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.fft

from skydiff.parallel import cpu_count, parallel_rows

__all__ = ["FFTConvolver", "TermWeights", "same_shape_padding"]

#: Workers for scipy.fft (all cores).
WORKERS = -1

#: Kernels with more rows than this get their spectrum from a padded rfft2 instead of the
#: row-FFT + GEMM factorisation (whose cost grows linearly with the number of rows).
GEMM_MAX_ROWS = 48

#: Largest number of multiply-adds of one real matrix product: OpenBLAS computes products of
#: fewer than twice 2**18 (``SMP_THRESHOLD_MIN`` x ``GEMM_MULTITHREAD_THRESHOLD``) on the calling
#: thread. (Complex products are threaded from much smaller sizes, hence real arithmetic.)
SERIAL_GEMM = (1 << 19) - 1

#: Elementwise passes over arrays of at least this many elements are split among threads.
PARALLEL_SIZE = 1 << 19

#: Target bytes of one block of rows of an elementwise pass (stays in the L2 cache).
_BLOCK_BYTES = 1 << 18

#: ``(row factor, column factor)`` of one spatial term: arrays of shape ``(H, 1)`` and
#: ``(1, W)`` (float32), or None for a factor that is identically one.
TermWeights = tuple[np.ndarray | None, np.ndarray | None]


def _probe_pocketfft() -> Any:
    """SciPy's pocketfft binding if its ``out=`` transforms work as expected, else None."""
    try:
        from scipy.fft._pocketfft import pypocketfft as binding

        rng = np.random.default_rng(0)
        real = rng.normal(size=(6, 10)).astype(np.float32)
        spectrum = np.empty((6, 6), dtype=np.complex64)
        binding.r2c(real, (0, 1), True, 0, spectrum, 1)
        if not np.allclose(spectrum, np.fft.rfft2(real), atol=1e-4):
            return None
        binding.c2c(spectrum, (0,), False, 2, spectrum, 1)
        back = np.empty_like(real)
        binding.c2r(spectrum, (1,), 10, False, 2, back, 1)
        if not np.allclose(back, real, atol=1e-5):
            return None
    except Exception:  # pragma: no cover - depends on the SciPy build
        return None
    return binding


#: The pocketfft binding used for buffer-reusing transforms, or None (public API fallback).
POCKETFFT: Any = _probe_pocketfft()


def same_shape_padding(shape: tuple[int, int], kernel_shape: tuple[int, int]
                       ) -> tuple[int, int]:
    """The FFT size of a zero-padded same-shape convolution: ``n + k // 2``, rounded up fast.

    Parameters
    ----------
    shape, kernel_shape : tuple of int
        ``(H, W)`` of the image and ``(k_r, k_c)`` of the largest kernel (odd sizes).

    Returns
    -------
    tuple of int
        ``(next_fast_len(H + k_r // 2), next_fast_len(W + k_c // 2, real=True))``.
    """
    height, width = (int(v) for v in shape)
    k_r, k_c = (int(v) for v in kernel_shape)
    return (scipy.fft.next_fast_len(height + k_r // 2),
            scipy.fft.next_fast_len(width + k_c // 2, real=True))


class FFTConvolver:
    """Same-shape zero-padded FFT convolutions of ``(H, W)`` planes with small kernels.

    Parameters
    ----------
    shape : tuple of int
        ``(H, W)`` of the planes.
    kernel_shape : tuple of int
        ``(k_r, k_c)``, the largest kernel shape (odd sizes).
    padded : tuple of int, optional
        The FFT size; default :func:`same_shape_padding`. Must be at least
        ``(H + k_r // 2, W + k_c // 2)``.
    reuse_buffers : bool, optional
        Write transforms into engine-owned buffers (default, when SciPy's pocketfft binding
        is usable); False uses the public :mod:`scipy.fft` functions only.

    Notes
    -----
    Instances hold scratch buffers and are not thread-safe; make one per call. A spectrum
    returned by :meth:`forward` stays valid until the next :meth:`forward` with
    ``reuse=True``.
    """

    def __init__(self, shape: tuple[int, int], kernel_shape: tuple[int, int], *,
                 padded: tuple[int, int] | None = None, reuse_buffers: bool = True) -> None:
        self.shape: tuple[int, int] = (int(shape[0]), int(shape[1]))
        self.kernel_shape: tuple[int, int] = (int(kernel_shape[0]), int(kernel_shape[1]))
        self.padded: tuple[int, int] = (same_shape_padding(self.shape, self.kernel_shape)
                                        if padded is None else (int(padded[0]), int(padded[1])))
        p_r, p_c = self.padded
        if p_r < self.shape[0] + self.kernel_shape[0] // 2 or \
                p_c < self.shape[1] + self.kernel_shape[1] // 2:
            msg = f"padded shape {self.padded} is too small for {self.shape} and {kernel_shape}"
            raise ValueError(msg)
        self.spectrum_shape: tuple[int, int] = (p_r, p_c // 2 + 1)
        self._pocketfft: Any = POCKETFFT if reuse_buffers else None
        self._threads = cpu_count()
        self._phases: tuple[np.ndarray, np.ndarray] | None = None
        self._real: np.ndarray | None = None
        self._real_dirty = False
        self._spectrum: np.ndarray | None = None
        self._scratch: list[np.ndarray] = []

    # -- buffers --------------------------------------------------------------------------

    def _complex(self) -> np.ndarray:
        """A complex scratch buffer of :attr:`spectrum_shape` (recycled when possible)."""
        if self._scratch:
            return self._scratch.pop()
        return np.empty(self.spectrum_shape, dtype=np.complex64)

    def _recycle(self, buffer: np.ndarray) -> None:
        if buffer.shape == self.spectrum_shape and buffer.dtype == np.complex64 \
                and buffer.flags.c_contiguous and len(self._scratch) < 2:
            self._scratch.append(buffer)

    def _real_buffer(self) -> np.ndarray:
        """The padded real buffer with zero padding (re-zeroed after use as an output)."""
        if self._real is None:
            self._real = np.zeros(self.padded, dtype=np.float32)
        elif self._real_dirty:
            height, width = self.shape
            self._real[height:, :] = 0.0
            self._real[:height, width:] = 0.0
        self._real_dirty = False
        return self._real

    def release(self) -> None:
        """Drop every scratch buffer."""
        self._real = None
        self._spectrum = None
        self._scratch.clear()

    # -- transforms -----------------------------------------------------------------------

    def forward(self, plane: np.ndarray, *, zero: np.ndarray | None = None,
                reuse: bool = False) -> np.ndarray:
        """``rfft2`` of ``plane`` zero-padded to :attr:`padded` (``complex64``).

        Parameters
        ----------
        plane : ndarray of shape (H, W)
            Converted to ``float32`` on the fly; not modified.
        zero : ndarray of bool of shape (H, W), optional
            Pixels set to zero before the transform (e.g. non-finite ones).
        reuse : bool, optional
            Write into the engine's spectrum buffer, overwriting the spectrum of a previous
            ``reuse=True`` call; by default a new array is returned.
        """
        real = self._real_buffer()
        height, width = self.shape
        inner = real[:height, :width]
        source = np.asarray(plane)

        def copy(block: slice) -> None:
            np.copyto(inner[block], source[block], casting="same_kind")

        if source.shape == inner.shape:
            self._row_blocks(height, width, copy)
        else:
            np.copyto(inner, source, casting="same_kind")
        if zero is not None:
            inner[zero] = 0.0
        if self._pocketfft is None:
            spectrum: np.ndarray = scipy.fft.rfft2(real, workers=WORKERS)
            return spectrum
        if reuse:
            if self._spectrum is None:
                self._spectrum = np.empty(self.spectrum_shape, dtype=np.complex64)
            out = self._spectrum
        else:
            out = np.empty(self.spectrum_shape, dtype=np.complex64)
        self._pocketfft.r2c(real, (0, 1), True, 0, out, self._threads)
        return out

    def kernel_spectrum(self, kernel: np.ndarray, *, out: np.ndarray | None = None,
                        times: np.ndarray | None = None) -> np.ndarray:
        """The 2-D ``rfft`` of ``kernel`` stored at the origin of the padded array.

        Parameters
        ----------
        kernel : ndarray of shape (a, b)
            ``a <= k_r`` and ``b <= k_c``; cast to ``float32``.
        out : ndarray of complex64, optional
            C-contiguous destination of shape :attr:`spectrum_shape`; may be ``times``.
        times : ndarray of complex64, optional
            A spectrum of shape :attr:`spectrum_shape` (e.g. :meth:`forward` of a plane): the
            result is then the product of the two, each block of the kernel spectrum being
            multiplied while it is in cache.

        Returns
        -------
        ndarray of complex64 of shape :attr:`spectrum_shape`
        """
        kernel32 = np.asarray(kernel, dtype=np.float32)
        rows = kernel32.shape[0]
        if out is None:
            out = np.empty(self.spectrum_shape, dtype=np.complex64)
        if rows > GEMM_MAX_ROWS:
            spectrum = scipy.fft.rfft2(kernel32, s=self.padded, workers=WORKERS)
            if times is None:
                np.copyto(out, spectrum)
            else:
                np.multiply(spectrum, times, out=out)
            return out
        p_r, p_c = self.padded
        row_spectra = np.ascontiguousarray(scipy.fft.rfft(kernel32, n=p_c, axis=1),
                                           dtype=np.complex64)
        # (F1 K) and -i (F1 K) as real (rows, 2 * n_c) matrices of interleaved (re, im) pairs
        right_y = row_spectra.view(np.float32)
        right_z = (row_spectra * np.complex64(-1j)).view(np.float32)
        cos, sin = self._row_phases(rows)
        width = right_y.shape[1]
        n_top = p_r // 2 + 1  # rows u = 0 .. P_r // 2; rows P_r - u for u = 1 .. (P_r - 1) // 2
        last_mirror = (p_r - 1) // 2
        block = SERIAL_GEMM // max(1, rows * width)
        cols = width
        if block < 2:  # very wide planes: blocks of columns too (whole complex values)
            block = 2
            cols = max(2, SERIAL_GEMM // (2 * max(1, rows)) // 2 * 2)
        destination = out

        def store(y: np.ndarray, z: np.ndarray, ufunc: np.ufunc, scratch: np.ndarray,
                  target: slice, columns: slice) -> None:
            half_columns = slice(columns.start // 2, columns.stop // 2)
            if times is None:
                ufunc(y, z, out=destination[target].view(np.float32)[:, columns])
                return
            ufunc(y, z, out=scratch)
            np.multiply(scratch.view(np.complex64), times[target, half_columns],
                        out=destination[target, half_columns])

        def run(start: int, stop: int) -> None:
            y_buf = np.empty((block, cols), dtype=np.float32)
            z_buf = np.empty_like(y_buf)
            scratch = np.empty_like(y_buf)
            for c0 in range(0, width, cols):
                columns = slice(c0, min(c0 + cols, width))
                n_cols = columns.stop - c0
                ry, rz = right_y[:, columns], right_z[:, columns]
                for u0 in range(start, stop, block):
                    u1 = min(u0 + block, stop)
                    y, z = y_buf[:u1 - u0, :n_cols], z_buf[:u1 - u0, :n_cols]
                    np.matmul(cos[u0:u1], ry, out=y)
                    np.matmul(sin[u0:u1], rz, out=z)
                    store(y, z, np.add, scratch[:u1 - u0, :n_cols], slice(u0, u1), columns)
                    a0, a1 = max(u0, 1), min(u1, last_mirror + 1)
                    if a1 > a0:  # rows P_r - u, in increasing order
                        store(y[a0 - u0:a1 - u0][::-1], z[a0 - u0:a1 - u0][::-1], np.subtract,
                              scratch[:a1 - a0, :n_cols], slice(p_r - a1 + 1, p_r - a0 + 1),
                              columns)

        parallel = p_r * (width // 2) >= PARALLEL_SIZE
        parallel_rows(run, n_top, threads=self._threads if parallel else 1)
        return out

    def _row_phases(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """``cos`` and ``sin`` of ``2π u i / P_r`` for ``u <= P_r // 2``, ``i < rows`` (cached).

        ``float32``, C-contiguous, of shape ``(P_r // 2 + 1, rows)``.
        """
        if self._phases is None or self._phases[0].shape[1] < rows:
            p_r = self.padded[0]
            n = max(rows, self.kernel_shape[0])
            u = np.arange(p_r // 2 + 1, dtype=np.int64)
            phase = (u[:, None] * np.arange(n)[None, :]) % p_r
            theta = (2.0 * np.pi / p_r) * phase
            self._phases = (np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32))
        cos, sin = self._phases
        return np.ascontiguousarray(cos[:, :rows]), np.ascontiguousarray(sin[:, :rows])

    def _row_blocks(self, n_rows: int, row_items: int, function: Callable[[slice], None]
                    ) -> None:
        """``function(rows)`` over blocks of rows of ``[0, n_rows)`` that stay in cache.

        Large arrays (``n_rows * row_items`` elements) are split among the engine's threads.
        """
        block = max(1, _BLOCK_BYTES // (8 * max(1, row_items)))
        parallel = n_rows * row_items >= PARALLEL_SIZE

        def run(start: int, stop: int) -> None:
            for r0 in range(start, stop, block):
                function(slice(r0, min(r0 + block, stop)))

        parallel_rows(run, n_rows, threads=self._threads if parallel else 1)

    def _inverse_rows(self, buffer: np.ndarray) -> np.ndarray:
        """Inverse FFT along axis 0, in place (normalised by ``1 / P_r``)."""
        if self._pocketfft is None:
            result: np.ndarray = scipy.fft.ifft(buffer, axis=0, overwrite_x=True,
                                                workers=WORKERS)
            return result
        self._pocketfft.c2c(buffer, (0,), False, 2, buffer, self._threads)
        return buffer

    def _inverse_columns(self, buffer: np.ndarray) -> np.ndarray:
        """Real inverse FFT along axis 1 (normalised by ``1 / P_c``) into the real buffer."""
        if self._pocketfft is None:
            result: np.ndarray = scipy.fft.irfft(buffer, n=self.padded[1], axis=1,
                                                 workers=WORKERS)
            return result
        real = self._real_buffer()
        self._real_dirty = True
        self._pocketfft.c2r(buffer, (1,), self.padded[1], False, 2, real, self._threads)
        return real

    def inverse(self, spectrum: np.ndarray) -> np.ndarray:
        """The real padded plane of ``spectrum``, which is overwritten (scratch).

        The result may be the engine's real buffer: use it before the next transform.
        """
        return self._inverse_columns(self._inverse_rows(spectrum))

    # -- convolutions ---------------------------------------------------------------------

    def crop(self, full: np.ndarray, kernel_shape: tuple[int, int]) -> np.ndarray:
        """The same-shape view of a padded result for a kernel of ``kernel_shape``."""
        r0, c0 = kernel_shape[0] // 2, kernel_shape[1] // 2
        height, width = self.shape
        return full[r0:r0 + height, c0:c0 + width]

    def convolve_terms(self, spectrum: np.ndarray, kernels: np.ndarray,
                       weights: Sequence[TermWeights]) -> np.ndarray:
        r"""Accumulate :math:`\sum_t w_t \cdot (P \otimes A_t)` for the plane ``P``.

        The weight of term :math:`t` is separable, :math:`w_t(y, x) = a_t(y)\, b_t(x)`. The
        inverse 2-D transform is an inverse FFT along axis 0 (rows, :math:`y`) followed by a
        real inverse FFT along axis 1, and a row factor commutes with the second step, so
        terms that share a column factor are summed after the first step and share the
        second:

        .. math::

            \sum_t a_t b_t\, \mathcal F^{-1}(\hat P \hat A_t) = \sum_{b} b \cdot
            \mathcal F_1^{-1}\Big[\sum_{t: b_t = b} a_t \cdot
            \mathcal F_0^{-1}(\hat P \hat A_t)\Big].

        A spatial order :math:`n` then costs :math:`n_t` half inverse transforms along axis 0
        but only :math:`n + 1` along axis 1.

        Parameters
        ----------
        spectrum : ndarray of complex64
            :meth:`forward` of the plane.
        kernels : ndarray of shape (n, a, b)
            The kernels :math:`A_t` (odd ``a, b``, no larger than ``kernel_shape``).
        weights : sequence of TermWeights
            Per term the separable weight ``(row factor, column factor)``; None factors are 1.
            Terms whose column factors are the same object are grouped.

        Returns
        -------
        ndarray of shape (H, W), float32
            A new, owned array. Terms whose kernel is identically zero are skipped.
        """
        kernel_shape = (int(kernels.shape[1]), int(kernels.shape[2]))
        r0 = kernel_shape[0] // 2
        height = self.shape[0]
        groups: dict[int, list[int]] = {}
        for t, (_, col_factor) in enumerate(weights):
            if kernels[t].any():
                groups.setdefault(id(col_factor), []).append(t)
        out: np.ndarray | None = None
        for members in groups.values():
            accumulator: np.ndarray | None = None
            for t in members:
                buffer = self._complex()
                self.kernel_spectrum(kernels[t], out=buffer, times=spectrum)
                half = self._inverse_rows(buffer)
                rows = half[r0:r0 + height]
                if accumulator is None:
                    self._scale_rows(rows, weights[t][0])
                    accumulator = half
                else:
                    self._accumulate(accumulator[r0:r0 + height], rows, weights[t][0])
                    self._recycle(half)
            assert accumulator is not None
            full = self._inverse_columns(accumulator)
            self._recycle(accumulator)
            term = self.crop(full, kernel_shape)
            out = self._add_term(out, term, weights[members[0]][1])
            del term, full
        if out is None:
            out = np.zeros(self.shape, dtype=np.float32)
        return out

    def _scale_rows(self, rows: np.ndarray, factor: np.ndarray | None) -> None:
        """``rows *= factor`` (a row factor of shape (H, 1); nothing for None)."""
        if factor is None:
            return

        def scale(block: slice) -> None:
            np.multiply(rows[block], factor[block], out=rows[block])

        self._row_blocks(rows.shape[0], rows.shape[1], scale)

    def _accumulate(self, accumulator: np.ndarray, rows: np.ndarray,
                    factor: np.ndarray | None) -> None:
        """``accumulator += rows * factor`` (``rows`` is overwritten when there is a factor)."""

        def add(block: slice) -> None:
            part = rows[block]
            if factor is not None:
                np.multiply(part, factor[block], out=part)
            np.add(accumulator[block], part, out=accumulator[block])

        self._row_blocks(rows.shape[0], rows.shape[1], add)

    def _add_term(self, out: np.ndarray | None, term: np.ndarray, factor: np.ndarray | None
                  ) -> np.ndarray:
        """``out + term * factor`` into ``out`` (a new array if None); ``term`` is overwritten.

        ``factor`` is a column factor of shape (1, W), or None for one.
        """
        if out is None:
            result = np.empty(self.shape, dtype=np.float32)

            def first(block: slice) -> None:
                if factor is None:
                    np.copyto(result[block], term[block])
                else:
                    np.multiply(term[block], factor, out=result[block])

            self._row_blocks(self.shape[0], self.shape[1], first)
            return result
        target = out

        def add(block: slice) -> None:
            part = term[block]
            if factor is not None:
                np.multiply(part, factor, out=part)
            np.add(target[block], part, out=target[block])

        self._row_blocks(self.shape[0], self.shape[1], add)
        return out
