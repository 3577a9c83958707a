"""Streaming multipart uploads: the file part goes straight to disk in fixed-size chunks
(constant memory), its SHA-256 is computed on the way, and the size limit is enforced while
the bytes arrive (413 before the rest is read). Also: safe stored names and the gzip check.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import unicodedata
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from app.problems import Problem

MAX_FIELD_BYTES = 16 * 1024
MAX_FIELDS = 16
MULTIPART_OVERHEAD = 64 * 1024  # headers and small fields around the file part
GZIP_MAGIC = b"\x1f\x8b"
TEXT_SUFFIXES = {
    ".txt": "txt",
    ".text": "txt",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}


def safe_filename(name: str) -> str:
    """A name safe to store: no directories, no traversal, no control or odd characters."""
    name = unicodedata.normalize("NFKC", name).replace("\\", "/").split("/")[-1]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    name = name[-120:]  # keep the suffix, which decides the format
    name = name.lstrip(".")  # no hidden files, no '..'
    return name or "corpus.txt"


_NOT_DISPLAYED = {"Cc", "Cs", "Zl", "Zp"}  # controls, lone surrogates, line/paragraph breaks
# bidi embeddings, overrides and isolates can disguise a name ("\u202etxt.exe"); the marks
# (LRM, RLM) and joiners that right-to-left text and emoji sequences need are kept
_BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def display_filename(name: str) -> str:
    """The client's name, kept for display only: no path, no control character, line break
    or bidi override (any other Unicode -- emoji sequences, RTL marks -- is kept as sent),
    bounded length."""
    base = name.replace("\\", "/").split("/")[-1]
    base = "".join(
        ch
        for ch in base
        if unicodedata.category(ch) not in _NOT_DISPLAYED and ch not in _BIDI_CONTROLS
    )
    if len(base) > 255:  # keep the start and the suffix
        base = base[:200] + "..." + base[-52:]
    return base or "corpus"


def detect_format(filename: str) -> tuple[str, bool]:
    """(``txt`` | ``jsonl``, compressed) from the name; 422 for anything else."""
    lower = filename.lower()
    compressed = lower.endswith(".gz")
    stem = lower[:-3] if compressed else lower
    for suffix, fmt in TEXT_SUFFIXES.items():
        if stem.endswith(suffix):
            return fmt, compressed
    raise Problem(
        422,
        "unsupported_file_type",
        f"unsupported file name {display_filename(filename)!r}: expected .txt or .jsonl "
        "optionally followed by .gz",
    )


@dataclass
class StoredFile:
    field_name: str
    client_filename: str
    path: Path
    bytes: int = 0
    sha256: str = ""


@dataclass
class MultipartResult:
    fields: dict[str, str] = field(default_factory=dict)
    file: StoredFile | None = None
    directory: Path | None = None

    def discard(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


class _Receiver:
    """python-multipart callbacks: fields are kept (small), the file part is streamed."""

    def __init__(self, dest_root: Path | None, file_field: str, max_bytes: int) -> None:
        self.dest_root = dest_root
        self.file_field = file_field
        self.max_bytes = max_bytes
        self.result = MultipartResult()
        self._headers: dict[str, str] = {}
        self._hname = b""
        self._hvalue = b""
        self._part_name: str | None = None
        self._is_file = False
        self._field_buf = bytearray()
        self._out: BinaryIO | None = None
        self._hasher = hashlib.sha256()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": self.header_field,
            "on_header_value": self.header_value,
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": self.part_data,
            "on_part_end": self.part_end,
        }

    def part_begin(self) -> None:
        self._headers = {}
        self._part_name = None
        self._is_file = False
        self._field_buf = bytearray()

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def header_end(self) -> None:
        self._headers[self._hname.decode("latin-1").lower()] = self._hvalue.decode("latin-1")
        self._hname = self._hvalue = b""

    def headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition", ""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        self._part_name = name
        filename = options.get(b"filename")
        if filename is None:
            if len(self.result.fields) >= MAX_FIELDS:
                raise Problem(422, "too_many_fields", "too many form fields")
            return
        if name != self.file_field:
            raise Problem(
                422,
                "unexpected_file",
                f"unexpected file field {name[:64]!r}: send the file as '{self.file_field}'",
            )
        if self.result.file is not None:
            raise Problem(422, "too_many_files", "send exactly one file per request")
        client_name = filename.decode("utf-8", "replace")
        detect_format(client_name)  # refuse an unknown type before storing anything
        self._is_file = True
        if self.dest_root is None:  # hashing only (an idempotent replay)
            path = Path("/dev/null")
        else:
            self.result.directory = self.dest_root / uuid.uuid4().hex
            self.result.directory.mkdir(parents=True)
            path = self.result.directory / safe_filename(client_name)
            self._out = path.open("xb")
        self.result.file = StoredFile(name, display_filename(client_name), path)

    def part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if not self._is_file:
            self._field_buf += chunk
            if len(self._field_buf) > MAX_FIELD_BYTES:
                raise Problem(413, "field_too_large", f"form field {self._part_name!r} too large")
            return
        stored = self.result.file
        assert stored is not None
        stored.bytes += len(chunk)
        if stored.bytes > self.max_bytes:
            raise Problem(
                413,
                "upload_too_large",
                f"the file exceeds the upload limit of {self.max_bytes} bytes",
            )
        self._hasher.update(chunk)
        if self._out is not None:
            self._out.write(chunk)

    def part_end(self) -> None:
        if self._is_file:
            assert self.result.file is not None
            self.result.file.sha256 = self._hasher.hexdigest()
            if self._out is not None:
                self._out.close()
                self._out = None
        elif self._part_name:
            try:
                self.result.fields[self._part_name] = self._field_buf.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise Problem(
                    422, "invalid_field", f"form field {self._part_name!r} is not UTF-8"
                ) from exc

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


async def receive_multipart(
    request: Request, dest_root: Path | None, *, file_field: str = "file", max_bytes: int
) -> MultipartResult:
    """Parse a ``multipart/form-data`` body as it streams in. ``dest_root=None`` only hashes
    the file (nothing is stored). On any error the partial file is removed."""
    content_type = request.headers.get("content-type", "")
    ctype, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise Problem(415, "unsupported_media_type", "send the corpus as multipart/form-data")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + MULTIPART_OVERHEAD:
        raise Problem(
            413, "upload_too_large", f"the request exceeds the upload limit of {max_bytes} bytes"
        )
    receiver = _Receiver(dest_root, file_field, max_bytes)
    parser = MultipartParser(boundary, receiver.callbacks())
    try:
        async for chunk in request.stream():
            if chunk:
                await run_in_threadpool(parser.write, chunk)
        parser.finalize()
    except Problem:
        receiver.close()
        receiver.result.discard()
        raise
    except ClientDisconnect:
        receiver.close()
        receiver.result.discard()
        raise
    except Exception as exc:  # the multipart parser's own errors: a malformed body
        receiver.close()
        receiver.result.discard()
        raise Problem(400, "malformed_multipart", "the multipart body is malformed") from exc
    receiver.close()
    stored = receiver.result.file
    if stored is not None and not stored.sha256:
        receiver.result.discard()
        raise Problem(400, "malformed_multipart", "the file part is incomplete")
    return receiver.result


def check_gzip(path: Path, *, max_uncompressed: int, max_ratio: float) -> int | None:
    """If ``path`` is gzip (by its magic bytes), decompress it as a stream with a cap on the
    output size and on the compression ratio (a gzip bomb is a 413) and return the
    uncompressed size; a corrupt stream is a 422. ``None`` for a plain file."""
    with path.open("rb") as fh:
        if fh.read(2) != GZIP_MAGIC:
            return None
        fh.seek(0)
        total_in = total_out = 0
        decomp = zlib.decompressobj(16 + zlib.MAX_WBITS)
        member_open = False  # the current gzip member got input but has not ended
        try:
            while chunk := fh.read(1 << 16):
                total_in += len(chunk)
                data = chunk
                while data:
                    member_open = True
                    out = decomp.decompress(data, 1 << 20)
                    total_out += len(out)
                    _check_bomb(total_in, total_out, max_uncompressed, max_ratio)
                    if decomp.eof:  # a member ended: what follows is the next member
                        data = decomp.unused_data
                        decomp = zlib.decompressobj(16 + zlib.MAX_WBITS)
                        member_open = False
                    else:
                        data = decomp.unconsumed_tail
            if member_open:
                raise zlib.error("truncated gzip stream")
        except zlib.error as exc:
            raise Problem(422, "invalid_corpus", "the gzip stream is corrupt or truncated") from exc
    return total_out


def _check_bomb(total_in: int, total_out: int, max_uncompressed: int, max_ratio: float) -> None:
    if total_out > max_uncompressed:
        raise Problem(
            413,
            "uncompressed_too_large",
            f"the decompressed corpus exceeds the limit of {max_uncompressed} bytes",
        )
    if total_out > (16 << 20) and total_out > max_ratio * max(total_in, 1):
        raise Problem(
            413,
            "compression_ratio_too_high",
            f"the gzip stream expands more than {max_ratio:g}x (a gzip bomb?)",
        )
