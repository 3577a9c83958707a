"""A lean HTTP/1.1 client for the load benchmark: one keep-alive connection per simulated
client, plain asyncio streams, no TLS.

Why not httpx: on this 2-core machine the load generator shares the CPUs with the server it
measures. httpx spends ~2 ms of CPU per request (its connection pool, header models, sniffing
the async library), so 200 clients at 1 Hz saturated the *client* process and the figures
measured its queue, not the server (seen with py-spy: the client 100% busy, the server
~30%). This client spends tens of microseconds per request, so the latencies are the
server's. It understands just what the service answers: ``Content-Length`` bodies,
``chunked`` streams (server-sent events) and ``Connection: close``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit


class HTTPError(Exception):
    """The server closed the connection or answered something this client cannot read."""


class Response:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body


class Connection:
    """One keep-alive connection to ``url`` (``http://host:port``), reopened when closed."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"only http://host:port URLs, got {url!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self.base = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.base += f"Host: {self.host}:{self.port}\r\n"
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self._reader, self._writer

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
        self._reader = self._writer = None

    async def _start(self, path: str, headers: dict[str, str] | None) -> tuple[int, dict]:
        reader, writer = await self._open()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        writer.write(f"GET {path} HTTP/1.1\r\n{self.base}{extra}\r\n".encode("latin-1"))
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            raise HTTPError(f"bad status line {lines[0]!r}") from None
        fields: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                fields[name.strip().lower()] = value.strip()
        return status, fields

    async def get(self, path: str, headers: dict[str, str] | None = None) -> Response:
        """GET ``path``; the whole body read (``Content-Length`` or chunked)."""
        try:
            status, fields = await self._start(path, headers)
            reader = self._reader
            assert reader is not None
            if fields.get("transfer-encoding", "").lower() == "chunked":
                body = b"".join([chunk async for chunk in _chunks(reader)])
            else:
                size = int(fields.get("content-length", "0"))
                body = await reader.readexactly(size) if size else b""
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            await self.close()
            raise HTTPError(f"connection lost: {type(exc).__name__}") from exc
        if fields.get("connection", "").lower() == "close":
            await self.close()
        return Response(status, fields, body)

    async def stream_lines(
        self, path: str, headers: dict[str, str] | None = None
    ) -> AsyncIterator[str | int]:
        """GET a streamed answer: first its status (an int), then its body's lines. The
        connection is closed afterwards (a stream is not reused)."""
        try:
            status, fields = await self._start(path, headers)
            yield status
            reader = self._reader
            assert reader is not None
            pending = b""
            chunked = fields.get("transfer-encoding", "").lower() == "chunked"
            source = _chunks(reader) if chunked else _raw(reader)
            async for chunk in source:
                pending += chunk
                *done, pending = pending.split(b"\n")
                for line in done:
                    yield line.rstrip(b"\r").decode("utf-8")
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise HTTPError(f"connection lost: {type(exc).__name__}") from exc
        finally:
            await self.close()


async def _chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """The chunks of a ``Transfer-Encoding: chunked`` body, up to the last (empty) one."""
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # the empty trailer
            return
        chunk = await reader.readexactly(size + 2)
        yield chunk[:-2]


async def _raw(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while chunk := await reader.read(65536):
        yield chunk
