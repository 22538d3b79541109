"""Registries of algorithms, one per role.

A *role* is a step of the difference-imaging pipeline (``subtraction``, ``detection``, ...).
Every algorithm of a role is a class with a registry ``name``, a ``ConfigClass`` (a
:class:`skydiff.Config` subclass) and optionally ``tags`` and an ``order``. Plugins contribute
algorithms by calling ``registries.<role>.add(cls)`` from their
``skydiff_register_algorithms`` hook; configs select them by name through a
:func:`skydiff.config.RegistryField`.

The vocabulary of each registry is closed: registering a name twice raises a
:class:`~skydiff.errors.ConfigError` naming both providing distributions, and looking up an
unknown name raises one listing the valid names.

The plugin manager (:mod:`skydiff._manager`) tells the registries which plugin is currently
registering algorithms through :func:`providing`, so each :class:`PluginInfo` records its
provider, distribution and version.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import inspect
import re
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import attrs

from skydiff.errors import ConfigError, PluginLoadError

if TYPE_CHECKING:
    from skydiff.config import Config

__all__ = [
    "ROLES",
    "PluginInfo",
    "Provider",
    "Registries",
    "Registry",
    "RoleInfo",
    "providing",
]

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# Keys a registry selection uses in TOML next to the per-plugin tables.
_RESERVED_NAMES = frozenset({"name", "names"})


@attrs.frozen
class RoleInfo:
    """Description of one pipeline role.

    Parameters
    ----------
    name : str
        Role name, also the attribute of :class:`Registries` holding its registry.
    multi : bool
        Whether a pipeline step usually runs several algorithms of this role at once (the
        default of ``multi`` in :func:`skydiff.config.RegistryField`).
    doc : str
        One-line description.
    """

    name: str
    multi: bool
    doc: str


ROLES: Mapping[str, RoleInfo] = MappingProxyType({
    info.name: info
    for info in (
        RoleInfo("psf_estimator", False, "Estimate the PSF model of an exposure from its stars."),
        RoleInfo("kernel_basis", False, "Build the basis images of a PSF-matching kernel."),
        RoleInfo("subtraction", False,
                 "PSF-match a template to a science exposure and subtract them."),
        RoleInfo("decorrelation", False,
                 "Whiten the noise of a difference image and give its effective PSF."),
        RoleInfo("detection", False, "Detect positive and negative sources in a difference."),
        RoleInfo("measurement", True, "Measure detected sources (catalog columns)."),
        RoleInfo("dipole_classifier", True, "Flag and score dipoles among measured sources."),
        RoleInfo("metric", True, "Compute scalar quality metrics of a subtraction."),
        RoleInfo("template_getter", False, "Build the template exposure for a science exposure."),
        RoleInfo("executor", False, "Run the pipeline over many science/template pairs."),
    )
})


@attrs.frozen
class Provider:
    """The plugin that registers algorithms, as known to the plugin manager.

    Parameters
    ----------
    name : str
        Plugin name (entry-point name, builtin module name or the name given to
        :meth:`skydiff._manager.PluginManager.register`).
    distribution : str or None
        Name of the installed distribution providing the plugin (``"skydiff"`` for
        built-ins), None when unknown.
    version : str or None
        Version of that distribution, None when unknown.
    """

    name: str
    distribution: str | None = None
    version: str | None = None

    def describe(self) -> str:
        """Return ``"distribution 'd' (plugin 'p')"`` for error messages."""
        dist = self.distribution if self.distribution is not None else "<unknown>"
        return f"distribution {dist!r} (plugin {self.name!r})"


_current_provider: contextvars.ContextVar[Provider | None] = contextvars.ContextVar(
    "skydiff_current_provider", default=None)


@contextlib.contextmanager
def providing(provider: Provider) -> Iterator[Provider]:
    """Attribute every algorithm registered inside the block to ``provider``.

    Used by the plugin manager while it runs one plugin's ``skydiff_register_algorithms``
    hook.

    Parameters
    ----------
    provider : Provider
        The plugin being loaded.

    Yields
    ------
    Provider
        ``provider``.
    """
    token = _current_provider.set(provider)
    try:
        yield provider
    finally:
        _current_provider.reset(token)


@attrs.frozen
class PluginInfo:
    """One registered algorithm.

    Parameters
    ----------
    name : str
        Registry name (lower-case identifier), used in configs to select the algorithm.
    role : str
        Role it is registered for (a key of :data:`ROLES`).
    target : type
        The algorithm class; calling ``target(config=..., ...)`` builds it.
    ConfigClass : type of Config
        Its configuration class.
    provider : str
        Name of the plugin that registered it.
    distribution : str or None
        Distribution providing that plugin, None when unknown.
    version : str or None
        Version of that distribution, None when unknown.
    tags : frozenset of str
        Capability tags declared by the class (``target.tags``), e.g. ``needs_psf``.
    order : float
        Execution order among the algorithms of a multi-select field (lower runs first;
        ties broken by name).
    doc : str
        First paragraph of the class docstring.
    """

    name: str
    role: str
    target: type
    ConfigClass: type[Config]
    provider: str
    distribution: str | None
    version: str | None
    tags: frozenset[str] = frozenset()
    order: float = 0.0
    doc: str = ""

    @property
    def provided_by(self) -> Provider:
        """The :class:`Provider` that registered this algorithm."""
        return Provider(self.provider, self.distribution, self.version)


def _role_base(role: str) -> type | None:
    """Return ``skydiff.roles.ROLE_BASES[role]`` if that table exists, else None."""
    try:
        roles = importlib.import_module("skydiff.roles")
    except ModuleNotFoundError as exc:
        if exc.name != "skydiff.roles":
            raise
        return None
    bases = getattr(roles, "ROLE_BASES", None)
    if not isinstance(bases, Mapping):
        return None
    return bases.get(role)


def _first_paragraph(cls: type) -> str:
    """First paragraph of the class's own docstring (not one inherited from a base)."""
    doc = inspect.cleandoc(vars(cls).get("__doc__") or "")
    return " ".join(doc.split("\n\n", 1)[0].split())


