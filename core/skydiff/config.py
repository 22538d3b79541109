"""Typed, validated, freezable configuration classes, persisted as TOML.

A config class is an attrs class decorated with :func:`configclass` whose attributes are
declared with the field constructors of this module. Every field carries a ``doc`` and is
converted and validated on construction *and on every assignment*; a bad value raises
:class:`~skydiff.errors.ConfigError` naming the dotted path of the key
(``subtract.al.kernel_order``). :meth:`Config.freeze` makes a config and everything nested in
it read-only.

Config files are data only, never executed: :meth:`Config.dump_toml` and
:meth:`Config.load_toml` round-trip exactly (``load(dump(c)) == c`` and, for a dumped string
``s``, ``dump(load(s)) == s``), and :meth:`Config.apply_overrides` applies command-line
``key=value`` overrides.

Field kinds
-----------
:func:`Field`
    a scalar (``int``, ``float``, ``str`` or ``bool``), with an optional ``check``.
:func:`ChoiceField`
    a scalar restricted to a closed set of allowed values.
:func:`RangeField`
    an ``int`` or ``float`` within bounds.
:func:`ListField`
    a homogeneous list of scalars, stored as a tuple.
:func:`ConfigField`
    a nested config.
:func:`ConfigurableField`
    a target callable (set from Python only) plus its config (persisted); see
    :class:`ConfigurableInstance`.
:func:`RegistryField`
    a choice among the algorithms registered for a role, keeping one config per algorithm;
    see :class:`RegistrySelection`.

Examples
--------
>>> import skydiff.config as sc
>>> @sc.configclass
... class StampConfig(sc.Config):
...     size: int = sc.Field(21, doc="Stamp size in pixels.", check=lambda v: v % 2 == 1)
...     sigmas: tuple[float, ...] = sc.ListField((0.7, 1.5), doc="Gaussian widths.")
>>> config = StampConfig()
>>> config.size = 20
Traceback (most recent call last):
...
skydiff.errors.ConfigError: size: 20 is not allowed; Stamp size in pixels.
>>> config.apply_overrides(["sigmas=[1, 2.5]"])
>>> print(config.dump_toml(), end="")
size = 21
sigmas = [
    1.0,
    2.5,
]
>>> StampConfig.load_toml(config.dump_toml()) == config
True
"""

from __future__ import annotations

import abc
import inspect
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Self, TypeVar, cast

import attrs
import numpy as np
import tomli_w

from skydiff.errors import ConfigError
from skydiff.registry import ROLES

if TYPE_CHECKING:
    from skydiff.registry import Registry

__all__ = [
    "ChoiceField",
    "Config",
    "ConfigField",
    "ConfigurableField",
    "ConfigurableInstance",
    "Field",
    "FieldHelp",
    "ListField",
    "RangeField",
    "RegistryField",
    "RegistrySelection",
    "configclass",
]

_SPEC_KEY = "skydiff.config.field"
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_DTYPES: Mapping[str, type] = MappingProxyType(
    {"int": int, "float": float, "str": str, "bool": bool})
_SELECTION_KEYS = ("name", "names")

_C = TypeVar("_C", bound="Config")


class FieldHelp(NamedTuple):
    """One row of :meth:`Config.describe`: a settable key and its documentation.

    Attributes
    ----------
    key : str
        Dotted key, as used in TOML tables and ``-c key=value`` overrides.
    type : str
        Human-readable type and constraints, e.g. ``"float in (0.0, inf]"``.
    default : object
        Default value as TOML data (lists for tuples), None when there is none.
    doc : str
        The field's documentation.
    """

    key: str
    type: str
    default: Any
    doc: str


