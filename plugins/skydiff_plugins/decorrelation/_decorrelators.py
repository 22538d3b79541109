r"""The decorrelation plugins: ``none``, ``dmtn021``, ``dmtn021_spatial`` and ``score``."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

import skydiff

from . import _math

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

#: Mask planes excluded from the variance statistics (``lsst.ip.diffim`` defaults).
STATISTICS_EXCLUDED_PLANES: tuple[str, ...] = (
    "INTRP", "EDGE", "DETECTED", "SAT", "CR", "BAD", "NO_DATA", "DETECTED_NEGATIVE")


# ------------------------------------------------------------------------------------------
# configs


@skydiff.configclass
class NoDecorrelationConfig(skydiff.Config):
    """Options of the ``none`` decorrelation (it has none)."""


@skydiff.configclass
class DecorrelationConfig(skydiff.Config):
    """Options of the ``dmtn021`` decorrelation (and the base of the others)."""

    complete_variance: bool = skydiff.Field(
        False, doc="Propagate the variance exactly, V = V_u ⊗ c_u² + V_c ⊗ c_c² (two extra "
                   "FFT convolutions), instead of the Parseval-weighted sum "
                   "V = V_u·Σc_u² + V_c·Σc_c² (upstream completeVarPlanePropagation).")
    statistics_excluded_planes: tuple[str, ...] = skydiff.ListField(
        STATISTICS_EXCLUDED_PLANES,
        doc="Mask planes whose pixels are left out of the clipped-mean variances σ²_S, σ²_T "
            "(planes an exposure does not have are ignored).")
    clip_sigma: float = skydiff.RangeField(
        3.0, doc="Clipping threshold (σ) of the clipped-mean variances.", min=0.0,
        inclusive_min=False)
    clip_iterations: int = skydiff.RangeField(
        3, doc="Clipping iterations of the clipped-mean variances.", min=1)
    replace_planes: tuple[str, ...] = skydiff.ListField(
        ("NO_DATA",), doc="Pixels with any of these planes (and non-finite pixels) are set to "
                          "the image mean before filtering and get their values back after.")
    update_psf: bool = skydiff.Field(
        True, doc="Replace the PSF of the output by the decorrelated PSF (φ ⊗ P for the "
                  "difference); upstream leaves the difference PSF unchanged (DM-47461).")
    divergence_ratio: float = skydiff.RangeField(
        1e8, doc="Log a warning when σ²_convolved / σ²_unconvolved exceeds this ratio (the "
                 "filter then approaches a deconvolution).", min=0.0, inclusive_min=False)


@skydiff.configclass
class SpatialDecorrelationConfig(DecorrelationConfig):
    """Options of the ``dmtn021_spatial`` decorrelation."""

    cell_size_fwhm: float = skydiff.RangeField(
        40.0, doc="Inner cell size in units of the PSF FWHM (upstream gridStep = 40).",
        min=0.0, inclusive_min=False)
    border_fwhm: float = skydiff.RangeField(
        8.0, doc="Border by which cells overlap, in units of the PSF FWHM (upstream "
                 "borderSize = 8); never less than the kernel size.", min=0.0)
    min_cell_size: int = skydiff.RangeField(
        64, doc="Smallest inner cell size in pixels.", min=8)
    default_fwhm: float = skydiff.RangeField(
        4.0, doc="FWHM (pixels) used to size the grid when no PSF is available.", min=0.0,
        inclusive_min=False)
    psf_order: int = skydiff.RangeField(
        2, doc="Largest total degree of the polynomial PSF fitted over the cells' decorrelated "
               "PSFs (lowered when there are too few cells).", min=0)


@skydiff.configclass
class ScoreDecorrelatorConfig(DecorrelationConfig):
    """Options of the ``score`` decorrelation."""


# ------------------------------------------------------------------------------------------
# input checks and helpers


def _check_inputs(science: Any, template: Any, subtraction: Any) -> None:
    for label, value in (("science", science), ("template", template)):
        if not isinstance(value, skydiff.Exposure):
            msg = f"{label} must be a skydiff.Exposure, got {type(value).__name__}"
            raise skydiff.InputError(msg)
    if not isinstance(subtraction, skydiff.SubtractionResult):
        msg = f"subtraction must be a skydiff.SubtractionResult, got {type(subtraction).__name__}"
        raise skydiff.InputError(msg)
    if not isinstance(subtraction.difference, skydiff.Exposure):
        msg = ("subtraction.difference must be a skydiff.Exposure, got "
               f"{type(subtraction.difference).__name__}")
        raise skydiff.InputError(msg)
    shapes = {"science": science.shape, "template": template.shape,
              "difference": subtraction.difference.shape}
    if subtraction.score is not None:
        if not isinstance(subtraction.score, skydiff.Exposure):
            msg = f"subtraction.score must be an Exposure or None, got {type(subtraction.score)}"
            raise skydiff.InputError(msg)
        shapes["score"] = subtraction.score.shape
    if len(set(shapes.values())) != 1:
        msg = (f"science, template and subtraction images must share one pixel grid, got "
               f"shapes {shapes}")
        raise skydiff.InputError(msg)


def _check_correctable(subtraction: skydiff.SubtractionResult) -> None:
    if subtraction.kernel is None:
        msg = ("the subtraction has no PSF-matching kernel (subtraction.kernel is None); "
               "decorrelation needs one — use decorrelation 'none' for kernel-free methods")
        raise skydiff.InputError(msg)
    if subtraction.convolved == "none":
        msg = ("the subtraction convolved neither input (e.g. ZOGY), so its outputs are "
               "already decorrelated; use decorrelation 'none'")
        raise skydiff.InputError(msg)


def _center(exposure: skydiff.Exposure) -> tuple[float, float]:
    """Parent-frame ``(x, y)`` of the centre of the exposure."""
    x0, y0 = exposure.origin
    height, width = exposure.shape
    return x0 + 0.5 * (width - 1), y0 + 0.5 * (height - 1)


def _roles(science: skydiff.Exposure, template: skydiff.Exposure,
           subtraction: skydiff.SubtractionResult) -> tuple[skydiff.Exposure, skydiff.Exposure]:
    """(unconvolved, convolved) inputs for the subtraction's convolution mode."""
    if subtraction.convolved == "science":
        return template, science
    return science, template


