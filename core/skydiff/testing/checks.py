r"""The plugin conformance suite: checks every algorithm plugin must pass.

Built-in and third-party plugins are held to the same contract, checked the same way (in the
spirit of scikit-learn's ``check_estimator``)::

    # tests/test_conformance.py of a plugin distribution
    from skydiff.testing import parametrize_with_checks

    @parametrize_with_checks(["metric:pixel_stats"])
    def test_conformance(plugin, check):
        check(plugin)

This yields one pytest item per (plugin, check) pair, with ids such as
``metric:pixel_stats-check_purity``. Outside pytest, :func:`check_plugin` runs the same checks
and reports every failure at once.

Tiers
-----
``"api"``
    The contract every plugin of every role must meet: registration, config defaults,
    TOML round-trip and freezing, purity (inputs and configs untouched), pickling, the
    role's result type, error *types* on role-specific bad input (a
    :class:`~skydiff.errors.SkydiffError` subclass; message text is never checked), thread
    safety and determinism.
``"numerical"``
    Invariants of the computation itself (see the style guide, section 5). Today: executors
    keep input order and record a failing item while the others still run.

Selection
---------
Each check declares the roles it applies to (``None``: all) and may require or exclude
capability *tags* (``plugin_class.tags``). For example :func:`check_thread_safety` excludes
plugins tagged ``"parallel"``, which manage their own workers.

Adding checks
-------------
A check is a function of one :class:`PluginUnderTest` that raises (usually an
:class:`AssertionError`) on failure and returns None on success; it may raise
:class:`CheckSkipped` when it cannot judge a plugin. Register it with :func:`register_check`,
stating its tier, roles and tags; every later call of :func:`parametrize_with_checks` and
:func:`check_plugin` picks it up. A per-algorithm numerical check, e.g. the null test of a
subtraction, looks like::

    from skydiff.testing.checks import register_check

    @register_check(roles={"subtraction"}, tier="numerical", requires_tags={"linear"})
    def check_subtraction_linearity(plugin):
        call = plugin.sample_call()
        science, template = call.args
        base = call(plugin.make()).difference
        scaled = plugin.make().run(scaled_exposure(science, 2.0),
                                   scaled_exposure(template, 2.0)).difference
        assert ...

Use :meth:`PluginUnderTest.sample_call` for the role's sample inputs (small simulated images
with a fixed seed), :meth:`PluginUnderTest.make` to build a plugin with its default config
and :func:`assert_equivalent` to compare results. Checks of skydiff's own numerical tier live
in this module; a plugin distribution may register checks for its own capability tags in
its test suite's ``conftest.py``.
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
import pickle
import threading
import unittest
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import attrs
import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time
from astropy.wcs import WCS

from skydiff.config import Config
from skydiff.errors import ConfigError, SkydiffError
from skydiff.exposure import Exposure
from skydiff.kernel import BasisKernel, FixedKernel
from skydiff.psf import Psf
from skydiff.registry import ROLES, PluginInfo, Registry
from skydiff.roles import (
    ROLE_BASES,
    ClassificationResult,
    DecorrelationResult,
    DetectionResult,
    ExecutorResult,
    KernelBasisResult,
    MeasurementResult,
    MetricResult,
    PsfEstimationResult,
    SubtractionResult,
    TemplateResult,
)
from skydiff.testing import _inputs

if TYPE_CHECKING:
    import pytest

__all__ = [
    "RESULT_TYPES",
    "TIERS",
    "VOLATILE_METADATA_KEYS",
    "Check",
    "CheckOutcome",
    "CheckSkipped",
    "ConformanceError",
    "PluginUnderTest",
    "assert_equivalent",
    "check_config_defaults",
    "check_config_freeze",
    "check_config_roundtrip",
    "check_determinism",
    "check_error_types",
    "check_executor_failures",
    "check_executor_order",
    "check_pickle",
    "check_plugin",
    "check_purity",
    "check_registration",
    "check_result_type",
    "check_thread_safety",
    "differences",
    "parametrize_with_checks",
    "register_check",
    "registered_checks",
    "resolve_plugin",
    "select_checks",
    "unregister_check",
]

#: The check tiers, in the order they run.
TIERS: tuple[str, ...] = ("api", "numerical")

Tier = Literal["api", "numerical"]

#: The result class of each role's ``run``.
RESULT_TYPES: Mapping[str, type] = {
    "psf_estimator": PsfEstimationResult,
    "kernel_basis": KernelBasisResult,
    "subtraction": SubtractionResult,
    "decorrelation": DecorrelationResult,
    "detection": DetectionResult,
    "measurement": MeasurementResult,
    "dipole_classifier": ClassificationResult,
    "metric": MetricResult,
    "template_getter": TemplateResult,
    "executor": ExecutorResult,
}

#: Metadata keys that measure the run rather than the result (timers of
#: :meth:`skydiff.task.Task.timer`); ignored when comparing results of repeated runs.
VOLATILE_METADATA_KEYS: frozenset[str] = frozenset({"wall_s", "cpu_s", "max_rss_mb"})

#: Columns every detection catalog must have.
DETECTION_COLUMNS: tuple[str, ...] = ("id", "x", "y", "peak_value", "significance",
                                      "is_negative")

_N_THREADS = 4
_BARRIER_TIMEOUT_S = 120.0


class CheckSkipped(unittest.SkipTest):
    """Raised by a check that cannot judge this plugin; pytest reports it as skipped."""


class ConformanceError(AssertionError):
    """Raised by :func:`check_plugin` when checks fail; lists every failed check.

    Attributes
    ----------
    outcomes : list of CheckOutcome
        Every check that ran, with its status.
    """

    def __init__(self, message: str, outcomes: Sequence[CheckOutcome]) -> None:
        super().__init__(message)
        self.outcomes = list(outcomes)


# ------------------------------------------------------------------------------------------
# the plugin under test


@attrs.frozen
class PluginUnderTest:
    """A plugin class resolved for testing, with its role, name and tags.

    This is the ``plugin`` argument that every check receives.

    Attributes
    ----------
    role : str
        The role (a key of :data:`skydiff.registry.ROLES`).
    name : str
        The registry name.
    target : type
        The plugin class.
    tags : frozenset of str
        Capability tags (``target.tags``).
    reference : str or type
        What the plugin was given as: a ``"role:name"`` registry reference or the class.
    """

    role: str
    name: str
    target: type[Any] = attrs.field(eq=False)
    tags: frozenset[str]
    reference: str | type = attrs.field(eq=False)

    @property
    def id(self) -> str:
        """``"role:name"``, used in test ids and messages."""
        return f"{self.role}:{self.name}"

    @property
    def ConfigClass(self) -> type[Config]:
        """The plugin's config class."""
        config_class: type[Config] = self.target.ConfigClass
        return config_class

    def make(self, config: Config | None = None) -> Any:
        """Build the plugin, with its default config unless ``config`` is given.

        Parameters
        ----------
        config : Config, optional
            An instance of :attr:`ConfigClass`.

        Returns
        -------
        Algorithm
            A new plugin instance.
        """
        return self.target() if config is None else self.target(config=config)

    def sample_call(self) -> _inputs.RoleCall:
        """Return the role's sample arguments (fresh containers; call it with an instance)."""
        return _inputs.sample_call(self.role)

    def bad_calls(self) -> list[_inputs.RoleCall]:
        """Return the role's invalid arguments (each must raise a SkydiffError)."""
        return _inputs.bad_calls(self.role)

    def __repr__(self) -> str:
        return f"<plugin {self.id}>"