# -- helpers ---------------------------------------------------------------------------------


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _same(a: Any, b: Any) -> bool:
    """Equality of config values, with NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def _coerce_scalar(value: Any, dtype: type, path: str) -> Any:
    """Return ``value`` as ``dtype`` (int is accepted for float; bool is not an int)."""
    if isinstance(value, np.generic):
        value = value.item()
    if dtype is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            msg = f"{path}: {value} is too large for a float"
            raise ConfigError(msg) from None
    ok = isinstance(value, dtype) and not (dtype is int and isinstance(value, bool))
    if not ok:
        hint = "; quote strings in TOML and in overrides" if dtype is str else ""
        msg = f"{path}: expected {dtype.__name__}, got {type(value).__name__} {value!r}{hint}"
        raise ConfigError(msg)
    if dtype is int and not _INT64_MIN <= value <= _INT64_MAX:
        msg = f"{path}: {value} does not fit in a 64-bit integer (the TOML integer range)"
        raise ConfigError(msg)
    return value


def _value_dtype(value: Any) -> type | None:
    for dtype in (bool, int, float, str):
        if isinstance(value, dtype):
            return dtype
    return None


def _annotation_dtype(annotation: Any, *, sequence: bool = False) -> type | None:
    """Scalar type named by an annotation (``"float | None"``, ``tuple[int, ...]``...)."""
    if annotation is None:
        return None
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    text = re.sub(r"\s+|typing\.|collections\.abc\.", "", text)
    text = re.sub(r"^Optional\[(.*)\]$", r"\1", text)
    parts = [part for part in text.split("|") if part != "None"]
    if len(parts) != 1:
        return None
    text = parts[0]
    if sequence:
        match = re.fullmatch(r"(?:tuple|list|Sequence)\[(\w+)(?:,\.\.\.)?\]", text)
        text = match.group(1) if match else ""
    return _DTYPES.get(text)


def _interval(dtype: type, low: Any, high: Any, inclusive_low: bool, inclusive_high: bool,
              ) -> str:
    left = "[" if inclusive_low and low is not None else "("
    right = "]" if inclusive_high and high is not None else ")"
    low_text = "-inf" if low is None else repr(low)
    high_text = "inf" if high is None else repr(high)
    return f"{dtype.__name__} in {left}{low_text}, {high_text}{right}"


def _current_value(instance: Any, name: str) -> Any:
    """The value already stored on ``instance`` (None while ``__init__`` runs)."""
    return vars(instance).get(name)


def _get_registries_role(role: str) -> Registry:
    from skydiff._manager import get_registries

    return get_registries()[role]


# -- the tree bookkeeping shared by configs, selections and configurable instances --------


class _Node(abc.ABC):
    """Parent link, key and frozen flag of one node of a config tree.

    The attributes are class-level defaults overridden per instance with
    ``object.__setattr__``, so they never go through the config's validating ``__setattr__``.
    """

    _skydiff_parent: ClassVar[Any] = None
    _skydiff_key: ClassVar[str | None] = None
    _skydiff_frozen: ClassVar[bool] = False

    def _path(self) -> str:
        parts: list[str] = []
        node: Any = self
        while node is not None:
            if node._skydiff_key:
                parts.append(node._skydiff_key)
            node = node._skydiff_parent
        return ".".join(reversed(parts))

    def _attach(self, parent: _Node | None, key: str | None) -> None:
        object.__setattr__(self, "_skydiff_parent", parent)
        object.__setattr__(self, "_skydiff_key", key)

    def _mark_frozen(self) -> None:
        object.__setattr__(self, "_skydiff_frozen", True)

    def _require_mutable(self, key: str) -> None:
        if self._skydiff_frozen:
            msg = (f"cannot modify a frozen config: {_join(self._path(), key)}; "
                   f"change a copy() instead")
            raise ConfigError(msg)

    @property
    def frozen(self) -> bool:
        """Whether :meth:`freeze` was called (on this node or on a parent)."""
        return self._skydiff_frozen

    @abc.abstractmethod
    def copy(self) -> Self:
        """Return a deep, unfrozen, detached copy."""


_N = TypeVar("_N", bound=_Node)


def _adopt(value: _N, parent: _Node, key: str) -> _N:
    """Attach ``value`` under ``parent.key``, copying it if it belongs to another tree."""
    if value._skydiff_parent is parent and value._skydiff_key == key:
        return value
    if value._skydiff_parent is not None or value._skydiff_frozen:
        value = value.copy()
    value._attach(parent, key)
    return value


# -- field specifications --------------------------------------------------------------------


class _FieldSpec(abc.ABC):
    """How one kind of field converts, validates, persists, copies and documents values."""

    def __init__(self, *, doc: str, optional: bool = False) -> None:
        if not isinstance(doc, str) or not doc.strip():
            msg = "every config field needs a non-empty doc='...' saying what it does"
            raise ConfigError(msg)
        self.doc = doc.strip()
        self.optional = optional
        self.name = ""
        self.owner = ""

    # declaration ------------------------------------------------------------------------

    def bind(self, name: str, annotation: Any, owner: type) -> None:
        """Finish the declaration once the owning class is known (first binding wins)."""
        if self.name:
            return
        self.name = name
        self.owner = owner.__qualname__
        self._bind(annotation)

    def _bind(self, annotation: Any) -> None:
        """Infer and check what needs the field's name or annotation."""
        return

    @property
    def declared(self) -> str:
        return f"{self.owner}.{self.name}"

    def attrs_field(self) -> Any:
        return attrs.field(
            converter=attrs.Converter(self._convert_hook, takes_self=True, takes_field=True),
            validator=self._validate_hook,
            metadata={_SPEC_KEY: self},
            **self._default_kwargs(),
        )

    def _convert_hook(self, value: Any, instance: Any, field: attrs.Attribute[Any]) -> Any:
        return self.convert(value, instance, _join(instance._path(), field.name))

    def _validate_hook(self, instance: Config, field: attrs.Attribute[Any], value: Any) -> None:
        self.verify(value, _join(instance._path(), field.name))

    @abc.abstractmethod
    def _default_kwargs(self) -> dict[str, Any]:
        """``{"default": value}`` or ``{"factory": callable}`` for :func:`attrs.field`."""

    # values ------------------------------------------------------------------------------

    @abc.abstractmethod
    def convert(self, value: Any, instance: Config | None, path: str) -> Any:
        """Return ``value`` converted to the stored form; raise ConfigError on a bad type."""

    def verify(self, value: Any, path: str) -> None:
        """Check the constraints of a converted value; raise ConfigError if violated."""
        return

    def to_data(self, value: Any) -> Any:
        """Return the TOML data of a stored value (None: nothing to write)."""
        return value

    def copy_value(self, value: Any) -> Any:
        return value

    def equal(self, a: Any, b: Any) -> bool:
        return _same(a, b)

    def validate_value(self, value: Any, path: str) -> None:
        self.verify(value, path)

    def freeze_value(self, value: Any) -> None:
        """Freeze a nested node (scalars are immutable already)."""
        return

    # documentation -----------------------------------------------------------------------

    @abc.abstractmethod
    def type_name(self) -> str:
        """Human-readable type with constraints."""

    def help_rows(self, key: str, *, plugins: bool) -> list[FieldHelp]:
        return [FieldHelp(key, self.type_name(), self.to_data(self.default_value()),
                          self.doc)]

    def default_value(self) -> Any:
        return None


class _ValueSpec(_FieldSpec):
    """A scalar field (``Field``); base of choice and range fields."""

    def __init__(self, default: Any, *, doc: str, dtype: type | None,
                 check: Callable[[Any], bool] | None, optional: bool) -> None:
        super().__init__(doc=doc, optional=optional)
        if dtype is not None and dtype not in _DTYPES.values():
            msg = f"dtype must be one of int, float, str, bool; got {dtype!r}"
            raise ConfigError(msg)
        self.dtype: type | None = dtype
        self.default = default
        self.check = check

    def _default_kwargs(self) -> dict[str, Any]:
        return {"default": self.default}

    def _bind(self, annotation: Any) -> None:
        if self.dtype is None:
            self.dtype = _annotation_dtype(annotation) or _value_dtype(self.default)
        if self.dtype is None:
            msg = f"{self.declared}: cannot infer the field type; pass dtype=int|float|str|bool"
            raise ConfigError(msg)
        if self.optional and self.default is not None:
            msg = (f"{self.declared}: an optional field must default to None (TOML cannot "
                   f"write None); use default=None or optional=False")
            raise ConfigError(msg)
        self.default = self.convert(self.default, None, self.declared)
        self.verify(self.default, self.declared)

    def default_value(self) -> Any:
        return self.default

    def convert(self, value: Any, instance: Config | None, path: str) -> Any:
        if value is None:
            if self.optional:
                return None
            assert self.dtype is not None
            msg = f"{path}: None is not allowed (not optional); set a {self.dtype.__name__}"
            raise ConfigError(msg)
        assert self.dtype is not None
        return _coerce_scalar(value, self.dtype, path)

    def verify(self, value: Any, path: str) -> None:
        if value is not None and self.check is not None and not self.check(value):
            msg = f"{path}: {value!r} is not allowed; {self.doc}"
            raise ConfigError(msg)

    def type_name(self) -> str:
        assert self.dtype is not None
        return self.dtype.__name__ + (" | None" if self.optional else "")


class _ChoiceSpec(_ValueSpec):
    """A scalar restricted to the keys of ``allowed`` (``ChoiceField``)."""

    def __init__(self, default: Any, *, doc: str, allowed: Mapping[Any, str] | Sequence[Any],
                 dtype: type | None, optional: bool) -> None:
        super().__init__(default, doc=doc, dtype=dtype, check=None, optional=optional)
        if isinstance(allowed, str) or not isinstance(allowed, Mapping | Sequence):
            msg = f"allowed must be a mapping {{value: doc}} or a sequence, got {allowed!r}"
            raise ConfigError(msg)
        allowed_docs = (dict(allowed) if isinstance(allowed, Mapping)
                        else dict.fromkeys(allowed, ""))
        if not allowed_docs:
            msg = "a ChoiceField needs at least one allowed value"
            raise ConfigError(msg)
        self.allowed: dict[Any, str] = allowed_docs

    def _bind(self, annotation: Any) -> None:
        if self.dtype is None:
            self.dtype = (_annotation_dtype(annotation) or _value_dtype(self.default)
                          or _value_dtype(next(iter(self.allowed))))
        assert self.dtype is not None
        self.allowed = {_coerce_scalar(value, self.dtype, f"{self.declared} allowed value"):
                        str(text) for value, text in self.allowed.items()}
        super()._bind(annotation)

    def verify(self, value: Any, path: str) -> None:
        if value is not None and value not in self.allowed:
            valid = ", ".join(repr(v) for v in sorted(self.allowed))
            msg = f"{path}: {value!r} is not one of the allowed values: {valid}"
            raise ConfigError(msg)

    def type_name(self) -> str:
        valid = ", ".join(repr(v) for v in sorted(self.allowed))
        return f"{super().type_name()}, one of {valid}"

    def help_rows(self, key: str, *, plugins: bool) -> list[FieldHelp]:
        (row,) = super().help_rows(key, plugins=plugins)
        described = "; ".join(f"{value!r}: {text}" for value, text in self.allowed.items()
                              if text)
        return [row._replace(doc=f"{row.doc} ({described})" if described else row.doc)]


