"""Tasks: configured, named and logged units of work with metadata and timers.

A :class:`Task` subclass declares a ``ConfigClass`` and a ``default_name`` and implements
:meth:`Task.run`, which returns a frozen attrs result with named fields. Tasks compose: a
parent builds its subtasks with :meth:`Task.make_subtask` from a
:func:`~skydiff.config.ConfigurableField` or a :func:`~skydiff.config.RegistryField` of its
config, in the spirit of ``lsst.pipe.base.Task``.

Every task has a logger ``skydiff.<full name>`` and a :class:`TaskMetadata`, a nested dict of
scalars in which the metadata of each subtask is nested under its name.

Examples
--------
>>> import skydiff.config as sc
>>> @sc.configclass
... class ScaleConfig(sc.Config):
...     factor: float = sc.Field(2.0, doc="Multiplier.")
>>> class Scale(Task):
...     ConfigClass = ScaleConfig
...     default_name = "scale"
...     def run(self, value):
...         with self.timer("run"):
...             self.metadata["n_calls"] = 1
...             return value * self.config.factor
>>> task = Scale(ScaleConfig(factor=3))
>>> task.run(2.0), task.log.name, task.config.frozen
(6.0, 'skydiff.scale', True)
>>> sorted(task.metadata.to_dict()["run"])
['cpu_s', 'max_rss_mb', 'wall_s']
"""

from __future__ import annotations

import abc
import contextlib
import logging
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any, ClassVar

import numpy as np

from skydiff.config import Config, ConfigurableInstance, RegistrySelection
from skydiff.errors import ConfigError

try:
    import resource
except ImportError:  # pragma: no cover - not available on Windows
    resource = None  # type: ignore[assignment]

__all__ = ["Task", "TaskMetadata"]

_SCALARS = (bool, int, float, str)


def _metadata_value(value: Any, key: str) -> Any:
    """Return ``value`` in stored form: a scalar, a tuple of scalars or a TaskMetadata."""
    if isinstance(value, TaskMetadata):
        return value
    if isinstance(value, Mapping):
        return TaskMetadata(value)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, list | tuple) or (isinstance(value, np.ndarray) and value.ndim == 1):
        items = [item.item() if isinstance(item, np.generic) else item for item in value]
        if all(isinstance(item, _SCALARS) for item in items):
            return tuple(items)
    msg = (f"metadata {key!r}: values must be bool, int, float, str, a list of those or a "
           f"mapping; got {type(value).__name__}")
    raise TypeError(msg)


class TaskMetadata(MutableMapping[str, Any]):
    """Hierarchical task metadata: a nested dict whose leaves are scalars or lists of scalars.

    Dotted keys address nested levels: ``md["fit.n_stars"] = 12`` creates the level ``fit``.
    Assigning a mapping creates a nested level; assigning another :class:`TaskMetadata`
    nests it by reference (this is how a subtask's metadata appears under its name in its
    parent's). NumPy scalars are stored as Python scalars, sequences as tuples.

    Parameters
    ----------
    data : Mapping, optional
        Initial content.

    Raises
    ------
    TypeError
        On assignment of a value that is not a scalar, a list of scalars or a mapping, or of
        a nested key below a scalar.
    KeyError
        On reading or deleting a missing key.

    Examples
    --------
    >>> md = TaskMetadata()
    >>> md["fit.n_stars"] = 12
    >>> md["fit.sigmas"] = [0.5, 1.0]
    >>> md.to_dict()
    {'fit': {'n_stars': 12, 'sigmas': [0.5, 1.0]}}
    """

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        self._data: dict[str, Any] = {}
        if data is not None:
            self.update(data)

    @staticmethod
    def _split(key: str) -> list[str]:
        parts = key.split(".") if isinstance(key, str) else []
        if not parts or not all(parts):
            msg = f"metadata keys are non-empty dotted strings, got {key!r}"
            raise TypeError(msg)
        return parts

    def _parent_of(self, parts: list[str], key: str) -> TaskMetadata:
        node = self
        for part in parts[:-1]:
            child = node._data.get(part)
            if not isinstance(child, TaskMetadata):
                raise KeyError(key)
            node = child
        return node

    def __getitem__(self, key: str) -> Any:
        parts = self._split(key)
        try:
            return self._parent_of(parts, key)._data[parts[-1]]
        except KeyError:
            raise KeyError(key) from None

    def __setitem__(self, key: str, value: Any) -> None:
        parts = self._split(key)
        node = self
        for index, part in enumerate(parts[:-1]):
            child = node._data.get(part)
            if child is None:
                child = node._data[part] = TaskMetadata()
            elif not isinstance(child, TaskMetadata):
                msg = (f"metadata {'.'.join(parts[:index + 1])!r} holds a scalar; cannot set "
                       f"{key!r} below it")
                raise TypeError(msg)
            node = child
        node._data[parts[-1]] = _metadata_value(value, key)

    def __delitem__(self, key: str) -> None:
        parts = self._split(key)
        try:
            del self._parent_of(parts, key)._data[parts[-1]]
        except KeyError:
            raise KeyError(key) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"TaskMetadata({self.to_dict()!r})"

    def to_dict(self) -> dict[str, Any]:
        """Return plain nested dicts (lists for sequences), e.g. for JSON or FITS headers."""
        return {key: (value.to_dict() if isinstance(value, TaskMetadata)
                      else list(value) if isinstance(value, tuple) else value)
                for key, value in self._data.items()}


