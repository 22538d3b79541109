"""Tests of skydiff.config: fields, validation, freezing, TOML persistence and selections."""

from __future__ import annotations

import importlib
import math
import pickle
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from skydiff._manager import PluginManager, use_manager
from skydiff.config import (
    ChoiceField,
    Config,
    ConfigField,
    ConfigurableField,
    ConfigurableInstance,
    Field,
    FieldHelp,
    ListField,
    RangeField,
    RegistryField,
    RegistrySelection,
    configclass,
)
from skydiff.errors import ConfigError
from skydiff.hookspecs import hookimpl
from skydiff.registry import Registries
from skydiff.task import Task

# -- configs and fake algorithms -----------------------------------------------------------


@configclass
class InnerConfig(Config):
    value: float = Field(0.0, doc="A float in a nested config.")
    label: str = Field("", doc="A string in a nested config.")


@configclass
class ScalarConfig(Config):
    order: int = Field(1, doc="Kernel order, 0 to 5.", check=lambda v: 0 <= v <= 5)
    scale: float = Field(1.5, doc="A float.")
    flag: bool = Field(False, doc="A bool.")
    text: str = Field("abc", doc="A string.")
    maybe: float | None = Field(None, doc="An optional float.", optional=True)
    mode: str = ChoiceField("convolveTemplate", doc="Which image to convolve.",
                            allowed={"convolveTemplate": "the template",
                                     "convolveScience": "the science image",
                                     "auto": "decide from the PSF widths"})
    level: int = ChoiceField(2, doc="A numeric choice.", allowed=[1, 2, 3])
    sigma: float = RangeField(0.7, doc="A width.", min=0.0, inclusive_min=False)
    fraction: float = RangeField(0.5, doc="A fraction.", min=0, max=1)
    count: int = RangeField(3, doc="A count below 10.", min=0, max=10, inclusive_max=False)
    sigmas: tuple[float, ...] = ListField((0.7, 1.5, 3.0), doc="Widths.", min_length=1,
                                          item_check=lambda v: v > 0)
    pair: tuple[int, ...] = ListField((1, 2), doc="Exactly two ints.", length=2)
    words: tuple[str, ...] = ListField((), doc="Some words.", dtype=str, max_length=3)
    inner: InnerConfig = ConfigField(InnerConfig, doc="A nested config.")


@configclass
class AlphaConfig(Config):
    kernel_order: int = Field(1, doc="Order of the fake kernel.", check=lambda v: 0 <= v <= 5)
    width: float = Field(2.0, doc="Width of the fake kernel.")


@configclass
class BetaConfig(Config):
    method: str = Field("fft", doc="Method of the fake algorithm.")
    inner: InnerConfig = ConfigField(InnerConfig, doc="Nested settings.")


@configclass
class MetricConfig(Config):
    threshold: float = Field(5.0, doc="Threshold of the fake metric.")


class FakeTask(Task):
    """Base of the fake algorithms: records how it was built."""

    def __init__(self, config: Config | None = None, *, name: str | None = None,
                 parent: Task | None = None, **extra: Any) -> None:
        super().__init__(config, name=name, parent=parent)
        self.extra = extra

    def run(self) -> str:
        return type(self).__name__


class Alpha(FakeTask):
    name = "alpha"
    ConfigClass = AlphaConfig


class Beta(FakeTask):
    name = "beta"
    ConfigClass = BetaConfig


class Counts(FakeTask):
    name = "counts"
    ConfigClass = MetricConfig
    order = 2


class Ratio(FakeTask):
    name = "ratio"
    ConfigClass = MetricConfig
    order = 1


class Zeta(FakeTask):
    name = "zeta"
    ConfigClass = MetricConfig
    order = 1


@hookimpl
def skydiff_register_algorithms(registries: Registries) -> None:
    registries.subtraction.add(Alpha)
    registries.subtraction.add(Beta)
    for cls in (Counts, Ratio, Zeta):
        registries.metric.add(cls)


FAKE_PLUGIN = types.ModuleType("skydiff_fake_config_plugin")
FAKE_PLUGIN.skydiff_register_algorithms = skydiff_register_algorithms  # type: ignore[attr-defined]


@configclass
class PipelineConfig(Config):
    subtract: RegistrySelection = RegistryField("subtraction", default="alpha",
                                                doc="The subtraction algorithm.")
    metrics: RegistrySelection = RegistryField("metric", default=("counts", "ratio"),
                                               doc="The metrics to compute.")
    maybe: RegistrySelection = RegistryField("subtraction", default=None, optional=True,
                                             doc="An optional extra subtraction.")
    stage: ConfigurableInstance = ConfigurableField(Alpha, doc="A configurable stage.")
    threshold: float = Field(5.0, doc="Detection threshold.")


@pytest.fixture(autouse=True)
def fake_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[PluginManager]:
    """An isolated plugin manager holding only the fake algorithms of this module."""
    try:
        roles = importlib.import_module("skydiff.roles")
    except ModuleNotFoundError:
        roles = None
    if roles is not None:
        monkeypatch.setattr(roles, "ROLE_BASES", {}, raising=False)
    with use_manager() as manager:
        manager.register(FAKE_PLUGIN, name="fake", distribution="skydiff-fake", version="0.1")
        yield manager


def mentions(error: pytest.ExceptionInfo[BaseException], *words: str) -> bool:
    """Whether the message contains every word, in the given order."""
    text = str(error.value)
    position = 0
    for word in words:
        position = text.find(word, position)
        if position < 0:
            return False
        position += len(word)
    return True


# -- scalar fields -------------------------------------------------------------------------


