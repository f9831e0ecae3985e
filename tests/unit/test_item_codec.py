"""The packed form of a batch item's info: smaller, and read back as exactly what was written."""

import pytest

from shared import keys
from shared.item_codec import ItemPlace, pack_info, unpack_info

PLACE = ItemPlace("b1", 300, 2)
ITEM = "b1-000300"


@pytest.mark.parametrize(
    "info",
    [
        {"name": "n01440764/n01440764_10026.JPEG"},
        {
            "name": "x.jpg",
            "input_key": keys.batch_input_pack_key("b1", 2),
            "input_range": [123, 456],
        },
        {"name": "x.jpg", "input_key": keys.batch_input_pack_key("b1", 3)},  # another block's
        {"name": "x.jpg", "error": {"code": "not_an_image", "message": "a | b"}},
        {
            "figure_key": keys.figure_key(ITEM, "webp", attempt="g41"),
            "thumbnail_key": keys.thumbnail_key(ITEM, attempt="g41"),
            "manifest_key": keys.manifest_key(ITEM, attempt="g41"),
            "reused": True,
            "reused_from": "b1-000007",
            "attempt": "g41",
        },
        # Written before attempts: the keys of the old layout are still derived.
        {
            "figure_key": keys.figure_key(ITEM, "webp", attempt=""),
            "thumbnail_key": keys.thumbnail_key(ITEM, attempt=""),
            "manifest_key": keys.manifest_key(ITEM, attempt=""),
        },
        # Keys of another attempt than the info's own are kept whole, never re-derived.
        {"manifest_key": keys.manifest_key(ITEM, attempt="g7"), "attempt": "g8"},
        {"figure_key": keys.figure_key("b1-000301", "jpg", attempt="g3"), "reused_from": "b1-7"},
        {"a": 1, "attempt": "g2", "scores_key": keys.scores_key(ITEM, attempt="g2")},
        {"reused_from": "b10-000007", "manifest_key": 0, "thumbnail_key": ["a"]},
        {"n": 1, "~n": 2, "i": None, "callbacks": [{"status": 200}], "callback_state": "x"},
    ],
)
def test_info_round_trips_exactly(info):
    packed = pack_info(PLACE, info)
    assert unpack_info(PLACE, packed) == info
    assert list(unpack_info(PLACE, packed)) == list(info)


def test_derived_values_are_left_out():
    info = {
        "name": "n01440764/n01440764_10026.JPEG",
        "input_key": keys.batch_input_pack_key("b1", 2),
        "input_range": [1_234_567, 110_000],
        "figure_key": keys.figure_key(ITEM, "jpg", attempt="g1234567"),
        "thumbnail_key": keys.thumbnail_key(ITEM, attempt="g1234567"),
        "manifest_key": keys.manifest_key(ITEM, attempt="g1234567"),
        "scores_key": keys.scores_key(ITEM, attempt="g1234567"),
        "reused": True,
        "reused_from": "b1-000007",
        "attempt": "g1234567",
    }
    packed = pack_info(PLACE, info)
    assert "results/" not in packed and "batches/" not in packed and "b1-" not in packed
    assert packed.count("g1234567") == 1  # the attempt once, not once per key
    assert len(packed) < 120
