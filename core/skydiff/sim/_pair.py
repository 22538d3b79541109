r"""Simulated science/template pairs with a truth table.

Random streams
--------------
``np.random.default_rng(seed)`` is split with :meth:`numpy.random.Generator.spawn` into eight
independent child generators, always in this order:

===  ====================  ====================================================================
 #   stream                draws, in order
===  ====================  ====================================================================
 0   ``stars``             template-frame x, y (uniform), flux (power law via inverse CDF)
 1   ``transients``        science x, y (uniform inside ``source_margin``), flux (log-uniform)
 2   ``variables``         science x, y, template flux (log-uniform), sign of the change (±1)
 3   ``dipoles``           science x, y, template flux (log-uniform)
 4   ``template_noise``    standard normals (all pixels), then Poisson deviates (faint pixels)
 5   ``science_noise``     as stream 4, for the science
 6   ``template_defects``  bad columns, then cosmic rays (x, y, angle, length, charges)
 7   ``science_defects``   as stream 6, for the science
===  ====================  ====================================================================

Because the streams are independent, changing one knob (say the number of cosmic rays) leaves
everything drawn from the other streams unchanged, and :func:`simulate_exposure` reproduces
exactly the corresponding epoch of :func:`simulate_pair` for the same seed and config.

Noise model
-----------
For the noiseless model :math:`m` (ADU, sky included) of a pixel, gain :math:`g` (e⁻/ADU) and
read noise :math:`r` (e⁻), the pixel value is

.. math::

    d = m + \frac{n_\mathrm{shot} + r\,z}{g}, \qquad
    n_\mathrm{shot} \sim \mathrm{Poisson}(g\,m) - g\,m, \quad z \sim \mathcal N(0, 1),

and the variance plane is the model variance in ADU²

.. math::

    V = \frac{\max(m, 0)}{g} + \left(\frac{r}{g}\right)^2

(without the first term when ``poisson`` is off). Shot noise is drawn exactly from the Poisson
distribution where :math:`g\,m < 64` e⁻ and from its normal approximation
:math:`\mathcal N(g m, g m)` elsewhere: at 64 e⁻ the skewness of the Poisson law is 0.125 and
falls as :math:`(g m)^{-1/2}`, far below anything a difference-imaging statistic resolves,
while the normal draw is three times faster on large frames.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import astropy.units as u
import attrs
import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time
from astropy.wcs import WCS
from numpy.typing import NDArray

from skydiff.errors import ConfigError
from skydiff.exposure import Exposure, PhotoCalib, VisitInfo
from skydiff.kernel import spatial_functions
from skydiff.mask import MaskPlanes
from skydiff.parallel import parallel_map
from skydiff.psf import GaussianPsf, ImagePsf, PolynomialPsf, Psf
from skydiff.sim._config import EpochConfig, SimConfig
from skydiff.sim._render import PsfProfile, add_sources, auto_oversample, stamp_half_size

__all__ = [
    "STREAMS",
    "SimulatedExposure",
    "SimulatedPair",
    "fwhm_at",
    "simulate_exposure",
    "simulate_pair",
]

#: Names of the child random streams, in spawn order (see the module notes).
STREAMS: tuple[str, ...] = (
    "stars",
    "transients",
    "variables",
    "dipoles",
    "template_noise",
    "science_noise",
    "template_defects",
    "science_defects",
)

#: Expected electron counts below which shot noise is drawn exactly from a Poisson law.
EXACT_POISSON_BELOW = 64.0

KINDS: tuple[str, ...] = ("star", "transient", "variable", "dipole")

Epoch = Literal["science", "template"]


# ------------------------------------------------------------------------------------------------
# result types
# ------------------------------------------------------------------------------------------------


def _readonly_float32(value: Any) -> NDArray[np.float32]:
    """A read-only float32 array; an already frozen, owned float32 array is kept as is."""
    if (
        isinstance(value, np.ndarray)
        and value.dtype == np.float32
        and not value.flags.writeable
        and value.flags.owndata
    ):
        return value
    array = np.array(value, dtype=np.float32, copy=True)
    array.setflags(write=False)
    return array


def _freeze(*arrays: np.ndarray) -> None:
    """Make freshly built arrays read-only so the frozen containers adopt them without copies."""
    for array in arrays:
        array.setflags(write=False)


def _tables_equal(a: Table, b: Table) -> bool:
    if a.colnames != b.colnames or len(a) != len(b):
        return False
    return all(np.array_equal(np.asarray(a[name]), np.asarray(b[name])) for name in a.colnames)


_ARRAY_EQ = attrs.cmp_using(eq=np.array_equal)
_TABLE_EQ = attrs.cmp_using(eq=_tables_equal)


@attrs.frozen(kw_only=True)
class SimulatedPair:
    """A simulated science/template pair and its truth.

    Attributes
    ----------
    science, template : Exposure
        The two epochs (image, mask, variance, PSF, WCS, photometric calibration, visit info).
        The template frame is the science frame grown by ``config.template_border``.
    truth : astropy.table.Table
        One row per source, columns

        ``id``
            running integer;
        ``kind``
            ``"star"``, ``"transient"`` (science only), ``"variable"`` or ``"dipole"``
            (moving source);
        ``x``, ``y`` [pix]
            0-based column and row of the source in the *science* image;
        ``x_template``, ``y_template`` [pix]
            its 0-based column and row in the template image;
        ``flux_template``, ``flux_science`` [adu]
            total flux in each image's units (0 for transients in the template);
        ``fwhm_template``, ``fwhm_science`` [pix]
            analytic PSF FWHM at the source's position in each epoch;
        ``saturated_template``, ``saturated_science``, ``saturated``
            whether the pixel at the source's position is ``SAT`` in the template, in the
            science, in either.

        ``truth.meta`` holds ``seed``, ``offset``, ``flux_scale`` and ``template_border``.
    science_model, template_model : ndarray, float32, read-only
        Noiseless expected images (sky plus sources, minus the sky for ``subtract_sky``),
        before cosmic rays, bad columns and saturation.
    config : SimConfig
        The configuration used.
    seed : int
        The seed used.
    """

    science: Exposure
    template: Exposure
    truth: Table = attrs.field(eq=_TABLE_EQ, hash=False, repr=False)
    science_model: NDArray[np.float32] = attrs.field(
        converter=_readonly_float32, eq=_ARRAY_EQ, hash=False, repr=False
    )
    template_model: NDArray[np.float32] = attrs.field(
        converter=_readonly_float32, eq=_ARRAY_EQ, hash=False, repr=False
    )
    config: SimConfig
    seed: int

    def exposure(self, epoch: Epoch) -> Exposure:
        """The ``"science"`` or ``"template"`` exposure."""
        self.config.epoch(epoch)  # validates the name
        return self.science if epoch == "science" else self.template

    def model(self, epoch: Epoch) -> NDArray[np.float32]:
        """The noiseless model of ``"science"`` or ``"template"``."""
        self.config.epoch(epoch)
        return self.science_model if epoch == "science" else self.template_model


@attrs.frozen(kw_only=True)
class SimulatedExposure:
    """One simulated epoch and its truth (see :class:`SimulatedPair` for the columns).

    Attributes
    ----------
    exposure : Exposure
        The simulated image.
    truth : astropy.table.Table
        The full truth table of the pair, with a single ``saturated`` column for this epoch.
    model : ndarray, float32, read-only
        The noiseless model image.
    epoch : {"science", "template"}
        Which epoch this is.
    config : SimConfig
        The configuration used.
    seed : int
        The seed used.
    """

    exposure: Exposure
    truth: Table = attrs.field(eq=_TABLE_EQ, hash=False, repr=False)
    model: NDArray[np.float32] = attrs.field(
        converter=_readonly_float32, eq=_ARRAY_EQ, hash=False, repr=False
    )
    epoch: str
    config: SimConfig
    seed: int


# ------------------------------------------------------------------------------------------------
# geometry helpers
# ------------------------------------------------------------------------------------------------


@attrs.frozen
class _Frame:
    """Pixel grid of one epoch: shape, parent origin and the offset to science-frame coords."""

    shape: tuple[int, int]
    origin: tuple[int, int]
    shift: tuple[float, float]  # science-frame (x, y) = local (x, y) + shift

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        x0, y0 = self.origin
        return x0, y0, x0 + self.shape[1], y0 + self.shape[0]


def _frame(config: SimConfig, epoch: Epoch) -> _Frame:
    rows, cols = config.shape
    x0, y0 = config.origin
    if epoch == "science":
        return _Frame((rows, cols), (x0, y0), (0.0, 0.0))
    b = config.template_border
    dx, dy = config.offset
    return _Frame((rows + 2 * b, cols + 2 * b), (x0 - b, y0 - b), (dx - b, dy - b))


def _field_uv(
    config: SimConfig, x_sci: NDArray[np.float64], y_sci: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Science-frame coordinates mapped to [-1, 1] (clipped outside the science frame)."""
    rows, cols = config.shape
    uu = np.clip(2.0 * x_sci / (cols - 1) - 1.0, -1.0, 1.0)
    vv = np.clip(2.0 * y_sci / (rows - 1) - 1.0, -1.0, 1.0)
    return uu, vv