def test_defaults() -> None:
    config = ScalarConfig()
    assert config.order == 1
    assert config.scale == 1.5
    assert config.flag is False
    assert config.maybe is None
    assert config.sigmas == (0.7, 1.5, 3.0)
    assert isinstance(config.sigmas, tuple)
    assert config.inner == InnerConfig()


def test_keyword_construction() -> None:
    config = ScalarConfig(order=3, scale=2, sigmas=[1, 2])
    assert config.order == 3
    assert config.scale == 2.0
    assert isinstance(config.scale, float)
    assert config.sigmas == (1.0, 2.0)
    assert all(isinstance(v, float) for v in config.sigmas)
    with pytest.raises(TypeError):
        ScalarConfig(3)  # type: ignore[misc]  # keyword-only


def test_int_is_converted_for_float() -> None:
    config = ScalarConfig()
    config.scale = 3
    assert config.scale == 3.0
    assert isinstance(config.scale, float)


def test_numpy_scalars_are_converted() -> None:
    config = ScalarConfig()
    config.scale = np.float32(0.25)
    config.order = np.int64(2)
    config.flag = np.bool_(True)
    assert type(config.scale) is float and config.scale == 0.25
    assert type(config.order) is int and config.order == 2
    assert config.flag is True


@pytest.mark.parametrize(("key", "value"), [
    ("order", True), ("order", 1.0), ("order", "1"), ("order", 2**63),
    ("scale", "1.5"), ("scale", True), ("scale", 10**400),
    ("flag", 1), ("flag", "true"),
    ("text", 3), ("text", b"abc"),
    ("order", None), ("text", None),
])
def test_type_errors_name_the_key(key: str, value: Any) -> None:
    config = ScalarConfig()
    before = getattr(config, key)
    with pytest.raises(ConfigError) as error:
        setattr(config, key, value)
    assert mentions(error, key)
    assert getattr(config, key) == before


def test_type_error_at_construction() -> None:
    with pytest.raises(ConfigError) as error:
        ScalarConfig(order="high")
    assert mentions(error, "order")


def test_optional_accepts_none() -> None:
    config = ScalarConfig(maybe=2)
    assert config.maybe == 2.0
    config.maybe = None
    assert config.maybe is None


def test_check() -> None:
    config = ScalarConfig()
    config.order = 5
    with pytest.raises(ConfigError) as error:
        config.order = 6
    assert mentions(error, "order", "6")
    assert config.order == 5


def test_choice_field() -> None:
    config = ScalarConfig()
    config.mode = "auto"
    assert config.mode == "auto"
    with pytest.raises(ConfigError) as error:
        config.mode = "aotu"
    assert mentions(error, "mode", "aotu", "'auto'", "'convolveScience'", "'convolveTemplate'")
    config.level = 3
    with pytest.raises(ConfigError):
        config.level = 4
    with pytest.raises(ConfigError):
        config.level = "3"


@pytest.mark.parametrize(("key", "value", "ok"), [
    ("sigma", 1e-300, True), ("sigma", 0.0, False), ("sigma", -1.0, False),
    ("sigma", math.inf, True), ("sigma", math.nan, False),
    ("fraction", 0.0, True), ("fraction", 1.0, True), ("fraction", 1.0000001, False),
    ("fraction", -math.inf, False),
    ("count", 0, True), ("count", 9, True), ("count", 10, False), ("count", -1, False),
    ("count", 3.0, False),
])
def test_range_field(key: str, value: Any, ok: bool) -> None:
    config = ScalarConfig()
    if ok:
        setattr(config, key, value)
        assert getattr(config, key) == value
    else:
        with pytest.raises(ConfigError) as error:
            setattr(config, key, value)
        assert mentions(error, key)


def test_list_field() -> None:
    config = ScalarConfig()
    config.sigmas = np.array([1, 2.5])
    assert config.sigmas == (1.0, 2.5)
    config.words = ["a", "b"]
    assert config.words == ("a", "b")
    with pytest.raises(ConfigError) as error:
        config.sigmas = [1.0, "2"]
    assert mentions(error, "sigmas[1]")
    with pytest.raises(ConfigError) as error:
        config.sigmas = [1.0, -2.0]
    assert mentions(error, "sigmas[1]")
    for bad in ("1.0", 1.0, {"a": 1.0}, [], None):
        with pytest.raises(ConfigError) as error:
            config.sigmas = bad
        assert mentions(error, "sigmas")
    with pytest.raises(ConfigError):
        config.pair = [1, 2, 3]
    with pytest.raises(ConfigError):
        config.words = ["a", "b", "c", "d"]
    assert config.sigmas == (1.0, 2.5)


def test_unknown_attribute_lists_valid_keys() -> None:
    config = ScalarConfig()
    with pytest.raises(ConfigError) as error:
        config.sigmaa = 1.0
    assert mentions(error, "sigmaa", *sorted(attrs.fields_dict(ScalarConfig)))
    with pytest.raises(ConfigError) as error:
        config.inner.valeu = 1.0
    assert mentions(error, "inner.valeu", "label", "value")
    assert not hasattr(config, "sigmaa")


# -- declaration errors --------------------------------------------------------------------


def test_field_needs_doc() -> None:
    with pytest.raises(ConfigError, match="doc"):
        Field(1, doc="")
    with pytest.raises(ConfigError, match="doc"):
        Field(1, doc="   ")


def test_plain_attributes_are_refused() -> None:
    with pytest.raises(ConfigError) as error:
        @configclass
        class Plain(Config):
            size: int = 3
    assert mentions(error, "Plain.size")