def _variance_scale(correction: _math.Correction, subtraction: skydiff.SubtractionResult
                    ) -> float:
    """1/kSum² for convolveScience (D = (κ⊗S − T)/kSum), else 1."""
    return 1.0 / correction.kernel_sum**2 if subtraction.convolved == "science" else 1.0


def _kernel_image(kernel: skydiff.FixedKernel | skydiff.BasisKernel, x: float, y: float
                  ) -> NDArray[np.float64]:
    image = np.asarray(kernel.image_at(x, y), dtype=np.float64)
    total = float(image.sum())
    if not (math.isfinite(total) and total > 0.0):
        msg = (f"the PSF-matching kernel has a non-positive sum ({total}) at (x, y) = "
               f"({x:.1f}, {y:.1f}); the decorrelation filter needs a positive photometric "
               f"scale")
        raise skydiff.InputError(msg)
    return image


def _difference_psf(science: skydiff.Exposure, template: skydiff.Exposure,
                    subtraction: skydiff.SubtractionResult) -> skydiff.Psf | None:
    """The PSF of the difference: its own, else the unconvolved input's."""
    if subtraction.difference.psf is not None:
        return subtraction.difference.psf
    return template.psf if subtraction.convolved == "science" else science.psf


def _psf_stamp(psf: skydiff.Psf, x: float, y: float) -> NDArray[np.float64]:
    return np.asarray(psf.kernel_image(x, y), dtype=np.float64)


