"""The ``pixel_flags`` measurement: mask planes inside each footprint and at its centre."""

from __future__ import annotations

from typing import Any

import numpy as np

import skydiff
from skydiff.photometry import cutouts

from ._common import check_inputs, float_column, on_image, positions, result

#: The planes flagged by default (SPEC order).
DEFAULT_FLAG_PLANES: tuple[str, ...] = ("BAD", "SAT", "CR", "EDGE", "NO_DATA", "INTRP",
                                        "SUSPECT", "SAT_TEMPLATE")


def _odd_size(value: Any) -> bool:
    return int(value) % 2 == 1


@skydiff.configclass
class PixelFlagsConfig(skydiff.Config):
    """Options of the ``pixel_flags`` measurement."""

    planes: tuple[str, ...] = skydiff.ListField(
        list(DEFAULT_FLAG_PLANES), dtype=str, min_length=1,
        doc="Mask planes to report: flag_<plane> (any pixel of the plane in the footprint) and "
            "flag_<plane>_center (any pixel in the central box). Planes the exposure does not "
            "define are never set.")
    center_size: int = skydiff.RangeField(
        3, min=1, doc="Odd side (pixels) of the central box of the _center flags.")
    box_size: int = skydiff.RangeField(
        5, min=1, doc="Odd side (pixels) of the box used instead of the footprint for sources "
                      "without one (sky sources without a footprint, no label image).")

    def _validate(self) -> None:
        for key in ("center_size", "box_size"):
            if not _odd_size(getattr(self, key)):
                msg = f"pixel_flags.{key} must be odd, got {getattr(self, key)}"
                raise skydiff.ConfigError(msg)


class PixelFlagsMeasurement(skydiff.Measurement):
    """Which mask planes touch each source: anywhere in its footprint and at its centre.

    For every configured plane ``P`` (default ``BAD``, ``SAT``, ``CR``, ``EDGE``,
    ``NO_DATA``, ``INTRP``, ``SUSPECT``, ``SAT_TEMPLATE``) of the difference image's mask:

    ``flag_<p>``
        some pixel of the source's footprint (pixels of ``inputs.footprints`` equal to the
        row's ``id``) has ``P`` set; a source with no footprint pixels (a sky source without
        a disk, a catalog without ``id`` or no label image) uses the ``box_size`` box around
        its position instead;
    ``flag_<p>_center``
        some pixel of the ``center_size`` box around the pixel nearest to the position has
        ``P`` set;

    followed by ``off_image`` (the nearest pixel is outside the image, or the position is not
    finite) and ``pixel_flags_flag`` (= ``off_image``: nothing could be looked up). Column
    names use the lower-case plane name; columns come in plane order, each ``flag_<p>``
    followed by its ``flag_<p>_center``. The footprint test is one pass over the labelled
    pixels (``numpy.isin``), the box tests one stacked cut-out of the mask.

    References
    ----------
    .. [1] ``lsst.meas.base`` ``PixelFlagsAlgorithm`` (``base_PixelFlags_flag_<plane>`` and
       ``..._<plane>Center``).
    """

    name = "pixel_flags"
    ConfigClass = PixelFlagsConfig
    order = 1.0
    tags = frozenset()

    def run(self, inputs: skydiff.MeasurementInputs) -> skydiff.MeasurementResult:
        catalog, difference = check_inputs(inputs, "pixel_flags")
        config = self.config
        x, y = positions(catalog)
        n = x.size
        inside = on_image(difference.shape, x, y)
        box_side = int(config.box_size)
        box = cutouts(difference.mask, x, y, size=box_side, fill=np.uint32(0))
        lo = box_side // 2 - int(config.center_size) // 2
        hi = lo + int(config.center_size)
        if int(config.center_size) > box_side:
            center = cutouts(difference.mask, x, y, size=int(config.center_size),
                             fill=np.uint32(0))
        else:
            center = box[:, lo:hi, lo:hi]
        box_any = np.bitwise_or.reduce(box.reshape(n, -1), axis=1) if n else box[:, 0, 0]
        center_any = (np.bitwise_or.reduce(center.reshape(n, -1), axis=1) if n
                      else center[:, 0, 0])
        # footprints: labels of the rows, and which labels carry each plane
        footprints = inputs.footprints
        labels = None
        if footprints is not None and "id" in catalog.colnames:
            ids = float_column(catalog, "id")
            labelled = footprints > 0
            pixel_labels = footprints[labelled]
            pixel_mask = difference.mask[labelled]
            present = np.isin(ids, np.unique(pixel_labels))
            labels = (ids, pixel_labels, pixel_mask, present)
        columns: dict[str, Any] = {}
        for plane in config.planes:
            key = plane.lower()
            if plane in difference.mask_planes.names:
                bit = np.uint32(1 << difference.mask_planes.bit(plane))
                in_box = (box_any & bit) != 0
                in_center = (center_any & bit) != 0
                if labels is not None:
                    ids, pixel_labels, pixel_mask, present = labels
                    hit = np.isin(ids, np.unique(pixel_labels[(pixel_mask & bit) != 0]))
                    in_footprint = np.where(present, hit, in_box)
                else:
                    in_footprint = in_box
            else:
                in_footprint = np.zeros(n, dtype=bool)
                in_center = np.zeros(n, dtype=bool)
            columns[f"flag_{key}"] = in_footprint & inside
            columns[f"flag_{key}_center"] = in_center & inside
        columns["off_image"] = ~inside
        columns["pixel_flags_flag"] = ~inside
        return result(columns, "pixel_flags_flag")