@pytest.mark.parametrize("name", ["validate", "freeze", "to_dict", "frozen", "copy"])
def test_field_names_must_not_shadow_methods(name: str) -> None:
    namespace = {"__annotations__": {name: "int"}, name: Field(1, doc="Clash.")}
    cls = type("Clash", (Config,), namespace)
    with pytest.raises(ConfigError) as error:
        configclass(cls)
    assert mentions(error, name)


def test_private_field_names_are_refused() -> None:
    with pytest.raises(ConfigError):
        @configclass
        class Private(Config):
            _hidden: int = Field(1, doc="Hidden.")


def test_configclass_needs_a_config_subclass() -> None:
    class NotAConfig:
        pass

    with pytest.raises(ConfigError):
        configclass(NotAConfig)  # type: ignore[type-var]


def test_dtype_inference() -> None:
    @configclass
    class Inferred(Config):
        from_annotation: float = Field(1, doc="Annotated float, int default.")
        from_default = Field(2.5, doc="No annotation.")  # noqa: RUF100
        from_dtype: Any = Field(3, doc="Explicit dtype.", dtype=float)
        optional_annotation: int | None = Field(None, doc="Optional int.", optional=True)
        items: tuple[int, ...] = ListField((), doc="Ints from the annotation.")

    config = Inferred()
    assert config.from_annotation == 1.0 and isinstance(config.from_annotation, float)
    assert isinstance(config.from_dtype, float)
    config.optional_annotation = 4
    with pytest.raises(ConfigError):
        config.optional_annotation = 4.5
    config.items = [1, 2]
    with pytest.raises(ConfigError):
        config.items = [1.5]


@pytest.mark.parametrize("declare", [
    lambda: Field(None, doc="No type at all.", optional=True, dtype=None),
    lambda: Field(1.0, doc="Optional with a default.", optional=True),
    lambda: Field(7, doc="Invalid default.", check=lambda v: v < 5),
    lambda: Field("x", doc="Wrong default type.", dtype=int),
    lambda: ChoiceField("d", doc="Default not allowed.", allowed=["a", "b"]),
    lambda: RangeField(2.0, doc="Default out of range.", max=1.0),
    lambda: RangeField("a", doc="Not a number."),
    lambda: ListField((), doc="No item type."),
    lambda: ListField((1,), doc="Too short default.", min_length=2),
])
def test_invalid_declarations(declare: Any) -> None:
    namespace = {"__annotations__": {"field": "Any"}, "field": declare()}
    with pytest.raises(ConfigError) as error:
        configclass(type("Declared", (Config,), namespace))
    assert mentions(error, "Declared.field")


@pytest.mark.parametrize("declare", [
    lambda: Field(1, doc="Bad dtype.", dtype=complex),
    lambda: ListField((1,), doc="Bad dtype.", dtype=list),
    lambda: ChoiceField("a", doc="No allowed values.", allowed=[]),
    lambda: ChoiceField("a", doc="A string is not a collection here.", allowed="abc"),
    lambda: ConfigField(dict, doc="Not a config."),  # type: ignore[arg-type]
    lambda: ConfigurableField(object(), doc="Not callable."),  # type: ignore[arg-type]
    lambda: ConfigurableField(dict, doc="Callable without a ConfigClass."),
    lambda: RegistryField("subtractions", default="alpha", doc="Unknown role."),
    lambda: RegistryField("subtraction", default=None, doc="Required but empty."),
    lambda: RegistryField("subtraction", default="alpha", optional=True,
                          doc="Optional with a default."),
    lambda: RegistryField("subtraction", default=3, doc="Not a name."),  # type: ignore[arg-type]
    lambda: RegistryField("metric", default="counts", doc="Multi needs a list."),
    lambda: RegistryField("metric", default=["a", "a"], doc="Duplicated."),
    lambda: RegistryField("metric", default=[], doc="Empty but required."),
    lambda: RegistryField("metric", default=[1], doc="Not names."),
])
def test_invalid_field_constructors(declare: Any) -> None:
    with pytest.raises(ConfigError):
        declare()


# -- nested configs ------------------------------------------------------------------------


def test_nested_errors_name_the_dotted_path() -> None:
    config = ScalarConfig()
    with pytest.raises(ConfigError) as error:
        config.inner.value = "x"
    assert mentions(error, "inner.value")


def test_assigning_a_table_merges() -> None:
    config = ScalarConfig()
    inner = config.inner
    config.inner = {"value": 2}
    assert config.inner is inner
    assert config.inner.value == 2.0
    with pytest.raises(ConfigError) as error:
        config.inner = {"valu": 2}
    assert mentions(error, "inner.valu", "label", "value")
    with pytest.raises(ConfigError) as error:
        config.inner = 3
    assert mentions(error, "inner")


def test_assigning_a_config_adopts_or_copies() -> None:
    fresh = InnerConfig(value=3)
    config = ScalarConfig()
    config.inner = fresh
    assert config.inner is fresh
    other = ScalarConfig()
    other.inner = config.inner
    assert other.inner == fresh
    assert other.inner is not fresh
    other.inner.value = 4
    assert fresh.value == 3
    with pytest.raises(ConfigError):
        config.inner = BetaConfig()  # type: ignore[assignment]


def test_paths_follow_the_tree() -> None:
    config = ScalarConfig(inner=InnerConfig(label="x"))
    with pytest.raises(ConfigError) as error:
        config.inner.label = 1
    assert mentions(error, "inner.label")


# -- validate, freeze, copy, equality ------------------------------------------------------