class _Corrector(skydiff.Decorrelator):
    """Shared machinery of the filtering decorrelators (not registered)."""

    ConfigClass: ClassVar[type[skydiff.Config]] = DecorrelationConfig
    config: DecorrelationConfig

    def _bits(self, exposure: skydiff.Exposure, names: tuple[str, ...]) -> int:
        planes = exposure.mask_planes
        return planes.value(*[name for name in names if name in planes.planes])

    def _sigma2(self, exposure: skydiff.Exposure, rows: slice = slice(None),
                cols: slice = slice(None), *, label: str) -> float:
        """3σ-clipped mean of a variance plane over unflagged pixels."""
        value = _math.variance_level(
            exposure.variance[rows, cols], exposure.mask[rows, cols],
            self._bits(exposure, tuple(self.config.statistics_excluded_planes)),
            n_sigma=self.config.clip_sigma, n_iter=self.config.clip_iterations)
        if not (math.isfinite(value) and value >= 0.0):
            msg = (f"the {label} variance plane has no usable finite, non-negative values "
                   f"(clipped mean {value}); decorrelation needs a variance plane")
            raise skydiff.InputError(msg)
        return value

    def _check_sigmas(self, sigma2_u: float, sigma2_c: float) -> None:
        if sigma2_u + sigma2_c <= 0.0:
            msg = ("both variance planes are zero: there is no noise to decorrelate; use "
                   "decorrelation 'none'")
            raise skydiff.InputError(msg)
        ratio = math.inf if sigma2_u == 0.0 else sigma2_c / sigma2_u
        if ratio > self.config.divergence_ratio:
            self.log.warning(
                "σ²_convolved / σ²_unconvolved = %.3g exceeds %.3g: the decorrelation filter "
                "approaches a deconvolution and may amplify noise", ratio,
                self.config.divergence_ratio)

    def _bad_pixels(self, exposure: skydiff.Exposure) -> NDArray[np.bool_]:
        bad = ~np.isfinite(exposure.image)
        bits = self._bits(exposure, tuple(self.config.replace_planes))
        if bits:
            bad |= (exposure.mask & np.uint32(bits)) != 0
        return bad


def _frozen(array: NDArray[Any]) -> NDArray[Any]:
    array.setflags(write=False)
    return array


def _metadata(correction: _math.Correction, w_u: float, w_c: float,
              subtraction: skydiff.SubtractionResult) -> dict[str, Any]:
    science_is_u = subtraction.convolved != "science"
    s2u, s2c = correction.sigma2_u, correction.sigma2_c
    return {"sigma2_science": s2u if science_is_u else s2c,
            "sigma2_template": s2c if science_is_u else s2u,
            "kernel_sum": correction.kernel_sum, "convolved": subtraction.convolved,
            "weight_unconvolved": w_u, "weight_convolved": w_c}


# ------------------------------------------------------------------------------------------
# none


class NoDecorrelation(skydiff.Decorrelator):
    """Return the difference (and score) of the subtraction unchanged.

    For subtractions whose outputs are already decorrelated (ZOGY) or when the correlated
    noise is accepted.

    Examples
    --------
    >>> from skydiff.testing._inputs import sample_call
    >>> result = sample_call("decorrelation")(NoDecorrelation())
    >>> result.metadata["decorrelated"]
    False
    """

    name = "none"
    ConfigClass = NoDecorrelationConfig
    tags = frozenset({"linear"})

    def run(self, science: skydiff.Exposure, template: skydiff.Exposure,
            subtraction: skydiff.SubtractionResult) -> skydiff.DecorrelationResult:
        """Check the inputs and pass ``subtraction.difference`` and ``.score`` through.

        Raises
        ------
        skydiff.InputError
            If an input is not an Exposure / SubtractionResult or the shapes differ.
        """
        _check_inputs(science, template, subtraction)
        return skydiff.DecorrelationResult(difference=subtraction.difference,
                                           score=subtraction.score,
                                           metadata={"decorrelated": False})


# ------------------------------------------------------------------------------------------
# dmtn021


