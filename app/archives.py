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

    def stream(self) -> Iterator[bytes]:
        for m in self.members:
            yield m.header()
            if m.path is None:
                continue
            remaining = m.size
            with m.path.open("rb") as fh:
                while remaining > 0:
                    chunk = fh.read(min(CHUNK, remaining))
                    if not chunk:  # the file shrank under us: keep the archive well-formed
                        chunk = b"\0" * min(CHUNK, remaining)
                    remaining -= len(chunk)
                    yield chunk
            if _padding(m.size):
                yield b"\0" * _padding(m.size)
        yield b"\0" * (2 * BLOCK)