@configclass
class CrossConfig(Config):
    low: float = Field(0.0, doc="Lower bound.")
    high: float = Field(1.0, doc="Upper bound.")

    def _validate(self) -> None:
        if self.low >= self.high:
            msg = f"low ({self.low}) must be below high ({self.high})"
            raise ConfigError(msg)


@configclass
class DerivedCrossConfig(CrossConfig):
    step: float = Field(0.1, doc="Step.")

    def _validate(self) -> None:
        if self.step > self.high - self.low:
            msg = "step larger than the interval"
            raise ConfigError(msg)


@configclass
class HolderConfig(Config):
    cross: DerivedCrossConfig = ConfigField(DerivedCrossConfig, doc="Nested cross checks.")


def test_validate_runs_every_hook_in_the_mro() -> None:
    config = DerivedCrossConfig()
    config.validate()
    config.low = 2.0
    with pytest.raises(ConfigError, match="below"):
        config.validate()
    config.low = 0.0
    config.step = 5.0
    with pytest.raises(ConfigError, match="step"):
        config.validate()


def test_validate_recurses() -> None:
    holder = HolderConfig()
    holder.validate()
    holder.cross.low = 5.0
    with pytest.raises(ConfigError):
        holder.validate()


def test_freeze_is_recursive() -> None:
    config = ScalarConfig()
    assert not config.frozen
    config.freeze()
    assert config.frozen and config.inner.frozen
    with pytest.raises(ConfigError) as error:
        config.order = 2
    assert mentions(error, "frozen", "order")
    with pytest.raises(ConfigError) as error:
        config.inner.value = 2.0
    assert mentions(error, "frozen", "inner.value")
    with pytest.raises(ConfigError):
        config.update(order=2)
    with pytest.raises(ConfigError):
        config.apply_overrides(["order=2"])
    assert config.order == 1


def test_copy_is_deep_and_unfrozen() -> None:
    config = ScalarConfig(order=4)
    config.inner.value = 1.0
    config.freeze()
    duplicate = config.copy()
    assert duplicate == config
    assert not duplicate.frozen and not duplicate.inner.frozen
    duplicate.inner.value = 2.0
    duplicate.order = 0
    assert config.inner.value == 1.0
    assert config.order == 4


def test_equality() -> None:
    assert ScalarConfig() == ScalarConfig()
    assert ScalarConfig(order=2) != ScalarConfig()
    assert ScalarConfig(maybe=math.nan) == ScalarConfig(maybe=math.nan)
    assert RoundTripConfig(numbers=[math.nan]) == RoundTripConfig(numbers=[math.nan])
    assert RoundTripConfig(numbers=[math.nan]) != RoundTripConfig(numbers=[1.0])
    assert RoundTripConfig(numbers=[1.0]) != RoundTripConfig(numbers=[1.0, 2.0])
    assert InnerConfig() != InnerConfig(label="x")
    assert CrossConfig() != DerivedCrossConfig()
    assert InnerConfig() != 3
    with pytest.raises(TypeError):
        hash(InnerConfig())


def test_update() -> None:
    config = ScalarConfig()
    config.update(order=2, inner={"label": "x"})
    assert (config.order, config.inner.label) == (2, "x")
    with pytest.raises(ConfigError) as error:
        config.update(ordre=2)
    assert mentions(error, "ordre")


def test_pickle_round_trip() -> None:
    config = ScalarConfig(order=3)
    config.inner.label = "é"
    config.freeze()
    restored = pickle.loads(pickle.dumps(config))
    assert restored == config
    assert restored.frozen
    with pytest.raises(ConfigError) as error:
        restored.inner.label = "x"
    assert mentions(error, "inner.label")


def test_diff() -> None:
    config = ScalarConfig()
    other = ScalarConfig(order=2, sigmas=[1.0], inner={"label": "x"})
    assert config.diff(other) == {"inner.label": ("", "x"), "order": (1, 2),
                                  "sigmas": ([0.7, 1.5, 3.0], [1.0])}
    assert config.diff(config.copy()) == {}
    assert config.diff(ScalarConfig(maybe=1.0)) == {"maybe": (None, 1.0)}


# -- dict and TOML persistence -------------------------------------------------------------


def test_to_dict_is_plain_data() -> None:
    data = ScalarConfig(maybe=None).to_dict()
    assert "maybe" not in data
    assert data["sigmas"] == [0.7, 1.5, 3.0]
    assert data["inner"] == {"value": 0.0, "label": ""}


def test_from_dict() -> None:
    config = ScalarConfig.from_dict({"order": 2, "inner": {"label": "x"}})
    assert config == ScalarConfig(order=2, inner={"label": "x"})
    assert ScalarConfig.from_dict({}) == ScalarConfig()


def test_from_dict_unknown_keys() -> None:
    with pytest.raises(ConfigError) as error:
        ScalarConfig.from_dict({"inner": {"lable": "x"}})
    assert mentions(error, "inner.lable", "label", "value")
    with pytest.raises(ConfigError) as error:
        ScalarConfig.from_dict({"inner": {"lable": "x"}}, path="steps.first")
    assert mentions(error, "steps.first.inner.lable")
    with pytest.raises(ConfigError) as error:
        ScalarConfig.from_dict({"order": "x"}, path="steps.first")
    assert mentions(error, "steps.first.order")
    # the prefix does not stick to the config
    config = ScalarConfig.from_dict({}, path="steps.first")
    with pytest.raises(ConfigError) as error:
        config.order = "x"
    assert not mentions(error, "steps")


def test_from_dict_needs_a_table() -> None:
    with pytest.raises(ConfigError):
        ScalarConfig.from_dict([("order", 1)])  # type: ignore[arg-type]