class Dmtn021Decorrelator(_Corrector):
    r"""Whiten the noise of an Alard–Lupton difference image (DMTN-021), globally.

    A difference :math:`D = u - \kappa \otimes c` of an unconvolved image :math:`u` and a
    convolved one :math:`c` (:math:`u = S, c = T` when the template was convolved; the reverse
    when the science was, ``subtraction.convolved``) has, for white input noise of variances
    :math:`\sigma^2_u, \sigma^2_c`, the noise power spectrum
    :math:`\sigma^2_u + \sigma^2_c |\hat\kappa(k)|^2`. The correction (Reiss & Lupton 2016,
    with the flux-preserving numerator of ``lsst.ip.diffim``)

    .. math::

        \hat\phi(k) = \sqrt{\frac{\sigma^2_u + \sigma^2_c\,k_\Sigma^2}
                                 {\sigma^2_u + \sigma^2_c\,|\hat\kappa(k)|^2}}, \qquad
        D_\mathrm{corr} = \mathcal F^{-1}\big[\hat\phi\cdot\hat D\big],

    makes the spectrum flat, :math:`\sigma^2_u + \sigma^2_c k_\Sigma^2`, and leaves fluxes
    unchanged (:math:`\hat\phi(0) = 1`, since :math:`\hat\kappa(0) = k_\Sigma`).

    * :math:`\kappa` is the kernel evaluated at the centre of the image (parent frame), not
      normalised; :math:`k_\Sigma = \sum\kappa`.
    * :math:`\sigma^2_u, \sigma^2_c` are 3σ-clipped means (3 iterations) of the *original*
      science and template variance planes, without the pixels of
      ``statistics_excluded_planes``.
    * **Padding.** The difference is zero-padded by twice the kernel size after subtracting
      the mean of its good pixels (added back afterwards): beyond its edges the image
      continues as its mean, the filter neither wraps around nor leaks a background offset,
      and, unlike reflection, padding adds no mirrored copy of the noise that would correlate
      the edge pixels. Non-finite and ``replace_planes`` pixels are set to the mean while
      filtering and restored afterwards.
    * **Variance** (DMTN-179 §5). With the overall filters :math:`\hat c_u = \hat\phi` and
      :math:`\hat c_c = \hat\kappa\hat\phi` of the two inputs, by default

      .. math::

          V_D = V_u\,w_u + V_c\,w_c, \qquad w = \sum_x c(x)^2 = \frac1N\sum_k|\hat c(k)|^2
          \quad\text{(Parseval)},

      or, with ``complete_variance``, :math:`V_D = V_u \otimes c_u^2 + V_c \otimes c_c^2`.
      :math:`V_u, V_c` are the science and template variance planes.
    * **convolveScience.** The AL difference is then
      :math:`D = (\kappa \otimes S - T)/k_\Sigma`, in the science's flux units; the filter is
      the same with :math:`u = T, c = S`, and the variance is divided by :math:`k_\Sigma^2`.
    * **PSF.** The PSF of the output is updated to :math:`P_D = \phi \otimes P` (an
      :class:`~skydiff.ImagePsf` at the image centre), :math:`P` the difference's PSF
      (science PSF when the template was convolved, template PSF otherwise). Upstream leaves
      the PSF stale (DM-47461); ``update_psf = false`` restores that behaviour.
    * **Cost.** One forward and one inverse ``float32`` FFT of the padded image; the filter is
      built on the ``rfft`` grid from the kernel's DFT by two small matrix products.

    The mask is unchanged. A warning is logged when :math:`\sigma^2_c/\sigma^2_u` exceeds
    ``divergence_ratio`` (the filter then approaches a deconvolution).

    References
    ----------
    .. [1] Reiss, D. J. & Lupton, R. H. 2016, DMTN-021, "Implementation of image difference
       decorrelation", https://dmtn-021.lsst.io.
    .. [2] Reiss, D. J. et al. 2021, DMTN-179, "Image differencing and decorrelation:
       numerical details", https://dmtn-179.lsst.io.
    .. [3] Alard, C. & Lupton, R. H. 1998, ApJ 503, 325.

    Examples
    --------
    >>> from skydiff.testing._inputs import sample_call
    >>> result = sample_call("decorrelation")(Dmtn021Decorrelator())
    >>> round(result.metadata["kernel_sum"], 6)
    1.0
    """

    name = "dmtn021"
    ConfigClass = DecorrelationConfig
    tags = frozenset({"linear"})

    def run(self, science: skydiff.Exposure, template: skydiff.Exposure,
            subtraction: skydiff.SubtractionResult) -> skydiff.DecorrelationResult:
        """Decorrelate ``subtraction.difference``; the score (if any) is passed through.

        Returns
        -------
        skydiff.DecorrelationResult
            ``difference``: the corrected image with its variance and PSF; ``metadata``:
            ``sigma2_science``, ``sigma2_template``, ``kernel_sum``, ``convolved``,
            ``weight_unconvolved``, ``weight_convolved``, ``psf_updated``.

        Raises
        ------
        skydiff.InputError
            If an input has the wrong type, the shapes differ, the subtraction has no kernel
            or convolved neither image, the kernel sum is not positive, or a variance plane
            has no usable value.
        """
        _check_inputs(science, template, subtraction)
        _check_correctable(subtraction)
        assert subtraction.kernel is not None
        difference = subtraction.difference
        with self.timer("run"):
            unconvolved, convolved = _roles(science, template, subtraction)
            cx, cy = _center(difference)
            kernel = _kernel_image(subtraction.kernel, cx, cy)
            correction = _math.Correction(
                "diffim", kernel, None,
                self._sigma2(unconvolved, label="unconvolved"),
                self._sigma2(convolved, label="convolved"))
            self._check_sigmas(correction.sigma2_u, correction.sigma2_c)
            image, variance, w_u, w_c = _math.decorrelate_block(
                difference.image, self._bad_pixels(difference), unconvolved.variance,
                convolved.variance, correction, complete_variance=self.config.complete_variance,
                variance_scale=_variance_scale(correction, subtraction))
            psf = difference.psf
            updated = False
            model = _difference_psf(science, template, subtraction)
            if self.config.update_psf and model is not None:
                new = _math.psf_from_stamp(correction.filtered_psf(_psf_stamp(model, cx, cy)),
                                           (cx, cy))
                if new is not None:
                    psf, updated = new, True
        metadata = _metadata(correction, w_u, w_c, subtraction)
        metadata["psf_updated"] = updated
        corrected = difference.evolve(image=_frozen(image), variance=_frozen(variance),
                                      psf=psf)
        return skydiff.DecorrelationResult(difference=corrected, score=subtraction.score,
                                           metadata=metadata)


