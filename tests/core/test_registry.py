"""Tests of skydiff.registry: roles, per-role registries and provider attribution."""

from __future__ import annotations

import importlib
import sys

import pytest

import skydiff.registry as registry_module
from skydiff.config import Config, Field, configclass
from skydiff.errors import ConfigError, PluginLoadError
from skydiff.registry import ROLES, PluginInfo, Provider, Registries, Registry, providing
from skydiff.task import Task


@configclass
class AlphaConfig(Config):
    gain: float = Field(1.0, doc="Gain applied by the fake algorithm.")


class Alpha(Task):
    """Fake algorithm used to test registration.

    Second paragraph, not part of the summary.
    """

    name = "alpha"
    ConfigClass = AlphaConfig
    tags = frozenset({"needs_psf", "linear"})
    order = 2

    def run(self) -> float:
        return self.config.gain


class Beta(Task):
    name = "beta"
    ConfigClass = AlphaConfig

    def run(self) -> float:
        return 0.0


class Gamma(Task):
    name = "gamma"
    ConfigClass = AlphaConfig
    order = 1

    def run(self) -> float:
        return 0.0


@pytest.fixture(autouse=True)
def no_role_bases(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the fake Task subclasses register whatever role base classes skydiff.roles has."""
    try:
        roles = importlib.import_module("skydiff.roles")
    except ModuleNotFoundError:
        return
    monkeypatch.setattr(roles, "ROLE_BASES", {}, raising=False)


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


def test_roles_table() -> None:
    assert set(ROLES) == {"psf_estimator", "kernel_basis", "subtraction", "decorrelation",
                          "detection", "measurement", "dipole_classifier", "metric",
                          "template_getter", "executor"}
    assert {name for name, info in ROLES.items() if info.multi} == {
        "measurement", "dipole_classifier", "metric"}
    assert all(info.name == name and info.doc for name, info in ROLES.items())
    with pytest.raises(TypeError):
        ROLES["new_role"] = ROLES["metric"]  # type: ignore[index]


def test_add_reads_class_attributes() -> None:
    registry = Registry("subtraction")
    entry = registry.add(Alpha)
    assert isinstance(entry, PluginInfo)
    assert entry.name == "alpha"
    assert entry.role == "subtraction"
    assert entry.target is Alpha
    assert entry.ConfigClass is AlphaConfig
    assert entry.tags == frozenset({"needs_psf", "linear"})
    assert entry.order == 2.0
    assert entry.doc == "Fake algorithm used to test registration."
    assert registry["alpha"] is entry


def test_add_defaults_for_optional_attributes() -> None:
    entry = Registry("metric").add(Beta)
    assert entry.tags == frozenset()
    assert entry.order == 0.0
    assert entry.doc == ""


def test_provider_outside_a_hook_is_the_module() -> None:
    entry = Registry("subtraction").add(Alpha)
    assert entry.provider == Alpha.__module__
    assert entry.distribution is None
    assert entry.version is None


def test_provider_is_taken_from_the_context() -> None:
    registry = Registry("subtraction")
    provider = Provider("fake", "skydiff-fake", "1.2")
    with providing(provider):
        entry = registry.add(Alpha)
    after = registry.add(Beta)
    assert (entry.provider, entry.distribution, entry.version) == ("fake", "skydiff-fake", "1.2")
    assert entry.provided_by == provider
    assert after.distribution is None


def test_name_override() -> None:
    registry = Registry("subtraction")
    registry.add(Alpha, name="alpha_two")
    assert registry.names() == ("alpha_two",)


@pytest.mark.parametrize("name", [None, "", "Alpha", "2fast", "has-dash", "name", "names", 3])
def test_invalid_names_are_refused(name: object) -> None:
    class Nameless(Task):
        ConfigClass = AlphaConfig

        def run(self) -> None:
            return None

    Nameless.name = name  # type: ignore[attr-defined]
    registry = Registry("subtraction")
    with pytest.raises(ConfigError):
        registry.add(Nameless)
    assert len(registry) == 0


def test_non_class_target_is_refused() -> None:
    with pytest.raises(ConfigError, match="classes"):
        Registry("subtraction").add(AlphaConfig())  # type: ignore[arg-type]


@pytest.mark.parametrize("config_class", [None, dict, "AlphaConfig", AlphaConfig()])
def test_config_class_must_be_a_config_subclass(config_class: object) -> None:
    class Bad(Task):
        name = "bad"

        def run(self) -> None:
            return None

    Bad.ConfigClass = config_class  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="ConfigClass"):
        Registry("subtraction").add(Bad)


@pytest.mark.parametrize(("attribute", "value"),
                         [("tags", "needs_psf"), ("tags", [1]), ("order", True),
                          ("order", "1")])
def test_tags_and_order_are_checked(attribute: str, value: object) -> None:
    class Bad(Task):
        name = "bad"
        ConfigClass = AlphaConfig

        def run(self) -> None:
            return None

    setattr(Bad, attribute, value)
    with pytest.raises(ConfigError, match=attribute):
        Registry("subtraction").add(Bad)


def test_duplicate_names_both_distributions() -> None:
    registry = Registry("subtraction")
    with providing(Provider("first", "skydiff-first", "1.0")):
        registry.add(Alpha)
    with providing(Provider("second", "skydiff-second", "2.0")), \
            pytest.raises(ConfigError) as error:
        registry.add(Beta, name="alpha")
    assert mentions(error, "alpha", "skydiff-first", "skydiff-second")
    assert registry["alpha"].target is Alpha


def test_unknown_name_lists_sorted_valid_names() -> None:
    registry = Registry("subtraction")
    for cls in (Gamma, Alpha, Beta):
        registry.add(cls)
    with pytest.raises(ConfigError) as error:
        registry["zogy"]
    assert mentions(error, "zogy", "alpha", "beta", "gamma")
    with pytest.raises(ConfigError) as error:
        registry.lookup("zogy", path="subtract.name")
    assert mentions(error, "subtract.name", "zogy", "alpha", "beta", "gamma")
    with pytest.raises(ConfigError):
        registry.lookup(["unhashable"])  # type: ignore[arg-type]


def test_unknown_name_in_empty_registry() -> None:
    with pytest.raises(ConfigError, match="zogy"):
        Registry("subtraction")["zogy"]


def test_mapping_like_access() -> None:
    registry = Registry("metric")
    for cls in (Gamma, Alpha, Beta):
        registry.add(cls)
    assert "alpha" in registry
    assert "delta" not in registry
    assert list(registry) == ["alpha", "beta", "gamma"]
    assert registry.names() == ("alpha", "beta", "gamma")
    assert [name for name, _ in registry.items()] == ["alpha", "beta", "gamma"]
    assert len(registry) == 3
    assert registry.get("beta") is registry["beta"]
    assert registry.get("delta") is None
    assert "alpha" in repr(registry)


def test_remove() -> None:
    registry = Registry("metric")
    registry.add(Alpha)
    removed = registry.remove("alpha")
    assert removed.target is Alpha
    assert "alpha" not in registry
    with pytest.raises(ConfigError):
        registry.remove("alpha")


def test_ordered_by_order_then_name() -> None:
    registry = Registry("metric")
    for cls in (Alpha, Beta, Gamma):
        registry.add(cls)
    # orders: beta 0, gamma 1, alpha 2
    assert registry.ordered(["alpha", "gamma", "beta"]) == ("beta", "gamma", "alpha")
    registry.add(Beta, name="aaa")  # order 0, sorts before beta by name
    assert registry.ordered(["beta", "aaa"]) == ("aaa", "beta")
    with pytest.raises(ConfigError) as error:
        registry.ordered(["alpha", "nope"], path="metrics.names")
    assert mentions(error, "metrics.names", "nope")


def test_unknown_role() -> None:
    with pytest.raises(ConfigError) as error:
        Registry("subtractions")
    assert mentions(error, "subtractions", "decorrelation", "subtraction")


def test_role_base_class_is_enforced(monkeypatch: pytest.MonkeyPatch) -> None:
    class SubtractionBase(Task):
        def run(self) -> None:
            return None

    class Good(SubtractionBase):
        name = "good"
        ConfigClass = AlphaConfig

    roles = importlib.import_module("skydiff.roles")
    monkeypatch.setattr(roles, "ROLE_BASES", {"subtraction": SubtractionBase}, raising=False)
    registry = Registry("subtraction")
    assert registry.add(Good).target is Good
    with pytest.raises(ConfigError, match="SubtractionBase"):
        registry.add(Alpha)
    # a role without a base class accepts any Task
    assert Registry("metric").add(Alpha).target is Alpha


def test_role_base_check_skipped_without_roles_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "skydiff.roles", None)
    assert Registry("subtraction").add(Alpha).target is Alpha


def test_role_base_check_skipped_without_table(monkeypatch: pytest.MonkeyPatch) -> None:
    roles = importlib.import_module("skydiff.roles")
    monkeypatch.delattr(roles, "ROLE_BASES", raising=False)
    assert Registry("subtraction").add(Alpha).target is Alpha


def test_role_base_check_does_not_hide_other_import_errors(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_import(name: str) -> None:
        raise ModuleNotFoundError("No module named 'numpyy'", name="numpyy")

    monkeypatch.setattr(registry_module.importlib, "import_module", broken_import)
    with pytest.raises(ModuleNotFoundError):
        Registry("subtraction").add(Alpha)


def test_registries_one_registry_per_role() -> None:
    registries = Registries()
    assert list(registries) == list(ROLES)
    assert registries.roles() == tuple(ROLES)
    for role in ROLES:
        assert isinstance(registries[role], Registry)
        assert registries[role] is getattr(registries, role)
        assert registries[role].role == role
    assert registries.load_errors == []
    assert "subtraction=0" in repr(registries)
    with pytest.raises(ConfigError) as error:
        registries["subtract"]
    assert mentions(error, "subtract", "decorrelation", "subtraction")


def test_registries_provider_queries() -> None:
    registries = Registries()
    with providing(Provider("one", "dist-one")):
        registries.subtraction.add(Alpha)
        registries.metric.add(Beta)
        registries.metric.add(Gamma)
    with providing(Provider("two", "dist-two")):
        registries.subtraction.add(Beta)
    assert registries.provided_by("one") == {"subtraction": ("alpha",),
                                             "metric": ("beta", "gamma")}
    assert registries.provided_by("two") == {"subtraction": ("beta",)}
    assert registries.provided_by("three") == {}
    registries.remove_provider("one")
    assert registries.subtraction.names() == ("beta",)
    assert registries.metric.names() == ()


def test_load_errors_is_a_plain_list() -> None:
    registries = Registries()
    error = PluginLoadError("broken", plugin="p", distribution="d")
    registries.load_errors.append(error)
    assert registries.load_errors == [error]
    assert Registries().load_errors == []
