"""The plugin manager: lazy, per-plugin, failure-tolerant loading of algorithms.

Plugins come from two sources, loaded in this order and through the same hook:

1. the built-in modules listed in :data:`BUILTIN_PLUGINS` (imported by module name;
   distribution ``"skydiff"``);
2. the entry points of the group ``skydiff.plugins`` of installed distributions.

Each plugin is imported and registered on its own. A plugin that fails to import, to
validate or to register its algorithms is recorded as a
:class:`~skydiff.errors.PluginLoadError` in :attr:`PluginManager.load_errors`, a
:class:`SkydiffPluginWarning` is emitted, anything it had registered is removed, and the
other plugins load normally.

Environment variables (read when loading, not at import):

``SKYDIFF_DISABLE_PLUGIN_AUTOLOAD``
    Any value other than ``""``, ``0``, ``false``, ``no`` or ``off`` skips entry points
    (built-ins still load).
``SKYDIFF_PLUGINS``
    Comma-separated allow-list of entry-point names; when set (even to ``""``), only those
    entry points load.

Nothing is loaded at import time: the default manager loads on the first call of
:func:`get_registries` (or :attr:`PluginManager.registries`).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import pluggy

from skydiff import hookspecs
from skydiff.errors import PluginLoadError
from skydiff.registry import Provider, Registries, providing

if TYPE_CHECKING:
    import argparse

__all__ = [
    "BUILTIN_PLUGINS",
    "DISABLE_AUTOLOAD_ENV",
    "ENTRY_POINT_GROUP",
    "PLUGINS_ENV",
    "PluginManager",
    "PluginRecord",
    "SkydiffPluginWarning",
    "get_manager",
    "get_registries",
    "use_manager",
]

BUILTIN_PLUGINS: tuple[str, ...] = (
    "skydiff_plugins.executors", "skydiff_plugins.decorrelation", "skydiff_plugins.psfmatch",
    "skydiff_plugins.psf_estimation", "skydiff_plugins.zogy", "skydiff_plugins.detection",
    "skydiff_plugins.measurement", "skydiff_plugins.dipoles", "skydiff_plugins.metrics")
"""Module names of the built-in plugins, loaded in this order before any entry point."""

ENTRY_POINT_GROUP = "skydiff.plugins"
"""Entry-point group scanned for third-party plugins."""

DISABLE_AUTOLOAD_ENV = "SKYDIFF_DISABLE_PLUGIN_AUTOLOAD"
PLUGINS_ENV = "SKYDIFF_PLUGINS"

_FALSE_VALUES = frozenset({"", "0", "false", "no", "off"})


class SkydiffPluginWarning(UserWarning):
    """A plugin failed to load; the others were loaded and skydiff carries on."""


class PluginRecord(NamedTuple):
    """One row of :meth:`PluginManager.plugins`.

    Attributes
    ----------
    name : str
        Plugin name (builtin module name, entry-point name or the registered name).
    distribution : str or None
        Distribution providing it (``"skydiff"`` for built-ins), None when unknown.
    version : str or None
        Version of that distribution, None when unknown.
    algorithms : Mapping of str to tuple of str
        ``{role: names}`` of the algorithms it registered.
    """

    name: str
    distribution: str | None
    version: str | None
    algorithms: Mapping[str, tuple[str, ...]]


def _skydiff_version() -> str:
    from skydiff import __version__

    return __version__


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in _FALSE_VALUES


def _allow_list() -> frozenset[str] | None:
    value = os.environ.get(PLUGINS_ENV)
    if value is None:
        return None
    return frozenset(item.strip() for item in value.split(",") if item.strip())


def _describe_exception(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class PluginManager:
    """Registry-aware wrapper around ``pluggy.PluginManager("skydiff")``.

    Parameters
    ----------
    builtin_modules : sequence of str, optional
        Module names of the built-in plugins; default :data:`BUILTIN_PLUGINS` (read when
        :meth:`load` runs).
    group : str, optional
        Entry-point group to scan; default :data:`ENTRY_POINT_GROUP`.

    Notes
    -----
    :meth:`load` runs at most once; :attr:`registries` calls it with its defaults on first
    access. Plugins added with :meth:`register` are loaded at once, before or after
    :meth:`load`. All public methods are guarded by a re-entrant lock, so concurrent first
    accesses load the plugins only once.

    Examples
    --------
    An isolated manager with one plugin, as in tests:

    >>> import types, skydiff
    >>> pm = PluginManager()
    >>> pm.load(builtins=False, entry_points=False)
    >>> plugin = types.SimpleNamespace()
    >>> pm.register(plugin, name="empty", distribution="demo", version="1.0")
    'empty'
    >>> pm.plugins()[0][:3]
    ('empty', 'demo', '1.0')
    """

    def __init__(self, *, builtin_modules: Sequence[str] | None = None,
                 group: str = ENTRY_POINT_GROUP) -> None:
        self._builtin_modules = None if builtin_modules is None else tuple(builtin_modules)
        self._group = group
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._registries = Registries()
        self._providers: dict[str, Provider] = {}
        self._loaded = False
        self._lock = threading.RLock()

    # -- loading -----------------------------------------------------------------------------

    def load(self, *, builtins: bool = True, entry_points: bool = True) -> None:
        """Load the built-in and entry-point plugins (once; later calls do nothing).

        Parameters
        ----------
        builtins : bool, optional
            Import and register the built-in modules.
        entry_points : bool, optional
            Load the entry points of the group, unless ``SKYDIFF_DISABLE_PLUGIN_AUTOLOAD``
            is set; only those named in ``SKYDIFF_PLUGINS`` when that is set.

        Warns
        -----
        SkydiffPluginWarning
            For each plugin that fails to load (also recorded in :attr:`load_errors`).
        """
        with self._lock:
            if self._loaded:
                return
            # Set first: a plugin hook that asks for the registries must not re-enter.
            self._loaded = True
            if builtins:
                self._load_builtins()
            if entry_points and not _env_flag(DISABLE_AUTOLOAD_ENV):
                self._load_entry_points()

    def _load_builtins(self) -> None:
        modules = BUILTIN_PLUGINS if self._builtin_modules is None else self._builtin_modules
        version = _skydiff_version()
        for module_name in modules:
            provider = Provider(module_name, "skydiff", version)
            try:
                module = importlib.import_module(module_name)
            except Exception as exc:
                msg = (f"built-in plugin {module_name!r} failed to import: "
                       f"{_describe_exception(exc)}; please report this skydiff bug")
                self._record(PluginLoadError(msg, plugin=module_name, distribution="skydiff"),
                             exc)
                continue
            self._register_captured(module, provider)

    def _load_entry_points(self) -> None:
        allowed = _allow_list()
        for entry_point in importlib.metadata.entry_points(group=self._group):
            if allowed is not None and entry_point.name not in allowed:
                continue
            dist = getattr(entry_point, "dist", None)
            provider = Provider(entry_point.name, getattr(dist, "name", None),
                                getattr(dist, "version", None))
            try:
                plugin = entry_point.load()
            except Exception as exc:
                msg = (f"plugin {entry_point.name!r} from {provider.describe()} failed to "
                       f"import: {_describe_exception(exc)}; upgrade or uninstall it, or "
                       f"leave it out of {PLUGINS_ENV}")
                self._record(PluginLoadError(msg, plugin=provider.name,
                                             distribution=provider.distribution), exc)
                continue
            self._register_captured(plugin, provider)

    def _register_captured(self, plugin: object, provider: Provider) -> None:
        try:
            self._register(plugin, provider)
        except PluginLoadError as exc:
            self._record(exc, exc.__cause__)

    def _record(self, error: PluginLoadError, cause: BaseException | None) -> None:
        error.__cause__ = cause
        self._registries.load_errors.append(error)
        warnings.warn(str(error), SkydiffPluginWarning, stacklevel=4)

    # -- registration ------------------------------------------------------------------------

    def register(self, plugin: object, *, name: str | None = None,
                 distribution: str | None = None, version: str | None = None) -> str:
        """Register a plugin object (usually a module) and its algorithms now.

        Parameters
        ----------
        plugin : object
            Module or object with ``@skydiff.hookimpl`` functions.
        name : str, optional
            Plugin name; default: the module's ``__name__`` (pluggy's canonical name).
        distribution, version : str, optional
            Shown in listings and in duplicate-name errors.

        Returns
        -------
        str
            The plugin name.

        Raises
        ------
        PluginLoadError
            If the name is taken, a hook implementation is invalid or unknown, or the
            plugin's ``skydiff_register_algorithms`` raises (chained; a duplicate algorithm
            name is a chained :class:`~skydiff.errors.ConfigError` naming both
            distributions). Nothing of the plugin stays registered.
        """
        with self._lock:
            plugin_name = name if name is not None else self._pm.get_canonical_name(plugin)
            self._register(plugin, Provider(plugin_name, distribution, version))
            return plugin_name

    def _register(self, plugin: object, provider: Provider) -> None:
        name = provider.name
        if self._pm.has_plugin(name):
            other = self._providers.get(name, Provider(name))
            msg = (f"plugin name {name!r} of {provider.describe()} is already used by "
                   f"{other.describe()}; register it under another name")
            raise PluginLoadError(msg, plugin=name, distribution=provider.distribution)
        try:
            self._pm.register(plugin, name=name)
            self._check_hook_names(plugin)
        except Exception as exc:
            self._rollback(name)
            msg = (f"plugin {name!r} from {provider.describe()} is not a valid skydiff "
                   f"plugin: {_describe_exception(exc)}")
            raise PluginLoadError(msg, plugin=name, distribution=provider.distribution) from exc
        self._providers[name] = provider
        try:
            with providing(provider):
                self._call_for(plugin, "skydiff_register_algorithms",
                               registries=self._registries)
        except Exception as exc:
            self._rollback(name)
            msg = (f"plugin {name!r} from {provider.describe()} failed to register its "
                   f"algorithms: {_describe_exception(exc)}")
            raise PluginLoadError(msg, plugin=name, distribution=provider.distribution) from exc

    def _check_hook_names(self, plugin: object) -> None:
        callers = self._pm.get_hookcallers(plugin) or []
        unknown = sorted(caller.name for caller in callers if not caller.has_spec())
        if unknown:
            valid = ", ".join(sorted(n for n in vars(hookspecs) if n.startswith("skydiff_")))
            msg = f"unknown hook(s) {', '.join(unknown)}; valid hooks: {valid}"
            raise pluggy.PluginValidationError(plugin, msg)
        wrappers = sorted(caller.name for caller in callers for impl in caller.get_hookimpls()
                          if impl.plugin is plugin and (impl.wrapper or impl.hookwrapper))
        if wrappers:
            msg = f"skydiff hooks cannot be wrappers: {', '.join(wrappers)}"
            raise pluggy.PluginValidationError(plugin, msg)

    def _call_for(self, plugin: object, hook_name: str, **kwargs: Any) -> None:
        """Call the ``hook_name`` implementation of ``plugin`` alone, if it has one.

        Each plugin is called on its own so that what it registers is attributed to it and
        an exception is attributed to it too. Implementations receive only the arguments
        they name (pluggy's opt-in arguments).
        """
        caller: pluggy.HookCaller = getattr(self._pm.hook, hook_name)
        for impl in caller.get_hookimpls():
            if impl.plugin is plugin:
                impl.function(**{arg: kwargs[arg] for arg in impl.argnames})

    def _rollback(self, name: str) -> None:
        self._registries.remove_provider(name)
        self._providers.pop(name, None)
        if self._pm.has_plugin(name):
            self._pm.unregister(name=name)

    def unregister(self, name: str) -> None:
        """Remove plugin ``name`` and every algorithm it registered.

        Raises
        ------
        PluginLoadError
            If no plugin of that name is registered.
        """
        with self._lock:
            if not self._pm.has_plugin(name):
                known = ", ".join(sorted(self._providers)) or "<none>"
                msg = f"no plugin named {name!r} is registered; registered plugins: {known}"
                raise PluginLoadError(msg, plugin=name)
            self._rollback(name)

    # -- queries -----------------------------------------------------------------------------

    @property
    def registries(self) -> Registries:
        """The registries, after loading the plugins (with :meth:`load`'s defaults) once."""
        with self._lock:
            self.load()
            return self._registries

    @property
    def load_errors(self) -> list[PluginLoadError]:
        """Plugins that failed to load, in order (a copy)."""
        with self._lock:
            return list(self._registries.load_errors)

    @property
    def hook(self) -> pluggy.HookRelay:
        """pluggy's hook relay (``pm.hook.skydiff_...``), after loading the plugins once.

        Calls through the relay are not failure-tolerant; prefer the typed methods such as
        :meth:`add_cli_commands`.
        """
        with self._lock:
            self.load()
            return self._pm.hook

    def plugins(self) -> list[PluginRecord]:
        """List the registered plugins in registration order.

        Returns
        -------
        list of PluginRecord
            ``(name, distribution, version, {role: algorithm names})`` per plugin; plugins
            that failed to load are in :attr:`load_errors` instead. Loads the plugins
            first, like :attr:`registries`.
        """
        with self._lock:
            self.load()
            return [PluginRecord(name, provider.distribution, provider.version,
                                 self._registries.provided_by(name))
                    for name, provider in self._providers.items()]

    def add_cli_commands(self, subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
                         ) -> None:
        """Let every plugin add sub-commands (``skydiff_add_cli_commands``).

        A plugin whose hook raises is recorded in :attr:`load_errors` (with a
        :class:`SkydiffPluginWarning`); the others still add their commands.
        """
        with self._lock:
            self.load()
            for name, provider in list(self._providers.items()):
                plugin = self._pm.get_plugin(name)
                try:
                    self._call_for(plugin, "skydiff_add_cli_commands", subparsers=subparsers)
                except Exception as exc:
                    msg = (f"plugin {name!r} from {provider.describe()} failed to add its "
                           f"command-line commands: {_describe_exception(exc)}")
                    self._record(PluginLoadError(msg, plugin=name,
                                                 distribution=provider.distribution), exc)


_MANAGER_LOCK = threading.Lock()
_manager: PluginManager | None = None


def get_manager() -> PluginManager:
    """Return the process-wide plugin manager (created on first call, not yet loaded)."""
    global _manager
    with _MANAGER_LOCK:
        if _manager is None:
            _manager = PluginManager()
        return _manager


def get_registries() -> Registries:
    """Return the registries of the current manager, loading its plugins on first call."""
    return get_manager().registries


@contextlib.contextmanager
def use_manager(manager: PluginManager | None = None) -> Iterator[PluginManager]:
    """Make ``manager`` the process-wide manager inside the block.

    Parameters
    ----------
    manager : PluginManager, optional
        The manager to install; default: a new, empty one already marked as loaded (no
        built-ins, no entry points), ready for :meth:`PluginManager.register`.

    Yields
    ------
    PluginManager
        The installed manager; the previous one is restored on exit.

    Examples
    --------
    >>> with use_manager() as pm:
    ...     get_registries() is pm.registries
    True
    """
    global _manager
    if manager is None:
        manager = PluginManager()
        manager.load(builtins=False, entry_points=False)
    with _MANAGER_LOCK:
        previous, _manager = _manager, manager
    try:
        yield manager
    finally:
        with _MANAGER_LOCK:
            _manager = previous
