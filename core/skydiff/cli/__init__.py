"""The ``skydiff`` command line.

Subcommands live in small modules (``_plugins``, ``_config``, ``_sim``, ``_subtract``,
``_detect``, ``_run``, ``_demo``, ``_bench``); plugins add their own
through the :func:`~skydiff.hookspecs.skydiff_add_cli_commands` hook. Errors that skydiff
raises on purpose (:class:`~skydiff.errors.SkydiffError`) print one line and exit with status 1;
``--debug`` shows the traceback instead. Usage errors exit with status 2 (argparse's
convention); an unexpected exception exits with status 3.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from skydiff import __version__
from skydiff.errors import SkydiffError

__all__ = ["build_parser", "main"]

EXIT_ERROR = 1
EXIT_INTERNAL = 3


def _add_common(parser: argparse.ArgumentParser, *, sub: bool = True) -> None:
    """Add ``-v``, ``-q`` and ``--debug`` (subcommands too, so they work in either place)."""
    # On subcommands the defaults are suppressed, so they never overwrite the top-level values.
    default = argparse.SUPPRESS if sub else 0
    group = parser.add_argument_group("output")
    group.add_argument("-v", "--verbose", action="count", default=default,
                       help="more log output: progress messages (repeat for debug messages)")
    group.add_argument("-q", "--quiet", action="count", default=default,
                       help="less log output: errors only (repeat for nothing)")
    group.add_argument("--debug", action="store_true",
                       default=argparse.SUPPRESS if sub else False,
                       help="show full tracebacks instead of one-line errors")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every built-in and plugin-provided subcommand."""
    from skydiff.cli import _bench, _config, _demo, _detect, _plugins, _run, _sim, _subtract

    parser = argparse.ArgumentParser(
        prog="skydiff",
        description="Astronomical difference imaging: PSF matching, subtraction, "
                    "decorrelation, detection and measurement.")
    parser.add_argument("--version", action="version", version=f"skydiff {__version__}")
    _add_common(parser, sub=False)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (_plugins, _config, _sim, _subtract, _detect, _run, _demo, _bench):
        module.add_parser(subparsers, _add_common)
    from skydiff._manager import get_manager

    # Each plugin's hook runs separately: one broken plugin is recorded, not fatal.
    get_manager().add_cli_commands(subparsers)
    return parser


def _configure_logging(verbose: int, quiet: int) -> None:
    # Results go to stdout; the log (stderr) shows warnings by default, -v info, -vv debug.
    level = logging.WARNING + 10 * (quiet - verbose)
    level = min(max(level, logging.DEBUG), logging.CRITICAL)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("skydiff")
    root.handlers[:] = [handler]
    root.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``skydiff`` command line and return its exit status.

    Run as the command (``argv`` None), it first makes the process keep the memory it frees
    for reuse (``skydiff._memory``; ``SKYDIFF_RETAIN_MEMORY=0`` opts out).
    """
    if argv is None:
        from skydiff._memory import retain_freed_memory

        retain_freed_memory()
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args_list
    logger = logging.getLogger("skydiff")
    saved = (list(logger.handlers), logger.level)
    try:
        parser = build_parser()
        args = parser.parse_args(args_list)
        _configure_logging(args.verbose, args.quiet)
        return int(args.func(args) or 0)
    except SkydiffError as exc:
        if debug:
            raise
        print(f"skydiff: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("skydiff: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `skydiff plugins | head`
        return 0
    except Exception as exc:
        if debug:
            raise
        print(f"skydiff: internal error: {type(exc).__name__}: {exc} "
              "(rerun with --debug for the traceback and report it)", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        # main() may run inside another program (or a test): leave logging as it was.
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