# ------------------------------------------------------------------------------------------
# dmtn021_spatial


class SpatialDmtn021Decorrelator(_Corrector):
    r"""DMTN-021 decorrelation with the kernel and variances local to each cell of a grid.

    The difference is cut into a grid of inner cells of ``cell_size_fwhm`` × FWHM pixels
    (at least ``min_cell_size``), each grown by a border of ``border_fwhm`` × FWHM pixels
    (at least the kernel size) — the upstream ``DecorrelateALKernelSpatialTask`` defaults,
    40 and 8 FWHM, with the FWHM of the difference PSF at the image centre (``default_fwhm``
    without a PSF). Every outer cut-out is corrected exactly as :class:`Dmtn021Decorrelator`
    does the whole image, with the kernel evaluated at the cell centre and
    :math:`\sigma^2_u, \sigma^2_c` the clipped means of the cut-out's variance planes; the
    results are blended with :func:`skydiff.map_reduce` (``blend="taper"``: smooth
    :math:`\cos^2` weights over the middle half of each overlap, summing to one, no seams).

    **PSF.** The difference PSF at each cell centre is decorrelated with that cell's filter;
    the output PSF is a :class:`~skydiff.PolynomialPsf` whose spatial images are the
    least-squares fit of polynomials of total degree ``psf_order`` (lowered until there are
    at least as many cells as terms) to the cells' PSFs over the image — exact at the cell
    centres for as many cells as terms, smooth in between — or an
    :class:`~skydiff.ImagePsf` for a single cell. (Upstream stitches a ``CoaddPsf``.)

    Metadata holds the per-cell values as lists in grid order (row-major).

    References
    ----------
    .. [1] Reiss, D. J. & Lupton, R. H. 2016, DMTN-021, https://dmtn-021.lsst.io.
    .. [2] Reiss, D. J. et al. 2021, DMTN-179, https://dmtn-179.lsst.io.

    Examples
    --------
    >>> from skydiff.testing._inputs import sample_call
    >>> result = sample_call("decorrelation")(SpatialDmtn021Decorrelator())
    >>> result.metadata["n_cells"]
    1
    """

    name = "dmtn021_spatial"
    ConfigClass = SpatialDecorrelationConfig
    config: SpatialDecorrelationConfig
    tags = frozenset({"linear", "spatially_varying"})

    def grid_sizes(self, fwhm: float, kernel_shape: tuple[int, int]) -> tuple[int, int]:
        """``(cell_size, border)`` in pixels for a PSF FWHM and a kernel shape."""
        border = max(math.ceil(self.config.border_fwhm * fwhm), *kernel_shape)
        cell = max(round(self.config.cell_size_fwhm * fwhm), self.config.min_cell_size)
        return cell, border

    def run(self, science: skydiff.Exposure, template: skydiff.Exposure,
            subtraction: skydiff.SubtractionResult) -> skydiff.DecorrelationResult:
        """Decorrelate ``subtraction.difference`` cell by cell; the score is passed through.

        Returns
        -------
        skydiff.DecorrelationResult
            ``metadata``: ``n_cells``, ``cell_size``, ``border``, and per cell (lists)
            ``cell_x``, ``cell_y``, ``sigma2_science``, ``sigma2_template``, ``kernel_sum``,
            ``weight_unconvolved``, ``weight_convolved``; ``psf_updated``.

        Raises
        ------
        skydiff.InputError
            As :meth:`Dmtn021Decorrelator.run`, for any cell.
        """
        _check_inputs(science, template, subtraction)
        _check_correctable(subtraction)
        kernel_model = subtraction.kernel
        assert kernel_model is not None
        difference = subtraction.difference
        unconvolved, convolved = _roles(science, template, subtraction)
        x0, y0 = difference.origin
        cx, cy = _center(difference)
        model = _difference_psf(science, template, subtraction)
        fwhm = float(model.fwhm(cx, cy)) if model is not None else self.config.default_fwhm
        if not (math.isfinite(fwhm) and fwhm > 0.0):
            fwhm = self.config.default_fwhm
        cell_size, border = self.grid_sizes(fwhm, kernel_model.shape)
        arrays = {"image": difference.image, "bad": self._bad_pixels(difference),
                  "variance_u": unconvolved.variance, "variance_c": convolved.variance}
        records: list[dict[str, Any]] = []

        def correct(cut: dict[str, NDArray[Any]], cell: skydiff.Cell
                    ) -> dict[str, NDArray[np.float32]]:
            row, col = cell.center
            x, y = x0 + col, y0 + row
            kernel = _kernel_image(kernel_model, x, y)
            rows, cols = cell.outer
            correction = _math.Correction(
                "diffim", kernel, None,
                self._sigma2(unconvolved, rows, cols, label="unconvolved"),
                self._sigma2(convolved, rows, cols, label="convolved"))
            self._check_sigmas(correction.sigma2_u, correction.sigma2_c)
            image, variance, w_u, w_c = _math.decorrelate_block(
                cut["image"], cut["bad"], cut["variance_u"], cut["variance_c"], correction,
                complete_variance=self.config.complete_variance,
                variance_scale=_variance_scale(correction, subtraction))
            record = _metadata(correction, w_u, w_c, subtraction)
            record.update(x=x, y=y, correction=correction)
            records.append(record)
            return {"image": image, "variance": variance}

        with self.timer("run"):
            stitched = skydiff.map_reduce(arrays, correct, cell_size=cell_size, border=border,
                                          blend="taper")
            assert isinstance(stitched, dict)
            psf = difference.psf
            updated = False
            if self.config.update_psf and model is not None:
                new = self._stitched_psf(model, records, difference)
                if new is not None:
                    psf, updated = new, True
        metadata: dict[str, Any] = {
            "n_cells": len(records), "cell_size": cell_size, "border": border,
            "convolved": subtraction.convolved, "psf_updated": updated,
            "cell_x": [r["x"] for r in records], "cell_y": [r["y"] for r in records]}
        for key in ("sigma2_science", "sigma2_template", "kernel_sum", "weight_unconvolved",
                    "weight_convolved"):
            metadata[key] = [r[key] for r in records]
        corrected = difference.evolve(image=_frozen(stitched["image"]),
                                      variance=_frozen(stitched["variance"]), psf=psf)
        return skydiff.DecorrelationResult(difference=corrected, score=subtraction.score,
                                           metadata=metadata)

    def _stitched_psf(self, model: skydiff.Psf, records: list[dict[str, Any]],
                      difference: skydiff.Exposure) -> skydiff.Psf | None:
        """The decorrelated PSF over the cells: a PolynomialPsf (or an ImagePsf)."""
        stamps = [r["correction"].filtered_psf(_psf_stamp(model, r["x"], r["y"]))
                  for r in records]
        size = max(s.shape[0] for s in stamps)
        cube = np.zeros((len(stamps), size, size))
        for index, stamp in enumerate(stamps):
            pad = (size - stamp.shape[0]) // 2
            cube[index, pad:pad + stamp.shape[0], pad:pad + stamp.shape[0]] = (
                stamp / stamp.sum())
        xs = np.array([r["x"] for r in records])
        ys = np.array([r["y"] for r in records])
        x_min, y_min, x_max, y_max = difference.bbox
        bbox = (float(x_min), float(y_min), float(x_max - 1), float(y_max - 1))
        order = self.config.psf_order
        while order > 0 and (order + 1) * (order + 2) // 2 > len(records):
            order -= 1
        if order == 0 or bbox[2] <= bbox[0] or bbox[3] <= bbox[1]:
            index = int(np.argmin((xs - 0.5 * (bbox[0] + bbox[2])) ** 2
                                  + (ys - 0.5 * (bbox[1] + bbox[3])) ** 2))
            return _math.psf_from_stamp(cube[index], (float(xs[index]), float(ys[index])))
        terms = skydiff.spatial_functions(xs, ys, order=order, bbox=bbox)  # (n_terms, n)
        solution, *_ = np.linalg.lstsq(terms.T, cube.reshape(len(records), -1), rcond=None)
        basis = solution.reshape(-1, size, size)
        try:
            return skydiff.PolynomialPsf(basis, np.eye(basis.shape[0]), order=order, bbox=bbox)
        except skydiff.InputError:
            return None