class _RangeSpec(_ValueSpec):
    """An int or float within ``[min, max]`` (``RangeField``)."""

    def __init__(self, default: Any, *, doc: str, dtype: type | None, min: Any, max: Any,
                 inclusive_min: bool, inclusive_max: bool, optional: bool) -> None:
        super().__init__(default, doc=doc, dtype=dtype, check=None, optional=optional)
        self.min = min
        self.max = max
        self.inclusive_min = inclusive_min
        self.inclusive_max = inclusive_max

    def _bind(self, annotation: Any) -> None:
        if self.dtype is None:
            self.dtype = _annotation_dtype(annotation) or _value_dtype(self.default)
        if self.dtype not in (int, float):
            msg = f"{self.declared}: a RangeField must hold int or float, not {self.dtype!r}"
            raise ConfigError(msg)
        if self.min is not None:
            self.min = _coerce_scalar(self.min, self.dtype, f"{self.declared} min")
        if self.max is not None:
            self.max = _coerce_scalar(self.max, self.dtype, f"{self.declared} max")
        super()._bind(annotation)

    def verify(self, value: Any, path: str) -> None:
        if value is None:
            return
        too_low = self.min is not None and (value < self.min if self.inclusive_min
                                            else value <= self.min)
        too_high = self.max is not None and (value > self.max if self.inclusive_max
                                             else value >= self.max)
        if too_low or too_high or (isinstance(value, float) and math.isnan(value)):
            msg = f"{path}: {value!r} is out of range; expected {self.type_name()}"
            raise ConfigError(msg)

    def type_name(self) -> str:
        assert self.dtype is not None
        text = _interval(self.dtype, self.min, self.max, self.inclusive_min, self.inclusive_max)
        return text + (" | None" if self.optional else "")


class _ListSpec(_FieldSpec):
    """A homogeneous list of scalars stored as a tuple (``ListField``)."""

    def __init__(self, default: Any, *, doc: str, dtype: type | None, length: int | None,
                 min_length: int | None, max_length: int | None,
                 item_check: Callable[[Any], bool] | None, optional: bool) -> None:
        super().__init__(doc=doc, optional=optional)
        if dtype is not None and dtype not in _DTYPES.values():
            msg = f"dtype must be one of int, float, str, bool; got {dtype!r}"
            raise ConfigError(msg)
        self.dtype: type | None = dtype
        self.default = default
        self.length = length
        self.min_length = min_length
        self.max_length = max_length
        self.item_check = item_check

    def _default_kwargs(self) -> dict[str, Any]:
        return {"default": self.default}

    def _bind(self, annotation: Any) -> None:
        if self.dtype is None:
            self.dtype = _annotation_dtype(annotation, sequence=True)
        if self.dtype is None and isinstance(self.default, Sequence) and self.default:
            self.dtype = _value_dtype(self.default[0])
        if self.dtype is None:
            msg = (f"{self.declared}: cannot infer the item type; pass dtype=int|float|str|bool "
                   f"or annotate as tuple[float, ...]")
            raise ConfigError(msg)
        if self.optional and self.default is not None:
            msg = (f"{self.declared}: an optional field must default to None (TOML cannot "
                   f"write None); use default=None or optional=False")
            raise ConfigError(msg)
        self.default = self.convert(self.default, None, self.declared)
        self.verify(self.default, self.declared)

    def default_value(self) -> Any:
        return self.default

    def convert(self, value: Any, instance: Config | None, path: str) -> Any:
        assert self.dtype is not None
        if value is None and self.optional:
            return None
        if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
            msg = (f"{path}: expected a list of {self.dtype.__name__}, got "
                   f"{type(value).__name__} {value!r}")
            raise ConfigError(msg)
        return tuple(_coerce_scalar(item, self.dtype, f"{path}[{index}]")
                     for index, item in enumerate(value))

    def verify(self, value: Any, path: str) -> None:
        if value is None:
            return
        size = len(value)
        if ((self.length is not None and size != self.length)
                or (self.min_length is not None and size < self.min_length)
                or (self.max_length is not None and size > self.max_length)):
            msg = f"{path}: {size} items is not allowed; expected {self.type_name()}"
            raise ConfigError(msg)
        if self.item_check is not None:
            for index, item in enumerate(value):
                if not self.item_check(item):
                    msg = f"{path}[{index}]: {item!r} is not allowed; {self.doc}"
                    raise ConfigError(msg)

    def to_data(self, value: Any) -> Any:
        return None if value is None else list(value)

    def equal(self, a: Any, b: Any) -> bool:
        if a is None or b is None:
            return a is b
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))

    def type_name(self) -> str:
        assert self.dtype is not None
        limits = []
        if self.length is not None:
            limits.append(f"length {self.length}")
        if self.min_length is not None:
            limits.append(f"length >= {self.min_length}")
        if self.max_length is not None:
            limits.append(f"length <= {self.max_length}")
        text = f"list[{self.dtype.__name__}]" + (f" ({', '.join(limits)})" if limits else "")
        return text + (" | None" if self.optional else "")


class _ConfigSpec(_FieldSpec):
    """A nested config (``ConfigField``)."""

    def __init__(self, dtype: type[Config], *, doc: str) -> None:
        super().__init__(doc=doc)
        if not (inspect.isclass(dtype) and issubclass(dtype, Config)):
            msg = f"ConfigField needs a skydiff.Config subclass, got {dtype!r}"
            raise ConfigError(msg)
        self.dtype = dtype

    def _default_kwargs(self) -> dict[str, Any]:
        return {"factory": self.dtype}

    def convert(self, value: Any, instance: Config | None, path: str) -> Any:
        assert instance is not None
        if type(value) is self.dtype:
            return _adopt(value, instance, self.name)
        if isinstance(value, Mapping):
            target = _current_value(instance, self.name)
            if target is None:
                target = self.dtype()
            target._attach(instance, self.name)
            target._merge(value)
            return target
        msg = (f"{path}: expected a {self.dtype.__qualname__} or a table of its settings, got "
               f"{type(value).__name__}")
        raise ConfigError(msg)

    def to_data(self, value: Any) -> Any:
        return value.to_dict()

    def copy_value(self, value: Any) -> Any:
        return value.copy()

    def equal(self, a: Any, b: Any) -> bool:
        return bool(a == b)

    def validate_value(self, value: Any, path: str) -> None:
        value.validate()

    def freeze_value(self, value: Any) -> None:
        value.freeze()

    def type_name(self) -> str:
        return self.dtype.__qualname__

    def help_rows(self, key: str, *, plugins: bool) -> list[FieldHelp]:
        return self.dtype.describe(plugins=plugins, prefix=key)


