"""``skydiff config show|validate``: the effective configuration as TOML, and file checks."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from skydiff.config import Config


def add_config_options(parser: argparse.ArgumentParser, *,
                       example: str = "executor.name=processes") -> None:
    """Add ``--config FILE`` and repeatable ``-c KEY=VALUE`` to a subcommand."""
    parser.add_argument("--config", metavar="FILE", type=Path,
                        help="TOML configuration file (data only, never executed)")
    parser.add_argument("-c", dest="overrides", metavar="KEY=VALUE", action="append",
                        default=[], help="override one setting by its dotted key, e.g. "
                                         f"-c {example} (repeatable)")


def load_config(config_class: type[Config], path: Path | None, overrides: list[str]) -> Config:
    """Build ``config_class`` from defaults, an optional TOML file and dotted overrides."""
    config = config_class.load_toml(path) if path is not None else config_class()
    if overrides:
        config.apply_overrides(overrides)
    config.validate()
    return config


def add_parser(subparsers: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    parser = subparsers.add_parser(
        "config", help="show or validate configurations",
        description="Show the effective configuration as TOML, or validate a TOML file.")
    sub = parser.add_subparsers(dest="config_command", metavar="ACTION", required=True)

    show = sub.add_parser("show", help="print the effective configuration as TOML",
                          description="Print the effective pipeline configuration (defaults, "
                                      "then --config, then -c overrides) as TOML. The output "
                                      "loads back identically with --config.")
    add_config_options(show)
    show.add_argument("--plugin", metavar="ROLE:NAME",
                      help="show the configuration of one registered algorithm instead")
    add_common(show)
    show.set_defaults(func=run_show)

    validate = sub.add_parser("validate", help="check a TOML configuration file",
                              description="Load a pipeline configuration file and report the "
                                          "first problem (unknown key, bad value, unknown "
                                          "plugin name) with its dotted path.")
    validate.add_argument("file", type=Path, help="TOML configuration file")
    add_common(validate)
    validate.set_defaults(func=run_validate)


def run_show(args: argparse.Namespace) -> int:
    from skydiff.errors import ConfigError
    from skydiff.pipeline import PipelineConfig

    if args.plugin is not None:
        from skydiff._manager import get_registries

        role, sep, name = args.plugin.partition(":")
        if not sep:
            msg = f"--plugin takes ROLE:NAME (e.g. executor:serial), got {args.plugin!r}"
            raise ConfigError(msg)
        registries = get_registries()
        if role not in registries.roles():
            msg = f"unknown role {role!r}; roles are: {', '.join(registries.roles())}"
            raise ConfigError(msg)
        config = load_config(registries[role][name].ConfigClass, args.config, args.overrides)
    else:
        config = load_config(PipelineConfig, args.config, args.overrides)
    sys.stdout.write(config.dump_toml())
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from skydiff.pipeline import PipelineConfig

    load_config(PipelineConfig, args.file, [])
    print(f"{args.file}: valid")
    return 0
