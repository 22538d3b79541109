"""Named mask planes: the dictionary from plane names to bits of a ``uint32`` mask.

An :class:`~skydiff.exposure.Exposure` carries a ``uint32`` mask array in which every bit is a
*plane* (``BAD``, ``SAT``, ``CR``, ``EDGE``, ...) and a :class:`MaskPlanes` dictionary that
names the bits. Plugins may add planes (``planes.with_plane("MY_FLAG")``); a mask holds at
most 32 planes.

The default planes follow the LSST ``afw`` conventions (bit numbers 0–13 in the order of
:data:`DEFAULT_PLANES`). In FITS headers a dictionary is stored as ``MP_<NAME> = bit``
keywords, exactly as ``afw`` writes them.

Examples
--------
>>> planes = MaskPlanes.default()
>>> planes.bit("SAT"), planes.value("BAD", "SAT")
(1, 3)
>>> planes.with_plane("GHOST").bit("GHOST")
14
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import attrs
import numpy as np

from skydiff.errors import InputError

__all__ = ["DEFAULT_PLANES", "MAX_PLANES", "MaskPlanes"]

#: The planes every exposure starts with; plane ``DEFAULT_PLANES[i]`` is bit ``i``.
DEFAULT_PLANES: tuple[str, ...] = (
    "BAD",
    "SAT",
    "INTRP",
    "CR",
    "EDGE",
    "DETECTED",
    "DETECTED_NEGATIVE",
    "SUSPECT",
    "NO_DATA",
    "SAT_TEMPLATE",
    "STREAK",
    "INJECTED",
    "INJECTED_TEMPLATE",
    "HIGH_VARIANCE",
)

#: The number of bits of a ``uint32`` mask, hence the maximum number of planes.
MAX_PLANES = 32

_HEADER_PREFIX = "MP_"


class _PlaneMap(Mapping[str, int]):
    """An immutable, hashable and picklable ``{name: bit}`` mapping ordered by bit."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, int]]) -> None:
        self._items: dict[str, int] = dict(sorted(items, key=lambda item: item[1]))

    def __getitem__(self, key: str) -> int:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return dict(self._items) == dict(other.items())

    def __repr__(self) -> str:
        return repr(self._items)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_PlaneMap, (tuple(self._items.items()),))


def _to_plane_map(value: Mapping[str, int] | Iterable[tuple[str, int]]) -> _PlaneMap:
    items = value.items() if isinstance(value, Mapping) else value
    try:
        pairs = [(name, int(bit)) for name, bit in items]
    except (TypeError, ValueError) as exc:
        msg = f"mask planes must map names to integer bits, got {value!r}"
        raise InputError(msg) from exc
    return _PlaneMap(pairs)


def _validate_planes(instance: Any, attribute: Any, value: _PlaneMap) -> None:
    for name, bit in value.items():
        if not isinstance(name, str) or not name or name != name.strip():
            msg = f"mask plane names must be non-empty strings without spaces, got {name!r}"
            raise InputError(msg)
        if not 0 <= bit < MAX_PLANES:
            msg = f"mask plane {name!r} has bit {bit}; bits must lie in 0..{MAX_PLANES - 1}"
            raise InputError(msg)
    bits = list(value.values())
    if len(set(bits)) != len(bits):
        msg = f"mask planes share a bit: {dict(value)}; give every plane its own bit"
        raise InputError(msg)


