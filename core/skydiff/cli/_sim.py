"""``skydiff sim``: write a simulated science/template pair and its truth table."""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    parser = subparsers.add_parser(
        "sim", help="write a simulated science/template pair and its truth table",
        description="Simulate a realistic science/template pair (star field, PSFs, sky, noise, "
                    "masks, offsets, transients) and write OUTDIR/science.fits, "
                    "OUTDIR/template.fits, OUTDIR/truth.ecsv and OUTDIR/sim.toml.")
    parser.add_argument("outdir", type=Path, help="output directory (created if missing)")
    parser.add_argument("--seed", type=int,
                        help="random seed (default: the seed in --config, else 0)")
    parser.add_argument("--shape", type=int, nargs=2, metavar=("ROWS", "COLS"),
                        help="image shape (default 1024 1024)")
    parser.add_argument("--n-stars", type=int, help="number of stars")
    parser.add_argument("--n-transients", type=int, help="transients injected in the science")
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="TOML file of simulator settings (as written to sim.toml)")
    parser.add_argument("-c", dest="overrides", metavar="KEY=VALUE", action="append",
                        default=[], help="override one simulator setting, e.g. "
                                         "-c science.fwhm=4.5 (repeatable)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing output files")
    add_common(parser)
    parser.set_defaults(func=run)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def build_config(args: argparse.Namespace) -> tuple[Any, int]:
    """The :class:`~skydiff.sim.SimConfig` and seed from defaults, ``--config``, options, ``-c``."""
    from skydiff.errors import ConfigError, InputError
    from skydiff.sim import SimConfig

    data: dict[str, Any] = {"shape": [1024, 1024], "n_stars": 800, "n_transients": 10}
    seed = 0
    if args.config is not None:
        try:
            data.update(tomllib.loads(args.config.read_text()))
        except OSError as exc:
            msg = f"cannot read simulator config {args.config}: {exc.strerror}"
            raise InputError(msg) from exc
        except tomllib.TOMLDecodeError as exc:
            msg = f"{args.config} is not valid TOML: {exc}"
            raise ConfigError(msg) from exc
        seed = int(data.pop("seed", 0))
    if args.seed is not None:
        seed = args.seed
    for key, value in (("shape", args.shape), ("n_stars", args.n_stars),
                       ("n_transients", args.n_transients)):
        if value is not None:
            data[key] = list(value) if key == "shape" else value
    for item in args.overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            msg = f"override {item!r} is not KEY=VALUE"
            raise ConfigError(msg)
        *parents, leaf = key.strip().split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                msg = f"override {key!r}: {part!r} is not a table"
                raise ConfigError(msg)
        node[leaf] = _parse_value(text.strip())
    if "shape" in data:
        data["shape"] = tuple(data["shape"])
    return SimConfig.from_dict(data), seed


def run(args: argparse.Namespace) -> int:
    import logging

    import tomli_w

    from skydiff.errors import InputError
    from skydiff.io import atomic_path, write_catalog, write_exposure
    from skydiff.sim import simulate_pair

    log = logging.getLogger("skydiff.cli.sim")
    config, seed = build_config(args)
    outdir: Path = args.outdir
    targets = {name: outdir / name
               for name in ("science.fits", "template.fits", "truth.ecsv", "sim.toml")}
    if not args.overwrite:
        existing = [str(p) for p in targets.values() if p.exists()]
        if existing:
            msg = f"{', '.join(existing)} already exist; pass --overwrite to replace them"
            raise InputError(msg)
    outdir.mkdir(parents=True, exist_ok=True)
    pair = simulate_pair(config, seed=seed)
    write_exposure(pair.science, targets["science.fits"], overwrite=args.overwrite)
    write_exposure(pair.template, targets["template.fits"], overwrite=args.overwrite)
    write_catalog(pair.truth, targets["truth.ecsv"], overwrite=args.overwrite)
    with atomic_path(targets["sim.toml"], overwrite=args.overwrite) as tmp:
        Path(tmp).write_text(tomli_w.dumps({"seed": seed, **config.to_dict()}))
    kinds = {str(k): int((pair.truth["kind"] == k).sum()) for k in sorted(set(pair.truth["kind"]))}
    summary = ", ".join(f"{n} {k}{'' if n == 1 else 's'}" for k, n in kinds.items())
    log.info("simulated %dx%d pair with %s", *pair.science.shape, summary)
    print(f"wrote {outdir}/science.fits, template.fits, truth.ecsv, sim.toml "
          f"({pair.science.shape[0]}x{pair.science.shape[1]} px; {summary})")
    return 0
