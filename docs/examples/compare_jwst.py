"""Compare ``al``, ``al_preconvolve`` and ``zogy`` on the JWST NIRCam pair of ``../shared/data``.

Runs the whole pipeline (:func:`skydiff.run_pipeline`) three times with the pipeline file
``docs/examples/pipeline.toml``, changing only ``subtract.name``, on the Abell 2744 F200W pair
(science: UNCOVER, Nov 2022; template: GLASS, June 2022) read with its WebbPSF PSF models and
1-sigma noise maps, exactly as ``skydiff run`` reads them with ``--science-psf``,
``--science-sigma``, ``--template-psf`` and ``--template-sigma``. It prints the two Markdown
tables of numbers quoted in ``docs/user/comparison.md`` and draws
``docs/_static/compare_jwst.png``.

Usage (from the repository root)::

    python docs/examples/compare_jwst.py                  # table + figure
    python docs/examples/compare_jwst.py --no-figure --json numbers.json
    python docs/examples/compare_jwst.py --data /path/to/jwst_nircam_a2744_f200w

The numbers (all on unmasked pixels: no mask bit, finite, variance > 0):

``std(z)``
    the standard deviation of ``z = D / sqrt(V)`` over the pixels with ``|z| < 5`` (``D``,
    ``V`` the image and variance planes of the subtraction's difference; SFFT's published
    decorrelated difference has 1.21 on this pair). For ``al_preconvolve`` ``D`` is the
    PSF-filtered difference.
``robust`` and ``|z|>5``
    the robust (MAD) standard deviation of ``z`` and the fraction of pixels with
    ``|z| > 5`` (SFFT: 1.18 and 0.05 %).
``std(nu0)``
    the same statistic for the significance image computed from the variance planes,
    ``nu0``: the score divided by the square root of its variance for the score methods,
    and for ``al`` the difference correlated with its PSF over the square root of the
    correlated variance, ``(D * P) / sqrt(V * P**2)`` (the ``threshold`` detector's matched
    filter).
``detector scale``
    the factor the ``threshold`` detector divided ``nu0`` by after measuring its spread on
    the sky (its ``noise_calibration``; metadata ``significance_scale``; 1 when it reports
    none).
``std(nu)``
    the statistic for ``nu = nu0 / scale``, the image the detector thresholds: 1 means its
    5-sigma threshold is a 5-sigma threshold.
``+ / - / dipoles``
    the detections (sky sources excluded), split as ``skydiff run`` prints them.
``|nu| > 5 std(nu)``
    how many of them have a catalog ``significance`` (in units of ``nu``) above 5 times the
    measured ``std(nu)``.
``sky S/N``
    the standard deviation of ``psf_flux / psf_flux_err`` of the 100 sky sources (1 for a
    noise model that is right at the scale of the PSF; about +-7 % for 100 sources).
``residual ratio (stars)``
    ``residual_footprint_ratio_mean`` of the metric of that name over its stars (the
    kernel stars used by ``al``/``al_preconvolve``, the flux-ratio stars of ``zogy``).
``flux scale``
    the photometric scale science/template: the kernel sum (AL) or the flux ratio (ZOGY).
``time``
    wall-clock seconds of the subtraction and of the whole pipeline (machine-dependent).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.signal

import skydiff
from skydiff.io import read_exposure

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PIPELINE = HERE / "pipeline.toml"
FIGURE = REPO / "docs" / "_static" / "compare_jwst.png"
DATA = REPO.parent / "shared" / "data" / "jwst_nircam_a2744_f200w"
METHODS = ("al", "al_preconvolve", "zogy")

FILES = {
    "science": "science_jw02561001002-02561-o001_t003_nircam_clear-f200w_i2d_stamp.fits",
    "template": "template_jw01324001001-01324-o001_t001_nircam_clear-f200w_i2d_stamp.fits",
    "science_psf": "science_psf_webbpsf.fits",
    "template_psf": "template_psf_webbpsf.fits",
    "science_sigma": "science_noise_sigma.fits",
    "template_sigma": "template_noise_sigma.fits",
}

#: The figure's cut-out, ``(row slice, column slice)``: a bright star, a large galaxy and the
#: candidate brightening of the data set's README at (x, y) = (172, 514).
CUTOUT = (slice(420, 720), slice(130, 430))
#: Changes the data set's README lists from SFFT's map (x, y, 0-based), circled in the figure.
README_CANDIDATES = ((172.0, 514.0), (185.0, 834.0))
#: Colour range of every significance panel (sigma).
Z_RANGE = 5.0


# ------------------------------------------------------------------------------------------
# inputs and configuration


def load_pair(data_dir: Path = DATA) -> tuple[skydiff.Exposure, skydiff.Exposure]:
    """The science and template exposures with their WebbPSF PSFs and noise maps."""
    data_dir = Path(data_dir)
    missing = [name for name in FILES.values() if not (data_dir / name).is_file()]
    if missing:
        msg = f"JWST pair not found in {data_dir} (missing {', '.join(missing)}); use --data"
        raise skydiff.InputError(msg)
    path = {key: data_dir / name for key, name in FILES.items()}
    science = read_exposure(path["science"], sigma=path["science_sigma"],
                            psf=path["science_psf"])
    template = read_exposure(path["template"], sigma=path["template_sigma"],
                             psf=path["template_psf"])
    return science, template


def pipeline_config(name: str, pipeline: Path = PIPELINE) -> skydiff.PipelineConfig:
    """The pipeline file with ``subtract.name`` switched to ``name`` (nothing else changed)."""
    config = skydiff.PipelineConfig.load_toml(pipeline)
    config.apply_overrides([f"subtract.name={name}"])
    config.validate()
    return config


# ------------------------------------------------------------------------------------------
# statistics


def normalized(exposure: skydiff.Exposure, *, ignore: Sequence[str] = ()
               ) -> tuple[np.ndarray, np.ndarray]:
    """``(z, good)``: image / sqrt(variance) and the unmasked pixels.

    ``good`` = no mask bit set except the planes in ``ignore``, finite image and variance,
    variance > 0; ``z`` is 0 elsewhere.
    """
    image = np.asarray(exposure.image, dtype=np.float64)
    variance = np.asarray(exposure.variance, dtype=np.float64)
    planes = [name for name in exposure.mask_planes.names if name not in set(ignore)]
    masked = exposure.masked(*planes) if planes else np.zeros(exposure.shape, bool)
    good = ~masked & np.isfinite(image) & np.isfinite(variance) & (variance > 0)
    z = np.zeros(exposure.shape)
    z[good] = image[good] / np.sqrt(variance[good])
    return z, good


def std_inside(values: np.ndarray, limit: float = 5.0) -> float:
    """Standard deviation of the values with ``|value| < limit`` (the issue's statistic)."""
    return float(np.std(values[np.abs(values) < limit]))


def matched_filter(exposure: skydiff.Exposure) -> tuple[np.ndarray, np.ndarray]:
    r"""``(nu, good)``: the matched-filter significance of a difference image.

    :math:`\nu = (D\star P)/\sqrt{V\star P^2}` with :math:`P` the exposure's PSF at the image
    centre and masked pixels given zero weight, as the ``threshold`` detector computes it
    (without its background and cosmic-ray steps). ``DETECTED`` planes are not masks here.
    """
    _, good = normalized(exposure, ignore=("DETECTED", "DETECTED_NEGATIVE"))
    x0, y0 = exposure.origin
    height, width = exposure.shape
    psf = np.asarray(exposure.psf.kernel_image(x0 + width / 2, y0 + height / 2), np.float64)
    flipped = psf[::-1, ::-1]  # correlation = convolution with the reflected PSF
    image = np.where(good, np.asarray(exposure.image, np.float64), 0.0)
    variance = np.where(good, np.asarray(exposure.variance, np.float64), 0.0)
    signal = scipy.signal.fftconvolve(image, flipped, mode="same")
    noise2 = scipy.signal.fftconvolve(variance, flipped**2, mode="same")
    ok = good & (noise2 > 0)
    nu = np.zeros(exposure.shape)
    nu[ok] = signal[ok] / np.sqrt(noise2[ok])
    return nu, ok


def detection_significance(result: skydiff.PipelineResult) -> tuple[np.ndarray, np.ndarray]:
    """``(nu0, good)``: the significance the detection starts from, from the variance planes.

    score/sqrt(variance) when the detection ran on the score image, else the matched filter
    of the difference; before the detector's noise calibration (:func:`significance_scale`).
    """
    score = result.subtraction.score
    if score is not None and result.detection.metadata.get("detected_on") == "score":
        return normalized(score)
    return matched_filter(result.detection.difference)


def significance_scale(result: skydiff.PipelineResult) -> float:
    """The factor the detector divided the significance by (its ``significance_scale``
    metadata, from ``noise_calibration = "measured"``); 1 when it reports none."""
    detection = result.detection.metadata.get("detection", {})
    meta = detection.get("result", detection) if isinstance(detection, dict) else {}
    return float(meta.get("significance_scale", 1.0))


def summarize(name: str, result: skydiff.PipelineResult, seconds: float) -> dict[str, Any]:
    """The comparison numbers of one run (plain floats and ints, JSON-able)."""
    z, good = normalized(result.subtraction.difference)
    nu, nu_good = detection_significance(result)
    detector_scale = significance_scale(result)
    catalog = result.detection.catalog
    sky = np.asarray(catalog["sky_source"], dtype=bool)
    dipole = np.asarray(catalog["is_dipole"], dtype=bool) & ~sky
    negative = np.asarray(catalog["is_negative"], dtype=bool) & ~sky & ~dipole
    positive = ~sky & ~dipole & ~negative
    significance = np.abs(np.asarray(catalog["significance"], dtype=np.float64))
    std_nu = std_inside(nu[nu_good] / detector_scale)
    sky_snr = np.asarray(catalog["snr"], dtype=np.float64)[sky]
    sky_snr = sky_snr[np.isfinite(sky_snr)]
    residual = result.metrics.get("residual_footprint_ratio", {})
    meta = result.subtraction.metadata
    scale = meta.get("kernel_sum", meta.get("flux_ratio", math.nan))
    return {
        "method": name,
        "std_z": std_inside(z[good]),
        "robust_std_z": float(skydiff.robust_std(z[good])),
        "tail5": float(np.mean(np.abs(z[good]) > 5.0)),
        "unmasked": float(good.mean()),
        "std_nu0": std_inside(nu[nu_good]),
        "detector_scale": detector_scale,
        "std_nu": std_nu,
        "detected_on": str(result.detection.metadata.get("detected_on", "difference")),
        "n_positive": int(positive.sum()),
        "n_negative": int(negative.sum()),
        "n_dipoles": int(dipole.sum()),
        "n_calibrated": int(np.count_nonzero(~sky & (significance > 5.0 * std_nu))),
        "sky_snr_std": float(np.std(sky_snr)) if sky_snr.size else math.nan,
        "n_sky": int(sky_snr.size),
        "residual_ratio": float(residual.get("residual_footprint_ratio_mean", math.nan)),
        "residual_n": int(residual.get("n_footprints", 0)),
        "scale": float(scale),
        "time_subtract": float(result.metadata["timing"]["subtract"]),
        "time_total": float(seconds),
    }


# ------------------------------------------------------------------------------------------
# running


def run_method(science: skydiff.Exposure, template: skydiff.Exposure, name: str,
               pipeline: Path = PIPELINE) -> tuple[skydiff.PipelineResult, float]:
    """:func:`skydiff.run_pipeline` with the pipeline file switched to ``name``; seconds."""
    config = pipeline_config(name, pipeline)
    start = time.perf_counter()
    result = skydiff.run_pipeline(science, template, config)
    return result, time.perf_counter() - start


def compare(science: skydiff.Exposure, template: skydiff.Exposure,
            methods: Sequence[str] = METHODS, pipeline: Path = PIPELINE, *, verbose: bool = False
            ) -> tuple[list[dict[str, Any]], dict[str, skydiff.PipelineResult]]:
    """Run every method in turn; return the rows of numbers and the results by name."""
    rows, results = [], {}
    for name in methods:
        if verbose:
            print(f"running {name} ...", file=sys.stderr, flush=True)
        result, seconds = run_method(science, template, name, pipeline)
        rows.append(summarize(name, result, seconds))
        results[name] = result
    return rows, results


#: Header of the noise table (the first table of ``docs/user/comparison.md``).
NOISE_HEADER = ("| method | std(z) | robust | \\|z\\|>5 | unmasked | sky S/N | flux scale "
                "| time: subtract / all |")
#: Header of the detection table (the second one).
DETECTION_HEADER = ("| method | detected on | std(ν₀) | detector scale | std(ν) "
                    "| + / − / dipoles | \\|ν\\| > 5 std(ν) | residual ratio (stars) |")


def _rule(header: str) -> str:
    return "|" + "---|" * (header.count(" | ") + 1)


def format_tables(rows: Sequence[dict[str, Any]]) -> str:
    """The two Markdown tables of ``docs/user/comparison.md`` (one line per method)."""
    noise = [NOISE_HEADER, _rule(NOISE_HEADER)]
    detection = [DETECTION_HEADER, _rule(DETECTION_HEADER)]
    for row in rows:
        name = f"`{row['method']}`"
        noise.append(
            f"| {name} | {row['std_z']:.3f} | {row['robust_std_z']:.3f} "
            f"| {100 * row['tail5']:.3f} % | {100 * row['unmasked']:.1f} % "
            f"| {row['sky_snr_std']:.2f} | {row['scale']:.4f} "
            f"| {row['time_subtract']:.1f} s / {row['time_total']:.0f} s |")
        detection.append(
            f"| {name} | {row['detected_on']} | {row['std_nu0']:.3f} "
            f"| {row['detector_scale']:.3f} | {row['std_nu']:.3f} "
            f"| {row['n_positive']} / {row['n_negative']} / {row['n_dipoles']} "
            f"| {row['n_calibrated']} "
            f"| {row['residual_ratio']:.3f} ({row['residual_n']}) |")
    return "\n".join(noise) + "\n\n" + "\n".join(detection)


# ------------------------------------------------------------------------------------------
# figure


def plot(results: dict[str, skydiff.PipelineResult], science: skydiff.Exposure,
         path: Path = FIGURE, *, max_colours: int = 64) -> Path:
    """Draw the comparison figure and write it as a small palette PNG.

    Top row: ``D/sqrt(V)`` of each method's difference; bottom row: the science image, then
    ``score/sqrt(variance)`` of each score-producing method. Same cut-out (:data:`CUTOUT`)
    and the same grey scale (-5 to 5 sigma) in every significance panel; masked pixels are
    shown in a flat colour. The PNG is quantised to ``max_colours`` grey levels (< 300 kB).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from PIL import Image

    rows, cols = CUTOUT
    extent = (cols.start - 0.5, cols.stop - 0.5, rows.start - 0.5, rows.stop - 0.5)
    cmap = ListedColormap(plt.get_cmap("gray")(np.linspace(0, 1, 256)))
    cmap.set_bad("#d8c8a0")
    names = list(results)
    fig, axes = plt.subplots(2, len(names), figsize=(2.9 * len(names) + 0.8, 6.2),
                             sharex=True, sharey=True, squeeze=False, layout="constrained")

    def show(ax: Any, image: np.ndarray, title: str, **kwargs: Any) -> Any:
        shown = ax.imshow(image[rows, cols], origin="lower", extent=extent,
                          interpolation="nearest", **kwargs)
        ax.set_title(title, fontsize=9)
        for x, y in README_CANDIDATES:
            if cols.start <= x < cols.stop and rows.start <= y < rows.stop:
                ax.add_patch(plt.Circle((x, y), 10, fill=False, color="red", lw=1.5))
        ax.tick_params(labelsize=7)
        return shown

    for column, name in enumerate(names):
        result = results[name]
        z, good = normalized(result.subtraction.difference)
        label = "pre-filtered difference" if name == "al_preconvolve" else "difference"
        image = show(axes[0, column], np.where(good, z, np.nan), f"{name}: {label} D/√V",
                     cmap=cmap, vmin=-Z_RANGE, vmax=Z_RANGE)
        score = result.subtraction.score
        if score is not None:
            s, s_good = normalized(score)
            show(axes[1, column], np.where(s_good, s, np.nan), f"{name}: score/√var",
                 cmap=cmap, vmin=-Z_RANGE, vmax=Z_RANGE)
        elif column == 0:
            sci = np.asarray(science.image, dtype=np.float64)
            sigma = float(np.sqrt(np.nanmedian(science.variance)))
            show(axes[1, column], np.arcsinh(np.nan_to_num(sci) / (3 * sigma)),
                 "science (asinh)", cmap="gray_r", vmin=-1.0, vmax=5.0)
        else:
            axes[1, column].axis("off")
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="significance (σ)")
    fig.suptitle("JWST NIRCam F200W, Abell 2744 (900² px); same cut-out, same ±5σ scale; "
                 "red circle: README candidate", fontsize=9)

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    buffer.seek(0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(buffer) as rendered:
        small = rendered.convert("RGB").quantize(colors=max_colours, dither=Image.Dither.NONE)
        small.save(path, format="PNG", optimize=True)
    return path


# ------------------------------------------------------------------------------------------
# command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA,
                        help="folder of the JWST pair (default ../shared/data/"
                             "jwst_nircam_a2744_f200w next to the repository)")
    parser.add_argument("--pipeline", type=Path, default=PIPELINE,
                        help="pipeline file (default docs/examples/pipeline.toml)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        help="subtract.name values to run (default: al al_preconvolve zogy)")
    parser.add_argument("--figure", type=Path, default=FIGURE, help="output PNG")
    parser.add_argument("--no-figure", action="store_true", help="do not draw the figure")
    parser.add_argument("--json", type=Path, help="also write the numbers as JSON")
    args = parser.parse_args(argv)

    science, template = load_pair(args.data)
    rows, results = compare(science, template, args.methods, args.pipeline, verbose=True)
    print(format_tables(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    if not args.no_figure:
        path = plot(results, science, args.figure)
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} kB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