def _configurable_config_class(target: Any, config_class: Any, path: str) -> type[Config]:
    resolved = config_class if config_class is not None else getattr(target, "ConfigClass",
                                                                      None)
    if not (inspect.isclass(resolved) and issubclass(resolved, Config)):
        msg = (f"{path or 'ConfigurableField'}: {target!r} needs a ConfigClass that is a "
               f"skydiff.Config subclass; give the target one or pass ConfigClass=")
        raise ConfigError(msg)
    return resolved


class _ConfigurableSpec(_FieldSpec):
    """A target plus its config (``ConfigurableField``)."""

    def __init__(self, target: Callable[..., Any], *, doc: str,
                 config_class: type[Config] | None) -> None:
        super().__init__(doc=doc)
        if not callable(target):
            msg = f"ConfigurableField needs a callable target (usually a Task), got {target!r}"
            raise ConfigError(msg)
        self.target = target
        self.config_class = _configurable_config_class(target, config_class, "")

    def _default_kwargs(self) -> dict[str, Any]:
        return {"factory": self._new_instance}

    def _new_instance(self) -> ConfigurableInstance:
        return ConfigurableInstance(self.target, self.config_class)

    def convert(self, value: Any, instance: Config | None, path: str) -> Any:
        assert instance is not None
        if isinstance(value, ConfigurableInstance):
            return _adopt(value, instance, self.name)
        if isinstance(value, Mapping):
            target = _current_value(instance, self.name)
            if target is None:
                target = self._new_instance()
            target._attach(instance, self.name)
            target.config._merge(value)
            return target
        msg = (f"{path}: expected a table of settings; change the target with "
               f"{path}.retarget(...) in Python, got {type(value).__name__}")
        raise ConfigError(msg)

    def to_data(self, value: Any) -> Any:
        return value.config.to_dict()

    def copy_value(self, value: Any) -> Any:
        return value.copy()

    def equal(self, a: Any, b: Any) -> bool:
        return bool(a == b)

    def validate_value(self, value: Any, path: str) -> None:
        value.validate()

    def freeze_value(self, value: Any) -> None:
        value.freeze()

    def type_name(self) -> str:
        return f"configurable {getattr(self.target, '__qualname__', repr(self.target))}"

    def help_rows(self, key: str, *, plugins: bool) -> list[FieldHelp]:
        return self.config_class.describe(plugins=plugins, prefix=key)


class _RegistrySpec(_FieldSpec):
    """A selection among a role's registered algorithms (``RegistryField``)."""

    def __init__(self, role: str, *, default: str | Sequence[str] | None, doc: str,
                 multi: bool | None, optional: bool) -> None:
        super().__init__(doc=doc, optional=optional)
        if role not in ROLES:
            msg = f"unknown role {role!r}; valid roles: {', '.join(sorted(ROLES))}"
            raise ConfigError(msg)
        self.role = role
        self.multi = ROLES[role].multi if multi is None else multi
        self.default = _selection_names(default, multi=self.multi, optional=optional,
                                        path=f"RegistryField({role!r}) default",
                                        is_default=True)

    def _default_kwargs(self) -> dict[str, Any]:
        return {"factory": self._new_selection}

    def _new_selection(self) -> RegistrySelection:
        return RegistrySelection(self.role, multi=self.multi, optional=self.optional,
                                 default=self.default)

    def convert(self, value: Any, instance: Config | None, path: str) -> Any:
        assert instance is not None
        if isinstance(value, RegistrySelection):
            if value.role != self.role or value.multi != self.multi:
                msg = (f"{path}: expected a {'multi-' if self.multi else ''}selection of "
                       f"{self.role} algorithms, got one of role {value.role!r}")
                raise ConfigError(msg)
            return _adopt(value, instance, self.name)
        selection = _current_value(instance, self.name)
        if selection is None:
            selection = self._new_selection()
        selection._attach(instance, self.name)
        selection._merge(value)
        return selection

    def to_data(self, value: Any) -> Any:
        return value._to_data()

    def copy_value(self, value: Any) -> Any:
        return value.copy()

    def equal(self, a: Any, b: Any) -> bool:
        return bool(a == b)

    def validate_value(self, value: Any, path: str) -> None:
        value.validate()

    def freeze_value(self, value: Any) -> None:
        value.freeze()

    def type_name(self) -> str:
        if self.multi:
            return f"list of {self.role} algorithm names"
        return f"{self.role} algorithm name" + (" | None" if self.optional else "")

    def help_rows(self, key: str, *, plugins: bool) -> list[FieldHelp]:
        if self.multi:
            row = FieldHelp(f"{key}.names", self.type_name(), list(self.default), self.doc)
        else:
            row = FieldHelp(f"{key}.name", self.type_name(),
                            self.default[0] if self.default else None, self.doc)
        if not plugins:
            return [row]
        registry = _get_registries_role(self.role)
        valid = ", ".join(registry.names()) or "<none registered>"
        rows = [row._replace(doc=f"{self.doc} (valid names: {valid})")]
        for name, info in registry.items():
            rows.extend(info.ConfigClass.describe(plugins=plugins, prefix=f"{key}.{name}"))
        return rows


# -- registry selections and configurable instances -------------------------------------------


def _selection_names(value: Any, *, multi: bool, optional: bool, path: str,
                     is_default: bool = False) -> tuple[str, ...]:
    """Validate the shape of a selection (not the names) and return it as a tuple."""
    if multi:
        if isinstance(value, str) or not isinstance(value, Iterable):
            msg = (f"{path}: expected a list of algorithm names, e.g. [\"a\", \"b\"], got "
                   f"{type(value).__name__} {value!r}")
            raise ConfigError(msg)
        names = tuple(value)
        bad = [name for name in names if not isinstance(name, str)]
        if bad:
            msg = f"{path}: algorithm names must be str, got {bad!r}"
            raise ConfigError(msg)
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            msg = f"{path}: {', '.join(duplicates)} selected more than once"
            raise ConfigError(msg)
        if not names and not optional:
            msg = f"{path}: select at least one algorithm (the field is not optional)"
            raise ConfigError(msg)
        return names
    if value is None:
        if not optional:
            msg = f"{path}: an algorithm must be selected (the field is not optional)"
            raise ConfigError(msg)
        return ()
    if not isinstance(value, str):
        msg = f"{path}: expected an algorithm name (str), got {type(value).__name__} {value!r}"
        raise ConfigError(msg)
    if optional and is_default:
        msg = (f"{path}: an optional selection must default to None (TOML cannot write "
               f"None); use default=None or optional=False")
        raise ConfigError(msg)
    return (value,)