def _max_rss_mb() -> float | None:
    """Peak resident set size of this process so far, in MiB (None where unavailable)."""
    if resource is None:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in kibibytes on Linux and in bytes on macOS.
    return peak / 1024**2 if sys.platform == "darwin" else peak / 1024


class Task(abc.ABC):
    """Base class of configured units of work (algorithms and pipeline steps).

    Parameters
    ----------
    config : Config, optional
        An instance of ``ConfigClass``. Default: for a top-level task ``ConfigClass()``; for
        a subtask the config of the parent's field ``name`` (the active config of a
        :class:`~skydiff.config.RegistrySelection`, the config of a
        :class:`~skydiff.config.ConfigurableInstance`, or a nested config).
    name : str, optional
        Task name; default ``default_name``.
    parent : Task, optional
        The task this one is a subtask of.

    Attributes
    ----------
    config : Config
        The validated, frozen config. An unfrozen config passed in is copied first, so the
        caller's object is never modified.
    name : str
        Task name (for algorithm plugins, distinct from the registry name ``type(self).name``).
    full_name : str
        ``"<parent full name>.<name>"``, or ``name`` for a top-level task.
    parent : Task or None
        The parent task.
    log : logging.Logger
        Logger ``skydiff.<full_name>``.
    metadata : TaskMetadata
        Scalars recorded by the task; nested under ``name`` in the parent's metadata.

    Raises
    ------
    ConfigError
        If no name is available, the config is not a ``ConfigClass`` instance (or cannot be
        found on the parent), or it is invalid.

    Notes
    -----
    Subclasses set the class attributes ``ConfigClass`` and ``default_name`` and implement
    :meth:`run`. Configs are frozen once a task holds them, so a task's behaviour cannot
    change after construction.
    """

    ConfigClass: ClassVar[type[Config]] = Config
    default_name: ClassVar[str] = ""

    config: Config
    full_name: str
    parent: Task | None
    log: logging.Logger
    metadata: TaskMetadata

    _INSTANCE_ATTRIBUTES: ClassVar[frozenset[str]] = frozenset(
        {"config", "name", "full_name", "parent", "log", "metadata"})

    def __init__(self, config: Config | None = None, *, name: str | None = None,
                 parent: Task | None = None) -> None:
        task_name = name if name is not None else type(self).default_name
        if not isinstance(task_name, str) or not task_name:
            msg = (f"{type(self).__qualname__} has no name: set the class attribute "
                   f"default_name or pass name=")
            raise ConfigError(msg)
        full_name = f"{parent.full_name}.{task_name}" if parent is not None else task_name
        if config is None:
            config = (self.ConfigClass() if parent is None
                      else _config_from_parent(parent, task_name))
        if not isinstance(config, self.ConfigClass):
            msg = (f"{full_name}: {type(self).__qualname__} needs a "
                   f"{self.ConfigClass.__qualname__}, got {type(config).__qualname__}")
            raise ConfigError(msg)
        if not config.frozen:
            config = config.copy()
        config.validate()
        config.freeze()
        self.config = config
        self.name = task_name
        self.full_name = full_name
        self.parent = parent
        self.log = logging.getLogger(f"skydiff.{full_name}")
        self.metadata = TaskMetadata()
        if parent is not None:
            parent.metadata[task_name] = self.metadata

    @abc.abstractmethod
    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Do the work; return a frozen attrs result object with named fields.

        Role base classes (:mod:`skydiff.roles`) fix the exact signature and result type.
        """

    def make_subtask(self, name: str, **kwargs: Any) -> Any:
        """Build the subtask configured by the config field ``name`` and set ``self.<name>``.

        Parameters
        ----------
        name : str
            A :func:`~skydiff.config.ConfigurableField` or
            :func:`~skydiff.config.RegistryField` of this task's config.
        **kwargs
            Passed on to the subtask's constructor.

        Returns
        -------
        Task or dict of str to Task or None
            The subtask (``target(config=..., name=name, parent=self, **kwargs)``); for a
            multi-select registry field a dict ``{algorithm name: task}`` in selection order,
            each task named ``"<name>.<algorithm name>"``; None for an empty optional
            selection.

        Raises
        ------
        ConfigError
            If ``name`` is not such a field, or would shadow a Task attribute.
        """
        if name in self._INSTANCE_ATTRIBUTES or hasattr(type(self), name):
            msg = (f"{self.full_name}: a subtask named {name!r} would shadow a "
                   f"{type(self).__qualname__} attribute; rename the config field")
            raise ConfigError(msg)
        value = getattr(self.config, name, None)
        subtask: Any
        if isinstance(value, ConfigurableInstance):
            subtask = value.apply(name=name, parent=self, **kwargs)
        elif isinstance(value, RegistrySelection) and value.multi:
            subtask = {algorithm: target(config=value[algorithm], name=f"{name}.{algorithm}",
                                         parent=self, **kwargs)
                       for algorithm, target in zip(value.names, value.targets, strict=True)}
        elif isinstance(value, RegistrySelection):
            subtask = value.apply(name=name, parent=self, **kwargs)
        else:
            valid = sorted(field for field in type(self.config)._skydiff_fields
                           if isinstance(getattr(self.config, field),
                                         ConfigurableInstance | RegistrySelection))
            msg = (f"{self.full_name}: config field {name!r} is not a ConfigurableField or "
                   f"RegistryField of {type(self.config).__qualname__}; subtask fields: "
                   f"{', '.join(valid) or '<none>'}")
            raise ConfigError(msg)
        setattr(self, name, subtask)
        return subtask

    @contextlib.contextmanager
    def timer(self, name: str) -> Iterator[dict[str, float]]:
        """Time a block into ``metadata`` (also when the block raises).

        Records ``<name>.wall_s`` (wall-clock seconds), ``<name>.cpu_s`` (CPU seconds of the
        process) and ``<name>.max_rss_mb`` (peak resident memory of the process so far, MiB;
        not recorded where the :mod:`resource` module is missing). While :mod:`tracemalloc` is
        tracing (as ``skydiff bench`` does), ``<name>.peak_mb`` is the peak of traced memory
        allocated during the block above what was allocated when it started (MiB; numpy
        arrays are traced); nested timers each get their own correct peak. A repeated name
        overwrites the previous values.

        Parameters
        ----------
        name : str
            Metadata key (may be dotted).

        Yields
        ------
        dict of str to float
            Filled when the block ends with ``wall_s`` and ``cpu_s`` (the same values as
            the metadata), for callers that also report the timing elsewhere:
            ``with self.timer("convolve") as timings["convolve"]: ...``.
        """
        record: dict[str, float] = {}
        wall_start = time.perf_counter()
        cpu_start = time.process_time()
        peak = _PeakTracker.start()
        try:
            yield record
        finally:
            record["wall_s"] = time.perf_counter() - wall_start
            record["cpu_s"] = time.process_time() - cpu_start
            self.metadata[f"{name}.wall_s"] = record["wall_s"]
            self.metadata[f"{name}.cpu_s"] = record["cpu_s"]
            rss = _max_rss_mb()
            if rss is not None:
                self.metadata[f"{name}.max_rss_mb"] = rss
            if peak is not None:
                self.metadata[f"{name}.peak_mb"] = _PeakTracker.stop(peak) / 2**20

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} {getattr(self, 'full_name', '<unnamed>')!r}>"


class _PeakTracker:
    """Peak traced memory of nested blocks, although :mod:`tracemalloc` keeps one peak.

    Starting a block records the process-wide peak so far and resets it; a block's peak is
    then the largest of the current peak and every peak recorded by blocks that started
    inside it.
    """

    _lock = threading.Lock()
    _recorded: ClassVar[list[int]] = []
    _depth = 0

    @classmethod
    def start(cls) -> tuple[int, int] | None:
        if not tracemalloc.is_tracing():
            return None
        with cls._lock:
            current, peak = tracemalloc.get_traced_memory()
            cls._recorded.append(peak)
            cls._depth += 1
            tracemalloc.reset_peak()
            return current, len(cls._recorded)

    @classmethod
    def stop(cls, token: tuple[int, int]) -> int:
        current_at_start, n_recorded = token
        with cls._lock:
            peak = tracemalloc.get_traced_memory()[1] if tracemalloc.is_tracing() else 0
            peak = max([peak, *cls._recorded[n_recorded:]])
            cls._depth -= 1
            if cls._depth == 0:
                cls._recorded.clear()
            return max(peak - current_at_start, 0)


def _config_from_parent(parent: Task, name: str) -> Config:
    """The config of subtask ``name`` found on ``parent.config``."""
    value = getattr(parent.config, name, None)
    if isinstance(value, RegistrySelection) and not value.multi:
        value = value.active
    elif isinstance(value, ConfigurableInstance):
        value = value.config
    if not isinstance(value, Config):
        msg = (f"{parent.full_name}.{name}: {type(parent.config).__qualname__} has no "
               f"ConfigField, ConfigurableField or single RegistryField {name!r}; pass config=")
        raise ConfigError(msg)
    return value
