"""Stream a set of files as a ``.tar`` in constant memory, with its exact length known in
advance (``Content-Length``) and an ``ETag`` derived from names, sizes and times."""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BLOCK = tarfile.BLOCKSIZE  # 512
CHUNK = 1 << 20


@dataclass(frozen=True)
class Member:
    arcname: str
    path: Path | None  # None: a directory entry
    size: int
    mtime: float

    def header(self) -> bytes:
        info = tarfile.TarInfo(self.arcname)
        info.mtime = int(self.mtime)
        if self.path is None:
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
        else:
            info.size = self.size
            info.mode = 0o644
        return info.tobuf(format=tarfile.PAX_FORMAT)


def _padding(size: int) -> int:
    return (BLOCK - size % BLOCK) % BLOCK


@dataclass(frozen=True)
class TarPlan:
    members: list[Member]

    @classmethod
    def of_directory(cls, root: Path, top: str) -> TarPlan:
        """Every regular file below ``root`` (links are skipped), under the folder ``top``."""
        members = [Member(top, None, 0, root.stat().st_mtime)]
        for path in sorted(root.rglob("*")):
            if path.is_symlink():
                continue
            rel = path.relative_to(root).as_posix()
            st = path.stat()
            if path.is_dir():
                members.append(Member(f"{top}/{rel}", None, 0, st.st_mtime))
            elif path.is_file():
                members.append(Member(f"{top}/{rel}", path, st.st_size, st.st_mtime))
        return cls(members)

    @classmethod
    def of_files(cls, files: list[Path], top: str) -> TarPlan:
        members = [Member(top, None, 0, max((f.stat().st_mtime for f in files), default=0))]
        for path in files:
            st = path.stat()
            members.append(Member(f"{top}/{path.name}", path, st.st_size, st.st_mtime))
        return cls(members)

    @property
    def content_length(self) -> int:
        total = 2 * BLOCK  # end-of-archive marker
        for m in self.members:
            total += len(m.header()) + m.size + _padding(m.size)
        return total

    @property
    def etag(self) -> str:
        digest = hashlib.sha256()
        for m in self.members:
            digest.update(f"{m.arcname}\0{m.size}\0{m.mtime}\n".encode())
        return f'"{digest.hexdigest()[:32]}"'

    def _segments(self) -> Iterator[tuple[int, bytes | None, Path | None]]:
        """(length, bytes, or the file to read them from) in archive order."""
        for m in self.members:
            header = m.header()
            yield len(header), header, None
            if m.path is not None:
                yield m.size, None, m.path
                if _padding(m.size):
                    yield _padding(m.size), b"\0" * _padding(m.size), None
        yield 2 * BLOCK, b"\0" * (2 * BLOCK), None

    def stream(self, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Bytes ``[start, end)`` of the archive; members before ``start`` are skipped
        without reading them (a resumed download does not reread what it has)."""
        end = self.content_length if end is None else end
        offset = 0
        for length, data, path in self._segments():
            seg_start, offset = offset, offset + length
            if offset <= start:
                continue
            if seg_start >= end:
                break
            lo, hi = max(start, seg_start) - seg_start, min(end, offset) - seg_start
            if data is not None:
                yield data[lo:hi]
            else:
                assert path is not None
                yield from _read_range(path, lo, hi)


def _read_range(path: Path, lo: int, hi: int) -> Iterator[bytes]:
    with path.open("rb") as fh:
        fh.seek(lo)
        remaining = hi - lo
        while remaining > 0:
            chunk = fh.read(min(CHUNK, remaining))
            if not chunk:  # the file shrank under us: keep the archive well-formed
                chunk = b"\0" * min(CHUNK, remaining)
            remaining -= len(chunk)
            yield chunk


def parse_range(header: str, total: int) -> tuple[int, int] | None:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` -> [start, end) ; None if unsatisfiable
    or not a single byte range."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or last.isdigit()):
        return None
    if not first:  # a suffix: the last n bytes
        n = int(last)
        return (max(0, total - n), total) if n > 0 else None
    start = int(first)
    end = min(int(last) + 1, total) if last.isdigit() else total
    return (start, end) if start < end else None