def fwhm_at(config: SimConfig, epoch: Epoch, x: Any, y: Any) -> NDArray[np.float64]:
    r"""Analytic PSF FWHM of an epoch at science-frame positions.

    .. math::

        \mathrm{FWHM}(x, y) = \mathrm{FWHM}_0\,(1 + g_x u + g_y v), \qquad
        u = \operatorname{clip}\!\left(\frac{2x}{W - 1} - 1\right), \quad
        v = \operatorname{clip}\!\left(\frac{2y}{H - 1} - 1\right),

    with :math:`(W, H)` the science frame's columns and rows and the clip to [-1, 1].

    Parameters
    ----------
    config : SimConfig
        Simulation config.
    epoch : {"science", "template"}
        Which epoch's PSF.
    x, y : array_like
        0-based column and row in the *science* frame.

    Returns
    -------
    ndarray of float64
        FWHM in pixels.
    """
    ep = config.epoch(epoch)
    uu, vv = _field_uv(config, np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    gx, gy = ep.fwhm_gradient
    return ep.fwhm * (1.0 + gx * uu + gy * vv)


def _profile(ep: EpochConfig) -> PsfProfile:
    return PsfProfile(
        ep.psf_model,
        beta=ep.moffat_beta,
        ellipticity=ep.ellipticity,
        position_angle=ep.position_angle,
    )


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        msg = f"seed must be a non-negative integer, got {seed!r}"
        raise ConfigError(msg)
    return int(seed)


def _streams(seed: int) -> dict[str, np.random.Generator]:
    children = np.random.default_rng(seed).spawn(len(STREAMS))
    return dict(zip(STREAMS, children, strict=True))


# ------------------------------------------------------------------------------------------------
# source catalogue
# ------------------------------------------------------------------------------------------------


def _power_law(
    unit: NDArray[np.float64], slope: float, f_min: float, f_max: float
) -> NDArray[np.float64]:
    r"""Inverse CDF of :math:`dN/dF \propto F^{-\gamma}` on :math:`[F_{min}, F_{max}]`."""
    if f_min == f_max:
        return np.full_like(unit, f_min)
    if abs(slope - 1.0) < 1e-12:
        return f_min * (f_max / f_min) ** unit
    p = 1.0 - slope
    lo, hi = f_min**p, f_max**p
    return (lo + unit * (hi - lo)) ** (1.0 / p)


def _log_uniform(
    rng: np.random.Generator, bounds: tuple[float, float], n: int
) -> NDArray[np.float64]:
    lo, hi = bounds
    return np.exp(rng.uniform(math.log(lo), math.log(hi), n)) if hi > lo else np.full(n, lo)


def _inner_positions(
    rng: np.random.Generator, config: SimConfig, n: int
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    rows, cols = config.shape
    m = config.source_margin
    x = rng.uniform(m, cols - 1 - m, n)
    y = rng.uniform(m, rows - 1 - m, n)
    return x, y


def _catalog(config: SimConfig, streams: dict[str, np.random.Generator]) -> dict[str, Any]:
    """Draw every source; positions in science-frame and template-local coordinates."""
    rows, cols = config.shape
    b = config.template_border
    dx, dy = config.offset
    scale = config.flux_scale

    rng = streams["stars"]
    n = config.n_stars
    xt_star = rng.uniform(-0.5, cols + 2 * b - 0.5, n)
    yt_star = rng.uniform(-0.5, rows + 2 * b - 0.5, n)
    f_star = _power_law(
        rng.uniform(0.0, 1.0, n), config.flux_slope, config.flux_min, config.flux_max
    )
    x_star = xt_star - b + dx
    y_star = yt_star - b + dy

    rng = streams["transients"]
    x_tr, y_tr = _inner_positions(rng, config, config.n_transients)
    f_tr = _log_uniform(rng, config.transient_flux, config.n_transients)

    rng = streams["variables"]
    x_var, y_var = _inner_positions(rng, config, config.n_variables)
    f_var = _log_uniform(rng, config.variable_flux, config.n_variables)
    sign = rng.choice(np.array([-1.0, 1.0]), config.n_variables)

    rng = streams["dipoles"]
    x_dip, y_dip = _inner_positions(rng, config, config.n_dipoles)
    f_dip = _log_uniform(rng, config.dipole_flux, config.n_dipoles)
    odx, ody = config.dipole_offset

    x = np.concatenate([x_star, x_tr, x_var, x_dip])
    y = np.concatenate([y_star, y_tr, y_var, y_dip])
    x_t = np.concatenate([xt_star, x_tr - dx + b, x_var - dx + b, x_dip - dx - odx + b])
    y_t = np.concatenate([yt_star, y_tr - dy + b, y_var - dy + b, y_dip - dy - ody + b])
    flux_t = np.concatenate([f_star, np.zeros(config.n_transients), f_var, f_dip])
    flux_s = np.concatenate(
        [
            scale * f_star,
            f_tr,
            scale * f_var * (1.0 + sign * config.variable_fraction),
            scale * f_dip,
        ]
    )
    counts = (config.n_stars, config.n_transients, config.n_variables, config.n_dipoles)
    kind = np.repeat(np.array(KINDS), counts)
    return {
        "x": x,
        "y": y,
        "x_template": x_t,
        "y_template": y_t,
        "flux_template": flux_t,
        "flux_science": flux_s,
        "kind": kind,
    }


def _epoch_sources(
    config: SimConfig, cat: dict[str, Any], epoch: Epoch
) -> tuple[NDArray[np.float64], ...]:
    """(x_local, y_local, flux, fwhm) of every source in an epoch's own frame."""
    frame = _frame(config, epoch)
    if epoch == "science":
        xl, yl, flux = cat["x"], cat["y"], cat["flux_science"]
    else:
        xl, yl, flux = cat["x_template"], cat["y_template"], cat["flux_template"]
    width = fwhm_at(config, epoch, xl + frame.shift[0], yl + frame.shift[1])
    return xl, yl, flux, width


# ------------------------------------------------------------------------------------------------
# one epoch
# ------------------------------------------------------------------------------------------------


class _EpochResult(NamedTuple):
    exposure: Exposure
    model: NDArray[np.float32]


def _sky(config: SimConfig, ep: EpochConfig, frame: _Frame) -> NDArray[np.float32]:
    rows, cols = frame.shape
    xs = np.arange(cols, dtype=np.float64) + frame.shift[0]
    ys = np.arange(rows, dtype=np.float64) + frame.shift[1]
    uu, vv = _field_uv(config, xs, ys)
    ax, ay = ep.sky_gradient
    axx, axy, ayy = ep.sky_quadratic
    along_x = (ep.sky_level + ax * uu + axx * uu * uu).astype(np.float32)
    along_y = (ay * vv + ayy * vv * vv).astype(np.float32)
    sky = along_y[:, None] + along_x[None, :]
    if axy != 0.0:
        sky += (axy * vv).astype(np.float32)[:, None] * uu.astype(np.float32)[None, :]
    return sky


def _add_noise(
    raw: NDArray[np.float32], ep: EpochConfig, rng: np.random.Generator
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Return (noisy image, variance plane) for the noiseless raw model (see module notes)."""
    read_var = np.float32((ep.read_noise / ep.gain) ** 2)
    if ep.poisson:
        variance = np.maximum(raw, np.float32(0.0))
        variance *= np.float32(1.0 / ep.gain)
        variance += read_var
    else:
        variance = np.full(raw.shape, read_var, dtype=np.float32)
    z = rng.standard_normal(raw.shape, dtype=np.float32)
    image = np.sqrt(variance)
    image *= z
    image += raw
    if ep.poisson:
        low = raw < np.float32(EXACT_POISSON_BELOW / ep.gain)
        if low.any():
            lam = ep.gain * np.maximum(raw[low].astype(np.float64), 0.0)
            shot = rng.poisson(lam) - lam
            image[low] = (raw[low] + (shot + ep.read_noise * z[low]) / ep.gain).astype(np.float32)
    return image, variance


def _defects(
    image: NDArray[np.float32], ep: EpochConfig, rng: np.random.Generator
) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
    """Add bad columns and cosmic rays in place; return (bad columns, CR pixel mask)."""
    rows, cols = image.shape
    if ep.n_bad_columns > cols:
        msg = f"n_bad_columns ({ep.n_bad_columns}) exceeds the number of columns ({cols})"
        raise ConfigError(msg)
    bad = np.sort(rng.choice(cols, size=ep.n_bad_columns, replace=False)).astype(np.int64)
    cr_mask = np.zeros(image.shape, dtype=bool)
    n = ep.n_cosmic_rays
    if n:
        lo, hi = ep.cosmic_ray_length
        x0 = rng.uniform(-0.5, cols - 0.5, n)
        y0 = rng.uniform(-0.5, rows - 0.5, n)
        angle = rng.uniform(0.0, math.pi, n)
        length = rng.integers(lo, hi + 1, n)
        charge = rng.uniform(ep.cosmic_ray_flux[0], ep.cosmic_ray_flux[1], (n, hi))
        t = np.arange(hi, dtype=np.float64)
        px = np.floor(x0[:, None] + t[None, :] * np.cos(angle)[:, None] + 0.5).astype(np.int64)
        py = np.floor(y0[:, None] + t[None, :] * np.sin(angle)[:, None] + 0.5).astype(np.int64)
        valid = (t[None, :] < length[:, None]) & (px >= 0) & (px < cols) & (py >= 0) & (py < rows)
        flat = py[valid] * cols + px[valid]
        np.add.at(image.reshape(-1), flat, charge[valid].astype(np.float32))
        cr_mask.reshape(-1)[flat] = True
    if bad.size:
        image[:, bad] = 0.0
    return bad, cr_mask


def _saturate(image: NDArray[np.float32], level: float, *, bleed: bool) -> NDArray[np.bool_]:
    """Clip at ``level`` in place (with optional column bleeding); return the SAT pixels.

    Bleeding: the saturated pixels of each column are grouped in contiguous runs; the excess
    charge :math:`E` of a run (sum of value - level) fills :math:`\\lceil E/\\mathrm{level}
    \\rceil` further pixels to the level, half above and half below the run.
    """
    lvl = np.float32(level)
    sat = image >= lvl
    if bleed and sat.any():
        rows = image.shape[0]
        r, c = np.nonzero(sat)
        order = np.lexsort((r, c))
        r, c = r[order], c[order]
        excess = image[r, c].astype(np.float64) - level
        new_run = np.ones(r.size, dtype=bool)
        new_run[1:] = (c[1:] != c[:-1]) | (r[1:] != r[:-1] + 1)
        starts = np.flatnonzero(new_run)
        ends = np.append(starts[1:], r.size) - 1
        run_excess = np.add.reduceat(excess, starts)
        n_bleed = np.ceil(run_excess / level).astype(np.int64)
        up = n_bleed // 2
        down = n_bleed - up
        run_col = c[starts]
        new_rows, new_cols = [], []
        for counts, anchor, direction in ((up, r[starts], -1), (down, r[ends], 1)):
            total = int(counts.sum())
            if total == 0:
                continue
            run_of = np.repeat(np.arange(counts.size), counts)
            step = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts) + 1
            new_rows.append(anchor[run_of] + direction * step)
            new_cols.append(run_col[run_of])
        if new_rows:
            rr = np.concatenate(new_rows)
            cc = np.concatenate(new_cols)
            keep = (rr >= 0) & (rr < rows)
            sat[rr[keep], cc[keep]] = True
    image[sat] = lvl
    return sat


def _edge_mask(shape: tuple[int, int], width: int) -> NDArray[np.bool_]:
    edge = np.zeros(shape, dtype=bool)
    if width > 0:
        edge[:width, :] = True
        edge[-width:, :] = True
        edge[:, :width] = True
        edge[:, -width:] = True
    return edge


def _attach_psf(
    config: SimConfig, epoch: Epoch, frame: _Frame, profile: PsfProfile, half: int, oversample: int
) -> Psf:
    """The PSF model of an epoch: exact for constant PSFs, a polynomial fit if varying."""
    ep = config.epoch(epoch)
    rows, cols = frame.shape
    x0, y0 = frame.origin
    integrate = ep.pixel_integrated
    if not ep.is_spatially_varying:
        if profile.model == "gaussian" and ep.ellipticity == 0.0 and not integrate:
            return GaussianPsf.from_fwhm(ep.fwhm, size=2 * half + 1)
        stamp = profile.stamps(
            np.zeros(1),
            np.zeros(1),
            np.array([ep.fwhm]),
            half,
            oversample=oversample,
            integrate=integrate,
        )[0]
        return ImagePsf(stamp, position=(x0 + 0.5 * (cols - 1), y0 + 0.5 * (rows - 1)))
    n_grid = config.psf_model_grid
    order = config.psf_model_order
    grid_x, grid_y = np.meshgrid(
        np.linspace(0.0, cols - 1.0, n_grid), np.linspace(0.0, rows - 1.0, n_grid)
    )
    gx, gy = grid_x.ravel(), grid_y.ravel()
    widths = fwhm_at(config, epoch, gx + frame.shift[0], gy + frame.shift[1])
    zero = np.zeros(gx.size)
    stamps = profile.stamps(zero, zero, widths, half, oversample=oversample, integrate=integrate)
    size = 2 * half + 1
    design = spatial_functions(gx + x0, gy + y0, order=order, bbox=frame.bbox)  # (n_terms, G²)
    solution, *_ = np.linalg.lstsq(design.T, stamps.reshape(gx.size, size * size), rcond=None)
    basis = solution.reshape(-1, size, size)
    return PolynomialPsf(basis, np.eye(basis.shape[0]), order=order, bbox=frame.bbox)


def _make_wcs(config: SimConfig, frame: _Frame) -> WCS:
    """TAN WCS; the tangent point is the science frame's centre (local, 0-based pixels)."""
    rows, cols = config.shape
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.cunit = ["deg", "deg"]
    wcs.wcs.crval = list(config.sky_center)
    # FITS pixels are 1-based: local 0-based x maps to FITS x + 1.
    wcs.wcs.crpix = [
        0.5 * (cols - 1) - frame.shift[0] + 1.0,
        0.5 * (rows - 1) - frame.shift[1] + 1.0,
    ]
    scale = config.pixel_scale / 3600.0
    wcs.wcs.cd = [[-scale, 0.0], [0.0, scale]]
    wcs.pixel_shape = (frame.shape[1], frame.shape[0])
    wcs.wcs.set()
    return wcs


def _render_epoch(
    config: SimConfig,
    cat: dict[str, Any],
    epoch: Epoch,
    seed: int,
    noise_rng: np.random.Generator,
    defect_rng: np.random.Generator,
) -> _EpochResult:
    ep = config.epoch(epoch)
    frame = _frame(config, epoch)
    profile = _profile(ep)
    fwhm_min, fwhm_max = ep.fwhm_range
    half = stamp_half_size(profile, fwhm_max, ep.stamp_radius)
    oversample = auto_oversample(fwhm_min) if ep.oversample is None else ep.oversample

    xl, yl, flux, width = _epoch_sources(config, cat, epoch)
    present = flux > 0.0
    raw = _sky(config, ep, frame)
    add_sources(
        raw,
        xl[present],
        yl[present],
        flux[present],
        width[present],
        profile,
        half=half,
        oversample=oversample,
        integrate=ep.pixel_integrated,
    )

    image, variance = _add_noise(raw, ep, noise_rng)
    bad_columns, cr = _defects(image, ep, defect_rng)
    planes = MaskPlanes.default()
    mask = np.zeros(frame.shape, dtype=np.uint32)
    if ep.saturation is not None:
        sat = _saturate(image, ep.saturation, bleed=ep.bleed)
        mask[sat] |= np.uint32(planes.value("SAT"))
    if bad_columns.size:
        mask[:, bad_columns] |= np.uint32(planes.value("BAD"))
    mask[cr] |= np.uint32(planes.value("CR"))
    if config.edge_width:
        mask[_edge_mask(frame.shape, config.edge_width)] |= np.uint32(planes.value("EDGE"))

    if ep.subtract_sky:
        sky = _sky(config, ep, frame)
        image -= sky
        raw -= sky

    _freeze(image, mask, variance, raw)
    calib = (
        config.template_calib
        if epoch == "template"
        else (config.template_calib / config.flux_scale)
    )
    header = fits.Header()
    header["SIMSEED"] = (seed, "skydiff.sim random seed")
    header["SIMEPOCH"] = (epoch, "skydiff.sim epoch")
    header["GAIN"] = (ep.gain, "[e-/adu] detector gain")
    header["RDNOISE"] = (ep.read_noise, "[e-] read noise")
    header["SKYLEVEL"] = (ep.sky_level, "[adu] sky level at the field centre")
    header["SKYSUB"] = (ep.subtract_sky, "sky model subtracted")
    header["PSFMODEL"] = (ep.psf_model, "analytic PSF profile")
    header["PSFFWHM"] = (ep.fwhm, "[pix] PSF FWHM at the field centre")
    if ep.saturation is not None:
        header["SATURATE"] = (ep.saturation, "[adu] saturation level (raw, sky included)")
    exposure = Exposure(
        image=image,
        mask=mask,
        variance=variance,
        mask_planes=planes,
        psf=_attach_psf(config, epoch, frame, profile, half, oversample),
        wcs=_make_wcs(config, frame),
        photo_calib=PhotoCalib(scale=calib),
        filter=config.filter,
        visit_info=VisitInfo(
            date=Time(ep.mjd, format="mjd", scale="tai"), exposure_time=ep.exposure_time
        ),
        origin=frame.origin,
        metadata=header,
    )
    return _EpochResult(exposure, raw)


def _saturated_at(
    exposure: Exposure, x: NDArray[np.float64], y: NDArray[np.float64]
) -> NDArray[np.bool_]:
    rows, cols = exposure.shape
    ic = np.floor(x + 0.5).astype(np.int64)
    jc = np.floor(y + 0.5).astype(np.int64)
    inside = (ic >= 0) & (ic < cols) & (jc >= 0) & (jc < rows)
    out = np.zeros(x.size, dtype=bool)
    sat = exposure.masked("SAT")
    out[inside] = sat[jc[inside], ic[inside]]
    return out


def _truth_table(config: SimConfig, cat: dict[str, Any], seed: int) -> Table:
    n = len(cat["x"])
    table = Table()
    table["id"] = np.arange(n, dtype=np.int64)
    table["kind"] = cat["kind"].astype("U9")
    table["x"] = cat["x"] * u.pix
    table["y"] = cat["y"] * u.pix
    table["x_template"] = cat["x_template"] * u.pix
    table["y_template"] = cat["y_template"] * u.pix
    table["flux_template"] = cat["flux_template"] * u.adu
    table["flux_science"] = cat["flux_science"] * u.adu
    frame_t = _frame(config, "template")
    table["fwhm_template"] = (
        fwhm_at(
            config,
            "template",
            cat["x_template"] + frame_t.shift[0],
            cat["y_template"] + frame_t.shift[1],
        )
        * u.pix
    )
    table["fwhm_science"] = fwhm_at(config, "science", cat["x"], cat["y"]) * u.pix
    table.meta.update(
        {
            "seed": seed,
            "offset": list(config.offset),
            "flux_scale": config.flux_scale,
            "template_border": config.template_border,
        }
    )
    return table


def _resolve(config: SimConfig | None, overrides: dict[str, Any]) -> SimConfig:
    if config is None:
        config = SimConfig()
    elif not isinstance(config, SimConfig):
        msg = f"config must be a SimConfig or None, got {type(config).__name__}"
        raise ConfigError(msg)
    return config.evolve(**overrides) if overrides else config


# ------------------------------------------------------------------------------------------------
# public entry points
# ------------------------------------------------------------------------------------------------


def simulate_pair(
    config: SimConfig | None = None, *, seed: int = 0, **overrides: Any
) -> SimulatedPair:
    r"""Simulate a science/template pair of a star field, with a truth table.

    Both epochs see the same stars (fluxes scaled by ``flux_scale`` in the science, positions
    shifted by ``offset``); the science additionally holds the transients, the changed fluxes
    of the variables and the displaced positions of the moving sources. Each epoch has its
    own PSF (optionally varying across the field), sky, noise and detector defects.

    Parameters
    ----------
    config : SimConfig, optional
        The simulation settings (default ``SimConfig()``).
    seed : int, optional
        Non-negative seed of ``np.random.default_rng``; the same seed and config give identical
        output (see the module notes for the stream layout).
    **overrides
        Field changes applied to ``config`` first (:meth:`SimConfig.evolve`); a mapping given
        for ``science`` or ``template`` changes only those fields of that epoch.

    Returns
    -------
    SimulatedPair
        ``science``, ``template`` exposures, ``truth`` table, the noiseless models, the config
        and the seed.

    Raises
    ------
    ConfigError
        For an unknown override, an invalid value, or a negative/non-integer seed.

    Notes
    -----
    Pixel values follow the model described in the module notes: sky plus PSF-convolved
    sources, Poisson and read noise, cosmic rays, bad columns, then saturation. The variance
    plane is the model variance :math:`\max(m,0)/g + (r/g)^2` in ADU². Each exposure carries
    the mask planes ``SAT``, ``BAD``, ``CR`` (and ``EDGE`` with ``edge_width``), a PSF model
    (:class:`~skydiff.psf.GaussianPsf` for a round Gaussian, otherwise an
    :class:`~skydiff.psf.ImagePsf`, or a :class:`~skydiff.psf.PolynomialPsf` fitted to the
    analytic profile on a grid when it varies), a TAN WCS whose science version is shifted by
    ``offset`` (the same sky position falls on science pixel :math:`(X + d_x, Y + d_y)` for
    template pixel :math:`(X, Y)`), and a photometric calibration carrying ``flux_scale``.

    The two epochs are rendered concurrently (:func:`skydiff.parallel.parallel_map`: in two
    threads when the process may use two CPUs); each uses only its own random streams, so
    the result does not depend on scheduling.

    Examples
    --------
    >>> pair = simulate_pair(shape=(64, 64), n_stars=5, seed=1)
    >>> pair.science.shape, len(pair.truth)
    ((64, 64), 5)
    """
    config = _resolve(config, overrides)
    seed = _check_seed(seed)
    streams = _streams(seed)
    cat = _catalog(config, streams)

    def render(epoch: Epoch) -> _EpochResult:
        return _render_epoch(
            config, cat, epoch, seed, streams[f"{epoch}_noise"], streams[f"{epoch}_defects"]
        )

    epochs: tuple[Epoch, Epoch] = ("template", "science")
    template, science = parallel_map(render, epochs)

    truth = _truth_table(config, cat, seed)
    sat_t = _saturated_at(template.exposure, cat["x_template"], cat["y_template"])
    sat_s = _saturated_at(science.exposure, cat["x"], cat["y"])
    truth["saturated_template"] = sat_t
    truth["saturated_science"] = sat_s
    truth["saturated"] = sat_t | sat_s
    return SimulatedPair(
        science=science.exposure,
        template=template.exposure,
        truth=truth,
        science_model=science.model,
        template_model=template.model,
        config=config,
        seed=seed,
    )


def simulate_exposure(
    config: SimConfig | None = None, *, epoch: Epoch = "science", seed: int = 0, **overrides: Any
) -> SimulatedExposure:
    """Simulate one epoch of a pair: identical to that epoch of :func:`simulate_pair`.

    Parameters
    ----------
    config : SimConfig, optional
        The simulation settings (default ``SimConfig()``); the other epoch's settings are
        ignored.
    epoch : {"science", "template"}, optional
        Which epoch to simulate.
    seed : int, optional
        Non-negative random seed.
    **overrides
        Field changes applied to ``config`` first, as in :func:`simulate_pair`.

    Returns
    -------
    SimulatedExposure
        The exposure, the truth table (``saturated`` refers to this epoch), the noiseless
        model, the epoch name, the config and the seed.

    Raises
    ------
    ConfigError
        For an unknown epoch or override, an invalid value, or a bad seed.

    Examples
    --------
    >>> one = simulate_exposure(shape=(64, 64), n_stars=5, seed=1)
    >>> one.exposure == simulate_pair(shape=(64, 64), n_stars=5, seed=1).science
    True
    """
    config = _resolve(config, overrides)
    config.epoch(epoch)
    seed = _check_seed(seed)
    streams = _streams(seed)
    cat = _catalog(config, streams)
    result = _render_epoch(
        config, cat, epoch, seed, streams[f"{epoch}_noise"], streams[f"{epoch}_defects"]
    )
    truth = _truth_table(config, cat, seed)
    if epoch == "science":
        truth["saturated"] = _saturated_at(result.exposure, cat["x"], cat["y"])
    else:
        truth["saturated"] = _saturated_at(result.exposure, cat["x_template"], cat["y_template"])
    return SimulatedExposure(
        exposure=result.exposure,
        truth=truth,
        model=result.model,
        epoch=epoch,
        config=config,
        seed=seed,
    )