def resolve_plugin(plugin: str | type | PluginInfo | PluginUnderTest) -> PluginUnderTest:
    """Resolve a plugin reference into a :class:`PluginUnderTest`.

    Parameters
    ----------
    plugin : str or type or PluginInfo or PluginUnderTest
        ``"role:name"`` (looked up in :func:`skydiff._manager.get_registries`, which loads
        the plugins on first use), a plugin class (its ``role`` class attribute, set by the
        role base class, and its ``name``), or a registry entry.

    Returns
    -------
    PluginUnderTest

    Raises
    ------
    ConfigError
        If a reference is malformed, names an unknown role or an unregistered plugin, or a
        class has no valid ``role``/``name``.
    """
    if isinstance(plugin, PluginUnderTest):
        return plugin
    if isinstance(plugin, PluginInfo):
        return PluginUnderTest(plugin.role, plugin.name, plugin.target, frozenset(plugin.tags),
                               f"{plugin.role}:{plugin.name}")
    if isinstance(plugin, str):
        role, sep, name = plugin.partition(":")
        if not sep or not role or not name:
            msg = (f"plugin reference {plugin!r} must be 'role:name', e.g. "
                   f"'subtraction:al'; roles: {', '.join(ROLES)}")
            raise ConfigError(msg)
        from skydiff._manager import get_registries

        info = get_registries()[role][name]
        return PluginUnderTest(role, name, info.target, frozenset(info.tags), plugin)
    if inspect.isclass(plugin):
        class_role: Any = getattr(plugin, "role", None)
        class_name: Any = getattr(plugin, "name", None)
        if class_role not in ROLES or not isinstance(class_name, str) or not class_name:
            msg = (f"{plugin.__qualname__} is not a plugin class: it needs a role (subclass a "
                   f"base of skydiff.roles) and a registry `name`")
            raise ConfigError(msg)
        tags: Iterable[str] = getattr(plugin, "tags", frozenset())
        return PluginUnderTest(class_role, class_name, plugin, frozenset(tags), plugin)
    msg = (f"a plugin is a 'role:name' string, a plugin class or a PluginInfo, got "
           f"{type(plugin).__name__} {plugin!r}")
    raise ConfigError(msg)


# ------------------------------------------------------------------------------------------
# check registry


@attrs.frozen
class Check:
    """A registered conformance check.

    Calling it runs the check on a :class:`PluginUnderTest`.

    Attributes
    ----------
    name : str
        The check's name (its function name by default), used in test ids.
    func : callable
        ``func(plugin) -> None``; raises on failure.
    tier : {"api", "numerical"}
        Its tier.
    roles : frozenset of str or None
        Roles it applies to; None for every role.
    requires_tags : frozenset of str
        Tags a plugin must all declare for the check to apply.
    excludes_tags : frozenset of str
        Tags of which a plugin declaring any is not checked.
    """

    name: str
    func: Callable[[PluginUnderTest], None] = attrs.field(eq=False)
    tier: str
    roles: frozenset[str] | None
    requires_tags: frozenset[str]
    excludes_tags: frozenset[str]

    def applies_to(self, plugin: PluginUnderTest) -> bool:
        """Whether the check applies to ``plugin`` (by role and tags)."""
        if self.roles is not None and plugin.role not in self.roles:
            return False
        return self.requires_tags <= plugin.tags and not (self.excludes_tags & plugin.tags)

    def __call__(self, plugin: PluginUnderTest) -> None:
        """Run the check on ``plugin`` (a :class:`PluginUnderTest` or a reference)."""
        self.func(resolve_plugin(plugin))

    def __repr__(self) -> str:
        return self.name


_CHECKS: dict[str, Check] = {}
_CHECKS_LOCK = threading.Lock()


def _tag_set(value: Iterable[str], label: str) -> frozenset[str]:
    if isinstance(value, str):
        msg = f"{label} must be a collection of tags, not the string {value!r}; use {{{value!r}}}"
        raise ConfigError(msg)
    return frozenset(value)