class Registry:
    """The algorithms registered for one role.

    Parameters
    ----------
    role : str
        A key of :data:`ROLES`.

    Raises
    ------
    ConfigError
        If ``role`` is not a known role.

    Notes
    -----
    Iteration yields the registered names in sorted order. Lookups of unknown names raise
    :class:`~skydiff.errors.ConfigError` listing the valid names.
    """

    def __init__(self, role: str) -> None:
        if role not in ROLES:
            msg = f"unknown role {role!r}; valid roles: {', '.join(sorted(ROLES))}"
            raise ConfigError(msg)
        self.role = role
        self.info = ROLES[role]
        self._entries: dict[str, PluginInfo] = {}

    def add(self, target: type, *, name: str | None = None) -> PluginInfo:
        """Register an algorithm class.

        Parameters
        ----------
        target : type
            The algorithm class. It must define ``name`` (unless ``name`` is given) and
            ``ConfigClass``; it may define ``tags`` (iterable of str) and ``order``
            (number). When ``skydiff.roles.ROLE_BASES`` defines a base class for this
            role, ``target`` must subclass it.
        name : str, optional
            Registry name overriding ``target.name``.

        Returns
        -------
        PluginInfo
            The registered entry, attributed to the plugin currently being loaded.

        Raises
        ------
        ConfigError
            If the name is missing, not a lower-case identifier or reserved; if
            ``ConfigClass`` is not a :class:`skydiff.Config` subclass; if ``target`` does not
            subclass the role's base class; or if the name is already registered (the
            message names both providing distributions).
        """
        from skydiff.config import Config

        if not inspect.isclass(target):
            msg = (f"{self.role} registry: can only register classes, got "
                   f"{type(target).__name__} {target!r}")
            raise ConfigError(msg)
        label = f"{target.__module__}.{target.__qualname__}"
        name = name if name is not None else getattr(target, "name", None)
        if not isinstance(name, str) or not _NAME_RE.match(name) or name in _RESERVED_NAMES:
            msg = (f"{self.role} registry: {label} needs a lower-case identifier as its "
                   f"`name` (not 'name'/'names'), got {name!r}")
            raise ConfigError(msg)
        config_class = getattr(target, "ConfigClass", None)
        if not (inspect.isclass(config_class) and issubclass(config_class, Config)):
            msg = (f"{self.role} registry: {label}.ConfigClass must be a skydiff.Config "
                   f"subclass decorated with @skydiff.configclass, got {config_class!r}")
            raise ConfigError(msg)
        base = _role_base(self.role)
        if base is not None and not issubclass(target, base):
            msg = (f"{self.role} registry: {label} must subclass {base.__module__}."
                   f"{base.__qualname__} to be registered as a {self.role} algorithm")
            raise ConfigError(msg)
        tags: Any = getattr(target, "tags", frozenset())
        if isinstance(tags, str) or not all(isinstance(tag, str) for tag in tags):
            msg = f"{self.role} registry: {label}.tags must be an iterable of str, got {tags!r}"
            raise ConfigError(msg)
        order = getattr(target, "order", 0)
        if isinstance(order, bool) or not isinstance(order, int | float):
            msg = f"{self.role} registry: {label}.order must be a number, got {order!r}"
            raise ConfigError(msg)
        provider = _current_provider.get() or Provider(target.__module__)
        existing = self._entries.get(name)
        if existing is not None:
            msg = (f"duplicate {self.role} algorithm {name!r}: registered by "
                   f"{existing.provided_by.describe()} and by {provider.describe()}; "
                   f"uninstall one of them or restrict plugins with SKYDIFF_PLUGINS")
            raise ConfigError(msg)
        entry = PluginInfo(
            name=name, role=self.role, target=target, ConfigClass=config_class,
            provider=provider.name, distribution=provider.distribution,
            version=provider.version, tags=frozenset(tags), order=float(order),
            doc=_first_paragraph(target),
        )
        self._entries[name] = entry
        return entry

    def lookup(self, name: str, *, path: str = "") -> PluginInfo:
        """Return the entry registered as ``name``.

        Parameters
        ----------
        name : str
            Registry name.
        path : str, optional
            Dotted config path to prefix the error message with.

        Returns
        -------
        PluginInfo

        Raises
        ------
        ConfigError
            If ``name`` is not registered (the message lists the valid names).
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            prefix = f"{path}: " if path else ""
            valid = ", ".join(self.names()) or "<none registered>"
            msg = f"{prefix}unknown {self.role} algorithm {name!r}; valid names: {valid}"
            raise ConfigError(msg) from None

    def __getitem__(self, name: str) -> PluginInfo:
        return self.lookup(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.role!r}, names={self.names()!r})"

    def names(self) -> tuple[str, ...]:
        """Return the registered names, sorted."""
        return tuple(sorted(self._entries))

    def items(self) -> list[tuple[str, PluginInfo]]:
        """Return ``(name, PluginInfo)`` pairs sorted by name."""
        return [(name, self._entries[name]) for name in self.names()]

    def get(self, name: str, default: PluginInfo | None = None) -> PluginInfo | None:
        """Return the entry registered as ``name``, or ``default``."""
        return self._entries.get(name, default)

    def remove(self, name: str) -> PluginInfo:
        """Unregister ``name`` and return its entry.

        Raises
        ------
        ConfigError
            If ``name`` is not registered.
        """
        entry = self.lookup(name)
        del self._entries[name]
        return entry

    def ordered(self, names: Iterable[str], *, path: str = "") -> tuple[str, ...]:
        """Return ``names`` sorted by each algorithm's ``order``, then by name.

        Parameters
        ----------
        names : iterable of str
            Registered names.
        path : str, optional
            Dotted config path for error messages.

        Raises
        ------
        ConfigError
            If a name is not registered.
        """
        entries = [self.lookup(name, path=path) for name in names]
        return tuple(entry.name for entry in sorted(entries, key=lambda e: (e.order, e.name)))


class Registries:
    """One :class:`Registry` per role, handed to ``skydiff_register_algorithms``.

    Attributes
    ----------
    psf_estimator, kernel_basis, subtraction, decorrelation, detection, measurement, \