def test_toml_round_trip() -> None:
    config = ScalarConfig(order=2, scale=-0.0, sigmas=[1e-300, math.inf], text="π \"q\"\n")
    text = config.dump_toml()
    loaded = ScalarConfig.load_toml(text)
    assert loaded == config
    assert loaded.dump_toml() == text
    assert math.copysign(1.0, loaded.scale) == -1.0


def test_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    config = ScalarConfig(order=4)
    path.write_text(config.dump_toml(), encoding="utf-8")
    assert ScalarConfig.load_toml(path) == config
    assert ScalarConfig.load_toml(str(path)) == config


def test_toml_unknown_top_level_key_in_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('order = 2\nkernel = "al"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        ScalarConfig.load_toml(path)
    assert mentions(error, "bad.toml", "kernel", *sorted(attrs.fields_dict(ScalarConfig)))
    assert isinstance(error.value.__cause__, ConfigError)


def test_toml_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        ScalarConfig.load_toml(tmp_path / "missing.toml")
    assert mentions(error, "missing.toml")
    with pytest.raises(ConfigError) as error:
        ScalarConfig.load_toml(str(tmp_path / "missing.toml"))
    assert mentions(error, "missing.toml")
    with pytest.raises(ConfigError):
        ScalarConfig.load_toml("order = ")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError):
        ScalarConfig.load_toml(binary)
    with pytest.raises(ConfigError) as error:
        ScalarConfig.load_toml("order = 9")
    assert mentions(error, "order")


def test_config_files_are_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "evil.toml"
    path.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n",
                    encoding="utf-8")
    with pytest.raises(ConfigError):
        ScalarConfig.load_toml(path)
    assert not marker.exists()


def test_empty_toml_gives_defaults() -> None:
    assert ScalarConfig.load_toml("") == ScalarConfig()
    assert ScalarConfig.load_toml("# just a comment\n") == ScalarConfig()


# -- overrides -----------------------------------------------------------------------------


def test_overrides_are_parsed_as_toml_values() -> None:
    config = ScalarConfig()
    config.apply_overrides(["order=2", "scale = 1e-3", "flag=true", 'text="12"',
                            "sigmas=[1, 2.5]", "inner.label=hello world", "mode=auto",
                            "inner={value = 4}", "maybe=-inf"])
    assert config.order == 2
    assert config.scale == 1e-3
    assert config.flag is True
    assert config.text == "12"
    assert config.sigmas == (1.0, 2.5)
    assert config.inner.label == "hello world"
    assert config.inner.value == 4.0
    assert config.mode == "auto"
    assert config.maybe == -math.inf


def test_override_single_string_and_empty_value() -> None:
    config = ScalarConfig()
    config.apply_overrides("inner.label=")
    assert config.inner.label == ""
    config.apply_overrides("inner.label=a=b")
    assert config.inner.label == "a=b"


@pytest.mark.parametrize("override", ["order", "=2", "inner..value=1", "order.=1"])
def test_malformed_overrides(override: str) -> None:
    with pytest.raises(ConfigError):
        ScalarConfig().apply_overrides([override])


def test_override_errors_name_the_path() -> None:
    config = ScalarConfig()
    with pytest.raises(ConfigError) as error:
        config.apply_overrides(["inner.vlaue=1"])
    assert mentions(error, "inner.vlaue", "label", "value")
    with pytest.raises(ConfigError) as error:
        config.apply_overrides(["text=12"])
    assert mentions(error, "text")
    with pytest.raises(ConfigError) as error:
        config.apply_overrides(["order.sub=1"])
    assert mentions(error, "order")


@given(st.floats())
@example(-0.0)
@example(5e-324)
@example(1.7976931348623157e308)
def test_float_overrides_are_exact(value: float) -> None:
    config = InnerConfig()
    config.apply_overrides([f"value={value!r}"])
    assert math.isnan(value) if math.isnan(config.value) else config.value == value
    assert math.copysign(1.0, config.value) == math.copysign(1.0, value) or math.isnan(value)


# -- registry fields -----------------------------------------------------------------------


def test_construction_does_not_need_the_registry() -> None:
    with use_manager():  # nothing registered
        config = PipelineConfig()
        assert config.subtract.name == "alpha"
        with pytest.raises(ConfigError) as error:
            _ = config.subtract.active
        assert mentions(error, "subtract.alpha", "alpha")
        with pytest.raises(ConfigError) as error:
            config.validate()
        assert mentions(error, "subtract.name", "alpha")


def test_single_selection() -> None:
    config = PipelineConfig()
    selection = config.subtract
    assert selection.role == "subtraction"
    assert not selection.multi
    assert selection.name == "alpha"
    assert selection.names == ("alpha",)
    assert selection.target is Alpha
    assert selection.targets == (Alpha,)
    assert isinstance(selection.active, AlphaConfig)
    selection.name = "beta"
    assert isinstance(selection.active, BetaConfig)
    assert selection.target is Beta


def test_unknown_name_lists_registered_names() -> None:
    config = PipelineConfig()
    with pytest.raises(ConfigError) as error:
        config.subtract.name = "zogy"
    assert mentions(error, "subtract.name", "zogy", "alpha", "beta")
    with pytest.raises(ConfigError) as error:
        config.subtract = "zogy"
    assert mentions(error, "subtract.name", "zogy", "alpha", "beta")
    with pytest.raises(ConfigError) as error:
        config.subtract["zogy"]
    assert mentions(error, "subtract.zogy", "alpha", "beta")
    assert config.subtract.name == "alpha"