def register_check(func: Callable[[PluginUnderTest], None] | None = None, *,
                   roles: Iterable[str] | None = None, tier: Tier = "api",
                   requires_tags: Iterable[str] = frozenset(),
                   excludes_tags: Iterable[str] = frozenset(), name: str | None = None,
                   ) -> Any:
    """Register a conformance check (usable bare or with arguments, as a decorator).

    Parameters
    ----------
    func : callable, optional
        ``func(plugin: PluginUnderTest) -> None``, raising on failure (``AssertionError``),
        or :class:`CheckSkipped` when it cannot judge the plugin.
    roles : iterable of str, optional
        The roles it applies to; default every role.
    tier : {"api", "numerical"}, optional
        Its tier (default ``"api"``).
    requires_tags : iterable of str, optional
        Capability tags a plugin must all declare for the check to apply.
    excludes_tags : iterable of str, optional
        Tags that exempt a plugin from the check.
    name : str, optional
        Name in test ids; default ``func.__name__``.

    Returns
    -------
    callable
        ``func`` itself (so it stays directly callable), or a decorator when ``func`` is
        omitted.

    Raises
    ------
    ConfigError
        For an unknown tier or role, tags given as a string, or a name already registered.

    Examples
    --------
    >>> from skydiff.testing.checks import register_check, unregister_check
    >>> @register_check(roles={"metric"}, tier="numerical")
    ... def check_metric_values_finite(plugin):
    ...     values = plugin.sample_call()(plugin.make()).values
    ...     assert all(value == value for value in values.values())  # no NaN
    >>> unregister_check("check_metric_values_finite").tier
    'numerical'
    """
    if tier not in TIERS:
        msg = f"unknown check tier {tier!r}; tiers: {', '.join(TIERS)}"
        raise ConfigError(msg)
    role_set = None if roles is None else _tag_set(roles, "roles")
    if role_set is not None:
        unknown = sorted(role_set - set(ROLES))
        if unknown:
            msg = f"unknown role(s) {', '.join(unknown)}; roles: {', '.join(ROLES)}"
            raise ConfigError(msg)
    required = _tag_set(requires_tags, "requires_tags")
    excluded = _tag_set(excludes_tags, "excludes_tags")

    def decorate(function: Callable[[PluginUnderTest], None]
                 ) -> Callable[[PluginUnderTest], None]:
        check_name = name if name is not None else function.__name__
        with _CHECKS_LOCK:
            if check_name in _CHECKS:
                msg = (f"a conformance check named {check_name!r} is already registered; "
                       f"pass name= or unregister_check({check_name!r}) first")
                raise ConfigError(msg)
            _CHECKS[check_name] = Check(check_name, function, tier, role_set, required,
                                        excluded)
        return function

    return decorate if func is None else decorate(func)


def unregister_check(name: str) -> Check:
    """Remove the check ``name`` and return it.

    Raises
    ------
    ConfigError
        If no check of that name is registered.
    """
    with _CHECKS_LOCK:
        try:
            return _CHECKS.pop(name)
        except KeyError:
            msg = f"no conformance check named {name!r}; registered: {', '.join(_CHECKS)}"
            raise ConfigError(msg) from None


def registered_checks() -> tuple[Check, ...]:
    """Return every registered check, in registration order."""
    with _CHECKS_LOCK:
        return tuple(_CHECKS.values())


def _tier_tuple(tiers: Iterable[str] | str) -> tuple[str, ...]:
    selected = (tiers,) if isinstance(tiers, str) else tuple(tiers)
    unknown = [tier for tier in selected if tier not in TIERS]
    if unknown or not selected:
        msg = f"tiers must be a non-empty subset of {TIERS}, got {tiers!r}"
        raise ConfigError(msg)
    return selected


def select_checks(plugin: str | type | PluginInfo | PluginUnderTest, *,
                  tiers: Iterable[str] | str = TIERS) -> list[Check]:
    """Return the registered checks of ``tiers`` that apply to ``plugin``.

    Parameters
    ----------
    plugin : str or type or PluginInfo or PluginUnderTest
        The plugin (see :func:`resolve_plugin`).
    tiers : iterable of str, optional
        Tiers to include (default both).

    Returns
    -------
    list of Check
        In tier order, then registration order.
    """
    resolved = resolve_plugin(plugin)
    selected = _tier_tuple(tiers)
    checks = registered_checks()
    return [check for tier in TIERS if tier in selected for check in checks
            if check.tier == tier and check.applies_to(resolved)]


# ------------------------------------------------------------------------------------------
# structural comparison


def _is_volatile(key: Any) -> bool:
    return isinstance(key, str) and key.rsplit(".", 1)[-1] in VOLATILE_METADATA_KEYS


