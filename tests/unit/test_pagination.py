"""Page tokens: what a listing accepts back, and a 422 naming /page_token for anything else."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from app.problems import ProblemError
from app.services.pagination import decode_token, encode_token


def test_round_trip():
    now = datetime(2026, 12, 5, 21, 0, tzinfo=UTC)
    assert decode_token(encode_token(now, "row-1"), datetime, str) == [now, "row-1"]
    assert decode_token(encode_token(42), int) == [42]


@pytest.mark.parametrize(
    ("token", "kinds"),
    [
        ("not a token!", (int,)),
        (encode_token(42), (datetime, str)),  # another listing's token
        (encode_token("2026-12-05T21:00:00+00:00", "row-1", 3), (datetime, str)),
        (encode_token("2026-12-05T21:00:00", "row-1"), (datetime, str)),  # no time zone
        (encode_token("yesterday", "row-1"), (datetime, str)),
        (encode_token(True), (int,)),
        (encode_token(-1), (int,)),
        (encode_token(2**63), (int,)),
        (encode_token("3"), (int,)),
        (encode_token(3), ()),
        (base64.urlsafe_b64encode(b"[" * 1000).decode(), (int,)),  # json.loads: RecursionError
        (base64.urlsafe_b64encode(b"[" * 300).decode(), (int,)),  # short enough to be parsed
        (encode_token("x" * 600), (str,)),  # longer than any token this service issues
    ],
)
def test_foreign_or_made_up_tokens_are_422(token, kinds):
    with pytest.raises(ProblemError) as info:
        decode_token(token, *kinds)
    assert info.value.status == 422 and info.value.errors[0].pointer == "/page_token"