class RegistrySelection(_Node):
    """The value of a :func:`RegistryField`: selected algorithm(s) and one config per algorithm.

    A config is kept for every algorithm of the role that was ever accessed, so switching the
    selection back and forth keeps each algorithm's settings (pex_config's
    ``RegistryInstanceDict``). Configs are created lazily from the registry
    (``registry[name].ConfigClass()``); the registry itself is looked up lazily through
    :func:`skydiff._manager.get_registries`, so declaring or constructing a config never loads
    plugins.

    Parameters
    ----------
    role : str
        A key of :data:`skydiff.registry.ROLES`.
    multi : bool, optional
        Select several algorithms (``names``) instead of one (``name``).
    optional : bool, optional
        Allow an empty selection (``name = None`` or ``names = []``).
    default : str or sequence of str or None, optional
        Initial selection; not checked against the registry until it is used.

    Notes
    -----
    TOML shape (``[subtract]`` for a single selection, ``[measure]`` for a multi one)::

        [subtract]
        name = "al"

        [subtract.al]          # the active algorithm, always written
        kernel_order = 1

        [subtract.zogy]        # another algorithm, written only if not at its defaults
        ...

        [measure]
        names = ["centroid", "psf_flux"]

    ``name = "al"`` may also be written as ``subtract = "al"``, and ``names`` as
    ``measure = [...]``. Multi-selection names are kept ordered by each algorithm's
    ``order`` attribute, then by name. Equality compares the selection and every
    algorithm config that differs from its defaults.
    """

    def __init__(self, role: str, *, multi: bool = False, optional: bool = False,
                 default: str | Sequence[str] | None = None) -> None:
        if role not in ROLES:
            msg = f"unknown role {role!r}; valid roles: {', '.join(sorted(ROLES))}"
            raise ConfigError(msg)
        self._role = role
        self._multi = multi
        self._optional = optional
        self._names: tuple[str, ...] = (
            () if default is None else tuple([default] if isinstance(default, str) else default))
        self._configs: dict[str, Config] = {}

    # identity ------------------------------------------------------------------------------

    @property
    def role(self) -> str:
        """The role whose algorithms are selected."""
        return self._role

    @property
    def multi(self) -> bool:
        """Whether several algorithms are selected (``names``) instead of one (``name``)."""
        return self._multi

    @property
    def optional(self) -> bool:
        """Whether the selection may be empty."""
        return self._optional

    def _registry(self) -> Registry:
        return _get_registries_role(self._role)

    # selection -----------------------------------------------------------------------------

    @property
    def name(self) -> str | None:
        """The selected algorithm (single selection); None when nothing is selected.

        Raises
        ------
        ConfigError
            On a multi selection (use :attr:`names`), or when set to an unknown name (the
            message lists the registered names) or to None on a non-optional field.
        """
        if self._multi:
            msg = f"{self._path() or self._role}: multi-selection; use .names, not .name"
            raise ConfigError(msg)
        return self._names[0] if self._names else None

    @name.setter
    def name(self, value: str | None) -> None:
        path = _join(self._path(), "name")
        self._require_mutable("name")
        if self._multi:
            msg = f"{path}: this field selects several algorithms; set .names to a list"
            raise ConfigError(msg)
        names = _selection_names(value, multi=False, optional=self._optional, path=path)
        for name in names:
            self._registry().lookup(name, path=path)
        self._names = names

    @property
    def names(self) -> tuple[str, ...]:
        """The selected algorithms, ordered by ``order`` then name (``()`` or one for single).

        Raises
        ------
        ConfigError
            When set on a single selection, to a non-list, to duplicated or unknown names, or
            to an empty list on a non-optional field.
        """
        if not self._multi:
            return self._names
        return self._registry().ordered(self._names, path=_join(self._path(), "names"))

    @names.setter
    def names(self, values: Iterable[str]) -> None:
        path = _join(self._path(), "names")
        self._require_mutable("names")
        if not self._multi:
            msg = f"{path}: this field selects one algorithm; set .name instead"
            raise ConfigError(msg)
        names = _selection_names(values, multi=True, optional=self._optional, path=path)
        self._names = self._registry().ordered(names, path=path)

    def __getitem__(self, name: str) -> Config:
        """Return the config of algorithm ``name`` (created with its defaults on first use).

        Raises
        ------
        ConfigError
            If ``name`` is not registered for this role (the message lists valid names).
        """
        config = self._configs.get(name)
        if config is None:
            info = self._registry().lookup(name, path=_join(self._path(), str(name)))
            created = info.ConfigClass()
            created._attach(self, name)
            if self._skydiff_frozen:
                created.freeze()
            config = self._configs.setdefault(name, created)
        return config

    @property
    def active(self) -> Config | tuple[Config, ...] | None:
        """Config of the selected algorithm (None if none); a tuple for a multi selection."""
        if self._multi:
            return tuple(self[name] for name in self.names)
        return self[self._names[0]] if self._names else None

    @property
    def target(self) -> type | None:
        """Class of the selected algorithm (single selection), None when nothing is selected."""
        name = self.name
        if name is None:
            return None
        return self._registry().lookup(name, path=_join(self._path(), "name")).target

    @property
    def targets(self) -> tuple[type, ...]:
        """Classes of the selected algorithms, in selection order."""
        path = _join(self._path(), "names")
        return tuple(self._registry().lookup(name, path=path).target for name in self.names)

    def apply(self, *args: Any, **kwargs: Any) -> Any:
        """Build the selected algorithm(s): ``target(*args, config=active, **kwargs)``.

        Returns
        -------
        object or list or None
            The instance (single), a list of instances in selection order (multi), or None
            when an optional single selection is empty.
        """
        if self._multi:
            return [self._registry().lookup(name).target(*args, config=self[name], **kwargs)
                    for name in self.names]
        target = self.target
        if target is None:
            return None
        return target(*args, config=self.active, **kwargs)

    # config-tree protocol -------------------------------------------------------------------

    def validate(self) -> None:
        """Check the selected names against the registry and validate the active configs.

        Raises
        ------
        ConfigError
            If a selected name is not registered, a non-optional selection is empty, or an
            active config is invalid.
        """
        path = _join(self._path(), "names" if self._multi else "name")
        _selection_names(list(self._names) if self._multi else self.name, multi=self._multi,
                         optional=self._optional, path=path)
        registry = self._registry()
        for name in self._names:
            registry.lookup(name, path=path)
        for name in self._names:
            self[name].validate()

    def freeze(self) -> None:
        """Freeze the selection and every algorithm config (also those created later)."""
        self._mark_frozen()
        for config in self._configs.values():
            config.freeze()

    def copy(self) -> Self:
        """Return a deep, unfrozen, detached copy."""
        new = type(self)(self._role, multi=self._multi, optional=self._optional)
        new._names = self._names
        for name, config in self._configs.items():
            copied = config.copy()
            copied._attach(new, name)
            new._configs[name] = copied
        return new

    def _merge(self, data: Any) -> None:
        path = self._path()
        if isinstance(data, Mapping):
            key, other = ("names", "name") if self._multi else ("name", "names")
            if other in data:
                msg = (f"{_join(path, other)}: this field selects "
                       f"{'several algorithms' if self._multi else 'one algorithm'}; "
                       f"use {key!r}")
                raise ConfigError(msg)
            if key in data:
                setattr(self, key, data[key])
            for name, settings in data.items():
                if name in _SELECTION_KEYS:
                    continue
                config = self[name]
                if not isinstance(settings, Mapping):
                    msg = (f"{_join(path, name)}: expected a table of {name} settings, got "
                           f"{type(settings).__name__}")
                    raise ConfigError(msg)
                config._merge(settings)
        elif self._multi:
            self.names = data
        else:
            self.name = data

    def _to_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self._multi:
            data["names"] = list(self.names)
        elif self._names:
            data["name"] = self._names[0]
        active = set(self.names)
        for name in sorted(active | set(self._configs)):
            config = self._configs.get(name)
            if name in active or (config is not None and config != type(config)()):
                data[name] = self[name].to_dict()
        return data

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RegistrySelection):
            return NotImplemented
        if (self._role, self._multi) != (other._role, other._multi):
            return False
        if self._multi and set(self._names) != set(other._names):
            return False
        if not self._multi and self._names != other._names:
            return False
        for name in set(self._configs) | set(other._configs):
            mine, theirs = self._configs.get(name), other._configs.get(name)
            if mine is None or theirs is None:
                present = mine if mine is not None else theirs
                assert present is not None
                if present != type(present)():
                    return False
            elif mine != theirs:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        chosen = f"names={self._names!r}" if self._multi else f"name={self.name!r}"
        return f"RegistrySelection(role={self._role!r}, {chosen})"


