"""Unit tests of skydiff.mask.MaskPlanes."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from astropy.io import fits

from skydiff.errors import InputError
from skydiff.mask import DEFAULT_PLANES, MaskPlanes


def test_default_planes_have_bits_in_order():
    planes = MaskPlanes.default()
    assert planes.names == DEFAULT_PLANES
    assert [planes.bit(name) for name in DEFAULT_PLANES] == list(range(len(DEFAULT_PLANES)))
    assert planes.bit("NO_DATA") == 8
    assert planes.bit("HIGH_VARIANCE") == 13


def test_unknown_plane_lists_known_planes():
    with pytest.raises(InputError, match="known planes: BAD, SAT"):
        MaskPlanes.default().bit("NOPE")


def test_value_ors_the_bits():
    planes = MaskPlanes.default()
    assert planes.value() == 0
    assert planes.value("BAD", "SAT", "NO_DATA") == 0b100000011
    assert planes.value("CR", "CR") == 8


def test_with_plane_adds_at_lowest_free_bit_and_keeps_existing():
    planes = MaskPlanes({"A": 0, "B": 2})
    added = planes.with_plane("C")
    assert added.bit("C") == 1
    assert planes.names == ("A", "B")  # original untouched
    assert added.with_plane("A") is added


def test_with_plane_beyond_32_planes_raises():
    planes = MaskPlanes({f"P{bit}": bit for bit in range(32)})
    with pytest.raises(InputError, match="all 32 bits"):
        planes.with_plane("ONE_MORE")


@pytest.mark.parametrize(("mapping", "match"), [
    ({"A": 0, "B": 0}, "share a bit"),
    ({"A": 32}, "0..31"),
    ({"A": -1}, "0..31"),
    ({"": 1}, "non-empty"),
    ({"A": "x"}, "integer bits"),
])
def test_invalid_planes_raise(mapping, match):
    with pytest.raises(InputError, match=match):
        MaskPlanes(mapping)


def test_planes_are_immutable_copies():
    source = {"A": 0, "B": 1}
    planes = MaskPlanes(source)
    source["C"] = 2
    assert planes.names == ("A", "B")
    with pytest.raises(TypeError):
        planes.planes["C"] = 2  # type: ignore[index]


def test_equality_hash_and_pickle():
    a = MaskPlanes({"B": 1, "A": 0})
    b = MaskPlanes({"A": 0, "B": 1})
    assert a == b
    assert hash(a) == hash(b)
    assert a != MaskPlanes({"A": 0, "B": 2})
    restored = pickle.loads(pickle.dumps(a))
    assert restored == a
    assert restored.bit("B") == 1


def test_header_round_trip_through_a_fits_file(tmp_path):
    planes = MaskPlanes.default().with_plane("MY_LONG_PLANE_NAME")
    cards = planes.to_header()
    assert cards["MP_BAD"] == 0
    assert cards["MP_MY_LONG_PLANE_NAME"] == 14
    header = fits.Header()
    for key, value in cards.items():
        header[key if len(key) <= 8 else f"HIERARCH {key}"] = value
    path = tmp_path / "mask.fits"
    fits.PrimaryHDU(np.zeros((2, 2), np.int32), header=header).writeto(path)
    assert MaskPlanes.from_header(fits.getheader(path)) == planes


def test_from_header_without_planes_gives_default():
    assert MaskPlanes.from_header(fits.Header({"OBJECT": "x"})) == MaskPlanes.default()


def test_from_header_rejects_non_integer_bit():
    with pytest.raises(InputError, match="MP_BAD"):
        MaskPlanes.from_header({"MP_BAD": 1.5})


def test_decode():
    planes = MaskPlanes.default()
    mask = np.array([[0, 1, 2], [3, 256, 257]], dtype=np.uint32)
    np.testing.assert_array_equal(planes.decode(mask, "BAD"),
                                  [[False, True, False], [True, False, True]])
    np.testing.assert_array_equal(planes.decode(mask, "NO_DATA"),
                                  [[False, False, False], [False, True, True]])
    with pytest.raises(InputError, match="integer"):
        planes.decode(mask.astype(float), "BAD")
