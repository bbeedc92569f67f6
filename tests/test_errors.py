"""InvalidInputError: ``loc`` is where the bad item is; ``field`` and the message say it as text."""

from __future__ import annotations

from blipitm.errors import InvalidInputError, format_loc


def test_loc_is_a_tuple_and_field_is_derived_from_it() -> None:
    e = InvalidInputError("text is empty", loc=("texts", 3))
    assert e.loc == ("texts", 3)
    assert e.field == "texts[3]"
    assert str(e) == "texts[3]: text is empty"
    bare = InvalidInputError("no location")
    assert (bare.loc, bare.field, str(bare)) == ((), None, "no location")


def test_format_loc() -> None:
    assert format_loc(("k_test",)) == "k_test"
    assert format_loc(("text_1", "content", 0)) == "text_1.content[0]"
    assert format_loc(("input", 2, "image_url")) == "input[2].image_url"