dipole_classifier, metric, template_getter, executor : Registry
        The registry of each role in :data:`ROLES`.
    load_errors : list of PluginLoadError
        Plugins that failed to load, recorded by the plugin manager.

    Examples
    --------
    >>> registries = Registries()
    >>> registries["subtraction"] is registries.subtraction
    True
    >>> list(registries)[:2]
    ['psf_estimator', 'kernel_basis']
    """

    psf_estimator: Registry
    kernel_basis: Registry
    subtraction: Registry
    decorrelation: Registry
    detection: Registry
    measurement: Registry
    dipole_classifier: Registry
    metric: Registry
    template_getter: Registry
    executor: Registry

    def __init__(self) -> None:
        for role in ROLES:
            setattr(self, role, Registry(role))
        self.load_errors: list[PluginLoadError] = []

    def __getitem__(self, role: str) -> Registry:
        if role not in ROLES:
            msg = f"unknown role {role!r}; valid roles: {', '.join(sorted(ROLES))}"
            raise ConfigError(msg)
        registry: Registry = getattr(self, role)
        return registry

    def __iter__(self) -> Iterator[str]:
        return iter(ROLES)

    def roles(self) -> tuple[str, ...]:
        """Return the role names, in the order of :data:`ROLES`."""
        return tuple(ROLES)

    def __repr__(self) -> str:
        counts = ", ".join(f"{role}={len(self[role])}" for role in self)
        return f"Registries({counts})"

    def provided_by(self, provider: str) -> dict[str, tuple[str, ...]]:
        """Return ``{role: names}`` of the algorithms registered by plugin ``provider``."""
        found: dict[str, tuple[str, ...]] = {}
        for role in self:
            names = tuple(name for name, entry in self[role].items()
                          if entry.provider == provider)
            if names:
                found[role] = names
        return found

    def remove_provider(self, provider: str) -> None:
        """Unregister every algorithm registered by plugin ``provider``."""
        for role, names in self.provided_by(provider).items():
            for name in names:
                self[role].remove(name)
