"""Tests of skydiff.io provenance records and atomic file replacement."""

from __future__ import annotations

import hashlib
import types
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

import skydiff
from skydiff._manager import PluginManager, use_manager
from skydiff.config import Config, Field, configclass
from skydiff.errors import InputError
from skydiff.exposure import Exposure
from skydiff.io import Provenance, atomic_path, read_provenance, write_exposure


@configclass
class _DemoConfig(Config):
    order: int = Field(2, doc="Spatial order.")
    mode: str = Field("auto", doc="Mode.")


def _exposure() -> Exposure:
    return Exposure(np.ones((3, 4)), variance=np.ones((3, 4)))


def test_collect_checksums_inputs_with_absolute_paths(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(201)
    first = tmp_path / "sci.fits"
    first.write_bytes(rng.bytes(5000))
    second = tmp_path / "ref.fits"
    second.write_bytes(rng.bytes(70))
    monkeypatch.chdir(tmp_path)
    prov = Provenance.collect(inputs=["sci.fits", second], plugins={"zogy": "0.2"})
    assert prov.inputs == (
        (str(first.resolve()), hashlib.sha256(first.read_bytes()).hexdigest()),
        (str(second.resolve()), hashlib.sha256(second.read_bytes()).hexdigest()),
    )
    assert prov.skydiff_version == skydiff.__version__
    assert prov.plugins == {"zogy": "0.2"}
    assert prov.input_paths == (str(first.resolve()), str(second.resolve()))


def test_collect_config_forms() -> None:
    config = _DemoConfig()
    config.order = 3
    assert Provenance.collect(config=config, plugins={}).config_toml == config.dump_toml()
    assert Provenance.collect(config={"a": 1, "b": {"c": "x"}}, plugins={}).config_toml == \
        'a = 1\n\n[b]\nc = "x"\n'
    text = 'name = "al"   \n\n'
    assert Provenance.collect(config=text, plugins={}).config_toml == text
    assert Provenance.collect(plugins={}).config_toml == ""


def test_collect_plugins_from_the_plugin_manager() -> None:
    module = types.ModuleType("skd_provenance_probe")
    # No built-ins and no entry points: only the probe is known.
    manager = PluginManager(builtin_modules=())
    manager.load(entry_points=False)
    with use_manager(manager):
        manager.register(module, name="probe", distribution="skydiff-probe", version="2.5")
        prov = Provenance.collect()
    assert prov.plugins == {"probe": "2.5"}


def test_collect_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"provenance input .*gone\.fits is not a file"):
        Provenance.collect(inputs=[tmp_path / "gone.fits"], plugins={})
    with pytest.raises(InputError, match="not valid TOML"):
        Provenance.collect(config="a = = 1", plugins={})
    with pytest.raises(InputError, match="cannot record a int as configuration"):
        Provenance.collect(config=5, plugins={})
    with pytest.raises(InputError, match="cannot be written as TOML"):
        Provenance.collect(config={"a": object()}, plugins={})
    with pytest.raises(InputError, match="not a SHA-256 hex digest"):
        Provenance(inputs=[("/x.fits", "abc")])
    with pytest.raises(InputError, match=r"\(path, sha256\) pairs"):
        Provenance(inputs=["/x.fits"])
    with pytest.raises(InputError, match="name → version pairs"):
        Provenance(plugins=["al"])
    with pytest.raises(InputError, match="invalid plugin name"):
        Provenance(plugins={"a=b": "1"})


def test_header_layout() -> None:
    digest = "0" * 64
    prov = Provenance(skydiff_version="1.2.3", plugins={"zogy": "0.2", "al": "1.0"},
                      inputs=[("/data/sci.fits", digest), ("/data/ref.fits", "f" * 64)])
    header = prov.to_header()
    assert list(header) == ["SKDFMT", "SKDVER", "NPLUGIN", "PLUG1", "PLUG2", "NINPUT", "INPUT1",
                            "INSHA1", "INPUT2", "INSHA2"]
    assert header["PLUG1"] == "al=1.0" and header["PLUG2"] == "zogy=0.2"  # sorted by name
    assert header["INPUT2"] == "/data/ref.fits" and header["INSHA1"] == digest
    assert prov.config_hdu() is None


