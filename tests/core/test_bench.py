"""``skydiff bench`` and :func:`skydiff.bench.run_benchmark` on small frames."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import skydiff
from skydiff.bench import (
    STAGES,
    TARGET_MEMORY_RATIO,
    TARGET_RFFT2_RATIO,
    BenchResult,
    StageResult,
    al_matching_kernel,
    benchmark_config,
    measure_rfft2,
    run_benchmark,
)
from skydiff.cli import main
from skydiff.errors import InputError

SMALL = (256, 512)

STAGE_FIELDS = {"name", "wall_s", "cpu_s", "peak_bytes", "peak_mb", "rfft2_ratio",
                "memory_ratio", "samples", "source", "note", "skipped"}
RESULT_FIELDS = {"size", "seed", "repeat", "rfft2_s", "rfft2_samples", "exposure_nbytes",
                 "exposure_mb", "stages", "targets", "machine", "notes"}
MACHINE_FIELDS = {"cores", "usable_cores", "platform", "python", "numpy", "scipy", "skydiff",
                  "load_before", "load_after"}


@pytest.fixture(scope="module")
def full_result() -> BenchResult:
    """Every stage on a 256x512 pair, with the built-in plugins."""
    messages: list[str] = []
    result = run_benchmark(size=SMALL, seed=1, repeat=1, progress=messages.append)
    assert messages and messages[0].startswith("simulating a 256x512 pair")
    return result


def _check_measured(stage: StageResult, exposure_nbytes: int, unit: float) -> None:
    assert not stage.skipped, stage.note
    assert stage.wall_s is not None and stage.wall_s > 0
    assert stage.cpu_s is not None and math.isfinite(stage.cpu_s)
    assert stage.rfft2_ratio == pytest.approx(stage.wall_s / unit)
    assert stage.peak_bytes is not None and stage.peak_bytes > 0
    assert stage.memory_ratio == pytest.approx(stage.peak_bytes / exposure_nbytes)
    assert len(stage.samples) >= 1 and all(t > 0 for t in stage.samples)
    assert stage.source


def test_benchmark_runs_every_stage_end_to_end(full_result):
    result = full_result
    assert result.size == SMALL
    assert result.seed == 1 and result.repeat == 1
    assert result.rfft2_s > 0 and len(result.rfft2_samples) >= 5
    assert result.exposure_nbytes == SMALL[0] * SMALL[1] * 12
    assert [stage.name for stage in result.stages] == list(STAGES)
    for stage in result.stages:
        _check_measured(stage, result.exposure_nbytes, result.rfft2_s)
    plugin_stages = ("preparation", "source_selection", "kernel_solve", "convolution",
                     "decorrelation", "subtraction")
    assert {result.stage(name).source for name in plugin_stages} == {"subtraction.al"}
    assert result.stage("psf_estimation").source == "psf_estimator.empirical"
    assert result.stage("kernel_convolution").source == "skydiff.convolve"
    assert result.stage("io").source == "skydiff.io"
    # the whole subtraction costs at least as much as each of its stages
    total = result.stage("subtraction")
    for name in plugin_stages[:-1]:
        assert result.stage(name).wall_s <= total.wall_s
        assert result.stage(name).peak_bytes <= total.peak_bytes
    with pytest.raises(KeyError):
        result.stage("nonsense")


def test_result_serialises_with_the_documented_fields(full_result):
    data = json.loads(json.dumps(full_result.to_dict()))
    assert set(data) == RESULT_FIELDS
    assert data["size"] == list(SMALL)
    assert MACHINE_FIELDS <= set(data["machine"])
    assert data["machine"]["cores"] >= 1
    for stage in data["stages"]:
        assert set(stage) == STAGE_FIELDS
    targets = data["targets"]
    assert targets["rfft2_target"] == TARGET_RFFT2_RATIO
    assert targets["memory_target"] == TARGET_MEMORY_RATIO
    assert targets["rfft2_ratio"] == pytest.approx(full_result.stage("subtraction").rfft2_ratio)
    assert isinstance(targets["time_ok"], bool) and isinstance(targets["memory_ok"], bool)


def test_table_lists_stages_units_and_machine(full_result):
    table = full_result.format_table()
    for name in STAGES:
        assert name in table
    assert "x rfft2" in table and "x exposure" in table and "peak MB" in table
    assert "256x512" in table and "machine:" in table and "targets" in table
    assert f"numpy {np.__version__}" in table


def test_missing_plugins_are_skipped_with_a_note():
    with skydiff.use_manager():  # an empty registry: no built-in plugins at all
        result = run_benchmark(size=(128, 192), stages=("psf_estimation", "kernel_solve",
                                                        "convolution", "io", "subtraction"))
    assert result.stage("psf_estimation").skipped
    assert "not registered" in result.stage("psf_estimation").note
    assert result.stage("kernel_solve").skipped and result.stage("subtraction").skipped
    # the convolution stage falls back to skydiff.convolve with a realistic AL kernel
    convolution = result.stage("convolution")
    assert not convolution.skipped and convolution.source == "skydiff.convolve"
    assert "stand-in" in convolution.note
    assert not result.stage("io").skipped
    assert any("'al' is not registered" in note for note in result.notes)
    assert result.targets["time_ok"] is None
    table = result.format_table()
    assert "skipped" in table and "not registered" in table


def test_selected_stages_only_and_no_memory():
    result = run_benchmark(size=(96, 160), stages=["kernel_convolution"], repeat=2,
                           trace_memory=False)
    assert [stage.name for stage in result.stages] == ["kernel_convolution"]
    stage = result.stage("kernel_convolution")
    assert len(stage.samples) == 2 and stage.wall_s > 0 and stage.rfft2_ratio > 0
    assert stage.peak_bytes is None and stage.memory_ratio is None
    assert "-" in result.format_table()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"size": (32, 512)}, "at least 64x64"),
    ({"size": (64,)}, "two integers"),
    ({"stages": ("convolution", "warp")}, "unknown stage"),
    ({"repeat": 0}, "positive integer"),
])
def test_invalid_arguments_raise_input_error(kwargs, match):
    with pytest.raises(InputError, match=match):
        run_benchmark(**kwargs)


def test_rfft2_unit_and_benchmark_config():
    unit, samples = measure_rfft2(np.zeros((64, 128)), n=3)
    assert unit > 0 and len(samples) == 3
    config = benchmark_config((2048, 4096))
    assert config.n_stars == 3000
    assert config.science.fwhm_gradient == (0.1, 0.0)
    assert config.offset != (0.0, 0.0) and config.flux_scale != 1.0
    small = benchmark_config(SMALL)
    assert small.shape == SMALL and small.n_stars >= 250


def test_al_matching_kernel_is_a_realistic_spatially_varying_kernel():
    config = benchmark_config((200, 300))
    kernel = al_matching_kernel(config, order=1)
    assert kernel.basis.shape == (27, 21, 21)
    assert kernel.is_spatially_varying
    assert kernel.sum == pytest.approx(config.flux_scale, rel=0.02)
    # wider at the right edge, where the science PSF is 10 % broader
    left = kernel.image_at(0.0, 100.0)
    right = kernel.image_at(299.0, 100.0)
    assert right.max() < left.max()
    with pytest.raises(InputError, match="odd"):
        al_matching_kernel(config, size=20)


# -- command line ---------------------------------------------------------------------------


def test_cli_bench_respects_size_and_writes_json_atomically(capsys, tmp_path):
    path = tmp_path / "bench.json"
    code = main(["bench", "--size", "128", "256", "--seed", "2", "--stages",
                 "kernel_convolution", "io", "--json", str(path)])
    out, err = capsys.readouterr()
    assert code == 0
    assert "bench: simulating a 128x256 pair" in err  # progress on stderr
    assert "kernel_convolution" in out and "bench: simulating" not in out
    data = json.loads(path.read_text())
    assert data["size"] == [128, 256] and data["seed"] == 2
    assert [stage["name"] for stage in data["stages"]] == ["kernel_convolution", "io"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]  # no temporaries
    # an existing file is never replaced without --overwrite
    code = main(["bench", "--size", "96", "128", "--stages", "io", "--json", str(path)])
    _, err = capsys.readouterr()
    assert code == 1 and "--overwrite" in err
    assert json.loads(path.read_text())["size"] == [128, 256]
    code = main(["bench", "-q", "--size", "96", "128", "--stages", "io", "--json", str(path),
                 "--overwrite"])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    assert json.loads(path.read_text())["size"] == [96, 128]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]


def test_a_failed_json_write_leaves_the_old_file_intact(tmp_path, monkeypatch):
    result = run_benchmark(size=(96, 128), stages=("kernel_convolution",), trace_memory=False)
    path = tmp_path / "bench.json"
    path.write_text("old")

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(json, "dumps", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        result.write_json(path, overwrite=True)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]


def test_cli_bench_rejects_bad_arguments(capsys):
    assert main(["bench", "--size", "16", "16"]) == 1
    assert "at least 64x64" in capsys.readouterr().err
    with pytest.raises(SystemExit) as excinfo:
        main(["bench", "--stages", "warp"])
    assert excinfo.value.code == 2
    capsys.readouterr()


def test_memory_tracer_keeps_outer_peaks_across_nested_stages():
    from skydiff.bench import _Tracer

    with _Tracer() as tracer:
        with tracer.stage("outer"):
            big = np.ones(1_000_000)  # 8 MB, freed before the inner stage
            del big
            with tracer.stage("inner"):
                small = np.ones(200_000)  # 1.6 MB
                del small
    assert 1.5e6 <= tracer.peaks["inner"] < 4e6
    assert tracer.peaks["outer"] >= 8e6  # the inner reset did not hide the outer peak