class ConfigurableInstance(_Node):
    """The value of a :func:`ConfigurableField`: a target callable and its config.

    Attribute access and assignment are forwarded to :attr:`config`, so
    ``config.selector.threshold = 5`` sets the target's setting. The target is set from
    Python only (:meth:`retarget`); TOML stores only the config's fields.

    Parameters
    ----------
    target : callable
        Usually a :class:`skydiff.task.Task` subclass; called as
        ``target(*args, config=config, **kwargs)`` by :meth:`apply`.
    ConfigClass : type of Config, optional
        Config class; default ``target.ConfigClass``.

    Raises
    ------
    ConfigError
        If no Config subclass can be found for the target.
    """

    def __init__(self, target: Callable[..., Any], ConfigClass: type[Config] | None = None,
                 ) -> None:
        config_class = _configurable_config_class(target, ConfigClass, "")
        object.__setattr__(self, "_target", target)
        config = config_class()
        config._attach(self, None)
        object.__setattr__(self, "_config", config)

    @property
    def target(self) -> Callable[..., Any]:
        """The callable built by :meth:`apply`."""
        target: Callable[..., Any] = self._target
        return target

    @property
    def config(self) -> Config:
        """The target's config (shares this field's dotted path)."""
        config: Config = self._config
        return config

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._config, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("target", "config"):
            msg = (f"{_join(self._path(), name)}: use retarget(target, ConfigClass=None) to "
                   f"change the target and its config class")
            raise ConfigError(msg)
        setattr(self._config, name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(type(self._config)._skydiff_fields))

    def retarget(self, target: Callable[..., Any], ConfigClass: type[Config] | None = None,
                 ) -> None:
        """Replace the target; the config is reset only if its class changes.

        Parameters
        ----------
        target : callable
            The new target.
        ConfigClass : type of Config, optional
            Its config class; default ``target.ConfigClass``.

        Raises
        ------
        ConfigError
            If frozen, or if no Config subclass can be found for ``target``.
        """
        self._require_mutable("target")
        config_class = _configurable_config_class(target, ConfigClass, self._path())
        if type(self._config) is not config_class:
            config = config_class()
            config._attach(self, None)
            object.__setattr__(self, "_config", config)
        object.__setattr__(self, "_target", target)

    def apply(self, *args: Any, **kwargs: Any) -> Any:
        """Return ``target(*args, config=config, **kwargs)``."""
        return self._target(*args, config=self._config, **kwargs)

    def validate(self) -> None:
        """Validate the config."""
        self._config.validate()

    def freeze(self) -> None:
        """Freeze the config; :meth:`retarget` is refused afterwards."""
        self._mark_frozen()
        self._config.freeze()

    def copy(self) -> Self:
        """Return a deep, unfrozen, detached copy (same target, copied config)."""
        new = object.__new__(type(self))
        object.__setattr__(new, "_target", self._target)
        config = self._config.copy()
        config._attach(new, None)
        object.__setattr__(new, "_config", config)
        return new

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConfigurableInstance):
            return NotImplemented
        return bool(self._target == other._target and self._config == other._config)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        name = getattr(self._target, "__qualname__", repr(self._target))
        return f"ConfigurableInstance(target={name}, config={self._config!r})"


# -- the Config base class -------------------------------------------------------------------


def _refuse_if_frozen(instance: Config, attribute: attrs.Attribute[Any], value: Any) -> Any:
    instance._require_mutable(attribute.name)
    return value


_ON_SETATTR = attrs.setters.pipe(_refuse_if_frozen, attrs.setters.convert,
                                 attrs.setters.validate)


def _build_config_class(cls: type[_C]) -> type[_C]:
    """Apply attrs, bind the field specs and guard assignment of unknown keys."""
    new = attrs.define(cls, kw_only=True, eq=False, slots=False, on_setattr=_ON_SETATTR)
    reserved = {name for name in dir(_Node) if not name.startswith("_")}
    if "Config" in globals():
        reserved |= {name for name in dir(Config) if not name.startswith("_")}
    specs: dict[str, _FieldSpec] = {}
    fields: tuple[attrs.Attribute[Any], ...] = attrs.fields(cast(Any, new))
    for field in fields:
        spec = field.metadata.get(_SPEC_KEY)
        if spec is None:
            msg = (f"{new.__qualname__}.{field.name}: declare config fields with "
                   f"skydiff.Field, ChoiceField, RangeField, ListField, ConfigField, "
                   f"ConfigurableField or RegistryField (they carry a doc)")
            raise ConfigError(msg)
        if field.name.startswith("_") or field.name in reserved:
            msg = (f"{new.__qualname__}.{field.name}: field names must not start with '_' or "
                   f"shadow Config methods ({', '.join(sorted(reserved))}); rename it")
            raise ConfigError(msg)
        spec.bind(field.name, field.type, new)
        specs[field.name] = spec
    new._skydiff_fields = MappingProxyType(specs)
    names = frozenset(specs)
    attrs_setattr = new.__setattr__

    def __setattr__(self: Config, name: str, value: Any) -> None:
        if name not in names:
            msg = (f"unknown config key {_join(self._path(), name)!r}; valid keys: "
                   f"{', '.join(sorted(names)) or '<none>'}")
            raise ConfigError(msg)
        attrs_setattr(self, name, value)

    __setattr__.__qualname__ = f"{new.__qualname__}.__setattr__"
    new.__setattr__ = __setattr__  # type: ignore[method-assign,assignment]
    return new


def configclass(cls: type[_C]) -> type[_C]:
    """Turn a :class:`Config` subclass into a validated attrs config class.

    Equivalent to ``attrs.define(kw_only=True, on_setattr=...)`` where the setattr hook
    (a) refuses changes when the config is frozen, (b) converts and (c) validates the new
    value; assigning a key that is not a field raises too.

    Parameters
    ----------
    cls : type
        A subclass of :class:`Config` whose fields are all declared with this module's field
        constructors.

    Returns
    -------
    type
        The attrs class (the same class object).

    Raises
    ------
    ConfigError
        If ``cls`` is not a Config subclass; if a field is declared without a field
        constructor, starts with ``_`` or shadows a Config method; if a field's type cannot
        be inferred; or if a default is invalid.
    """
    if not (inspect.isclass(cls) and issubclass(cls, Config)):
        msg = f"@configclass decorates subclasses of skydiff.Config, got {cls!r}"
        raise ConfigError(msg)
    return _build_config_class(cls)


