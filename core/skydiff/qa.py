"""Quality-assurance figures (needs :mod:`matplotlib`, the ``skydiff[qa]`` extra)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from skydiff.errors import InputError

if TYPE_CHECKING:
    from skydiff.detect import DetectAndMeasureResult
    from skydiff.exposure import Exposure
    from skydiff.pipeline import PipelineResult
    from skydiff.roles import SubtractionResult

__all__ = ["plot_detection_qa", "plot_subtraction_qa"]


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


def _strongest(catalog: Any, n: int) -> Any:
    """The ``n`` non-sky rows of largest |snr| (|significance| where snr is NaN)."""
    if len(catalog) == 0:
        return catalog
    rows = catalog[~np.asarray(catalog["sky_source"], dtype=bool)] \
        if "sky_source" in catalog.colnames else catalog
    if len(rows) == 0:
        return rows
    strength = np.full(len(rows), -np.inf)
    for name in ("significance", "snr"):
        if name in rows.colnames:
            values = np.abs(np.asarray(rows[name], dtype=np.float64))
            strength = np.where(np.isfinite(values), values, strength)
    return rows[np.argsort(-strength, kind="stable")[:n]]


def _kind(row: Any) -> tuple[str, str]:
    """(label, colour) of a catalog row: dipole, negative or positive."""
    names = row.colnames
    if "is_dipole" in names and bool(row["is_dipole"]):
        return "dipole", "magenta"
    if "is_negative" in names and bool(row["is_negative"]):
        return "negative", "red"
    return "positive", "limegreen"


def _stamp(image: np.ndarray, x: float, y: float, radius: int) -> np.ndarray:
    """A (2r+1)^2 cut-out centred on the pixel nearest (x, y), NaN outside the image."""
    size = 2 * radius + 1
    out = np.full((size, size), np.nan)
    height, width = image.shape
    col, row = round(x), round(y)
    r0, c0 = row - radius, col - radius
    rs = slice(max(r0, 0), min(r0 + size, height))
    cs = slice(max(c0, 0), min(c0 + size, width))
    if rs.start < rs.stop and cs.start < cs.stop:
        out[rs.start - r0:rs.stop - r0, cs.start - c0:cs.stop - c0] = image[rs, cs]
    return out


def _limits(stamp: np.ndarray, *, symmetric: bool) -> tuple[float, float]:
    finite = stamp[np.isfinite(stamp)]
    if finite.size == 0:
        return -1.0, 1.0
    if symmetric:
        high = float(np.max(np.abs(finite))) or 1.0
        return -high, high
    low, high = (float(v) for v in np.percentile(finite, [1.0, 99.5]))
    return low, (high if high > low else low + 1.0)


def plot_detection_qa(result: DetectAndMeasureResult | PipelineResult,
                      path: str | os.PathLike[str], *, science: Exposure | None = None,
                      template: Exposure | None = None, overwrite: bool = False,
                      n_sources: int = 12, stamp_radius: int = 15) -> None:
    """Write a PNG with cut-outs of the strongest sources found on a difference image.

    The top panel shows the whole difference divided by its noise (±5σ) with every
    detection circled (green positive, red negative, magenta dipole; sky sources are left
    out). Below, for each of the ``n_sources`` strongest non-sky sources (largest
    :math:`|S/N|`), three cut-outs side by side — science, template, difference — with the
    measured position marked and the source's id, kind and S/N in the title. Science and
    template use a percentile stretch, the difference a symmetric linear one.

    Parameters
    ----------
    result : DetectAndMeasureResult or PipelineResult
        The detection result, or a pipeline result (its ``detection``; the template then
        defaults to the subtraction's matched image).
    path : path-like
        The PNG to write (atomically).
    science, template : Exposure, optional
        The images for the first two columns of cut-outs (left blank when missing).
    overwrite : bool, optional
        Replace an existing file.
    n_sources : int, optional
        Maximum number of sources shown (>= 1).
    stamp_radius : int, optional
        Half-size of the cut-outs in pixels (>= 2).

    Raises
    ------
    InputError
        If matplotlib is missing, ``result`` is of another type, an option is out of range,
        or the file exists and ``overwrite`` is False.
    """
    from skydiff.detect import DetectAndMeasureResult
    from skydiff.io import atomic_path
    from skydiff.pipeline import PipelineResult

    if isinstance(result, PipelineResult):
        if template is None:
            template = result.subtraction.matched_image
        detection = result.detection
    elif isinstance(result, DetectAndMeasureResult):
        detection = result
    else:
        msg = (f"plot_detection_qa needs a DetectAndMeasureResult or PipelineResult, got "
               f"{type(result).__name__}")
        raise InputError(msg)
    if int(n_sources) < 1 or int(stamp_radius) < 2:
        msg = (f"n_sources must be >= 1 and stamp_radius >= 2, got {n_sources} and "
               f"{stamp_radius}")
        raise InputError(msg)
    plt = _pyplot()
    difference = detection.difference
    catalog = detection.catalog
    diff = np.asarray(difference.image, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = diff / np.sqrt(np.asarray(difference.variance, dtype=np.float64))
    z = np.where(np.isfinite(z), z, 0.0)
    chosen = _strongest(catalog, int(n_sources))
    per_row = 4
    n_rows = int(np.ceil(len(chosen) / per_row)) if len(chosen) else 0
    fig = plt.figure(figsize=(13, 5.5 + 2.2 * n_rows), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[5.5, max(2.2 * n_rows, 0.01)])
    ax = top.subplots()
    ax.imshow(z, origin="lower", cmap="RdBu_r", vmin=-5, vmax=5, interpolation="nearest")
    real = catalog[~np.asarray(catalog["sky_source"], dtype=bool)] \
        if "sky_source" in catalog.colnames and len(catalog) else catalog
    for row in real:
        label, colour = _kind(row)
        ax.add_patch(plt.Circle((float(row["x"]), float(row["y"])), 6.0, fill=False,
                                color=colour, linewidth=0.8))
    counts = {kind: sum(_kind(row)[0] == kind for row in real)
              for kind in ("positive", "negative", "dipole")}
    ax.set_title(f"difference/σ (±5): {counts['positive']} positive, {counts['negative']} "
                 f"negative, {counts['dipole']} dipole sources")
    ax.set_axis_off()
    if n_rows:
        images = [("science", science), ("template", template), ("difference", difference)]
        axes = np.atleast_2d(bottom.subplots(n_rows, 3 * per_row))
        for index, row in enumerate(chosen):
            label, colour = _kind(row)
            x, y = float(row["x"]), float(row["y"])
            snr = float(row["snr"]) if "snr" in row.colnames else float("nan")
            for k, (name, exposure) in enumerate(images):
                axis = axes[index // per_row, 3 * (index % per_row) + k]
                if exposure is not None:
                    stamp = _stamp(np.asarray(exposure.image, dtype=np.float64), x, y,
                                   int(stamp_radius))
                    low, high = _limits(stamp, symmetric=name == "difference")
                    axis.imshow(stamp, origin="lower", vmin=low, vmax=high,
                                cmap="RdBu_r" if name == "difference" else "gray",
                                interpolation="nearest")
                    centre = int(stamp_radius)
                    axis.plot(centre + x - round(x), centre + y - round(y), "+",
                              color=colour, markersize=10, markeredgewidth=1.2)
                short = {"positive": "pos", "negative": "neg", "dipole": "dip"}[label]
                title = f"#{int(row['id'])} {short} S/N {snr:.3g}" if k == 2 else name
                axis.set_title(title, fontsize=7)
                axis.set_axis_off()
        for axis in axes.ravel()[3 * len(chosen):]:
            axis.set_axis_off()
        bottom.suptitle("strongest sources: science | template | difference", fontsize=9)
    try:
        with atomic_path(path, overwrite=overwrite) as tmp:
            fig.savefig(tmp, dpi=80, format="png")
    finally:
        plt.close(fig)
