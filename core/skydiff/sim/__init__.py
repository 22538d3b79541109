r"""Synthetic images for tests, demos and benchmarks.

* :func:`simulate_pair` — a realistic science/template pair of a star field with a truth
  table: analytic (Gaussian or Moffat, optionally elliptical) PSFs per epoch that may vary
  across the field, sky with gradients, Poisson and read noise, saturation (with bleeding),
  bad columns, cosmic rays, a sub-pixel offset and a photometric scale between the epochs,
  injected transients, variable stars and moving sources (dipoles). Configured by
  :class:`SimConfig` (with one :class:`EpochConfig` per epoch), deterministic by seed.
* :func:`simulate_exposure` — one epoch of the same simulation.
* :func:`make_test_image` — a port of lsst.ip.diffim's ``makeTestImage`` used by the lsst
  acceptance scenarios (σ-parameterised Gaussian stars, white noise).
* :func:`render_stars` — the vectorised point-source renderer underneath.

Examples
--------
>>> from skydiff.sim import simulate_pair
>>> pair = simulate_pair(shape=(128, 128), n_stars=30, n_transients=2, offset=(0.3, -0.2),
...                      seed=42)
>>> sorted(str(kind) for kind in set(pair.truth["kind"]))
['star', 'transient']
"""

from skydiff.sim._config import EpochConfig, SimConfig
from skydiff.sim._lsst import SyntheticImage, make_test_image
from skydiff.sim._pair import (
    STREAMS,
    SimulatedExposure,
    SimulatedPair,
    fwhm_at,
    simulate_exposure,
    simulate_pair,
)
from skydiff.sim._render import render_stars

__all__ = [
    "STREAMS",
    "EpochConfig",
    "SimConfig",
    "SimulatedExposure",
    "SimulatedPair",
    "SyntheticImage",
    "fwhm_at",
    "make_test_image",
    "render_stars",
    "simulate_exposure",
    "simulate_pair",
]