@_build_config_class
class Config(_Node):
    """Base class of every skydiff configuration.

    Subclass it, declare fields with :func:`Field` and friends, and decorate with
    :func:`configclass`. Construct with keyword arguments (``ALConfig(kernel_order=2)``);
    every construction and assignment is converted and validated. Configs compare equal
    when their classes and values are equal (NaN equals NaN); they are mutable, hence
    unhashable, until and after :meth:`freeze`.

    Cross-field checks go in a ``_validate(self)`` method raising
    :class:`~skydiff.errors.ConfigError`; :meth:`validate` calls the ``_validate`` of every
    class in the MRO, base classes first, so overrides need not call ``super()``.
    """

    _skydiff_fields: ClassVar[Mapping[str, _FieldSpec]] = MappingProxyType({})

    # comparison --------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(spec.equal(getattr(self, name), getattr(other, name))
                   for name, spec in self._skydiff_fields.items())

    __hash__ = None  # type: ignore[assignment]

    # lifecycle ---------------------------------------------------------------------------

    def validate(self) -> None:
        """Validate every field recursively, then run the ``_validate`` hooks.

        Raises
        ------
        ConfigError
            If a value is invalid, a selected algorithm is not registered, or a
            ``_validate`` hook rejects the combination of values.
        """
        path = self._path()
        for name, spec in self._skydiff_fields.items():
            spec.validate_value(getattr(self, name), _join(path, name))
        for klass in reversed(type(self).__mro__):
            hook = vars(klass).get("_validate")
            if hook is not None:
                hook(self)

    def freeze(self) -> None:
        """Make this config and everything nested in it read-only (irreversible).

        Any later assignment raises :class:`~skydiff.errors.ConfigError`; use :meth:`copy`
        to get a modifiable config.
        """
        self._mark_frozen()
        for name, spec in self._skydiff_fields.items():
            spec.freeze_value(getattr(self, name))

    def copy(self) -> Self:
        """Return a deep, unfrozen, detached copy (targets of configurables are kept)."""
        new = type(self)()
        for name, spec in self._skydiff_fields.items():
            setattr(new, name, spec.copy_value(getattr(self, name)))
        return new

    def update(self, **values: Any) -> None:
        """Set several fields; tables (dicts) are merged into nested configs and selections.

        Raises
        ------
        ConfigError
            On an unknown key (listing the valid keys) or an invalid value.
        """
        self._merge(values)

    def _merge(self, data: Any) -> None:
        path = self._path()
        if not isinstance(data, Mapping):
            msg = (f"{path or 'config'}: expected a table of settings, got "
                   f"{type(data).__name__} {data!r}")
            raise ConfigError(msg)
        specs = self._skydiff_fields
        for key in data:
            if key not in specs:
                msg = (f"unknown config key {_join(path, str(key))!r}; valid keys: "
                       f"{', '.join(sorted(specs)) or '<none>'}")
                raise ConfigError(msg)
        for key, value in data.items():
            setattr(self, key, value)

    # data --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as TOML-able data (str, int, float, bool, list, dict).

        None values are left out (TOML has no null; optional fields default to None).
        Registry selections hold ``name``/``names`` plus a table for each active algorithm
        and each other algorithm whose config differs from its defaults.
        """
        data: dict[str, Any] = {}
        for name, spec in self._skydiff_fields.items():
            value = spec.to_data(getattr(self, name))
            if value is not None:
                data[name] = value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, path: str = "") -> Self:
        """Build a config from defaults updated with ``data`` (as from :meth:`to_dict`).

        Parameters
        ----------
        data : Mapping
            Nested settings; missing keys keep their defaults.
        path : str, optional
            Dotted prefix for error messages (where ``data`` sits in a larger file).

        Raises
        ------
        ConfigError
            On an unknown key (naming ``path.key`` and listing the valid keys), an unknown
            algorithm name (listing the registered names) or an invalid value.
        """
        config = cls()
        config._attach(None, path or None)
        try:
            config._merge(data)
        finally:
            config._attach(None, None)
        return config

    def dump_toml(self) -> str:
        """Return the settings as TOML text (floats written exactly via ``repr``)."""
        return tomli_w.dumps(self.to_dict())

    @classmethod
    def load_toml(cls, source: str | os.PathLike[str]) -> Self:
        """Build a config from TOML text or a TOML file (data only, never executed).

        Parameters
        ----------
        source : str or path-like
            A path (``os.PathLike``, or a one-line ``str`` without ``=`` or ``[``) or TOML
            text.

        Raises
        ------
        ConfigError
            If the file cannot be read, the TOML is invalid, or the settings are (unknown
            keys, names or invalid values; messages from files start with the file name).
        """
        if isinstance(source, os.PathLike) or (
                source.strip() and not any(char in source for char in "\n=[")):
            path = Path(source)
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                msg = f"cannot read config file {str(path)!r}: {exc}"
                raise ConfigError(msg) from exc
            origin: str | None = str(path)
        else:
            text, origin = source, None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            msg = f"{origin or 'config text'}: invalid TOML: {exc}"
            raise ConfigError(msg) from exc
        if origin is None:
            return cls.from_dict(data)
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            msg = f"{origin}: {exc}"
            raise ConfigError(msg) from exc

    def apply_overrides(self, overrides: Iterable[str] | str) -> None:
        """Apply ``key=value`` overrides in order (as from ``-c key=value``).

        The value is parsed as a TOML value (``2``, ``1.5``, ``true``, ``"text"``,
        ``[1, 2]``, ``{a = 1}``), falling back to the bare string (``zogy``). Keys are dotted
        paths: ``subtract.name=zogy``, ``subtract.al.kernel_order=2``, ``sub.sigma=1.5``.

        Parameters
        ----------
        overrides : iterable of str or str
            The overrides (a single string is one override).

        Raises
        ------
        ConfigError
            If an override has no ``=``, names an unknown key or algorithm, or sets an
            invalid value.
        """
        for item in [overrides] if isinstance(overrides, str) else overrides:
            key, sep, text = item.partition("=")
            parts = key.strip().split(".")
            if not sep or not all(parts):
                msg = f"override {item!r} is not key=value; e.g. subtract.name=zogy"
                raise ConfigError(msg)
            value: Any = _parse_override_value(text.strip())
            for part in reversed(parts):
                value = {part: value}
            self._merge(value)

    def diff(self, other: Config) -> dict[str, tuple[Any, Any]]:
        """Return ``{dotted key: (self value, other value)}`` for settings that differ.

        Values are TOML data (None where a key is absent on one side).
        """
        mine, theirs = _flatten(self.to_dict()), _flatten(other.to_dict())
        return {key: (mine.get(key), theirs.get(key))
                for key in sorted(set(mine) | set(theirs))
                if not _data_equal(mine.get(key), theirs.get(key))}

    # documentation -----------------------------------------------------------------------

    @classmethod
    def describe(cls, *, plugins: bool = True, prefix: str = "") -> list[FieldHelp]:
        """Return one :class:`FieldHelp` row per settable key, for docs and the CLI.

        Parameters
        ----------
        plugins : bool, optional
            Expand registry fields into the settings of every registered algorithm (loads
            the plugins); otherwise only their ``name``/``names`` rows.
        prefix : str, optional
            Dotted prefix of the keys.

        Returns
        -------
        list of FieldHelp
            ``(key, type, default, doc)`` rows in declaration order.
        """
        rows: list[FieldHelp] = []
        for name, spec in cls._skydiff_fields.items():
            rows.extend(spec.help_rows(_join(prefix, name), plugins=plugins))
        return rows



def _parse_override_value(text: str) -> Any:
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    return parsed["v"] if list(parsed) == ["v"] else text


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, _join(prefix, key)))
        else:
            flat[_join(prefix, key)] = value
    return flat


def _data_equal(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return _same(a, b)


# -- field constructors ----------------------------------------------------------------------


def Field(default: Any, *, doc: str, dtype: type | None = None,
          check: Callable[[Any], bool] | None = None, optional: bool = False) -> Any:
    """Declare a scalar field (``int``, ``float``, ``str`` or ``bool``).

    Parameters
    ----------
    default : int, float, str, bool or None
        Default value (None only for an optional field, which must default to None).
    doc : str
        What the setting does (shown by ``skydiff config show`` and in the docs).
    dtype : {int, float, str, bool}, optional
        Value type; inferred from the annotation, else from the default. An int is accepted
        (and converted) for a float; a bool is never accepted for an int.
    check : callable, optional
        ``check(value) -> bool``; False rejects the value.
    optional : bool, optional
        Allow None.

    Returns
    -------
    attrs field
        To be assigned to an annotated class attribute of a :func:`configclass`.

    Raises
    ------
    ConfigError
        At class definition, if the doc is empty, the type cannot be inferred, or the
        default is invalid.
    """
    return _ValueSpec(default, doc=doc, dtype=dtype, check=check,
                      optional=optional).attrs_field()


def ChoiceField(default: Any, *, doc: str, allowed: Mapping[Any, str] | Sequence[Any],
                dtype: type | None = None, optional: bool = False) -> Any:
    """Declare a scalar field restricted to a closed set of values.

    Parameters
    ----------
    default : object
        Default value, one of ``allowed`` (None for an optional field).
    doc : str
        What the setting does.
    allowed : Mapping of value to str, or sequence
        The allowed values, each with its documentation when a mapping.
    dtype : {int, float, str, bool}, optional
        Inferred from the annotation, the default or the allowed values.
    optional : bool, optional
        Allow None.

    Returns
    -------
    attrs field

    Raises
    ------
    ConfigError
        At class definition, if ``allowed`` is empty or the default is not allowed.
    """
    return _ChoiceSpec(default, doc=doc, allowed=allowed, dtype=dtype,
                       optional=optional).attrs_field()


def RangeField(default: Any, *, doc: str, min: float | None = None, max: float | None = None,
               inclusive_min: bool = True, inclusive_max: bool = True,
               dtype: type | None = None, optional: bool = False) -> Any:
    """Declare an ``int`` or ``float`` field within bounds (NaN is always rejected).

    Parameters
    ----------
    default : int or float
        Default value, within the bounds.
    doc : str
        What the setting does.
    min, max : int or float, optional
        Bounds; None means unbounded.
    inclusive_min, inclusive_max : bool, optional
        Whether each bound is allowed (default: both, unlike pex_config whose maximum is
        exclusive by default).
    dtype : {int, float}, optional
        Inferred from the annotation, else from the default.
    optional : bool, optional
        Allow None.

    Returns
    -------
    attrs field

    Raises
    ------
    ConfigError
        At class definition, if the type is not int or float or the default is out of range.
    """
    return _RangeSpec(default, doc=doc, dtype=dtype, min=min, max=max,
                      inclusive_min=inclusive_min, inclusive_max=inclusive_max,
                      optional=optional).attrs_field()


def ListField(default: Sequence[Any] | None, *, doc: str, dtype: type | None = None,
              length: int | None = None, min_length: int | None = None,
              max_length: int | None = None, item_check: Callable[[Any], bool] | None = None,
              optional: bool = False) -> Any:
    """Declare a homogeneous list of scalars, stored as a tuple (TOML array).

    Parameters
    ----------
    default : sequence or None
        Default items (None only for an optional field, which must default to None).
    doc : str
        What the setting does.
    dtype : {int, float, str, bool}, optional
        Item type; inferred from an annotation like ``tuple[float, ...]``, else from the
        first default item.
    length, min_length, max_length : int, optional
        Constraints on the number of items.
    item_check : callable, optional
        ``item_check(item) -> bool``; False rejects the list.
    optional : bool, optional
        Allow None.

    Returns
    -------
    attrs field

    Raises
    ------
    ConfigError
        At class definition, if the item type cannot be inferred or the default is invalid.
    """
    return _ListSpec(default, doc=doc, dtype=dtype, length=length, min_length=min_length,
                     max_length=max_length, item_check=item_check,
                     optional=optional).attrs_field()


def ConfigField(dtype: type[Config], *, doc: str) -> Any:
    """Declare a nested config (a TOML table), defaulting to ``dtype()``.

    Assigning a config of that exact class adopts it (a copy if it belongs to another
    config); assigning a dict merges it into the current nested config.

    Parameters
    ----------
    dtype : type of Config
        The nested config class.
    doc : str
        What the group of settings is for.

    Returns
    -------
    attrs field

    Raises
    ------
    ConfigError
        At class definition, if ``dtype`` is not a Config subclass.
    """
    return _ConfigSpec(dtype, doc=doc).attrs_field()


def ConfigurableField(target: Callable[..., Any], *, doc: str,
                      ConfigClass: type[Config] | None = None) -> Any:
    """Declare a retargetable callable with its config (value: :class:`ConfigurableInstance`).

    Parameters
    ----------
    target : callable
        Default target, usually a :class:`skydiff.task.Task` subclass.
    doc : str
        What the target does.
    ConfigClass : type of Config, optional
        Config class; default ``target.ConfigClass``.

    Returns
    -------
    attrs field

    Raises
    ------
    ConfigError
        At class definition, if no Config subclass can be found for the target.
    """
    return _ConfigurableSpec(target, doc=doc, config_class=ConfigClass).attrs_field()


def RegistryField(role: str, *, default: str | Sequence[str] | None, doc: str,
                  multi: bool | None = None, optional: bool = False) -> Any:
    """Declare a choice among the algorithms registered for ``role``.

    The value is a :class:`RegistrySelection`. Assigning a string (or, for a multi field, a
    list) selects by name; assigning a dict merges ``name``/``names`` and per-algorithm
    tables.

    Parameters
    ----------
    role : str
        A key of :data:`skydiff.registry.ROLES`.
    default : str or sequence of str or None
        Initial selection (a list for a multi field; None only for an optional single field,
        which must default to None). Checked against the registry when first used, not at
        declaration, so declaring a config never loads plugins.
    doc : str
        What the step does.
    multi : bool, optional
        Select several algorithms; default: the role's ``multi`` (True for
        ``measurement``, ``dipole_classifier`` and ``metric``).
    optional : bool, optional
        Allow an empty selection.

    Returns
    -------
    attrs field

    Raises
    ------
    ConfigError
        At class definition, if the role is unknown or the default has the wrong shape.
    """
    return _RegistrySpec(role, default=default, doc=doc, multi=multi,
                         optional=optional).attrs_field()