def _array_differs(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return True
    if np.ma.isMaskedArray(a) or np.ma.isMaskedArray(b):
        if not np.array_equal(np.ma.getmaskarray(a), np.ma.getmaskarray(b)):
            return True
        a, b = np.ma.getdata(a), np.ma.getdata(b)
    try:
        return not np.array_equal(a, b, equal_nan=True)
    except TypeError:  # non-numeric dtypes cannot hold NaN
        return not np.array_equal(a, b)


def _time_differs(a: Time, b: Time) -> bool:
    return a.shape != b.shape or a.scale != b.scale or not bool(np.all(a == b))


def differences(a: Any, b: Any, *, path: str = "value", ignore_volatile: bool = False,
                limit: int = 10) -> list[str]:
    """Describe how ``b`` differs from ``a``, recursively (empty when equivalent).

    Compares attrs objects field by field (including fields excluded from their ``==``,
    such as tables), NumPy arrays by shape, dtype and values (NaN equal to NaN), astropy
    tables column by column, WCS by header, FITS headers by text, configs by value, and
    exceptions by type and arguments.

    Parameters
    ----------
    a, b : object
        The reference and the value to compare.
    path : str, optional
        Name of the compared value in the messages.
    ignore_volatile : bool, optional
        Skip metadata keys in :data:`VOLATILE_METADATA_KEYS` (timings).
    limit : int, optional
        Stop after this many differences.

    Returns
    -------
    list of str
        One line per difference, naming its path.
    """
    found: list[str] = []
    _compare(a, b, path, ignore_volatile, found, limit)
    return found


def _compare(a: Any, b: Any, path: str, volatile: bool, found: list[str], limit: int) -> None:
    if len(found) >= limit or a is b:
        return
    if type(a) is not type(b):
        found.append(f"{path}: type {type(a).__name__} became {type(b).__name__}")
        return
    if isinstance(a, np.ndarray):
        if _array_differs(a, b):
            found.append(f"{path}: array values differ")
    elif isinstance(a, Table):
        if a.colnames != b.colnames or len(a) != len(b):
            found.append(f"{path}: table columns {a.colnames} x {len(a)} rows became "
                         f"{b.colnames} x {len(b)} rows")
            return
        for name in a.colnames:
            if _array_differs(np.asanyarray(a[name]), np.asanyarray(b[name])):
                found.append(f"{path}[{name!r}]: column values differ")
        _compare(dict(a.meta), dict(b.meta), f"{path}.meta", volatile, found, limit)
    elif isinstance(a, Config):
        if a != b:
            found.append(f"{path}: config differs: {a.diff(b)}")
    elif isinstance(a, WCS):
        if a.to_header_string(relax=True) != b.to_header_string(relax=True):
            found.append(f"{path}: WCS differs")
    elif isinstance(a, fits.Header):
        if str(a) != str(b):
            found.append(f"{path}: header differs")
    elif isinstance(a, Time):
        if _time_differs(a, b):
            found.append(f"{path}: time {a} became {b}")
    elif attrs.has(type(a)):
        for field in attrs.fields(type(a)):
            _compare(getattr(a, field.name), getattr(b, field.name), f"{path}.{field.name}",
                     volatile, found, limit)
    elif isinstance(a, Mapping):
        keys_a = {k for k in a if not (volatile and _is_volatile(k))}
        keys_b = {k for k in b if not (volatile and _is_volatile(k))}
        if keys_a != keys_b:
            found.append(f"{path}: keys {sorted(map(str, keys_a ^ keys_b))} added or removed")
        for key in sorted(keys_a & keys_b, key=str):
            _compare(a[key], b[key], f"{path}[{key!r}]", volatile, found, limit)
    elif isinstance(a, list | tuple):
        if len(a) != len(b):
            found.append(f"{path}: length {len(a)} became {len(b)}")
            return
        for index, (item_a, item_b) in enumerate(zip(a, b, strict=True)):
            _compare(item_a, item_b, f"{path}[{index}]", volatile, found, limit)
    elif isinstance(a, BaseException):
        _compare(a.args, b.args, f"{path}.args", volatile, found, limit)
    elif isinstance(a, float | np.floating):
        if not (a == b or (math.isnan(a) and math.isnan(b))):
            found.append(f"{path}: {a!r} became {b!r}")
    else:
        try:
            equal = bool(np.all(a == b))
        except Exception as exc:  # objects whose == raises cannot be compared: report
            found.append(f"{path}: cannot compare {type(a).__name__} ({exc})")
            return
        if not equal:
            found.append(f"{path}: {a!r} became {b!r}")


def assert_equivalent(expected: Any, actual: Any, *, what: str = "result",
                      ignore_volatile: bool = True) -> None:
    """Assert that ``actual`` is structurally identical to ``expected``.

    Parameters
    ----------
    expected, actual : object
        Values to compare with :func:`differences`.
    what : str, optional
        Name of the values in the message.
    ignore_volatile : bool, optional
        Ignore timing metadata (default True).

    Raises
    ------
    AssertionError
        Listing up to ten differences.
    """
    found = differences(expected, actual, path=what, ignore_volatile=ignore_volatile)
    if found:
        msg = "; ".join(found)
        raise AssertionError(msg)


def _freeze_arrays(value: Any, seen: set[int] | None = None) -> None:
    """Make every NumPy array reachable from ``value`` read-only (tables' columns too)."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, np.ndarray):
        value.setflags(write=False)
    elif isinstance(value, Table):
        for column in value.itercols():
            column.setflags(write=False)  # Column subclasses ndarray: the table's own data
    elif isinstance(value, Mapping):
        for item in value.values():
            _freeze_arrays(item, seen)
    elif isinstance(value, list | tuple):
        for item in value:
            _freeze_arrays(item, seen)
    elif attrs.has(type(value)) and not isinstance(value, Exposure):
        for field in attrs.fields(type(value)):
            _freeze_arrays(getattr(value, field.name), seen)


# ------------------------------------------------------------------------------------------
# api tier


def _fail(msg: str) -> None:
    raise AssertionError(msg)


@register_check
def check_registration(plugin: PluginUnderTest) -> None:
    """The plugin is a valid, registrable algorithm of its role.

    The class subclasses ``skydiff.roles.ROLE_BASES[role]``, declares a
    :class:`~skydiff.Config` subclass as ``ConfigClass``, a lower-case ``name`` and string
    ``tags``. A plugin given as ``"role:name"`` must resolve to the same class in the
    current registries; a plugin given as a class must be accepted by a fresh registry of
    its role.
    """
    target = plugin.target
    base = ROLE_BASES[plugin.role]
    if not (inspect.isclass(target) and issubclass(target, base)):
        _fail(f"{target!r} does not subclass {base.__module__}.{base.__qualname__}")
    config_class = getattr(target, "ConfigClass", None)
    if not (inspect.isclass(config_class) and issubclass(config_class, Config)):
        _fail(f"{target.__qualname__}.ConfigClass must be a skydiff.Config subclass, "
              f"got {config_class!r}")
    if getattr(target, "role", None) != plugin.role:
        _fail(f"{target.__qualname__}.role is {getattr(target, 'role', None)!r}, "
              f"expected {plugin.role!r}")
    if isinstance(plugin.reference, str):
        from skydiff._manager import get_registries

        entry = get_registries()[plugin.role].get(plugin.name)
        if entry is None:
            _fail(f"{plugin.id} is not registered")
        elif entry.target is not target:
            _fail(f"{plugin.id} resolves to {entry.target!r}, not {target!r}")
    else:
        try:
            entry = Registry(plugin.role).add(target)
        except ConfigError as exc:
            msg = f"{target.__qualname__} cannot be registered as a {plugin.role} algorithm"
            raise AssertionError(msg) from exc
        if entry.name != plugin.name:
            _fail(f"{target.__qualname__} registers as {entry.name!r}, not {plugin.name!r}")


@register_check
def check_config_defaults(plugin: PluginUnderTest) -> None:
    """The default config validates, and the plugin builds from it and from an explicit one."""
    config = plugin.ConfigClass()
    config.validate()
    instance = plugin.make()
    if instance.config != config:
        _fail(f"{plugin.id} built with no config holds {instance.config!r}, not the defaults")
    explicit = plugin.make(plugin.ConfigClass())
    if explicit.config != config:
        _fail(f"{plugin.id} built with the default config holds {explicit.config!r}")


@register_check
def check_config_roundtrip(plugin: PluginUnderTest) -> None:
    """The default config round-trips exactly through TOML text and plain data."""
    config = plugin.ConfigClass()
    text = config.dump_toml()
    loaded = plugin.ConfigClass.load_toml(text)
    if loaded != config:
        _fail(f"TOML round-trip changed the config: {config.diff(loaded)}")
    if loaded.dump_toml() != text:
        _fail("dumping the re-loaded config gives different TOML text")
    from_data = plugin.ConfigClass.from_dict(config.to_dict())
    if from_data != config:
        _fail(f"to_dict/from_dict round-trip changed the config: {config.diff(from_data)}")
    if config.copy() != config:
        _fail("config.copy() differs from the config")


@register_check
def check_config_freeze(plugin: PluginUnderTest) -> None:
    """A frozen config refuses every assignment, keeps its value, and copies unfrozen."""
    config = plugin.ConfigClass()
    text = config.dump_toml()
    config.freeze()
    if not config.frozen:
        _fail("config.freeze() did not mark the config frozen")
    config_type: Any = type(config)
    for name in attrs.fields_dict(config_type):
        try:
            setattr(config, name, getattr(config, name))
        except ConfigError:
            continue
        _fail(f"assigning {name!r} of a frozen config did not raise ConfigError")
    if config.dump_toml() != text:
        _fail("freezing changed the config")
    thawed = config.copy()
    if thawed.frozen or thawed != config:
        _fail("copy() of a frozen config must be an equal, unfrozen config")


@register_check
def check_purity(plugin: PluginUnderTest) -> None:
    """``run`` leaves its inputs and its config untouched.

    Every array reachable from the arguments is made read-only first (so an in-place write
    raises), then the arguments are compared with deep copies taken before the call. The
    plugin gets a frozen config, which is compared before and after too.
    """
    call = plugin.sample_call()
    _freeze_arrays((call.args, call.kwargs))
    before_args = copy.deepcopy(call.args)
    before_kwargs = copy.deepcopy(dict(call.kwargs))
    config = plugin.ConfigClass()
    config.freeze()
    before_config = config.dump_toml()
    instance = plugin.make(config)
    call(instance)
    changed = (differences(before_args, call.args, path="args")
               + differences(before_kwargs, dict(call.kwargs), path="kwargs"))
    if changed:
        _fail(f"{plugin.id}.run modified its inputs: {'; '.join(changed)}")
    if config.dump_toml() != before_config or instance.config.dump_toml() != before_config:
        _fail(f"{plugin.id}.run modified its config")


@register_check
def check_pickle(plugin: PluginUnderTest) -> None:
    """The plugin and its result survive pickling; the unpickled plugin gives the same result."""
    instance = plugin.make()
    try:
        clone = pickle.loads(pickle.dumps(instance))
    except Exception as exc:
        msg = f"{plugin.id} instance cannot be pickled: {type(exc).__name__}"
        raise AssertionError(msg) from exc
    if type(clone) is not type(instance) or clone.config != instance.config:
        _fail(f"unpickled {plugin.id} differs from the original (type or config)")
    result = plugin.sample_call()(instance)
    try:
        restored = pickle.loads(pickle.dumps(result))
    except Exception as exc:
        msg = f"the result of {plugin.id} cannot be pickled: {type(exc).__name__}"
        raise AssertionError(msg) from exc
    assert_equivalent(result, restored, what="unpickled result", ignore_volatile=False)
    assert_equivalent(result, plugin.sample_call()(clone), what="result of the unpickled plugin")


def _is_metadata(value: Any) -> bool:
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_metadata(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(isinstance(v, bool | numbers.Number | str | np.generic) for v in value)
    return isinstance(value, bool | numbers.Number | str | np.generic)


def _exposure_like(value: Any, shape: tuple[int, ...], label: str, *,
                   optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, Exposure):
        _fail(f"{label} must be an Exposure, got {type(value).__name__}")
    if value.shape != shape:
        _fail(f"{label} has shape {value.shape}, expected {shape}")


def _check_table(value: Any, label: str, *, optional: bool = False,
                 columns: Sequence[str] = ()) -> None:
    if value is None and optional:
        return
    if not isinstance(value, Table):
        _fail(f"{label} must be an astropy Table, got {type(value).__name__}")
    missing = [name for name in columns if name not in value.colnames]
    if missing:
        _fail(f"{label} lacks the columns {missing}")


def _validate_result(role: str, result: Any, call: _inputs.RoleCall) -> None:
    expected = RESULT_TYPES[role]
    if not isinstance(result, expected):
        _fail(f"run returned {type(result).__name__}, expected {expected.__name__}")
    metadata = getattr(result, "metadata", {})
    if not (isinstance(metadata, Mapping) and _is_metadata(metadata)):
        _fail("result.metadata must be a mapping of str to scalars, lists of scalars or "
              "mappings")
    _ROLE_VALIDATORS[role](result, call)


def _validate_psf_estimation(result: PsfEstimationResult, call: _inputs.RoleCall) -> None:
    if not isinstance(result.psf, Psf):
        _fail(f"result.psf does not satisfy the Psf protocol: {type(result.psf).__name__}")
    image = np.asarray(result.psf.kernel_image())
    if (image.ndim != 2 or image.shape[0] != image.shape[1] or image.shape[0] % 2 == 0
            or not np.all(np.isfinite(image)) or abs(float(image.sum()) - 1.0) > 1e-6):
        _fail("result.psf.kernel_image() must be an odd, square, finite, unit-sum image")
    fwhm = float(result.psf.fwhm())
    if not (math.isfinite(fwhm) and fwhm > 0.0):
        _fail(f"result.psf.fwhm() must be positive and finite, got {fwhm}")
    _check_table(result.sources, "result.sources", optional=True, columns=("x", "y"))


def _validate_kernel_basis(result: KernelBasisResult, call: _inputs.RoleCall) -> None:
    basis = result.basis
    if not (isinstance(basis, np.ndarray) and basis.ndim == 3 and basis.shape[0] >= 1
            and basis.shape[1] % 2 == 1 and basis.shape[2] % 2 == 1):
        _fail("result.basis must be an ndarray of shape (n_basis, K_r, K_c) with odd K")
    if not np.all(np.isfinite(basis)):
        _fail("result.basis must be finite")
    if not isinstance(result.constant_first, bool | np.bool_):
        _fail("result.constant_first must be a bool")
    regularization = result.regularization
    if regularization is not None:
        size = basis.shape[0] + 1
        if not (isinstance(regularization, np.ndarray) and regularization.shape == (size, size)
                and np.all(np.isfinite(regularization))):
            _fail(f"result.regularization must be a finite ({size}, {size}) array or None")


def _validate_subtraction(result: SubtractionResult, call: _inputs.RoleCall) -> None:
    shape = call.args[0].shape
    _exposure_like(result.difference, shape, "result.difference")
    _exposure_like(result.matched_image, shape, "result.matched_image", optional=True)
    _exposure_like(result.score, shape, "result.score", optional=True)
    if result.kernel is not None and not isinstance(result.kernel, FixedKernel | BasisKernel):
        _fail(f"result.kernel must be a FixedKernel, BasisKernel or None, got "
              f"{type(result.kernel).__name__}")
    if result.background is not None and not (isinstance(result.background, np.ndarray)
                                              and result.background.shape == shape):
        _fail(f"result.background must be an ndarray of shape {shape} or None")
    _check_table(result.kernel_sources, "result.kernel_sources", optional=True)


def _validate_decorrelation(result: DecorrelationResult, call: _inputs.RoleCall) -> None:
    _exposure_like(result.difference, call.args[2].difference.shape, "result.difference")


def _validate_detection(result: DetectionResult, call: _inputs.RoleCall) -> None:
    _check_table(result.catalog, "result.catalog", columns=DETECTION_COLUMNS)
    footprints = result.footprints
    shape = call.args[0].shape
    if not (isinstance(footprints, np.ndarray) and footprints.shape == shape
            and np.issubdtype(footprints.dtype, np.integer)):
        _fail(f"result.footprints must be an integer label image of shape {shape}")
    labels = set(np.unique(footprints).tolist()) - {0}
    ids = set(np.asarray(result.catalog["id"]).tolist())
    if not labels <= ids:
        _fail(f"result.footprints holds labels {sorted(labels - ids)} absent from the catalog")


def _validate_measurement(result: MeasurementResult, call: _inputs.RoleCall) -> None:
    _check_table(result.columns, "result.columns")
    n_rows = len(call.args[0].catalog)
    if len(result.columns) != n_rows:
        _fail(f"result.columns has {len(result.columns)} rows, expected one per source "
              f"({n_rows})")


def _validate_classification(result: ClassificationResult, call: _inputs.RoleCall) -> None:
    n_rows = len(call.args[0])
    if not (isinstance(result.flag, np.ndarray) and result.flag.dtype == bool
            and result.flag.shape == (n_rows,)):
        _fail(f"result.flag must be a boolean array of shape ({n_rows},)")
    if not (isinstance(result.score, np.ndarray) and result.score.shape == (n_rows,)
            and np.issubdtype(result.score.dtype, np.number)):
        _fail(f"result.score must be a numeric array of shape ({n_rows},)")


def _validate_metric(result: MetricResult, call: _inputs.RoleCall) -> None:
    values = result.values
    if not isinstance(values, Mapping) or not values:
        _fail("result.values must be a non-empty mapping of names to numbers")
    for key, value in values.items():
        if not isinstance(key, str):
            _fail(f"metric value names must be str, got {key!r}")
        if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
            _fail(f"metric value {key!r} must be a real number, got {type(value).__name__}")


def _validate_template(result: TemplateResult, call: _inputs.RoleCall) -> None:
    _exposure_like(result.template, call.args[0].shape, "result.template")
    coverage = result.coverage
    if (isinstance(coverage, bool) or not isinstance(coverage, numbers.Real)
            or not 0.0 <= float(coverage) <= 1.0):
        _fail(f"result.coverage must be a number in [0, 1], got {coverage!r}")


def _validate_executor(result: ExecutorResult, call: _inputs.RoleCall) -> None:
    n_items = len(call.args[1])
    if len(result.results) != n_items or len(result.errors) != n_items:
        _fail(f"result.results and result.errors must hold one entry per item ({n_items}), "
              f"got {len(result.results)} and {len(result.errors)}")
    bad = [e for e in result.errors if e is not None and not isinstance(e, BaseException)]
    if bad:
        _fail(f"result.errors must hold exceptions or None, got {bad!r}")


_ROLE_VALIDATORS: Mapping[str, Callable[[Any, _inputs.RoleCall], None]] = {
    "psf_estimator": _validate_psf_estimation,
    "kernel_basis": _validate_kernel_basis,
    "subtraction": _validate_subtraction,
    "decorrelation": _validate_decorrelation,
    "detection": _validate_detection,
    "measurement": _validate_measurement,
    "dipole_classifier": _validate_classification,
    "metric": _validate_metric,
    "template_getter": _validate_template,
    "executor": _validate_executor,
}


@register_check
def check_result_type(plugin: PluginUnderTest) -> None:
    """``run`` returns the role's result class with fields of the right types and shapes."""
    call = plugin.sample_call()
    _validate_result(plugin.role, call(plugin.make()), call)


def _run_executor(plugin: PluginUnderTest, items: Sequence[Any]) -> ExecutorResult:
    result = plugin.make().run(_inputs.square_or_fail, list(items))
    if not isinstance(result, ExecutorResult):
        _fail(f"run returned {type(result).__name__}, expected ExecutorResult")
    return result


@register_check
def check_error_types(plugin: PluginUnderTest) -> None:
    """Invalid input raises a :class:`~skydiff.errors.SkydiffError` subclass (any message).

    The bad inputs are role-specific: mismatched shapes for subtraction and decorrelation,
    non-Exposure images, catalogs without the required columns, no template, a negative
    FWHM. Executors have no invalid input at the role level: an empty item list must give an
    empty result, and an item that raises must be recorded (with its own exception type) in
    ``errors`` rather than raised.
    """
    if plugin.role == "executor":
        empty = _run_executor(plugin, [])
        if list(empty.results) or list(empty.errors):
            _fail("an empty item list must give empty results and errors")
        failing = _run_executor(plugin, _inputs.EXECUTOR_FAILING_ITEMS)
        recorded = [e for e in failing.errors if e is not None]
        if len(recorded) != 1 or not isinstance(recorded[0], ValueError):
            _fail("the ValueError of the failing item must be recorded as such in errors, "
                  f"got {[type(e).__name__ for e in recorded]}")
        return
    calls = plugin.bad_calls()
    if not calls:
        raise CheckSkipped(f"no invalid inputs are defined for role {plugin.role!r}")
    for call in calls:
        try:
            call(plugin.make())
        except SkydiffError:
            continue
        except Exception as exc:
            msg = (f"{plugin.id}.run raised {type(exc).__name__} for invalid input "
                   f"({call.label}); raise a skydiff.errors.SkydiffError subclass "
                   f"(InputError, AlgorithmError, ...) instead")
            raise AssertionError(msg) from exc
        _fail(f"{plugin.id}.run accepted invalid input ({call.label}) without raising a "
              f"skydiff.errors.SkydiffError")


@register_check(excludes_tags={"parallel"})
def check_thread_safety(plugin: PluginUnderTest) -> None:
    """Concurrent runs of one instance on shared inputs match a serial run.

    Four threads start together behind a :class:`threading.Barrier` and call ``run`` on
    the same instance with the same arguments. Plugins tagged ``"parallel"`` (which run
    their own workers) are exempt.
    """
    instance = plugin.make()
    call = plugin.sample_call()
    serial = call(instance)
    barrier = threading.Barrier(_N_THREADS, timeout=_BARRIER_TIMEOUT_S)
    results: list[Any] = [None] * _N_THREADS
    errors: list[BaseException | None] = [None] * _N_THREADS

    def work(index: int) -> None:
        try:
            barrier.wait()
            results[index] = call(instance)
        except BaseException as exc:  # re-raised in the main thread below
            errors[index] = exc

    threads = [threading.Thread(target=work, args=(i,), name=f"skydiff-check-{i}")
               for i in range(_N_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, error in enumerate(errors):
        if error is not None:
            msg = f"thread {index} failed while running {plugin.id} concurrently"
            raise AssertionError(msg) from error
    for index, result in enumerate(results):
        assert_equivalent(serial, result, what=f"thread {index} result")


@register_check
def check_determinism(plugin: PluginUnderTest) -> None:
    """Two runs of fresh instances on equal inputs give identical results."""
    first = plugin.sample_call()(plugin.make())
    second = plugin.sample_call()(plugin.make())
    assert_equivalent(first, second, what="second run")


# ------------------------------------------------------------------------------------------
# numerical tier


@register_check(roles={"executor"}, tier="numerical")
def check_executor_order(plugin: PluginUnderTest) -> None:
    """Results come back in input order, whatever order the workers finish in."""
    items = _inputs.EXECUTOR_ITEMS
    result = _run_executor(plugin, items)
    expected = [_inputs.square_or_fail(item) for item in items]
    if list(result.results) != expected or any(e is not None for e in result.errors):
        _fail(f"expected results {expected} with no errors, got {list(result.results)} "
              f"and errors {list(result.errors)}")


@register_check(roles={"executor"}, tier="numerical")
def check_executor_failures(plugin: PluginUnderTest) -> None:
    """A failing item is recorded in place (result None, its exception) and the others run."""
    items = _inputs.EXECUTOR_FAILING_ITEMS
    result = _run_executor(plugin, items)
    for index, item in enumerate(items):
        value, error = result.results[index], result.errors[index]
        if item < 0:
            if value is not None or not isinstance(error, ValueError):
                _fail(f"item {index} ({item}) must fail with its ValueError recorded and "
                      f"result None, got {value!r} / {error!r}")
        elif value != item * item or error is not None:
            _fail(f"item {index} ({item}) must still give {item * item}, got {value!r} / "
                  f"{error!r}")
    if result.n_failed != 1:
        _fail(f"n_failed must be 1, got {result.n_failed}")


# ------------------------------------------------------------------------------------------
# running checks


@attrs.frozen
class CheckOutcome:
    """The outcome of one check run by :func:`check_plugin`.

    Attributes
    ----------
    check : str
        The check's name.
    status : {"passed", "failed", "skipped", "xfailed", "xpassed"}
        What happened (``xfailed``/``xpassed``: an expected failure failed/passed).
    error : BaseException or None
        The exception raised by the check, if any.
    """

    check: str
    status: str
    error: BaseException | None = attrs.field(default=None, eq=False)


def _check_names(expected: Mapping[str, str], label: str) -> dict[str, str]:
    known = {check.name for check in registered_checks()}
    unknown = sorted(set(expected) - known)
    if unknown:
        msg = (f"expected_failed_checks{label} names unknown checks {unknown}; registered "
               f"checks: {', '.join(sorted(known))}")
        raise ConfigError(msg)
    return {str(k): str(v) for k, v in expected.items()}


def check_plugin(plugin: str | type | PluginInfo | PluginUnderTest, *,
                 tiers: Iterable[str] | str = TIERS,
                 expected_failed_checks: Mapping[str, str] | None = None,
                 raise_on_failure: bool = True) -> list[CheckOutcome]:
    """Run every applicable conformance check on one plugin, without pytest.

    Parameters
    ----------
    plugin : str or type or PluginInfo or PluginUnderTest
        ``"role:name"`` or the plugin class (see :func:`resolve_plugin`).
    tiers : iterable of str, optional
        Tiers to run (default both).
    expected_failed_checks : mapping of str to str, optional
        ``{check name: reason}`` of checks known to fail for this plugin; their failure is
        reported as ``"xfailed"`` and their success as ``"xpassed"`` (which fails, as a
        strict xfail).
    raise_on_failure : bool, optional
        Raise :class:`ConformanceError` if any check failed or unexpectedly passed (after
        running them all).

    Returns
    -------
    list of CheckOutcome
        One outcome per check, in run order.

    Raises
    ------
    ConformanceError
        If ``raise_on_failure`` and a check failed or xpassed.
    ConfigError
        For an invalid plugin reference, tier or check name.

    Examples
    --------
    >>> from skydiff.testing import check_plugin
    >>> outcomes = check_plugin("executor:serial")
    >>> {o.status for o in outcomes}
    {'passed'}
    """
    resolved = resolve_plugin(plugin)
    xfails = _check_names(expected_failed_checks or {}, "")
    outcomes: list[CheckOutcome] = []
    for check in select_checks(resolved, tiers=tiers):
        try:
            check(resolved)
        except unittest.SkipTest as exc:
            outcomes.append(CheckOutcome(check.name, "skipped", exc))
        except Exception as exc:
            status = "xfailed" if check.name in xfails else "failed"
            outcomes.append(CheckOutcome(check.name, status, exc))
        else:
            status = "xpassed" if check.name in xfails else "passed"
            outcomes.append(CheckOutcome(check.name, status))
    bad = [o for o in outcomes if o.status in ("failed", "xpassed")]
    if bad and raise_on_failure:
        lines = [f"{resolved.id} failed {len(bad)} conformance check(s):"]
        for outcome in bad:
            if outcome.status == "xpassed":
                lines.append(f"  {outcome.check}: passed but is listed in "
                             f"expected_failed_checks ({xfails[outcome.check]})")
            else:
                error = outcome.error
                detail = str(error).splitlines()[0] if str(error) else ""
                lines.append(f"  {outcome.check}: {type(error).__name__}: {detail}")
        raise ConformanceError("\n".join(lines), outcomes)
    return outcomes


def _expected_for(expected: Any, plugin: PluginUnderTest) -> dict[str, str]:
    if expected is None:
        return {}
    if callable(expected) and not isinstance(expected, Mapping):
        return _check_names(expected(plugin) or {}, f"({plugin.id})")
    for key, value in expected.items():
        if key == plugin.id or key is plugin.target or (
                isinstance(key, PluginUnderTest) and key.id == plugin.id):
            return _check_names(value, f"[{plugin.id!r}]")
    return {}


def _plugin_keys(expected: Any, plugins: Sequence[PluginUnderTest]) -> None:
    if expected is None or (callable(expected) and not isinstance(expected, Mapping)):
        return
    if not isinstance(expected, Mapping):
        msg = ("expected_failed_checks must map plugins ('role:name' or class) to "
               f"{{check name: reason}}, or be a callable; got {type(expected).__name__}")
        raise ConfigError(msg)
    for key in expected:
        if not any(key == p.id or key is p.target for p in plugins):
            msg = (f"expected_failed_checks names {key!r}, which is not among the plugins "
                   f"checked: {', '.join(p.id for p in plugins)}")
            raise ConfigError(msg)


def parametrize_with_checks(
        plugins: Iterable[str | type | PluginInfo], *, tiers: Iterable[str] | str = TIERS,
        expected_failed_checks: (Mapping[str | type, Mapping[str, str]]
                                 | Callable[[PluginUnderTest], Mapping[str, str] | None]
                                 | None) = None,
) -> pytest.MarkDecorator:
    """Parametrize a test over every applicable (plugin, check) pair.

    Parameters
    ----------
    plugins : iterable of str or type or PluginInfo
        Plugins as ``"role:name"`` registry references (resolved now, through
        :func:`skydiff._manager.get_registries`) or plugin classes.
    tiers : iterable of str, optional
        Tiers to include (default ``("api", "numerical")``).
    expected_failed_checks : mapping or callable, optional
        Known failures: ``{plugin: {check name: reason}}`` with plugins keyed as given in
        ``plugins`` (reference string or class), or a callable ``f(plugin_under_test)``
        returning ``{check name: reason}``. Each becomes a strict ``xfail`` mark: the item
        fails if the check unexpectedly passes, so fixed plugins drop their exemptions.

    Returns
    -------
    pytest.MarkDecorator
        ``pytest.mark.parametrize("plugin, check", ...)`` with ids ``"role:name-check_name"``;
        the test body is ``check(plugin)``.

    Raises
    ------
    ConfigError
        For an unknown plugin, tier or check name, or an expected failure of a plugin not in
        ``plugins``.

    Examples
    --------
    >>> from skydiff.testing import parametrize_with_checks
    >>> @parametrize_with_checks(["executor:serial"],
    ...                          expected_failed_checks={"executor:serial": {}})
    ... def test_conformance(plugin, check):
    ...     check(plugin)
    """
    import pytest

    resolved = [resolve_plugin(plugin) for plugin in plugins]
    _plugin_keys(expected_failed_checks, resolved)
    selected = _tier_tuple(tiers)
    params = []
    for plugin in resolved:
        xfails = _expected_for(expected_failed_checks, plugin)
        for check in select_checks(plugin, tiers=selected):
            marks = []
            if check.name in xfails:
                marks.append(pytest.mark.xfail(strict=True, reason=xfails[check.name]))
            params.append(pytest.param(plugin, check, id=f"{plugin.id}-{check.name}",
                                       marks=marks))
    return pytest.mark.parametrize("plugin, check", params)

from skydiff.testing import _subtraction_checks  # noqa: E402, F401 (registers its checks)
