"""If-None-Match / If-Match values as RFC 9110 writes them: lists, ``*`` and weak comparison."""

from __future__ import annotations

import pytest

from app.api.deps import etag_listed

TAG = 'W/"abc"'


@pytest.mark.parametrize(
    ("header", "listed"),
    [
        (None, False),
        ('W/"abc"', True),
        ('"abc"', True),  # the strong form of the same opaque tag: weak comparison matches it
        ("*", True),
        (' W/"old" , W/"abc"', True),
        ('W/"old", "other"', False),
        ('W/"abcd"', False),
        ("", False),
    ],
)
def test_etag_listed(header, listed):
    assert etag_listed(header, TAG) is listed