@attrs.frozen
class MaskPlanes:
    """The dictionary of mask planes of an exposure: plane name → bit index.

    Parameters
    ----------
    planes : Mapping[str, int]
        Plane name → bit index (0..31). Bits must be unique.

    Raises
    ------
    InputError
        If a bit lies outside 0..31, two planes share a bit, or a name is empty.

    See Also
    --------
    skydiff.exposure.Exposure.masked, skydiff.exposure.Exposure.with_mask

    Examples
    --------
    >>> planes = MaskPlanes({"BAD": 0, "SAT": 1})
    >>> planes.names
    ('BAD', 'SAT')
    >>> MaskPlanes.from_header(planes.to_header()) == planes
    True
    """

    planes: Mapping[str, int] = attrs.field(converter=_to_plane_map, validator=_validate_planes)

    @classmethod
    def default(cls) -> MaskPlanes:
        """The default planes :data:`DEFAULT_PLANES`, bit ``i`` for ``DEFAULT_PLANES[i]``."""
        return _DEFAULT

    @property
    def names(self) -> tuple[str, ...]:
        """The plane names, ordered by bit."""
        return tuple(self.planes)

    def bit(self, name: str) -> int:
        """The bit index of plane ``name``.

        Raises
        ------
        InputError
            If there is no plane of that name; the message lists the known planes.
        """
        try:
            return self.planes[name]
        except KeyError:
            msg = (f"unknown mask plane {name!r}; known planes: {', '.join(self.names)} "
                   "(add one with MaskPlanes.with_plane)")
            raise InputError(msg) from None

    def value(self, *names: str) -> int:
        """The bitmask with the bits of ``names`` set (``0`` when no names are given).

        Raises
        ------
        InputError
            If one of the names is not a known plane.
        """
        result = 0
        for name in names:
            result |= 1 << self.bit(name)
        return result

    def with_plane(self, name: str) -> MaskPlanes:
        """A dictionary with plane ``name`` added at the lowest free bit.

        Returns ``self`` unchanged when the plane exists already.

        Raises
        ------
        InputError
            If all 32 bits are in use.
        """
        if name in self.planes:
            return self
        used = set(self.planes.values())
        free = [bit for bit in range(MAX_PLANES) if bit not in used]
        if not free:
            msg = (f"cannot add mask plane {name!r}: all {MAX_PLANES} bits are in use; "
                   "drop an unused plane first")
            raise InputError(msg)
        return MaskPlanes({**self.planes, name: free[0]})

    def to_header(self) -> dict[str, int]:
        """The FITS header form ``{"MP_<NAME>": bit}`` (``afw`` convention).

        Names longer than five characters give keywords longer than eight characters, which
        astropy writes as ``HIERARCH`` cards, as ``afw`` does.
        """
        return {f"{_HEADER_PREFIX}{name}": bit for name, bit in self.planes.items()}

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> MaskPlanes:
        """Read the ``MP_<NAME> = bit`` keywords of a FITS header.

        Parameters
        ----------
        header : Mapping
            An :class:`astropy.io.fits.Header` or any mapping of keyword → value.

        Returns
        -------
        MaskPlanes
            The planes named in the header, or :meth:`default` when the header has no
            ``MP_`` keyword.

        Raises
        ------
        InputError
            If the keywords do not form a valid dictionary (shared or out-of-range bits).
        """
        planes: dict[str, int] = {}
        for key in header:
            upper = str(key).upper()
            if upper.startswith(_HEADER_PREFIX) and len(upper) > len(_HEADER_PREFIX):
                value = header[key]
                if isinstance(value, bool) or not isinstance(value, int | np.integer):
                    msg = f"header keyword {key} must hold an integer mask bit, got {value!r}"
                    raise InputError(msg)
                planes[upper[len(_HEADER_PREFIX):]] = int(value)
        if not planes:
            return cls.default()
        return cls(planes)

    def decode(self, mask_array: np.ndarray, name: str) -> np.ndarray:
        """Boolean image of the pixels of ``mask_array`` with plane ``name`` set.

        Parameters
        ----------
        mask_array : ndarray of integers
            A mask image (any shape).
        name : str
            Plane name.

        Returns
        -------
        ndarray of bool
            Same shape as ``mask_array``.

        Raises
        ------
        InputError
            If ``name`` is unknown or ``mask_array`` is not an integer array.
        """
        array = np.asarray(mask_array)
        if not np.issubdtype(array.dtype, np.integer):
            msg = f"mask array must hold integer bit planes, got dtype {array.dtype}"
            raise InputError(msg)
        return (array.astype(np.uint32, copy=False) & np.uint32(1 << self.bit(name))) != 0


_DEFAULT = MaskPlanes({name: bit for bit, name in enumerate(DEFAULT_PLANES)})