# ------------------------------------------------------------------------------------------
# score


class ScoreDecorrelator(_Corrector):
    r"""The DMTN-179 likelihood correction: a ZOGY-equivalent score image from an AL result.

    **Pre-convolution path** (``subtraction.prefilter`` = :math:`H`, the reflected science PSF
    the science was convolved with): the input :math:`S_0 = H\otimes S - \kappa\otimes T`
    (``subtraction.score`` when present, else ``subtraction.difference``) is corrected by

    .. math::

        \hat c(k) = \frac{\sigma^2_u + \sigma^2_c\,k_\Sigma^2}
                         {\sigma^2_u + \sigma^2_c\,|\hat\kappa(k)|^2 / |\hat H(k)|^2},
        \qquad \mathrm{score} = \mathcal F^{-1}\big[\hat c\cdot\hat S_0\big]

    (no square root; :math:`|\hat H|^2` floored at 1000 × the smallest normal float64, the
    filter being evaluated in float64 by chunks of rows;
    :math:`k_\Sigma^2` divided by :math:`(\sum H)^2` if :math:`H` is not normalised). With
    :math:`\hat\kappa = \hat H\hat P_S/\hat P_T` this is
    :math:`\hat c\hat S_0 = n\,\big(\hat P_S^*|\hat P_T|^2\hat S - \hat P_T^*|\hat P_S|^2
    \hat T\big)/(\sigma^2_S|\hat P_T|^2 + \sigma^2_T|\hat P_S|^2)`, :math:`n` the numerator:
    the ZOGY score (Zackay, Ofek & Gal-Yam 2016, eq. 12) up to a constant, and
    :math:`\hat c(0) = 1`. Only ``convolved = "template"`` is meaningful here.

    **Plain difference** (no pre-filter): the score of :math:`D = u - \kappa\otimes c` is its
    matched filter by :math:`H` = the reflected difference PSF at the image centre, corrected
    the same way with :math:`\kappa \to H\otimes\kappa` (so :math:`|\hat\kappa|^2/|\hat H|^2
    \to |\hat\kappa|^2` and no floor is needed): :math:`\mathrm{score} =
    \mathcal F^{-1}[\hat H\hat c\,\hat D]`, again ZOGY's score up to a constant. For
    ``convolved = "science"`` the roles swap (:math:`u = T`) and the variance is divided by
    :math:`k_\Sigma^2`.

    **Variance** (DMTN-179 §5) as for :class:`Dmtn021Decorrelator`, with the overall filters
    :math:`\hat c_u = \hat H\hat c` and :math:`\hat c_c = \hat\kappa\hat c` (plain
    difference: :math:`\hat H\hat\kappa\hat c`). Upstream writes :math:`\hat c_u =
    \overline{\hat H}\hat c` with :math:`H` the unreflected PSF — the same filter.

    **PSF** of the score: its response to a point source of the unconvolved image,
    :math:`\mathcal F^{-1}[\hat c\,|\hat H|^2]` — the PSF correlated with itself, reweighted by
    :math:`\hat c`; this is ZOGY's :math:`P_S = |\hat P_D|^2` (normalised to unit sum), and
    exactly the PSF's autocorrelation for a noiseless template.

    The difference is returned unchanged; the corrected score is ``result.score``.

    References
    ----------
    .. [1] Reiss, D. J. et al. 2021, DMTN-179, "Image differencing and decorrelation:
       numerical details", https://dmtn-179.lsst.io.
    .. [2] Zackay, B., Ofek, E. O. & Gal-Yam, A. 2016, ApJ 830, 27.
    .. [3] Reiss, D. J. & Lupton, R. H. 2016, DMTN-021, https://dmtn-021.lsst.io.

    Examples
    --------
    >>> from skydiff.testing._inputs import sample_call
    >>> result = sample_call("decorrelation")(ScoreDecorrelator())
    >>> result.score.shape, result.metadata["prefiltered"]
    ((64, 64), False)
    """

    name = "score"
    ConfigClass = ScoreDecorrelatorConfig
    tags = frozenset({"linear", "needs_psf"})

    def run(self, science: skydiff.Exposure, template: skydiff.Exposure,
            subtraction: skydiff.SubtractionResult) -> skydiff.DecorrelationResult:
        """Compute the corrected score image.

        Returns
        -------
        skydiff.DecorrelationResult
            ``difference``: ``subtraction.difference`` unchanged; ``score``: the corrected
            score with its variance and PSF; ``metadata`` as for ``dmtn021`` plus
            ``prefiltered``.

        Raises
        ------
        skydiff.InputError
            As :meth:`Dmtn021Decorrelator.run`; also for a pre-filter that is not a finite
            odd 2-D array with a positive sum, a pre-filter with ``convolved = "science"``,
            or a plain difference without any PSF.
        """
        _check_inputs(science, template, subtraction)
        _check_correctable(subtraction)
        assert subtraction.kernel is not None
        source = subtraction.score if subtraction.score is not None else subtraction.difference
        cx, cy = _center(source)
        prefiltered = subtraction.prefilter is not None
        psf_stamp: NDArray[np.float64] | None = None
        if prefiltered:
            if subtraction.convolved != "template":
                msg = ("a pre-filtered (pre-convolution) subtraction must convolve the "
                       f"template, got convolved={subtraction.convolved!r}")
                raise skydiff.InputError(msg)
            prefilter = self._prefilter(subtraction.prefilter)
        else:
            model = _difference_psf(science, template, subtraction)
            if model is None:
                msg = ("the score of a plain difference needs its PSF (difference, science or "
                       "template PSF) for the matched filter; none is set")
                raise skydiff.InputError(msg)
            psf_stamp = _psf_stamp(model, cx, cy)
            prefilter = np.ascontiguousarray(psf_stamp[::-1, ::-1] / psf_stamp.sum())
        with self.timer("run"):
            unconvolved, convolved = _roles(science, template, subtraction)
            kernel = _kernel_image(subtraction.kernel, cx, cy)
            correction = _math.Correction(
                "score_prefiltered" if prefiltered else "score_matched", kernel, prefilter,
                self._sigma2(unconvolved, label="unconvolved"),
                self._sigma2(convolved, label="convolved"))
            self._check_sigmas(correction.sigma2_u, correction.sigma2_c)
            image, variance, w_u, w_c = _math.decorrelate_block(
                source.image, self._bad_pixels(source), unconvolved.variance,
                convolved.variance, correction, complete_variance=self.config.complete_variance,
                variance_scale=_variance_scale(correction, subtraction))
            psf = source.psf
            updated = False
            if self.config.update_psf:
                new = _math.psf_from_stamp(correction.filtered_psf(psf_stamp), (cx, cy))
                if new is not None:
                    psf, updated = new, True
        metadata = _metadata(correction, w_u, w_c, subtraction)
        metadata.update(prefiltered=prefiltered, psf_updated=updated)
        score = source.evolve(image=_frozen(image), variance=_frozen(variance), psf=psf)
        return skydiff.DecorrelationResult(difference=subtraction.difference, score=score,
                                           metadata=metadata)

    @staticmethod
    def _prefilter(value: Any) -> NDArray[np.float64]:
        array = np.asarray(value, dtype=np.float64)
        if (array.ndim != 2 or array.shape[0] % 2 == 0 or array.shape[1] % 2 == 0
                or not np.all(np.isfinite(array)) or not array.sum() > 0.0):
            msg = ("subtraction.prefilter must be a finite 2-D array with odd sizes and a "
                   f"positive sum, got shape {array.shape}")
            raise skydiff.InputError(msg)
        return array
