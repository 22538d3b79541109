"""PSF-matching kernel mathematics: bases, per-stamp and spatial least squares, statistics."""
