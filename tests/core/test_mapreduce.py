"""Tests of skydiff.mapreduce: grids of overlapping cells and seamless stitching."""

from __future__ import annotations

import numpy as np
import pytest

import skydiff
from skydiff.mapreduce import BLEND_MODES, make_grid, map_reduce


def _image(shape: tuple[int, int], seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _identity(cutout: np.ndarray, cell: skydiff.Cell) -> dict[str, np.ndarray]:
    return {"image": np.array(cutout)}


@pytest.mark.parametrize("shape", [(100, 150), (64, 64), (7, 300), (1, 1)])
@pytest.mark.parametrize(("cell_size", "border"), [(32, 8), (40, 0), ((16, 50), (3, 20))])
def test_cells_tile_the_image(shape: tuple[int, int], cell_size: int | tuple[int, int],
                              border: int | tuple[int, int]) -> None:
    grid = make_grid(shape, cell_size=cell_size, border=border)
    cover = np.zeros(shape, dtype=int)
    size = np.broadcast_to(cell_size, 2)
    grow = np.broadcast_to(border, 2)
    for cell in grid:
        cover[cell.inner] += 1
        (r0, r1), (c0, c1) = ((s.start, s.stop) for s in cell.inner)
        assert 0 < r1 - r0 <= size[0] and 0 < c1 - c0 <= size[1]
        # outer = inner grown by the border, clipped to the image
        assert cell.outer[0] == slice(max(r0 - grow[0], 0), min(r1 + grow[0], shape[0]))
        assert cell.outer[1] == slice(max(c0 - grow[1], 0), min(c1 + grow[1], shape[1]))
        inner = cell.inner_in_outer
        assert inner[0].stop - inner[0].start == r1 - r0
    assert np.all(cover == 1)
    assert len(grid) == grid.n_cells[0] * grid.n_cells[1]


def test_edge_cells_are_clipped() -> None:
    grid = make_grid((100, 90), cell_size=30, border=10)
    first, last = grid.cells[0], grid.cells[-1]
    assert first.outer[0].start == 0 and first.outer[1].start == 0
    assert last.outer[0].stop == 100 and last.outer[1].stop == 90
    assert first.outer_shape == (first.inner[0].stop + 10, first.inner[1].stop + 10)
    # near-equal cells, no sliver at the end
    assert grid.row_edges == (0, 25, 50, 75, 100)
    assert np.ptp(np.diff(grid.col_edges)) <= 1


@pytest.mark.parametrize("blend", BLEND_MODES)
def test_identity_reproduces_image_exactly(blend: str) -> None:
    image = _image((97, 131))
    out = map_reduce(image, _identity, cell_size=30, border=9, blend=blend)
    assert isinstance(out, dict)
    assert out["image"].dtype == np.float32
    np.testing.assert_array_equal(out["image"], image)


@pytest.mark.parametrize("blend", BLEND_MODES)
def test_exposure_identity(blend: str) -> None:
    rng = np.random.default_rng(5)
    mask = (rng.random((80, 70)) < 0.05).astype(np.uint32)
    exposure = skydiff.Exposure(_image((80, 70)), mask, rng.random((80, 70)) + 1.0,
                                origin=(100, 200))
    seen = []

    def check_origin(cutout: skydiff.Exposure, cell: skydiff.Cell) -> skydiff.Exposure:
        seen.append(cutout.origin == (100 + cell.outer[1].start, 200 + cell.outer[0].start))
        return cutout

    out = map_reduce(exposure, check_origin, cell_size=25, border=6, blend=blend)
    assert all(seen) and len(seen) == 12
    assert isinstance(out, skydiff.Exposure)
    np.testing.assert_array_equal(out.image, exposure.image)
    np.testing.assert_array_equal(out.variance, exposure.variance)
    # "copy" pastes the inner masks; the blends OR overlapping copies of the same mask
    np.testing.assert_array_equal(out.mask, exposure.mask)
    assert out.origin == exposure.origin


def test_mapping_input_and_integer_outputs() -> None:
    image = _image((60, 60))
    flags = np.zeros((60, 60), dtype=np.uint32)
    flags[10, 10] = 4

    def function(cut: dict[str, np.ndarray], cell: skydiff.Cell) -> dict[str, np.ndarray]:
        assert not cut["image"].flags.writeable
        return {"twice": 2 * cut["image"], "flags": cut["flags"] | 1,
                "seen": np.ones(cut["image"].shape, dtype=bool)}

    out = map_reduce({"image": image, "flags": flags}, function, cell_size=20, border=5)
    assert isinstance(out, dict)
    np.testing.assert_array_equal(out["twice"], 2 * image)
    assert out["flags"].dtype == np.uint32 and out["flags"][10, 10] == 5
    assert np.all(out["flags"] & 1) and out["seen"].all()


def _cell_scalar(cutout: np.ndarray, cell: skydiff.Cell) -> dict[str, np.ndarray]:
    row, col = cell.center
    value = 0.01 * row + 0.02 * col  # smooth in position, constant within a cell
    return {"value": np.full(cutout.shape, value, dtype=np.float32)}


def test_taper_leaves_no_seams() -> None:
    shape, cell, border = (240, 300), 60, 16
    taper = map_reduce(np.zeros(shape, np.float32), _cell_scalar, cell_size=cell,
                       border=border, blend="taper")["value"]
    copy = map_reduce(np.zeros(shape, np.float32), _cell_scalar, cell_size=cell,
                      border=border, blend="copy")["value"]
    step = 0.02 * cell  # jump between neighbouring cells along the columns
    copy_jump = np.abs(np.diff(copy, axis=1)).max()
    taper_jump = np.abs(np.diff(taper, axis=1)).max()
    assert copy_jump == pytest.approx(step, rel=1e-5)
    # the jump is spread over 2 * half-width = border pixels as a cos² ramp
    half = border // 2
    assert taper_jump <= np.pi * step / (4 * half) * 1.05
    assert np.abs(np.diff(taper, axis=0)).max() <= np.pi * 0.01 * cell / (4 * half) * 1.05
    # cell interiors keep the cell value
    grid = make_grid(shape, cell_size=cell, border=border)
    for c in grid:
        rows, cols = c.inner
        core = (slice(rows.start + half, rows.stop - half),
                slice(cols.start + half, cols.stop - half))
        np.testing.assert_allclose(taper[core], copy[core], rtol=1e-6)


def test_average_blend_averages_overlaps() -> None:
    out = map_reduce(np.zeros((10, 20), np.float32),
                     lambda cut, cell: {"v": np.full(cut.shape, float(cell.index[1]))},
                     cell_size=10, border=2, blend="average")["v"]
    np.testing.assert_allclose(out[:, :8], 0.0)
    np.testing.assert_allclose(out[:, 8:12], 0.5)
    np.testing.assert_allclose(out[:, 12:], 1.0)


def test_taper_weights_partition_unity() -> None:
    grid = make_grid((90, 77), cell_size=(20, 25), border=(6, 9))
    total = np.zeros(grid.shape)
    for cell, (wr, wc) in zip(grid, grid.weights("taper"), strict=True):
        assert np.all(wr >= 0) and np.all(wc >= 0)
        total[cell.outer] += wr[:, None] * wc[None, :]
    np.testing.assert_allclose(total, 1.0, rtol=1e-12)


def test_errors() -> None:
    image = _image((20, 20))
    with pytest.raises(skydiff.InputError):
        map_reduce(image, _identity, cell_size=10, border=2, blend="median")  # type: ignore[arg-type]
    with pytest.raises(skydiff.InputError):
        make_grid((20, 20), cell_size=0, border=2)
    with pytest.raises(skydiff.InputError):
        make_grid((20, 20), cell_size=5, border=-1)
    with pytest.raises(skydiff.InputError):
        map_reduce({"a": image, "b": image[:10]}, _identity, cell_size=10, border=2)
    with pytest.raises(skydiff.InputError):
        map_reduce(image, lambda cut, cell: {"image": cut[:2]}, cell_size=10, border=2)
    with pytest.raises(skydiff.InputError):
        map_reduce(image, lambda cut, cell: cut, cell_size=10, border=2)
    with pytest.raises(skydiff.InputError):
        map_reduce(image, lambda cut, cell: {str(cell.index): cut}, cell_size=10, border=2)
    with pytest.raises(skydiff.InputError):
        map_reduce([[1.0]], _identity, cell_size=10, border=2)  # type: ignore[arg-type]
