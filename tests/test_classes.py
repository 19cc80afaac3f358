"""The class table, WorldCover mapping, counts and colours."""

import re

import numpy as np
import pytest

from nycdata.data import classes
from nycdata.data.classes import (
    CLASS_COLOURS, CLASS_NAMES, CLASSES, IGNORE_COLOUR, IGNORE_INDEX, NUM_CLASSES, WORLDCOVER_CODES,
    class_counts, colormap, worldcover_to_class,
)

EXPECTED_WORLDCOVER = {
    0: 255,   # no data -> ignore
    10: 2, 20: 2,  # tree cover, shrubland -> trees
    30: 3, 40: 3,  # grassland, cropland -> herbaceous
    50: 1,  # built-up -> developed
    60: 4, 70: 4, 100: 4,  # bare, snow, moss -> other
    80: 0, 90: 0, 95: 0,  # water, wetland, mangroves -> water
}


def test_expected_table_covers_every_worldcover_code():
    assert set(EXPECTED_WORLDCOVER) == set(WORLDCOVER_CODES)


@pytest.mark.parametrize("code, expected", sorted(EXPECTED_WORLDCOVER.items()))
def test_worldcover_code_maps_to_class(code, expected):
    out = worldcover_to_class(np.array([code], dtype=np.int32))
    assert out.tolist() == [expected]


def test_worldcover_all_codes_at_once_in_a_2d_array():
    codes = np.array(list(EXPECTED_WORLDCOVER), dtype=np.int32).reshape(3, 4)
    out = worldcover_to_class(codes)
    assert out.shape == (3, 4)
    assert out.dtype == np.uint8
    expected = np.array([EXPECTED_WORLDCOVER[c] for c in codes.ravel()], dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int64])
def test_worldcover_other_integer_dtypes(dtype):
    codes = np.array([[10, 50], [80, 0]], dtype=dtype)
    out = worldcover_to_class(codes)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[2, 1], [0, 255]])


def test_unknown_worldcover_codes_become_ignore():
    codes = np.array([[5, 254, 255], [-1, 300, 11]], dtype=np.int32)
    out = worldcover_to_class(codes)
    assert out.dtype == np.uint8
    assert out.shape == (2, 3)
    assert (out == IGNORE_INDEX).all()


def test_unknown_codes_mixed_with_known_codes():
    codes = np.array([-1, 10, 300, 80, 256, 50], dtype=np.int32)
    np.testing.assert_array_equal(worldcover_to_class(codes), [255, 2, 255, 0, 255, 1])


def test_class_table_order_names_and_indices():
    assert IGNORE_INDEX == 255
    assert NUM_CLASSES == 5
    assert [c.index for c in CLASSES] == [0, 1, 2, 3, 4]
    assert CLASS_NAMES == ("water", "developed", "trees", "herbaceous", "other")
    assert tuple(c.name for c in CLASSES) == CLASS_NAMES


def test_class_table_worldcover_codes_consistent_with_mapping():
    for cls in CLASSES:
        out = worldcover_to_class(np.array(cls.worldcover_codes, dtype=np.int32))
        assert (out == cls.index).all(), cls.name
    # each WorldCover code belongs to at most one class
    all_codes = [code for cls in CLASSES for code in cls.worldcover_codes]
    assert len(all_codes) == len(set(all_codes))


def test_class_colours_are_distinct_valid_hex():
    from matplotlib.colors import is_color_like

    assert len(CLASS_COLOURS) == NUM_CLASSES
    for colour in (*CLASS_COLOURS, IGNORE_COLOUR):
        assert re.fullmatch(r"#[0-9a-fA-F]{6}", colour), colour
        assert is_color_like(colour)
    lowered = [c.lower() for c in (*CLASS_COLOURS, IGNORE_COLOUR)]
    assert len(set(lowered)) == NUM_CLASSES + 1
    assert IGNORE_COLOUR.lower() == "#000000"


def test_class_counts_counts_every_class_and_ignore():
    label = np.array([[0, 0, 1, 2], [3, 4, 4, 255], [255, 7, 4, 2]], dtype=np.uint8)
    counts = class_counts(label)
    assert counts == {"water": 2, "developed": 1, "trees": 2, "herbaceous": 1, "other": 3, "ignore": 3}
    assert sum(counts.values()) == label.size
    assert list(counts) == [*CLASS_NAMES, "ignore"]


def test_class_counts_empty_classes_are_zero():
    counts = class_counts(np.full((4, 4), 255, dtype=np.uint8))
    assert counts == {"water": 0, "developed": 0, "trees": 0, "herbaceous": 0, "other": 0, "ignore": 16}


def test_colormap_maps_classes_to_their_colours_and_ignore_to_black():
    from matplotlib.colors import to_rgba

    cmap, norm = colormap()
    values = np.array([0, 1, 2, 3, 4, 255])
    rgba = cmap(norm(values))
    expected = [to_rgba(c) for c in CLASS_COLOURS] + [to_rgba(IGNORE_COLOUR)]
    np.testing.assert_allclose(rgba, expected)
    # any value above the classes (not only 255) is drawn as ignore
    np.testing.assert_allclose(cmap(norm(np.array([5, 200]))), [to_rgba(IGNORE_COLOUR)] * 2)


def test_legend_handles_in_class_order():
    from matplotlib.colors import to_rgba

    handles = classes.legend_handles()
    assert [h.get_label() for h in handles] == [f"{c.index} {c.name}" for c in CLASSES]
    for handle, colour in zip(handles, CLASS_COLOURS):
        np.testing.assert_allclose(handle.get_facecolor(), to_rgba(colour))
