"""Hook specifications: the whole plugin interface of skydiff.

A plugin is a module (or any object) with functions decorated by :data:`hookimpl` whose names
match the specifications below. Built-in algorithms (``skydiff_plugins``) and third-party
distributions (entry points of the group ``skydiff.plugins``) use exactly the same hooks.

Hooks are few on purpose. New arguments are only ever appended; an implementation may accept
any subset of a hook's arguments (pluggy's opt-in arguments), so adding one never breaks
existing plugins.

Examples
--------
A plugin module registering one subtraction algorithm::

    import skydiff

    @skydiff.hookimpl
    def skydiff_register_algorithms(registries):
        registries.subtraction.add(MySubtraction)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import argparse

    from skydiff.registry import Registries

__all__ = [
    "PROJECT_NAME",
    "hookimpl",
    "hookspec",
    "skydiff_add_cli_commands",
    "skydiff_register_algorithms",
]

PROJECT_NAME = "skydiff"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
"""Marker for hook specifications (used only in this module)."""

hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Marker for hook implementations; re-exported as ``skydiff.hookimpl``."""


@hookspec
def skydiff_register_algorithms(registries: Registries) -> None:
    """Register the algorithms this plugin provides.

    Call ``registries.<role>.add(cls)`` once per algorithm class, e.g.
    ``registries.subtraction.add(ZogySubtraction)``. Each class declares a registry ``name``,
    a ``ConfigClass`` and optionally ``tags`` and an ``order``.

    Parameters
    ----------
    registries : skydiff.registry.Registries
        One :class:`~skydiff.registry.Registry` per role.

    Returns
    -------
    None
        Return values are ignored; contribute algorithms only through ``registries``.

    Raises
    ------
    skydiff.errors.ConfigError
        Raised by ``add`` for an invalid class or a name another plugin already registered.
        The plugin manager records any exception raised by this hook as a
        :class:`~skydiff.errors.PluginLoadError`, removes what the plugin registered and
        carries on with the other plugins.

    Notes
    -----
    *Call order*: called exactly once per plugin, right after the plugin is registered with
    the manager -- built-ins first (in ``BUILTIN_PLUGINS`` order), then entry points (in
    discovery order), then plugins registered programmatically. The manager calls each
    plugin's implementation on its own, so every registered algorithm is attributed to the
    plugin, distribution and version that provided it.

    *firstresult*: no.
    """


@hookspec
def skydiff_add_cli_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
                             ) -> None:
    """Add sub-commands to the ``skydiff`` command line.

    Call ``subparsers.add_parser(name, help=...)`` and ``set_defaults(func=...)`` on the new
    parser; the command line calls ``args.func(args)`` for the chosen sub-command.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The object returned by ``parser.add_subparsers()`` of the ``skydiff`` parser.

    Returns
    -------
    None
        Return values are ignored.

    Raises
    ------
    Exception
        Any exception is recorded by the plugin manager as a
        :class:`~skydiff.errors.PluginLoadError` (shown by ``skydiff plugins``); the other
        plugins' commands are still added.

    Notes
    -----
    *Call order*: called once per plugin, in registration order, after every plugin has
    been loaded and after skydiff's own sub-commands were added; a name clash with an
    existing command is therefore reported for the plugin, not for skydiff.

    *firstresult*: no.
    """
