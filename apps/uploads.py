"""Upload limits held while a request body streams in, before any of it is stored.

A request's size is judged before it is read: it must say its length (`Content-Length`), and
that length must fit the request's limits (`ServeLimits.max_images` files of at most
`max_file_bytes` each, plus room for the multipart framing). While the body streams in,
python-multipart's parser follows its parts, so the first file over the count or over the
per-file size stops the request there. The Gradio server applies this to its upload route
(`UploadLimitMiddleware`); Ray Serve's `/predict` reads its files and questions through
`read_parts`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import PlainTextResponse

from ..data import display_name
from ..errors import InputError
from .service import ServeLimits

PART_HEADER_BYTES = 36 * 1024
"""Room for one part's headers: python-multipart allows 8 headers of about 4 KiB each."""

FORM_SLACK_BYTES = 64 * 1024
"""Room for the closing boundary and a few small form fields."""

MAX_FIELD_BYTES = 64 * 1024
"""A form field that is not a file (a question, a flag) is short text."""

MAX_FIELDS = 32

FILE_FIELD = "files"
"""The form field that carries the files, in Gradio's upload route and in `/predict`."""

OTHER_BODY_BYTES = 1024 * 1024
"""Any other request body (Gradio's JSON calls carry names and settings, not files)."""

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class UploadRefused(InputError):
    """A request over the upload limits; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 413):
        super().__init__(message)
        self.status = status


def body_limit(limits: ServeLimits) -> int:
    """The largest request body that can carry `limits.max_images` files within limits."""
    return limits.max_images * (limits.max_file_bytes + PART_HEADER_BYTES) + FORM_SLACK_BYTES


def check_length(headers: Any, limit: int) -> None:
    """Refuse a body that does not say its length, or says one over `limit` (nothing of it
    has been read yet)."""
    length = headers.get("content-length")
    if length is None:
        raise UploadRefused("the request must say its length (Content-Length): uploads "
                            "without it are refused", status=411)
    if not length.isdigit():
        raise UploadRefused(f"Content-Length {length!r} is not a number", status=400)
    if int(length) > limit:
        raise UploadRefused(f"request body of {int(length):,} bytes is over the limit of "
                            f"{limit:,} bytes")


@dataclass
class Part:
    """One part of a multipart body: its form field's name, file name (None for a plain
    field), size, and contents when kept."""

    name: str = ""
    filename: str | None = None
    size: int = 0
    chunks: list[bytes] = field(default_factory=list)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


class MultipartLimit:
    """Follows a multipart/form-data body chunk by chunk (`feed`) and raises `UploadRefused`
    at the first file past `limits.max_images`, the first file over `limits.max_file_bytes`
    or a form field over `MAX_FIELD_BYTES`; keeps each part's contents when `keep`."""

    def __init__(self, content_type: str, limits: ServeLimits, keep: bool = False):
        kind, params = parse_options_header(content_type)
        if kind != b"multipart/form-data" or not params.get(b"boundary"):
            raise UploadRefused("expected a multipart/form-data body: send each image as a "
                                f"part named `{FILE_FIELD}`", status=400)
        self.limits = limits
        self.keep = keep
        self.parts: list[Part] = []
        self._header: list[bytes] = [b"", b""]
        self._headers: dict[bytes, bytes] = {}
        self._parser = MultipartParser(params[b"boundary"], {
            "on_part_begin": self._begin,
            "on_header_field": lambda data, start, end: self._add(0, data[start:end]),
            "on_header_value": lambda data, start, end: self._add(1, data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
        })

    @property
    def files(self) -> list[Part]:
        return [part for part in self.parts if part.filename is not None]

    def feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise UploadRefused(f"malformed multipart body ({exc})", status=400) from None

    def finish(self) -> None:
        self._parser.finalize()

    def _begin(self) -> None:
        self.parts.append(Part())
        self._headers = {}

    def _add(self, index: int, data: bytes) -> None:
        self._header[index] += data

    def _header_end(self) -> None:
        name, value = self._header
        self._headers[name.strip().lower()] = value.strip()
        self._header = [b"", b""]

    def _headers_finished(self) -> None:
        part = self.parts[-1]
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        part.name = params.get(b"name", b"").decode("utf-8", "replace")
        filename = params.get(b"filename")
        part.filename = None if filename is None else filename.decode("utf-8", "replace")
        if part.name == FILE_FIELD and not part.filename:
            raise UploadRefused(f"part {len(self.parts)} of the request has no file name: "
                                f"send each file as a `{FILE_FIELD}` part with one",
                                status=400)
        if part.filename is not None and len(self.files) > self.limits.max_images:
            raise UploadRefused(f"more than {self.limits.max_images} files in one request; "
                                f"the limit is {self.limits.max_images}")
        if part.filename is None and len(self.parts) - len(self.files) > MAX_FIELDS:
            raise UploadRefused(f"more than {MAX_FIELDS} form fields in one request")

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self.parts[-1]
        part.size += end - start
        if part.filename is not None and part.size > self.limits.max_file_bytes:
            raise UploadRefused(f"{display_name(part.filename)}: over the limit of "
                                f"{self.limits.max_file_bytes:,} bytes a file")
        if part.filename is None and part.size > MAX_FIELD_BYTES:
            raise UploadRefused(f"form field {part.name!r}: over {MAX_FIELD_BYTES:,} bytes")
        if self.keep:
            part.chunks.append(bytes(data[start:end]))


async def read_parts(request: Request, limits: ServeLimits) -> list[Part]:
    """A multipart request's parts, read within `limits` (see the module docstring; nothing
    is spooled to disk), contents kept."""
    check_length(request.headers, body_limit(limits))
    parts = MultipartLimit(request.headers.get("content-type", ""), limits, keep=True)
    async for chunk in request.stream():
        parts.feed(chunk)
    parts.finish()
    return parts.parts


def uploaded_files(parts: list[Part]) -> list[tuple[str, bytes]]:
    """The `FILE_FIELD` parts as (display name, bytes), in request order."""
    return [(display_name(part.filename), part.data) for part in parts
            if part.filename is not None and part.name == FILE_FIELD]


async def read_form(request: Request, limits: ServeLimits,
                    ) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """A multipart request read within `limits` (`read_parts`): its `FILE_FIELD` parts as
    (display name, bytes), and its plain fields by name (the last of a repeated one)."""
    parts = await read_parts(request, limits)
    fields = {part.name: part.data.decode("utf-8", "replace") for part in parts
              if part.filename is None}
    return uploaded_files(parts), fields


class _RefusedMidStream(MultiPartException):
    """Raised from the body stream into Gradio's multipart parser, which then deletes the
    files it had begun to write (it does so for this exception type only)."""


class UploadLimitMiddleware:
    """ASGI middleware: `upload_path` takes multipart uploads within `limits`; every other
    request body is at most `OTHER_BODY_BYTES`. Over-limit requests that say so in their
    headers are answered here (411/413) without reaching the app. Requests for which
    `reads_own_body(method, path)` is true are passed on as they are: their routes read no
    body, or read it with `read_form`, which holds the same limits."""

    def __init__(self, app: Callable, upload_path: str, limits: ServeLimits,
                 reads_own_body: Callable[[str, str], bool] = lambda method, path: False):
        self.app = app
        self.upload_path = upload_path
        self.limits = limits
        self.reads_own_body = reads_own_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS")
                or self.reads_own_body(scope["method"], scope["path"])):
            return await self.app(scope, receive, send)
        request = Request(scope)
        upload = scope["path"] == self.upload_path
        try:
            check_length(request.headers, body_limit(self.limits) if upload else
                         OTHER_BODY_BYTES)
            if upload:
                receive = self._limited(receive, MultipartLimit(
                    request.headers.get("content-type", ""), self.limits))
        except UploadRefused as exc:
            response = PlainTextResponse(str(exc), status_code=exc.status)
            return await response(scope, receive, send)
        await self.app(scope, receive, send)

    def _limited(self, receive: Receive, parts: MultipartLimit) -> Receive:
        async def limited() -> MutableMapping[str, Any]:
            message = await receive()
            if message["type"] == "http.request":
                try:
                    parts.feed(message.get("body", b""))
                except UploadRefused as exc:
                    # Gradio answers 413 for a message about the "maximum allowed size",
                    # 400 for any other.
                    over = " (over the maximum allowed size of one request)"
                    raise _RefusedMidStream(f"{exc}{over * (exc.status == 413)}") from None
            return message
        return limited
