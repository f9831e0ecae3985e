"""Job options: defaults, parsing of form strings, and the error for each bad value."""

import pytest

from shared.errors import InvalidOption
from shared.options import JobOptions


def test_defaults_are_the_articles():
    options = JobOptions()
    assert (options.mode, options.reduction, options.normalize) == ("chain", "mean", "none")
    assert (options.format, options.colormap, options.renderer) == ("jpg", "viridis", "fast")


def test_form_strings_parse():
    options = JobOptions.from_mapping(
        {"mode": "forward", "reduction": "l2", "per_layer": "true", "arrays": "0"}
    )
    assert options.mode == "forward" and options.reduction == "l2"
    assert options.per_layer is True and options.arrays is False


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"mode": "backward"}, "mode='backward' is not one of: chain, forward"),
        ({"reduction": "median"}, "reduction"),
        ({"format": "gif"}, "format"),
        ({"colormap": "notacolormap"}, "colormap"),
        ({"per_layer": "maybe"}, "per_layer must be true or false"),
        ({"size": "10"}, "unknown option(s): size"),
    ],
)
def test_bad_options_name_what_to_fix(data, fragment):
    with pytest.raises(InvalidOption) as info:
        JobOptions.from_mapping(data)
    assert fragment in info.value.message
    assert info.value.code == "invalid_option" and info.value.http_status == 400