def test_configs_are_kept_per_algorithm() -> None:
    config = PipelineConfig()
    config.subtract["alpha"].kernel_order = 3
    config.subtract.name = "beta"
    config.subtract.active.method = "direct"
    config.subtract = "alpha"
    assert config.subtract.active.kernel_order == 3
    assert config.subtract["beta"].method == "direct"
    assert config.subtract["alpha"] is config.subtract["alpha"]


def test_selection_paths_in_errors() -> None:
    config = PipelineConfig()
    with pytest.raises(ConfigError) as error:
        config.subtract["alpha"].kernel_order = 9
    assert mentions(error, "subtract.alpha.kernel_order")
    with pytest.raises(ConfigError) as error:
        config.subtract["beta"].inner.value = "x"
    assert mentions(error, "subtract.beta.inner.value")


def test_required_single_selection_refuses_none() -> None:
    config = PipelineConfig()
    with pytest.raises(ConfigError) as error:
        config.subtract.name = None
    assert mentions(error, "subtract.name")
    with pytest.raises(ConfigError):
        config.subtract.name = 3  # type: ignore[assignment]


def test_optional_selection() -> None:
    config = PipelineConfig()
    assert config.maybe.name is None
    assert config.maybe.active is None
    assert config.maybe.target is None
    assert config.maybe.targets == ()
    assert config.maybe.apply(name="maybe") is None
    config.maybe.name = "beta"
    assert config.maybe.apply(name="maybe").config == config.maybe.active
    config.maybe.name = None
    assert config.maybe.name is None
    config.validate()


def test_multi_selection_is_ordered() -> None:
    config = PipelineConfig()
    selection = config.metrics
    assert selection.multi
    # orders: ratio 1, zeta 1, counts 2
    assert selection.names == ("ratio", "counts")
    selection.names = ["counts", "zeta", "ratio"]
    assert selection.names == ("ratio", "zeta", "counts")
    assert selection.targets == (Ratio, Zeta, Counts)
    assert [type(c) for c in selection.active] == [MetricConfig] * 3
    config.metrics = ["counts"]
    assert config.metrics.names == ("counts",)


@pytest.mark.parametrize("names", [[], "counts", ["counts", "counts"], ["counts", "nope"],
                                   [1], None])
def test_multi_selection_errors(names: Any) -> None:
    config = PipelineConfig()
    with pytest.raises(ConfigError) as error:
        config.metrics.names = names
    assert mentions(error, "metrics.names")
    assert config.metrics.names == ("ratio", "counts")


def test_name_and_names_are_not_interchangeable() -> None:
    config = PipelineConfig()
    with pytest.raises(ConfigError):
        _ = config.metrics.name
    with pytest.raises(ConfigError):
        config.metrics.name = "counts"
    with pytest.raises(ConfigError):
        config.subtract.names = ["alpha"]
    with pytest.raises(ConfigError) as error:
        config.update(subtract={"names": ["alpha"]})
    assert mentions(error, "subtract.names", "name")
    with pytest.raises(ConfigError) as error:
        config.update(metrics={"name": "counts"})
    assert mentions(error, "metrics.name", "names")


def test_apply() -> None:
    config = PipelineConfig()
    config.subtract["alpha"].kernel_order = 2
    task = config.subtract.apply(name="subtract", flavour="x")
    assert isinstance(task, Alpha)
    assert task.config == config.subtract.active
    assert task.extra == {"flavour": "x"}
    tasks = config.metrics.apply(name="metric")
    assert [type(t) for t in tasks] == [Ratio, Counts]


def test_registry_selection_toml_shape() -> None:
    config = PipelineConfig()
    config.subtract["beta"].method = "direct"   # differs from defaults: written
    config.subtract["alpha"]                    # default and inactive ... but active here
    config.metrics["zeta"]                      # inactive and default: not written
    data = config.to_dict()
    assert data["subtract"] == {"name": "alpha", "alpha": {"kernel_order": 1, "width": 2.0},
                                "beta": {"method": "direct",
                                         "inner": {"value": 0.0, "label": ""}}}
    assert data["metrics"] == {"names": ["ratio", "counts"],
                               "counts": {"threshold": 5.0}, "ratio": {"threshold": 5.0}}
    assert data["maybe"] == {}
    text = config.dump_toml()
    assert '[subtract]\nname = "alpha"\n' in text
    assert "[subtract.beta]" in text
    assert "[metrics.zeta]" not in text
    loaded = PipelineConfig.load_toml(text)
    assert loaded == config
    assert loaded.dump_toml() == text


def test_registry_selection_shorthands_in_toml() -> None:
    config = PipelineConfig.load_toml('subtract = "beta"\nmetrics = ["counts"]\n')
    assert config.subtract.name == "beta"
    assert config.metrics.names == ("counts",)


def test_registry_selection_toml_errors() -> None:
    with pytest.raises(ConfigError) as error:
        PipelineConfig.load_toml('[subtract]\nname = "zogy"\n')
    assert mentions(error, "subtract.name", "zogy", "alpha", "beta")
    with pytest.raises(ConfigError) as error:
        PipelineConfig.load_toml("[subtract.zogy]\nx = 1\n")
    assert mentions(error, "subtract.zogy", "alpha", "beta")
    with pytest.raises(ConfigError) as error:
        PipelineConfig.load_toml("[subtract.alpha]\nkernel_ordre = 1\n")
    assert mentions(error, "subtract.alpha.kernel_ordre", "kernel_order", "width")
    with pytest.raises(ConfigError) as error:
        PipelineConfig.load_toml("[subtract]\nalpha = 1\n")
    assert mentions(error, "subtract.alpha")
    with pytest.raises(ConfigError):
        PipelineConfig.load_toml("subtract = 1\n")


