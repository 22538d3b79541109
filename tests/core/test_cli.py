"""The ``skydiff`` command line: listing, configs, simulation, errors and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import skydiff
from skydiff.cli import main
from skydiff.io import read_catalog, read_exposure


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_plugins_lists_every_role_and_builtins(capsys):
    code, out, _ = run_cli(capsys, "plugins")
    assert code == 0
    for role in skydiff.ROLES:
        assert f"{role}:" in out
    assert "serial" in out and "processes" in out


def test_plugins_json_and_role_filter(capsys):
    code, out, _ = run_cli(capsys, "plugins", "--json", "--role", "executor")
    assert code == 0
    data = json.loads(out)
    assert {row["name"] for row in data["plugins"]} == {"serial", "processes"}
    assert all(row["distribution"] == "skydiff" for row in data["plugins"])
    assert data["load_errors"] == []


def test_plugins_unknown_role_is_one_line_error(capsys):
    code, out, err = run_cli(capsys, "plugins", "--role", "subtractoin")
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1 and "executor" in err


def test_config_show_round_trips_through_config_file(capsys, tmp_path):
    code, shown, _ = run_cli(capsys, "config", "show", "-c", "executor.name=processes",
                             "-c", "executor.processes.max_workers=3")
    assert code == 0
    path = tmp_path / "pipeline.toml"
    path.write_text(shown)
    loaded = skydiff.PipelineConfig.load_toml(path)
    assert loaded.executor.name == "processes"
    assert loaded.executor["processes"].max_workers == 3
    code, again, _ = run_cli(capsys, "config", "show", "--config", str(path))
    assert code == 0
    assert again == shown


def test_config_show_plugin(capsys):
    code, out, _ = run_cli(capsys, "config", "show", "--plugin", "executor:processes")
    assert code == 0
    assert "max_workers = 0" in out


@pytest.mark.parametrize("text, needle", [
    ("[executor]\nname = \"nonexistent\"\n", "serial"),      # unknown plugin lists valid names
    ("[executr]\nname = \"serial\"\n", "executor"),           # unknown key lists valid keys
    ("[executor.processes]\nmax_workers = -1\n", "max_workers"),  # bad value names the key
    ("[executor\n", "TOML"),                                  # not TOML at all
])
def test_config_validate_reports_one_line(capsys, tmp_path, text, needle):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    code, out, err = run_cli(capsys, "config", "validate", str(path))
    assert code == 1
    assert out == ""
    assert err.startswith("skydiff: error: ") and err.count("\n") == 1
    assert needle in err


def test_config_validate_accepts_valid_file(capsys, tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text("[executor]\nname = \"processes\"\n")
    code, out, _ = run_cli(capsys, "config", "validate", str(path))
    assert code == 0
    assert "valid" in out


def test_config_validate_missing_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "config", "validate", str(tmp_path / "missing.toml"))
    assert code == 1
    assert "missing.toml" in err


def test_debug_shows_traceback_instead(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[executr]\n")
    with pytest.raises(skydiff.ConfigError):
        main(["config", "validate", str(path), "--debug"])


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == 2


def test_sim_writes_pair_truth_and_config(capsys, tmp_path):
    out_dir = tmp_path / "sim"
    code, out, _ = run_cli(capsys, "sim", str(out_dir), "--shape", "96", "128", "--n-stars", "25",
                           "--n-transients", "3", "--seed", "7", "-c", "science.fwhm=3.5")
    assert code == 0
    assert "science.fits" in out
    science = read_exposure(out_dir / "science.fits")
    template = read_exposure(out_dir / "template.fits")
    truth = read_catalog(out_dir / "truth.ecsv")
    assert science.shape == template.shape == (96, 128)
    assert int(np.sum(truth["kind"] == "transient")) == 3
    assert science.psf is not None and science.psf.fwhm() == pytest.approx(3.5, rel=1e-3)
    # The written sim.toml reproduces the same pair.
    again = tmp_path / "again"
    code, _, _ = run_cli(capsys, "sim", str(again), "--config", str(out_dir / "sim.toml"))
    assert code == 0
    assert np.array_equal(read_exposure(again / "science.fits").image, science.image)


def test_sim_refuses_to_overwrite(capsys, tmp_path):
    args = ["sim", str(tmp_path), "--shape", "48", "48", "--n-stars", "5"]
    assert run_cli(capsys, *args)[0] == 0
    before = (tmp_path / "science.fits").read_bytes()
    code, _, err = run_cli(capsys, *args, "--seed", "3")
    assert code == 1 and "--overwrite" in err
    assert (tmp_path / "science.fits").read_bytes() == before
    assert run_cli(capsys, *args, "--seed", "3", "--overwrite")[0] == 0
    assert (tmp_path / "science.fits").read_bytes() != before


def test_sim_bad_override(capsys, tmp_path):
    code, _, err = run_cli(capsys, "sim", str(tmp_path), "-c", "science.fwhn=3")
    assert code == 1
    assert "fwhm" in err


def test_console_script_runs_as_a_process(tmp_path):
    # The installed entry point behaves like the in-process main (exit status, one-line error).
    result = subprocess.run([sys.executable, "-m", "skydiff", "plugins", "--role", "nope"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("skydiff: error:")
    assert "Traceback" not in result.stderr


def test_quiet_and_verbose_are_accepted_everywhere(capsys, tmp_path):
    assert run_cli(capsys, "-q", "plugins")[0] == 0
    assert run_cli(capsys, "plugins", "-v")[0] == 0


def test_core_never_imports_plugins():
    """The core package must not import skydiff_plugins (DESIGN.md section 2)."""
    import ast

    core = Path(skydiff.__file__).parent
    offenders = []
    for path in core.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names
                          if n.split(".")[0] == "skydiff_plugins"]
    assert offenders == []
