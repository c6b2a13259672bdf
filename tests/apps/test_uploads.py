"""Upload limits on a body as it streams in, without a server (`apps/uploads.py`)."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from mmdeploy.apps.service import ServeLimits
from mmdeploy.apps.uploads import (
    MultipartLimit,
    UploadRefused,
    body_limit,
    check_length,
    read_parts,
    uploaded_files,
)

LIMITS = ServeLimits(max_images=3, max_file_bytes=1000)
BOUNDARY = "XyZ"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def part(name: str, data: bytes, filename: str | None = "image.png") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return (f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data
            + b"\r\n")


def body(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def feed(data: bytes, chunk: int = 7, keep: bool = False) -> MultipartLimit:
    """Feed `data` in small chunks, as a slow client sends it."""
    limit = MultipartLimit(CONTENT_TYPE, LIMITS, keep=keep)
    for start in range(0, len(data), chunk):
        limit.feed(data[start:start + chunk])
    limit.finish()
    return limit


def test_parts_are_followed_across_chunks():
    data = body(part("files", b"a" * 1000, "one.png"), part("note", b"hello", None),
                part("files", b"b" * 10, "two.png"))
    limit = feed(data, keep=True)
    assert [(p.name, p.filename, p.size) for p in limit.parts] == [
        ("files", "one.png", 1000), ("note", None, 5), ("files", "two.png", 10)]
    assert limit.files[0].data == b"a" * 1000


@pytest.mark.parametrize(("data", "message", "status"), [
    (body(*[part("files", b"x", f"{i}.png") for i in range(4)]),
     "more than 3 files in one request", 413),
    (body(part("files", b"x" * 1001, "big.png")),
     "big.png: over the limit of 1,000 bytes a file", 413),
    (body(part("note", b"x" * (64 * 1024 + 1), None)), "form field 'note': over", 413),
    (body(part("files", b"x", None)), "part 1 of the request has no file name", 400),
])
def test_the_first_part_over_a_limit_stops_the_body(data, message, status):
    with pytest.raises(UploadRefused, match=message) as refused:
        feed(data)
    assert refused.value.status == status


def test_only_multipart_bodies_are_taken():
    with pytest.raises(UploadRefused, match="multipart/form-data") as refused:
        MultipartLimit("application/json", LIMITS)
    assert refused.value.status == 400


@pytest.mark.parametrize(("headers", "status"), [
    ({}, 411), ({"content-length": "12x"}, 400),
    ({"content-length": str(body_limit(LIMITS) + 1)}, 413)])
def test_a_body_must_say_a_length_within_the_limit(headers, status):
    with pytest.raises(UploadRefused) as refused:
        check_length(headers, body_limit(LIMITS))
    assert refused.value.status == status
    check_length({"content-length": str(body_limit(LIMITS))}, body_limit(LIMITS))


def request(data: bytes, chunk: int = 100) -> Request:
    chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)]

    async def receive() -> dict:
        piece = chunks.pop(0)
        return {"type": "http.request", "body": piece, "more_body": bool(chunks)}

    scope = {"type": "http", "method": "POST", "path": "/predict", "query_string": b"",
             "headers": [(b"content-type", CONTENT_TYPE.encode()),
                         (b"content-length", str(len(data)).encode())]}
    return Request(scope, receive)


def test_read_parts_gives_the_file_parts_by_display_name_and_the_fields_as_sent():
    data = body(part("files", b"one", "a\u202eb.png"), part("question", b"what\xff?", None),
                part("files", b"two", "c.png"))
    parts = asyncio.run(read_parts(request(data), LIMITS))
    assert uploaded_files(parts) == [("a\\u202eb.png", b"one"), ("c.png", b"two")]
    assert [(p.name, p.data) for p in parts if p.filename is None] == \
        [("question", b"what\xff?")]


def test_read_parts_stops_at_the_part_over_the_limit():
    data = body(part("files", b"x" * 999, "ok.png"), part("files", b"y" * 5000, "big.png"))
    with pytest.raises(UploadRefused, match="big.png: over the limit of 1,000 bytes"):
        asyncio.run(read_parts(request(data), LIMITS))
