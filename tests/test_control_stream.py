"""How a control socket's input is cut into requests (RequestStream), in memory.

QMP input is a stream of JSON values: QEMU's own client sends them back to back,
a person at a terminal ends each with a newline, and a hostile client sends
anything. Each case feeds bytes, possibly cut anywhere, and reads back the
requests and errors in order."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shmemctl.control import ControlError
from shmemctl.control.protocol import (
    MAX_DEPTH,
    MAX_REQUEST,
    RequestStream,
    RequestTooLong,
    decode_request,
)


def fed(*chunks: bytes) -> list[bytes | str]:
    """What a fresh stream makes of these chunks: requests as bytes, errors as their desc."""
    stream = RequestStream()
    out: list[bytes | str] = []
    for chunk in chunks:
        out += [r.desc if isinstance(r, ControlError) else r for r in stream.feed(chunk)]
    return out


def test_back_to_back_without_newlines_as_qemu_qmp_sends() -> None:
    assert fed(b'{"execute":"a","id":"__qmp#00000"}{"execute":"b"}') == [
        b'{"execute":"a","id":"__qmp#00000"}',
        b'{"execute":"b"}',
    ]


def test_lines_and_whitespace_between_requests() -> None:
    assert fed(b'\r\n  {"execute": "a"}\n\n\t{"execute": "b"}\n') == [
        b'{"execute": "a"}',
        b'{"execute": "b"}',
    ]


def test_a_request_cut_anywhere_comes_out_whole_once() -> None:
    request = b'{"execute": "map", "arguments": {"maps": [{"shmid": 0}]}, "id": "x}{"}'
    for cut in range(1, len(request)):
        assert fed(request[:cut], request[cut:]) == [request], cut
    assert fed(*(request[i : i + 1] for i in range(len(request)))) == [request]


def test_brackets_and_escapes_inside_strings_do_not_count() -> None:
    request = b'{"id": "\\"}]{[\\\\", "execute": "a"}'
    assert json.loads(request)["id"] == '"}]{[\\'
    assert fed(request + b'{"execute": "b"}') == [request, b'{"execute": "b"}']


def test_garbage_is_answered_once_up_to_its_newline() -> None:
    out = fed(b'hello {"execute": "lost"}\n{"execute": "next"}')
    assert len(out) == 2 and isinstance(out[0], str) and out[0].startswith("not JSON")
    assert out[1] == b'{"execute": "next"}'


def test_a_scalar_is_not_a_request() -> None:
    assert fed(b"42\n", b'"status"\n', b"null\n") == [
        "QMP input must be a JSON object, not 42",
        'QMP input must be a JSON object, not "status"',
        "QMP input must be a JSON object, not null",
    ]


def test_a_stray_closer_is_garbage_to_the_newline() -> None:
    out = fed(b'}]\n{"execute": "a"}')
    assert (
        isinstance(out[0], str)
        and out[0].startswith("not JSON")
        and out[1:] == [b'{"execute": "a"}']
    )


def test_an_array_is_framed_and_left_to_the_server_to_refuse() -> None:
    assert fed(b'[{"execute": "a"}]') == [b'[{"execute": "a"}]']


DEEP = (f"JSON nested more than {MAX_DEPTH} levels deep; a request needs at most that (the "
        "rest of its line is skipped)")  # fmt: skip


def test_nesting_is_refused_as_soon_as_it_is_too_deep() -> None:
    fits = b'{"id": ' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}"
    assert fed(fits) == [fits]
    deep = b'{"execute": "a", "id": ' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}"
    assert fed(deep) == [DEEP]
    # never closed: answered all the same, at the level that is one too many
    assert fed(b"[" * 5000) == [DEEP]
    # the rest of its line is dropped, the next line is read as usual
    assert fed(b"[" * 100 + b'{"execute": "lost"}\n{"execute": "next"}') == [
        DEEP,
        b'{"execute": "next"}',
    ]
    assert fed(b"[" * 100, b"]" * 100, b'\n{"execute": "next"}') == [DEEP, b'{"execute": "next"}']


@pytest.mark.parametrize(
    "chunks",
    [
        [b'{"id": "' + b"x" * MAX_REQUEST],  # one value that never ends
        [b'{"id": "', b"x" * (MAX_REQUEST // 2), b"x" * (MAX_REQUEST // 2)],  # nor in pieces
        [b"x" * (MAX_REQUEST + 1)],  # garbage without a newline
        [b'{"id": "' + b"x" * MAX_REQUEST + b'"}'],  # one that ends, too late
    ],
)
def test_a_request_longer_than_the_bound_ends_the_stream(chunks: list[bytes]) -> None:
    stream = RequestStream()
    out = [item for chunk in chunks for item in stream.feed(chunk)]
    assert len(out) == 1 and isinstance(out[0], RequestTooLong)
    assert out[0].desc == f"request longer than {MAX_REQUEST} bytes; closing"
    assert stream.feed(b'{"execute": "after"}') == []  # the client is being dropped


def test_what_came_before_a_request_too_long_is_still_served() -> None:
    first = b'{"execute": "query-version", "id": 1}'
    out = RequestStream().feed(first + b"\n" + b"x" * (MAX_REQUEST + 10))
    assert out[0] == first and isinstance(out[1], RequestTooLong) and len(out) == 2


def test_a_request_at_the_bound_is_taken() -> None:
    request = b'{"id": "' + b"x" * (MAX_REQUEST - 10) + b'"}'
    assert len(request) == MAX_REQUEST
    assert fed(request) == [request]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (b'{"id": NaN}', "NaN is not a JSON value"),
        (b'{"id": 1e999}', "1e999 is too large"),
        (b'{"id": "\xc3("}', "not JSON"),  # UTF-8 that breaks off
        (b'{"id": 1,}', "not JSON"),
    ],
)
def test_what_is_framed_but_not_json_says_why(text: bytes, words: str) -> None:
    with pytest.raises(ControlError, match=words):
        decode_request(text)


requests = st.lists(
    st.dictionaries(
        st.text(max_size=6),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=8),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=4), inner, max_size=3)
            ),
            max_leaves=8,
        ),
        max_size=4,
    ),
    min_size=1,
    max_size=5,
)


@given(requests, st.data())
def test_any_json_objects_cut_anywhere_come_back_in_order(objects, data) -> None:
    separators = [data.draw(st.sampled_from([b"", b"\n", b" ", b"\r\n"])) for _ in objects]
    stream_bytes = b"".join(
        json.dumps(o).encode() + sep for o, sep in zip(objects, separators, strict=True)
    )
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(stream_bytes) - 1)), max_size=6)))
    chunks = [
        stream_bytes[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream_bytes)], strict=True)
    ]
    out = fed(*chunks)
    assert [json.loads(r) for r in out if isinstance(r, bytes)] == objects


def test_a_0xff_byte_brings_the_stream_back_into_step() -> None:
    reset = (
        "JSON parse error: byte 0xff resets the parser; anything unfinished before it was dropped"
    )
    assert fed(b'{"execute": "lost', b'\xff{"execute": "next"}') == [reset, b'{"execute": "next"}']
    assert fed(b"junk\xff\n{}") == [reset, b"{}"]  # junk ends there too
    assert fed(b"[" * 100 + b"\xff{}") == [
        "JSON nested more than 16 levels deep; a request needs at most that (the rest of its "
        "line is skipped)",
        reset,
        b"{}",
    ]
    assert fed(b"\xff") == [reset]
