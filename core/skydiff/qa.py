"""Quality-assurance figures (needs :mod:`matplotlib`, the ``skydiff[qa]`` extra)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from skydiff.errors import InputError

if TYPE_CHECKING:
    from skydiff.roles import SubtractionResult

__all__ = ["plot_subtraction_qa"]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        msg = "QA figures need matplotlib: pip install 'skydiff[qa]'"
        raise InputError(msg) from exc
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_subtraction_qa(result: SubtractionResult, path: str | os.PathLike[str], *,
                        overwrite: bool = False, n_grid: int = 5, n_stamps: int = 16,
                        stamp_radius: int = 12) -> None:
    """Write a PNG with the kernel across the field and residual stamps of the kernel stars.

    The left panel shows the matching kernel evaluated on an ``n_grid`` x ``n_grid`` grid of
    positions (each normalised to its own peak, with its sum printed); the right panel shows
    ``(difference) / sqrt(variance)`` cut-outs around the brightest kernel stars that were
    used, on a fixed ±5σ scale, so a good subtraction looks like noise.

    Parameters
    ----------
    result : SubtractionResult
        The output of a subtraction.
    path : path-like
        The PNG to write (atomically).
    overwrite : bool, optional
        Replace an existing file.
    n_grid : int, optional
        Kernel grid size per axis.
    n_stamps : int, optional
        Maximum number of residual stamps.
    stamp_radius : int, optional
        Half-size of the residual stamps in pixels.

    Raises
    ------
    InputError
        If matplotlib is missing or the file exists and ``overwrite`` is False.
    """
    from skydiff.io import atomic_path

    plt = _pyplot()
    difference = result.difference
    height, width = difference.shape
    x0, y0 = difference.origin
    fig = plt.figure(figsize=(12, 6), layout="constrained")
    left, right = fig.subfigures(1, 2)
    if result.kernel is not None:
        xs = x0 + np.linspace(0.0, width - 1.0, n_grid)
        ys = y0 + np.linspace(0.0, height - 1.0, n_grid)
        axes = left.subplots(n_grid, n_grid)
        for i, y in enumerate(ys[::-1]):
            for j, x in enumerate(xs):
                image = np.asarray(result.kernel.image_at(x, y))
                ax = axes[i, j]
                ax.imshow(image / np.abs(image).max(), origin="lower", cmap="RdBu_r",
                          vmin=-1, vmax=1)
                ax.set_title(f"Σ={image.sum():.3f}", fontsize=7)
                ax.set_axis_off()
        left.suptitle("matching kernel across the field")
    else:
        left.suptitle("no matching kernel")
    z = np.asarray(difference.image, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = z / np.sqrt(np.asarray(difference.variance, dtype=np.float64))
    z = np.where(np.isfinite(z), z, 0.0)
    sources = result.kernel_sources
    rows = []
    if sources is not None and len(sources) > 0:
        table = sources
        if "used" in table.colnames:
            table = table[np.asarray(table["used"], dtype=bool)]
        order = np.argsort(-np.asarray(table["snr"])) if "snr" in table.colnames else slice(None)
        for row in table[order][:n_stamps]:
            cx, cy = round(float(row["x"])), round(float(row["y"]))
            r0, r1 = cy - stamp_radius, cy + stamp_radius + 1
            c0, c1 = cx - stamp_radius, cx + stamp_radius + 1
            if r0 >= 0 and c0 >= 0 and r1 <= height and c1 <= width:
                rows.append(z[r0:r1, c0:c1])
    if rows:
        n_cols = int(np.ceil(np.sqrt(len(rows))))
        n_rows = int(np.ceil(len(rows) / n_cols))
        axes = np.atleast_1d(right.subplots(n_rows, n_cols)).ravel()
        for ax, stamp in zip(axes, rows, strict=False):
            ax.imshow(stamp, origin="lower", cmap="RdBu_r", vmin=-5, vmax=5)
            ax.set_title(f"rms {np.std(stamp):.2f}", fontsize=7)
        for ax in axes:
            ax.set_axis_off()
        right.suptitle("kernel-star residuals, difference/σ (±5)")
    else:
        ax = right.subplots()
        ax.imshow(z, origin="lower", cmap="RdBu_r", vmin=-5, vmax=5)
        ax.set_axis_off()
        right.suptitle("difference/σ (±5)")
    try:
        with atomic_path(path, overwrite=overwrite) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