def test_round_trip_through_a_file(tmp_path: Path) -> None:
    config_text = '# effective\n[subtract]\nname = "al"   \nnote = "ünïcode ✓"\n\n'
    inputs = [("/very/long/" + "d" * 120 + "/science image %41 Å.fits", "a" * 64)]
    prov = Provenance(plugins={"al": "1.0", "dipole": "0.1.dev3+g1234"},
                      config_toml=config_text, inputs=inputs)
    path = tmp_path / "out.fits"
    write_exposure(_exposure(), path, provenance=prov)
    read = read_provenance(path)
    assert read == prov
    assert read.config_toml == config_text  # trailing whitespace and unicode kept exactly
    assert read.inputs[0][0] == inputs[0][0]


def test_default_provenance_is_the_version_only(tmp_path: Path) -> None:
    path = tmp_path / "out.fits"
    write_exposure(_exposure(), path)
    assert read_provenance(path) == Provenance()
    with fits.open(path) as hdul:
        assert "PROVCONF" not in hdul


def test_read_provenance_errors(tmp_path: Path) -> None:
    plain = tmp_path / "plain.fits"
    fits.PrimaryHDU(np.ones((2, 2))).writeto(plain)
    with pytest.raises(InputError, match="has no skydiff provenance"):
        read_provenance(plain)
    with pytest.raises(InputError, match="does not exist"):
        read_provenance(tmp_path / "missing.fits")
    damaged = fits.PrimaryHDU()
    damaged.header["SKDVER"] = "1.0"
    damaged.header["NPLUGIN"] = 2
    damaged.header["PLUG1"] = "al=1"
    damaged.writeto(tmp_path / "count.fits")
    with pytest.raises(InputError, match="NPLUGIN=2 but 1 cards found"):
        read_provenance(tmp_path / "count.fits")
    orphan = fits.PrimaryHDU()
    orphan.header["SKDVER"] = "1.0"
    orphan.header["INPUT1"] = "/a.fits"
    orphan.writeto(tmp_path / "orphan.fits")
    with pytest.raises(InputError, match="INPUT1 has no INSHA1"):
        read_provenance(tmp_path / "orphan.fits")
    bad_plugin = fits.PrimaryHDU()
    bad_plugin.header["SKDVER"] = "1.0"
    bad_plugin.header["PLUG1"] = "noversion"
    bad_plugin.writeto(tmp_path / "plug.fits")
    with pytest.raises(InputError, match="is not 'name=version'"):
        read_provenance(tmp_path / "plug.fits")


def test_provenance_is_hashable_and_frozen() -> None:
    prov = Provenance(plugins={"al": "1"})
    assert hash(prov) == hash(Provenance(plugins={"al": "1"}))
    assert prov != Provenance(plugins={"al": "2"})


# ------------------------------------------------------------------------------------------
# atomic_path


def test_atomic_path_commits_on_success(tmp_path: Path) -> None:
    target = tmp_path / "result.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and not tmp.exists()
        tmp.write_text("done")
        assert not target.exists()
    assert target.read_text() == "done"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_path_rolls_back_on_error(tmp_path: Path) -> None:
    target = tmp_path / "result.txt"
    target.write_text("original")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target, overwrite=True) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "original"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_path_refusals(tmp_path: Path) -> None:
    target = tmp_path / "result.txt"
    target.write_text("original")
    with pytest.raises(InputError, match=r"result\.txt exists; pass overwrite=True"), \
            atomic_path(target):
        pass
    with pytest.raises(InputError, match="is a directory"), atomic_path(tmp_path):
        pass
    with pytest.raises(InputError, match="does not exist; create it first"), \
            atomic_path(tmp_path / "missing" / "x.txt"):
        pass
    with pytest.raises(InputError, match="nothing was written"), \
            atomic_path(tmp_path / "empty.txt"):
        pass
    assert not (tmp_path / "empty.txt").exists()


def test_atomic_path_never_clobbers_a_file_that_appears(tmp_path: Path) -> None:
    target = tmp_path / "race.txt"
    with pytest.raises(InputError, match="exists"), atomic_path(target) as tmp:
        tmp.write_text("mine")
        target.write_text("theirs")  # another process won the race
    assert target.read_text() == "theirs"
    assert list(tmp_path.iterdir()) == [target]
