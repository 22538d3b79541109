"""Configuration of the image simulator: :class:`EpochConfig` and :class:`SimConfig`.

Both classes are frozen, keyword-only attrs values. Every field is converted (lists to tuples,
ints to floats, mappings to nested configs) and validated on construction; an invalid value
raises :class:`~skydiff.errors.ConfigError` naming the field. Change a config with
:func:`attrs.evolve` (or the ``**overrides`` of :func:`~skydiff.sim.simulate_pair`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import attrs
import numpy as np

from skydiff.errors import ConfigError

__all__ = ["EpochConfig", "SimConfig"]

PsfModelName = Literal["gaussian", "moffat"]

_PSF_MODELS = ("gaussian", "moffat")


# ------------------------------------------------------------------------------------------------
# converters: normalise what they can (ints to floats, sequences to tuples) and pass anything
# else through unchanged, so that the type validators below can name the offending field.
# ------------------------------------------------------------------------------------------------


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def _is_integral(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _as_float(value: Any) -> Any:
    """A real number (not a bool) as float; anything else unchanged."""
    return float(value) if _is_real(value) else value


def _as_int(value: Any) -> Any:
    """An integral number (not a bool) as int; anything else unchanged."""
    return int(value) if _is_integral(value) else value


def _as_bool(value: Any) -> Any:
    """A Python or numpy bool as bool; anything else unchanged."""
    return bool(value) if isinstance(value, bool | np.bool_) else value


def _as_float_tuple(value: Any) -> Any:
    """A list/tuple/array of numbers as a tuple of floats; anything else unchanged."""
    if isinstance(value, list | tuple | np.ndarray):
        return tuple(_as_float(v) for v in value)
    return value


def _as_int_tuple(value: Any) -> Any:
    """A list/tuple/array of integers as a tuple of ints; anything else unchanged."""
    if isinstance(value, list | tuple | np.ndarray):
        return tuple(_as_int(v) for v in value)
    return value


# ------------------------------------------------------------------------------------------------
# validators (all raise ConfigError naming the field)
# ------------------------------------------------------------------------------------------------

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def _type_error(attribute: attrs.Attribute[Any], expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{attribute.name} must be {expected}, got {value!r}")


def _real(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, float):
        raise _type_error(attribute, "a real number", value)


def _optional_real(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not isinstance(value, float):
        raise _type_error(attribute, "None or a real number", value)


def _integer(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool)):
        raise _type_error(attribute, "an integer", value)


def _optional_integer(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not (isinstance(value, int) and not isinstance(value, bool)):
        raise _type_error(attribute, "None or an integer", value)


def _boolean(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bool):
        raise _type_error(attribute, "True or False", value)


def _string(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str):
        raise _type_error(attribute, "a string", value)


def _reals(n: int) -> Validator:
    def check(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not (
            isinstance(value, tuple)
            and len(value) == n
            and all(isinstance(v, float) for v in value)
        ):
            raise _type_error(attribute, f"a sequence of {n} real numbers", value)

    return check


def _integers(n: int) -> Validator:
    def check(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not (
            isinstance(value, tuple)
            and len(value) == n
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            raise _type_error(attribute, f"a sequence of {n} integers", value)

    return check


def _finite(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if v is not None and not math.isfinite(v):
            msg = f"{attribute.name} must be finite, got {value!r}"
            raise ConfigError(msg)


def _gt(bound: float) -> Validator:
    def check(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        values = value if isinstance(value, tuple) else (value,)
        if any(v is not None and not v > bound for v in values):
            msg = f"{attribute.name} must be > {bound}, got {value!r}"
            raise ConfigError(msg)

    return check


def _ge(bound: float) -> Validator:
    def check(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        values = value if isinstance(value, tuple) else (value,)
        if any(v is not None and not v >= bound for v in values):
            msg = f"{attribute.name} must be >= {bound}, got {value!r}"
            raise ConfigError(msg)

    return check


def _lt(bound: float) -> Validator:
    def check(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        values = value if isinstance(value, tuple) else (value,)
        if any(v is not None and not v < bound for v in values):
            msg = f"{attribute.name} must be < {bound}, got {value!r}"
            raise ConfigError(msg)

    return check


def _ordered_range(inst: Any, attribute: attrs.Attribute[Any], value: tuple[float, float]) -> None:
    if not value[0] <= value[1]:
        msg = f"{attribute.name} must be (min, max) with min <= max, got {value!r}"
        raise ConfigError(msg)


def _one_of(choices: tuple[str, ...]) -> Validator:
    def check(inst: Any, attribute: attrs.Attribute[Any], value: str) -> None:
        if value not in choices:
            msg = f"{attribute.name} must be one of {', '.join(choices)}; got {value!r}"
            raise ConfigError(msg)

    return check


# ------------------------------------------------------------------------------------------------
# EpochConfig
# ------------------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class EpochConfig:
    r"""Observing conditions of one epoch (science or template) of a simulated pair.

    All pixel quantities are in the epoch's own image units (ADU); electrons are ADU times
    ``gain``.

    Parameters
    ----------
    psf_model : {"gaussian", "moffat"}
        Analytic PSF profile (see Notes).
    fwhm : float
        PSF full width at half maximum at the centre of the field, in pixels (> 0). For an
        elliptical PSF it is the geometric mean of the major- and minor-axis FWHMs.
    moffat_beta : float
        Moffat power-law index :math:`\beta` (> 1; ignored for Gaussians). Smaller values give
        heavier wings; atmospheric seeing is close to :math:`\beta \approx 3`-4.7.
    ellipticity : float
        :math:`e = 1 - b/a` of the PSF isophotes, in [0, 1).
    position_angle : float
        Angle of the major axis in degrees, counter-clockwise from the +column (x) axis toward
        the +row (y) axis.
    fwhm_gradient : (float, float)
        Fractional change of the FWHM across the field along (x, y): the FWHM at a position is
        :math:`\mathrm{FWHM}\,(1 + g_x u + g_y v)` with :math:`u, v \in [-1, 1]` the science
        frame's columns and rows mapped linearly (so ``(0.2, 0)`` gives -20 % at the left edge
        and +20 % at the right edge). :math:`|g_x| + |g_y| < 1`.
    pixel_integrated : bool
        False (default): the profile is the *effective* PSF (optics, atmosphere and pixel
        together) and is sampled at pixel centres, so the attached PSF model reproduces the
        stars exactly and has exactly this FWHM. True: the profile is the pre-pixel PSF and is
        integrated over each pixel (the effective PSF is then broader, by about 1/12 px² in
        variance); the attached PSF is the integrated image.
    oversample : int or None
        With ``pixel_integrated``, the sub-pixel factor :math:`n` of the :math:`n \times n`
        midpoint rule used for Moffat and rotated elliptical profiles. None (default) chooses
        :math:`n = \lceil 6/\mathrm{FWHM}_{\min} \rceil` clipped to [1, 8]. Round and
        axis-aligned Gaussians are integrated exactly (error functions) and ignore it.
    stamp_radius : float or None
        Half-size of the square rendering stamp in units of the largest FWHM in the field.
        None (default) uses 3 for Gaussians (:math:`\approx 7\sigma`) and 5 for Moffats. Each
        stamp is renormalised to the source's flux, so the truncation only trims the wings.
    sky_level : float
        Sky background at the centre of the field, in ADU (>= 0).
    sky_gradient : (float, float)
        Linear sky terms :math:`(a_x, a_y)` in ADU: :math:`a_x u + a_y v`.
    sky_quadratic : (float, float, float)
        Quadratic sky terms :math:`(a_{xx}, a_{xy}, a_{yy})` in ADU:
        :math:`a_{xx} u^2 + a_{xy} u v + a_{yy} v^2`. The sky must stay >= 0 over the frame.
    subtract_sky : bool
        Subtract the noiseless sky model from the delivered image (a background-subtracted
        exposure). The variance plane still contains the sky's shot noise.
    gain : float
        Detector gain in electrons per ADU (> 0).
    read_noise : float
        Read noise in electrons per pixel (>= 0).
    poisson : bool
        Add shot noise of sky and sources. When False only read noise is added and the variance
        plane is the constant :math:`(r/g)^2`.
    saturation : float or None
        Saturation level in raw ADU (sky included). Pixels reaching it are clipped to it and get
        the ``SAT`` mask bit. None disables saturation.
    bleed : bool
        Let saturated charge bleed along columns: the excess charge of each saturated run of a
        column is spread to saturation level over the pixels just above and below it.
    n_bad_columns : int
        Number of dead columns (value 0 ADU raw, ``BAD`` mask bit), at random.
    n_cosmic_rays : int
        Number of cosmic-ray tracks (``CR`` mask bit), at random positions and angles.
    cosmic_ray_flux : (float, float)
        Range of the charge deposited per track pixel, in ADU (uniform).
    cosmic_ray_length : (int, int)
        Range of track lengths in pixels (uniform integers, inclusive).
    exposure_time : float
        Exposure time in seconds (recorded in the visit info).
    mjd : float
        Modified Julian date of the exposure (recorded in the visit info).

    Notes
    -----
    With :math:`r^2 = (\Delta x', \Delta y')` the offsets rotated to the PSF's axes and scaled
    by the axis ratio :math:`q = 1 - e` (major axis stretched by :math:`q^{-1/2}`, minor axis
    shrunk by :math:`q^{1/2}`), the profiles are

    .. math::

        G(r) = \frac{1}{2\pi\sigma^2} \exp\!\left(-\frac{r^2}{2\sigma^2}\right),
        \qquad \sigma = \frac{\mathrm{FWHM}}{2\sqrt{2\ln 2}},

    .. math::

        M(r) = \frac{\beta - 1}{\pi\alpha^2}\left[1 + \frac{r^2}{\alpha^2}\right]^{-\beta},
        \qquad \alpha = \frac{\mathrm{FWHM}}{2\sqrt{2^{1/\beta} - 1}}

    (Moffat 1969), sampled at pixel centres (or integrated over pixels, see
    ``pixel_integrated``) and normalised to unit sum on the stamp.

    References
    ----------
    .. [1] Moffat, A. F. J. 1969, A&A 3, 455, "A theoretical investigation of focal stellar
       images in the photographic emulsion and application to photographic photometry".
    """

    psf_model: PsfModelName = attrs.field(
        default="gaussian", validator=[_string, _one_of(_PSF_MODELS)]
    )
    fwhm: float = attrs.field(
        default=3.0, converter=_as_float, validator=[_real, _finite, _gt(0.0)]
    )
    moffat_beta: float = attrs.field(
        default=3.0, converter=_as_float, validator=[_real, _finite, _gt(1.0)]
    )
    ellipticity: float = attrs.field(
        default=0.0, converter=_as_float, validator=[_real, _finite, _ge(0.0), _lt(1.0)]
    )
    position_angle: float = attrs.field(
        default=0.0, converter=_as_float, validator=[_real, _finite]
    )
    fwhm_gradient: tuple[float, float] = attrs.field(
        default=(0.0, 0.0), converter=_as_float_tuple, validator=[_reals(2), _finite]
    )
    pixel_integrated: bool = attrs.field(default=False, converter=_as_bool, validator=_boolean)
    oversample: int | None = attrs.field(
        default=None,
        converter=_as_int,
        validator=[_optional_integer, _ge(1)],
    )
    stamp_radius: float | None = attrs.field(
        default=None, converter=_as_float, validator=[_optional_real, _finite, _gt(0.0)]
    )
    sky_level: float = attrs.field(
        default=100.0, converter=_as_float, validator=[_real, _finite, _ge(0)]
    )
    sky_gradient: tuple[float, float] = attrs.field(
        default=(0.0, 0.0), converter=_as_float_tuple, validator=[_reals(2), _finite]
    )
    sky_quadratic: tuple[float, float, float] = attrs.field(
        default=(0.0, 0.0, 0.0), converter=_as_float_tuple, validator=[_reals(3), _finite]
    )
    subtract_sky: bool = attrs.field(default=False, converter=_as_bool, validator=_boolean)
    gain: float = attrs.field(
        default=1.0, converter=_as_float, validator=[_real, _finite, _gt(0.0)]
    )
    read_noise: float = attrs.field(
        default=5.0, converter=_as_float, validator=[_real, _finite, _ge(0)]
    )
    poisson: bool = attrs.field(default=True, converter=_as_bool, validator=_boolean)
    saturation: float | None = attrs.field(
        default=None, converter=_as_float, validator=[_optional_real, _finite, _gt(0.0)]
    )
    bleed: bool = attrs.field(default=False, converter=_as_bool, validator=_boolean)
    n_bad_columns: int = attrs.field(default=0, converter=_as_int, validator=[_integer, _ge(0)])
    n_cosmic_rays: int = attrs.field(default=0, converter=_as_int, validator=[_integer, _ge(0)])
    cosmic_ray_flux: tuple[float, float] = attrs.field(
        default=(300.0, 3000.0),
        converter=_as_float_tuple,
        validator=[_reals(2), _finite, _gt(0.0), _ordered_range],
    )
    cosmic_ray_length: tuple[int, int] = attrs.field(
        default=(1, 8), converter=_as_int_tuple, validator=[_integers(2), _ge(1), _ordered_range]
    )
    exposure_time: float = attrs.field(
        default=30.0, converter=_as_float, validator=[_real, _finite, _gt(0.0)]
    )
    mjd: float = attrs.field(default=60000.0, converter=_as_float, validator=[_real, _finite])

    def __attrs_post_init__(self) -> None:
        gx, gy = self.fwhm_gradient
        if abs(gx) + abs(gy) >= 1.0:
            msg = (
                f"fwhm_gradient {self.fwhm_gradient!r} makes the FWHM non-positive somewhere; "
                "keep |g_x| + |g_y| < 1"
            )
            raise ConfigError(msg)
        # The sky over u, v in [-1, 1]^2 is a quadratic; its minimum over the square is reached
        # at a corner, on an edge or at the interior stationary point.  Check a dense grid of
        # the square plus the stationary point: cheap and exact enough for a config check.
        if self.sky_min() < 0.0:
            msg = (
                f"the sky model goes negative (minimum {self.sky_min():.4g} ADU); raise "
                "sky_level or reduce sky_gradient / sky_quadratic"
            )
            raise ConfigError(msg)

    @property
    def is_spatially_varying(self) -> bool:
        """True if the PSF width changes across the field."""
        return self.fwhm_gradient != (0.0, 0.0)

    @property
    def fwhm_range(self) -> tuple[float, float]:
        """(min, max) FWHM over the science frame, in pixels."""
        spread = abs(self.fwhm_gradient[0]) + abs(self.fwhm_gradient[1])
        return self.fwhm * (1.0 - spread), self.fwhm * (1.0 + spread)

    def sky_min(self) -> float:
        """Minimum of the sky model over the science frame, in ADU."""
        t = np.linspace(-1.0, 1.0, 65)
        u, v = np.meshgrid(t, t)
        ax, ay = self.sky_gradient
        axx, axy, ayy = self.sky_quadratic
        sky = self.sky_level + ax * u + ay * v + axx * u * u + axy * u * v + ayy * v * v
        return float(sky.min())

    def to_dict(self) -> dict[str, Any]:
        """Plain dictionary of the fields (tuples as lists, None values dropped)."""
        return _plain(attrs.asdict(self, recurse=False))


# ------------------------------------------------------------------------------------------------
# SimConfig
# ------------------------------------------------------------------------------------------------


_SCIENCE_DEFAULT = EpochConfig(fwhm=4.0, mjd=60000.0)
_TEMPLATE_DEFAULT = EpochConfig(fwhm=3.0, mjd=59000.0)


def _to_epoch(value: Any, default: EpochConfig, name: str) -> EpochConfig:
    if isinstance(value, EpochConfig):
        return value
    if isinstance(value, Mapping):
        return _evolve_checked(default, dict(value), where=name)
    msg = f"{name} must be an EpochConfig or a mapping of its fields, got {value!r}"
    raise ConfigError(msg)


def _to_science_epoch(value: Any) -> EpochConfig:
    """An EpochConfig, or a mapping of changes to the default science epoch."""
    return _to_epoch(value, _SCIENCE_DEFAULT, "science")


def _to_template_epoch(value: Any) -> EpochConfig:
    """An EpochConfig, or a mapping of changes to the default template epoch."""
    return _to_epoch(value, _TEMPLATE_DEFAULT, "template")


@attrs.frozen(kw_only=True)
class SimConfig:
    r"""Everything that defines a simulated science/template pair, except the random seed.

    Coordinates: ``x`` is the column and ``y`` the row, 0-based, of the *science* frame, whose
    parent origin is ``origin``. The template frame is the science frame grown by
    ``template_border`` pixels on every side; a source at template position :math:`(X, Y)`
    appears in the science at :math:`(X + d_x, Y + d_y)`, with :math:`(d_x, d_y)` = ``offset``.

    Parameters
    ----------
    shape : (int, int)
        (rows, cols) of the science image (each >= 8).
    origin : (int, int)
        Parent coordinates (x0, y0) of the science image's pixel [0, 0].
    n_stars : int
        Number of constant stars, uniform over the template frame (so some fall near or across
        the science edges).
    flux_slope : float
        Index :math:`\gamma` of the differential flux distribution
        :math:`dN/dF \propto F^{-\gamma}` between ``flux_min`` and ``flux_max`` (2.5 is the
        Euclidean count slope; 1 is log-uniform; 0 is uniform).
    flux_min, flux_max : float
        Flux limits of the stars, in template ADU (0 < min <= max).
    science, template : EpochConfig or mapping
        Observing conditions of each epoch; a mapping is applied as field changes to the default
        epoch (science: FWHM 4 px, template: FWHM 3 px).
    offset : (float, float)
        Sub-pixel (or any) shift (dx, dy) of the science relative to the template, in pixels.
    flux_scale : float
        Photometric ratio science/template: a source of template flux :math:`F` has science
        flux ``flux_scale`` :math:`\times F` (> 0). The photometric calibrations carry it.
    template_border : int
        Extra pixels on every side of the template frame (>= 0), as in lsst's
        ``templateBorderSize``.
    edge_width : int
        Width in pixels of the ``EDGE`` mask border set in both exposures (0 disables it).
    n_transients : int
        Number of sources present only in the science image.
    transient_flux : (float, float)
        Science flux range of the transients, in science ADU (log-uniform).
    n_variables : int
        Number of variable stars.
    variable_fraction : float
        Fractional flux change of the variables, in (0, 1): each variable is brighter or fainter
        (random sign) in the science by this fraction, :math:`F_s = s F_t (1 \pm f)`.
    variable_flux : (float, float)
        Template flux range of the variables, in template ADU (log-uniform).
    n_dipoles : int
        Number of moving sources (dipoles in the difference).
    dipole_offset : (float, float)
        Shift (dx, dy) in pixels of a moving source's science position relative to where it
        would be without motion.
    dipole_flux : (float, float)
        Template flux range of the moving sources (log-uniform).
    source_margin : float
        Minimum distance in pixels of transients, variables and dipoles from the science
        border (so they are fully measurable).
    psf_model_order : int
        Total degree (0-6) of the Chebyshev polynomials of the spatially varying PSF model
        (:class:`~skydiff.psf.PolynomialPsf`) attached to an epoch whose PSF varies
        (``fwhm_gradient != (0, 0)``). With the default 3 the model reproduces the analytic
        PSF to 1e-4 of its peak for a ±10 % FWHM variation and to 2 % for ±30 %; use 4 for
        larger variations.
    psf_model_grid : int
        The analytic PSF is sampled on a ``psf_model_grid`` x ``psf_model_grid`` grid of
        positions spanning the frame, and each model pixel is a least-squares polynomial fit
        to those samples (>= psf_model_order + 1).
    pixel_scale : float
        Pixel scale of the TAN WCS in arcsec per pixel (> 0).
    sky_center : (float, float)
        (RA, Dec) in degrees of the science frame's centre.
    filter : str
        Filter name recorded in both exposures.
    template_calib : float
        Photometric calibration of the template, nJy per ADU (> 0); the science gets
        ``template_calib / flux_scale``.
    """

    shape: tuple[int, int] = attrs.field(
        default=(512, 512), converter=_as_int_tuple, validator=_integers(2)
    )
    origin: tuple[int, int] = attrs.field(
        default=(0, 0), converter=_as_int_tuple, validator=_integers(2)
    )
    n_stars: int = attrs.field(default=200, converter=_as_int, validator=[_integer, _ge(0)])
    flux_slope: float = attrs.field(default=2.0, converter=_as_float, validator=[_real, _finite])
    flux_min: float = attrs.field(
        default=300.0, converter=_as_float, validator=[_real, _finite, _gt(0)]
    )
    flux_max: float = attrs.field(
        default=300000.0, converter=_as_float, validator=[_real, _finite, _gt(0)]
    )
    science: EpochConfig = attrs.field(default=_SCIENCE_DEFAULT, converter=_to_science_epoch)
    template: EpochConfig = attrs.field(default=_TEMPLATE_DEFAULT, converter=_to_template_epoch)
    offset: tuple[float, float] = attrs.field(
        default=(0.0, 0.0), converter=_as_float_tuple, validator=[_reals(2), _finite]
    )
    flux_scale: float = attrs.field(
        default=1.0, converter=_as_float, validator=[_real, _finite, _gt(0)]
    )
    template_border: int = attrs.field(default=0, converter=_as_int, validator=[_integer, _ge(0)])
    edge_width: int = attrs.field(default=0, converter=_as_int, validator=[_integer, _ge(0)])
    n_transients: int = attrs.field(default=0, converter=_as_int, validator=[_integer, _ge(0)])
    transient_flux: tuple[float, float] = attrs.field(
        default=(2000.0, 20000.0),
        converter=_as_float_tuple,
        validator=[_reals(2), _finite, _gt(0.0), _ordered_range],
    )
    n_variables: int = attrs.field(default=0, converter=_as_int, validator=[_integer, _ge(0)])
    variable_fraction: float = attrs.field(
        default=0.5, converter=_as_float, validator=[_real, _finite, _gt(0.0), _lt(1.0)]
    )
    variable_flux: tuple[float, float] = attrs.field(
        default=(2000.0, 20000.0),
        converter=_as_float_tuple,
        validator=[_reals(2), _finite, _gt(0.0), _ordered_range],
    )
    n_dipoles: int = attrs.field(default=0, converter=_as_int, validator=[_integer, _ge(0)])
    dipole_offset: tuple[float, float] = attrs.field(
        default=(1.5, 0.0), converter=_as_float_tuple, validator=[_reals(2), _finite]
    )
    dipole_flux: tuple[float, float] = attrs.field(
        default=(2000.0, 20000.0),
        converter=_as_float_tuple,
        validator=[_reals(2), _finite, _gt(0.0), _ordered_range],
    )
    source_margin: float = attrs.field(
        default=16.0, converter=_as_float, validator=[_real, _finite, _ge(0.0)]
    )
    psf_model_order: int = attrs.field(
        default=3, converter=_as_int, validator=[_integer, _ge(0), _lt(7)]
    )
    psf_model_grid: int = attrs.field(default=8, converter=_as_int, validator=[_integer, _ge(1)])
    pixel_scale: float = attrs.field(
        default=0.2, converter=_as_float, validator=[_real, _finite, _gt(0.0)]
    )
    sky_center: tuple[float, float] = attrs.field(
        default=(150.0, 2.0), converter=_as_float_tuple, validator=[_reals(2), _finite]
    )
    filter: str = attrs.field(default="r", validator=_string)
    template_calib: float = attrs.field(
        default=1.0, converter=_as_float, validator=[_real, _finite, _gt(0.0)]
    )

    def __attrs_post_init__(self) -> None:
        rows, cols = self.shape
        if rows < 8 or cols < 8:
            msg = f"shape must be at least (8, 8) pixels, got {self.shape!r}"
            raise ConfigError(msg)
        if self.flux_min > self.flux_max:
            msg = f"flux_min ({self.flux_min}) must be <= flux_max ({self.flux_max})"
            raise ConfigError(msg)
        changing = self.n_transients + self.n_variables + self.n_dipoles
        if changing and 2 * self.source_margin >= min(rows, cols) - 1:
            msg = (
                f"source_margin {self.source_margin} leaves no room for transients, variables "
                f"or dipoles in a {rows}x{cols} image; reduce source_margin"
            )
            raise ConfigError(msg)
        if self.psf_model_grid < self.psf_model_order + 1:
            msg = (
                f"psf_model_grid ({self.psf_model_grid}) must be >= psf_model_order + 1 "
                f"({self.psf_model_order + 1}) to constrain the PSF polynomial"
            )
            raise ConfigError(msg)

    def epoch(self, name: Literal["science", "template"]) -> EpochConfig:
        """The :class:`EpochConfig` of ``"science"`` or ``"template"``."""
        if name not in ("science", "template"):
            msg = f"epoch must be 'science' or 'template', got {name!r}"
            raise ConfigError(msg)
        return self.science if name == "science" else self.template

    def evolve(self, **changes: Any) -> SimConfig:
        """Return a copy with ``changes`` applied.

        A mapping given for ``science`` or ``template`` changes only the named fields of that
        epoch (it is merged into the current epoch config, not into the default). Unknown keys
        raise :class:`~skydiff.errors.ConfigError` listing the valid ones.
        """
        merged = dict(changes)
        for name in ("science", "template"):
            value = merged.get(name)
            if isinstance(value, Mapping):
                merged[name] = _evolve_checked(getattr(self, name), dict(value), where=name)
        return _evolve_checked(self, merged, where="SimConfig")

    def to_dict(self) -> dict[str, Any]:
        """Plain (TOML-able) dictionary: tuples become lists, epochs nested dicts, None dropped."""
        out = _plain(attrs.asdict(self, recurse=False))
        out["science"] = self.science.to_dict()
        out["template"] = self.template.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SimConfig:
        """Build a config from :meth:`to_dict` output (missing keys take their defaults)."""
        return cls().evolve(**dict(data))


def _evolve_checked(obj: Any, changes: dict[str, Any], *, where: str) -> Any:
    valid = [f.name for f in attrs.fields(type(obj))]
    unknown = sorted(set(changes) - set(valid))
    if unknown:
        msg = f"unknown {where} field(s) {', '.join(unknown)}; valid fields: {', '.join(valid)}"
        raise ConfigError(msg)
    try:
        return attrs.evolve(obj, **changes)
    except ConfigError as exc:
        if where in ("science", "template") and not str(exc).startswith(f"{where}."):
            msg = f"{where}.{exc}"
            raise ConfigError(msg) from exc
        raise


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in data.items()
        if value is not None
    }