def test_registry_overrides() -> None:
    config = PipelineConfig()
    config.apply_overrides(["subtract.name=beta", "subtract.alpha.kernel_order=2",
                            "subtract.beta.inner.label=x", 'metrics.names=["zeta"]',
                            "metrics.zeta.threshold=1"])
    assert config.subtract.name == "beta"
    assert config.subtract["alpha"].kernel_order == 2
    assert config.subtract.active.inner.label == "x"
    assert config.metrics.names == ("zeta",)
    assert config.metrics.active[0].threshold == 1.0
    config.apply_overrides(["subtract=alpha"])
    assert config.subtract.name == "alpha"
    with pytest.raises(ConfigError) as error:
        config.apply_overrides(["subtract.name=zogy"])
    assert mentions(error, "subtract.name", "zogy", "alpha", "beta")


def test_registry_selection_equality() -> None:
    one, two = PipelineConfig(), PipelineConfig()
    one.subtract["beta"]  # a default config created lazily does not matter
    assert one == two
    two.subtract["beta"].method = "direct"
    assert one != two
    one.subtract["beta"].method = "direct"
    assert one == two
    one.metrics.names = ["counts", "ratio"]
    assert one == two
    one.metrics.names = ["counts"]
    assert one != two
    assert one.subtract != one.maybe
    assert one.subtract != "alpha"
    with pytest.raises(TypeError):
        hash(one.subtract)


def test_registry_selection_freeze_and_copy() -> None:
    config = PipelineConfig()
    config.subtract["alpha"].kernel_order = 2
    config.freeze()
    with pytest.raises(ConfigError) as error:
        config.subtract.name = "beta"
    assert mentions(error, "frozen", "subtract.name")
    with pytest.raises(ConfigError):
        config.metrics.names = ["counts"]
    with pytest.raises(ConfigError):
        config.subtract["alpha"].kernel_order = 3
    late = config.subtract["beta"]  # created after freezing: frozen too
    assert late.frozen
    with pytest.raises(ConfigError):
        late.method = "direct"
    duplicate = config.copy()
    assert duplicate == config
    duplicate.subtract.name = "beta"
    duplicate.subtract["alpha"].kernel_order = 4
    assert config.subtract.name == "alpha"
    assert config.subtract["alpha"].kernel_order == 2


def test_assigning_a_selection() -> None:
    source = PipelineConfig()
    source.subtract.name = "beta"
    target = PipelineConfig()
    target.subtract = source.subtract
    assert target.subtract == source.subtract
    assert target.subtract is not source.subtract
    target.subtract.name = "alpha"
    assert source.subtract.name == "beta"
    with pytest.raises(ConfigError):
        target.subtract = source.metrics
    standalone = RegistrySelection("subtraction", default="beta")
    target.maybe = standalone
    assert target.maybe is standalone
    with pytest.raises(ConfigError) as error:
        standalone.name = "nope"
    assert mentions(error, "maybe.name")


def test_registry_selection_validate() -> None:
    config = PipelineConfig()
    config.subtract["alpha"].kernel_order = 2
    config.validate()
    selection = RegistrySelection("metric", multi=True, default=["nope"])
    with pytest.raises(ConfigError):
        selection.validate()
    with pytest.raises(ConfigError):
        RegistrySelection("subtractions")
    assert "beta" in repr(RegistrySelection("subtraction", default="beta"))


# -- configurable fields -------------------------------------------------------------------


@configclass
class OtherConfig(Config):
    depth: int = Field(3, doc="Depth of the other stage.")


class Other(FakeTask):
    ConfigClass = OtherConfig


class AlphaVariant(FakeTask):
    ConfigClass = AlphaConfig


def test_configurable_forwarding() -> None:
    config = PipelineConfig()
    stage = config.stage
    assert stage.target is Alpha
    assert isinstance(stage.config, AlphaConfig)
    stage.kernel_order = 4
    assert stage.config.kernel_order == 4
    assert stage.kernel_order == 4
    with pytest.raises(ConfigError) as error:
        stage.kernel_order = 9
    assert mentions(error, "stage.kernel_order")
    with pytest.raises(ConfigError) as error:
        stage.kernal_order = 1
    assert mentions(error, "stage.kernal_order", "kernel_order", "width")
    with pytest.raises(AttributeError):
        _ = stage.no_such_setting
    assert "kernel_order" in dir(stage)
    for name in ("target", "config"):
        with pytest.raises(ConfigError):
            setattr(stage, name, Other)


def test_retarget() -> None:
    config = PipelineConfig()
    config.stage.kernel_order = 4
    config.stage.retarget(AlphaVariant)  # same ConfigClass: settings kept
    assert config.stage.target is AlphaVariant
    assert config.stage.kernel_order == 4
    config.stage.retarget(Other)  # new ConfigClass: fresh config
    assert isinstance(config.stage.config, OtherConfig)
    assert config.stage.depth == 3
    config.stage.retarget(Alpha, ConfigClass=OtherConfig)
    assert isinstance(config.stage.config, OtherConfig)
    with pytest.raises(ConfigError):
        config.stage.retarget(dict)


def test_configurable_apply_and_toml() -> None:
    config = PipelineConfig()
    config.stage.width = 7
    task = config.stage.apply(name="stage", flavour="y")
    assert isinstance(task, Alpha)
    assert task.config == config.stage.config
    assert task.extra == {"flavour": "y"}
    assert config.to_dict()["stage"] == {"kernel_order": 1, "width": 7.0}
    loaded = PipelineConfig.load_toml(config.dump_toml())
    assert loaded == config
    config.stage = {"kernel_order": 2}
    assert config.stage.kernel_order == 2
    with pytest.raises(ConfigError) as error:
        config.stage = Other
    assert mentions(error, "stage", "retarget")


def test_configurable_freeze_copy_equality() -> None:
    config = PipelineConfig()
    config.stage.retarget(Other)
    duplicate = config.copy()
    assert duplicate.stage.target is Other
    assert duplicate == config
    duplicate.stage.retarget(Alpha)
    assert duplicate != config
    config.freeze()
    with pytest.raises(ConfigError):
        config.stage.retarget(Alpha)
    with pytest.raises(ConfigError):
        config.stage.depth = 1
    unfrozen = config.copy()
    unfrozen.stage.depth = 1
    assert unfrozen.stage.depth == 1
    standalone = ConfigurableInstance(Other)
    assert standalone == ConfigurableInstance(Other)
    assert standalone != ConfigurableInstance(Alpha)
    assert "Other" in repr(standalone)
    with pytest.raises(TypeError):
        hash(standalone)


def test_configurable_pickle() -> None:
    config = PipelineConfig()
    config.stage.width = 3
    restored = pickle.loads(pickle.dumps(config))
    assert restored == config
    assert restored.stage.width == 3.0


# -- documentation rows --------------------------------------------------------------------


def test_describe_scalar_fields() -> None:
    rows = {row.key: row for row in ScalarConfig.describe()}
    assert all(isinstance(row, FieldHelp) for row in rows.values())
    assert list(rows)[:3] == ["order", "scale", "flag"]
    assert rows["order"] == FieldHelp("order", "int", 1, "Kernel order, 0 to 5.")
    assert rows["maybe"].type == "float | None"
    assert rows["sigma"].type == "float in (0.0, inf)"
    assert rows["fraction"].type == "float in [0.0, 1.0]"
    assert rows["count"].type == "int in [0, 10)"
    assert rows["sigmas"].default == [0.7, 1.5, 3.0]
    assert "list[float]" in rows["sigmas"].type
    assert "'auto'" in rows["mode"].type
    assert "the science image" in rows["mode"].doc
    assert rows["inner.label"] == FieldHelp("inner.label", "str", "",
                                            "A string in a nested config.")


def test_describe_registry_and_configurable_fields() -> None:
    rows = {row.key: row for row in PipelineConfig.describe()}
    assert rows["subtract.name"].default == "alpha"
    assert "alpha" in rows["subtract.name"].doc and "beta" in rows["subtract.name"].doc
    assert rows["subtract.alpha.kernel_order"].default == 1
    assert rows["subtract.beta.inner.value"].type == "float"
    assert rows["metrics.names"].default == ["counts", "ratio"]
    assert "metrics.zeta.threshold" in rows
    assert rows["stage.width"].default == 2.0
    assert rows["maybe.name"].default is None
    short = {row.key for row in PipelineConfig.describe(plugins=False)}
    assert "subtract.name" in short
    assert not any(key.startswith("subtract.alpha") for key in short)


# -- TOML round trip property --------------------------------------------------------------


@configclass
class RoundTripConfig(Config):
    number: float = Field(1.0, doc="Any float.")
    integer: int = Field(0, doc="Any 64-bit int.")
    switch: bool = Field(False, doc="Any bool.")
    text: str = Field("", doc="Any text.")
    maybe: float | None = Field(None, doc="Optional float.", optional=True)
    numbers: tuple[float, ...] = ListField((), doc="Floats.", dtype=float)
    texts: tuple[str, ...] = ListField((), doc="Texts.", dtype=str)
    inner: InnerConfig = ConfigField(InnerConfig, doc="Nested.")
    subtract: RegistrySelection = RegistryField("subtraction", default="alpha", doc="Choice.")
    metrics: RegistrySelection = RegistryField("metric", default=["counts"], doc="Multi.",
                                               optional=True)


FLOATS = st.one_of(st.floats(), st.sampled_from([-0.0, 5e-324, 1.7976931348623157e308,
                                                 -math.inf, 1e16, 1e-7]))
INTS = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@st.composite
def round_trip_configs(draw: st.DrawFn) -> RoundTripConfig:
    config = RoundTripConfig(
        number=draw(FLOATS), integer=draw(INTS), switch=draw(st.booleans()),
        text=draw(st.text()), maybe=draw(st.none() | FLOATS),
        numbers=draw(st.lists(FLOATS, max_size=4)),
        texts=draw(st.lists(st.text(max_size=8), max_size=3)),
        inner={"value": draw(FLOATS), "label": draw(st.text(max_size=8))},
    )
    config.subtract.name = draw(st.sampled_from(["alpha", "beta"]))
    if draw(st.booleans()):
        config.subtract["alpha"].width = draw(FLOATS)
    if draw(st.booleans()):
        config.subtract["beta"].inner.label = draw(st.text(max_size=8))
    config.metrics.names = draw(st.lists(st.sampled_from(["counts", "ratio", "zeta"]),
                                         unique=True))
    if draw(st.booleans()):
        config.metrics["zeta"].threshold = draw(FLOATS)
    return config


@given(round_trip_configs())
def test_toml_round_trip_property(config: RoundTripConfig) -> None:
    text = config.dump_toml()
    loaded = RoundTripConfig.load_toml(text)
    assert loaded == config
    assert loaded.dump_toml() == text
    assert RoundTripConfig.from_dict(config.to_dict()) == config
    assert loaded.copy() == config
