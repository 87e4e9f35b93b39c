"""A strict, streaming tar reader and a minimal tar writer (spec/archive.md).

Only what OCI image layouts need: regular files and folders. The reader takes one pass
over a stream (a file, or a zstd decompressor), never seeks and never holds more than
one block of a member in memory. It is stricter than ``tarfile`` so that a damaged
archive is refused rather than half read:

* every header's checksum is checked, and the checksum field itself must be written
  in one of the canonical forms (``%06o\\0 ``, ``%07o\\0``, ``%06o \\0``);
* the padding after a member's data and everything after the end-of-archive blocks
  must be zero bytes;
* a stream that ends before the end-of-archive marker is refused.

PAX extended headers (``x``; ``path`` and ``size`` keys) and GNU long names (``L``) are
applied to the next member; global PAX headers (``g``) are ignored. A size, in a
header (octal digits, or GNU base-256 for a positive number) or in a PAX record (decimal
digits), is read strictly: a negative, signed or otherwise malformed one is damage. Every
loop of the reader consumes input on each turn or raises, so no archive can make it spin.
Every failure raises :class:`TarDamaged` (an ``IntegrityError``).
"""

from __future__ import annotations

import errno
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from blobstore.errors import IntegrityError
from blobstore.layout import start_writeback

__all__ = ["BLOCK", "Readable", "TarDamaged", "TarMember", "TarReader", "Writeback",
           "copy_range", "tar_header", "tar_padding", "tar_trailer"]

BLOCK = 512
RECORD = 20 * BLOCK
_ZERO_BLOCK = bytes(BLOCK)
_MAX_META = 1 << 20  # a PAX header or GNU long name larger than this is not a real one
# POSIX ustar numeric fields: octal digits (leading spaces as old writers put them),
# ended by NUL or space. GNU base-256 marks a binary number with 0x80 (0xff: negative).
_OCTAL = re.compile(rb" *([0-7]+)[ \0]*")
_PAX_SIZE = re.compile(r"[0-9]{1,20}")  # decimal, as pax(1) writes; 20 digits > 2**64


class TarDamaged(IntegrityError):
    """The tar stream is damaged or not a tar stream."""

    def __init__(self, reason: str, *, offset: int | None = None,
                 source: str | None = None) -> None:
        where = f" at byte {offset}" if offset is not None else ""
        src = f"{source}: " if source else ""
        super().__init__(f"{src}damaged archive{where}: {reason}",
                         hint="the archive was changed or truncated; copy it again")
        self.reason = reason
        self.offset = offset


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


@dataclass
class TarMember:
    name: str
    size: int
    type: bytes  # tarfile.REGTYPE, DIRTYPE, ...
    offset: int  # offset of the header in the (uncompressed) stream

    @property
    def is_file(self) -> bool:
        return self.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)

    @property
    def is_dir(self) -> bool:
        return self.type == tarfile.DIRTYPE


def _header_size(field: bytes) -> int | None:
    """The ``size`` field of a header (12 bytes), or None if it is not a valid size."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    if not field.strip(b" \0"):
        return 0  # an empty field (all NUL or blank), as some writers leave a link's
    m = _OCTAL.fullmatch(field)
    return int(m.group(1), 8) if m else None


def _checksum_ok(block: bytes) -> bool:
    field = block[148:156]
    calc = 256 + sum(block[:148]) + sum(block[156:])
    return field in (f"{calc:06o}\0 ".encode(), f"{calc:07o}\0".encode(),
                     f"{calc:06o} \0".encode())


class TarReader:
    """Iterate the members of a tar stream; read each one's data before the next.

    ``for m in reader: data = reader.read(...)`` — data not read is skipped (and its
    bytes still checked for padding) when the iteration moves on.
    """

    def __init__(self, stream: Readable, *, source: str | None = None,
                 length: int | None = None) -> None:
        """``length``: the stream's size if known (a plain file); a member that claims
        more data than is left is then refused at its header, not after a long read."""
        self._stream = stream
        self.source = source
        self.length = length
        self.offset = 0          # bytes consumed from the stream
        self._left = 0           # data bytes of the current member not read yet
        self._pad = 0            # padding after the current member
        self.ended = False

    # ------------------------------------------------------------------ raw reads
    def _damaged(self, reason: str, offset: int | None = None) -> TarDamaged:
        return TarDamaged(reason, offset=self.offset if offset is None else offset,
                          source=self.source)

    def _read_exact(self, n: int) -> bytes:
        parts: list[bytes] = []
        want = n
        while want:
            got = self._stream.read(want)
            if not got:
                raise self._damaged("unexpected end of the archive (truncated)")
            parts.append(got)
            want -= len(got)
            self.offset += len(got)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes of the current member's data (``b""`` at its end)."""
        n = min(n, self._left)
        if n <= 0:
            return b""
        got = self._stream.read(n)
        if not got:
            raise self._damaged("unexpected end of the archive (truncated)")
        self.offset += len(got)
        self._left -= len(got)
        return got

    def _finish_member(self) -> None:
        while self._left > 0:  # each read consumes at least one byte, or raises
            self.read(min(self._left, 1 << 20))
        if self._pad:
            pad = self._read_exact(self._pad)
            self._pad = 0
            if pad.count(0) != len(pad):
                raise self._damaged("non-zero padding after a member", self.offset - len(pad))

    # ------------------------------------------------------------------ members
    def __iter__(self) -> Iterator[TarMember]:
        long_name: str | None = None
        pax: dict[str, str] = {}
        pax_at = 0  # where the PAX header that applies to the next member is
        while True:
            self._finish_member()
            at = self.offset
            block = self._read_exact(BLOCK)
            if block == _ZERO_BLOCK:
                self._check_trailer()
                return
            if not _checksum_ok(block):
                raise self._damaged("bad tar header checksum", at)
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError as exc:
                raise self._damaged(f"bad tar header ({exc})", at) from exc
            size = _header_size(block[124:136])
            if size is None:
                raise self._damaged(f"bad member size {block[124:136]!r}", at)
            if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME):
                if size > _MAX_META:
                    raise self._damaged("oversized extended header", at)
                data = self._read_exact(size)
                self._pad = -size % BLOCK
                self._finish_member()
                if info.type == tarfile.GNUTYPE_LONGNAME:
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                elif info.type == tarfile.XHDTYPE:
                    pax, pax_at = self._parse_pax(data, at), at
                continue
            name = pax.get("path") or long_name or info.name
            if "size" in pax:
                if not _PAX_SIZE.fullmatch(pax["size"]):
                    raise self._damaged(f"bad PAX size {pax['size']!r}", pax_at)
                size = int(pax["size"])
            long_name, pax = None, {}
            has_data = info.type not in (tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                                         tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE)
            self._left = size if has_data else 0
            if self.length is not None and self.offset + self._left > self.length:
                raise self._damaged(f"a member of {self._left} bytes runs past the end of "
                                    f"the archive (truncated)", at)
            self._pad = -self._left % BLOCK
            yield TarMember(name, self._left, info.type, at)

    def _parse_pax(self, data: bytes, at: int) -> dict[str, str]:
        out: dict[str, str] = {}
        pos = 0
        while pos < len(data):
            if data[pos] == 0:  # trailing NULs
                if data[pos:].count(0) != len(data) - pos:
                    raise self._damaged("bad PAX header", at)
                break
            sp = data.find(b" ", pos)
            digits = data[pos:sp] if sp > pos else b""
            if not (digits.isdigit() and len(digits) <= 7):  # ASCII digits only
                raise self._damaged("bad PAX record length", at)
            length = int(digits)
            record = data[pos:pos + length]
            if length <= sp - pos or len(record) != length or not record.endswith(b"\n"):
                raise self._damaged("bad PAX record", at)
            key, eq, value = record[sp - pos + 1:-1].partition(b"=")
            if not eq:
                raise self._damaged("bad PAX record", at)
            out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8",
                                                                       "surrogateescape")
            pos += length
        return out

    def _check_trailer(self) -> None:
        """After the first zero block: only zero bytes may follow, up to the end."""
        self.ended = True
        second = self._read_exact(BLOCK)  # POSIX: two zero blocks end an archive
        seen = 0
        tail = second
        while True:
            if tail.count(0) != len(tail):
                raise self._damaged("data after the end-of-archive marker")
            tail = self._stream.read(1 << 16)
            if not tail:
                break
            seen += len(tail)
        self.offset += seen


# ---------------------------------------------------------------------- writing
def tar_header(name: str, size: int, *, is_dir: bool = False, mtime: int = 0) -> bytes:
    """A ustar header for a regular file (mode 0644) or folder (0755), uid/gid 0."""
    info = tarfile.TarInfo(name)
    info.size = 0 if is_dir else size
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.mode = 0o755 if is_dir else 0o644
    info.mtime = mtime
    info.uname = info.gname = ""
    if len(name.encode()) <= 100:
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def tar_padding(size: int) -> bytes:
    return bytes(-size % BLOCK)


def tar_trailer(written: int) -> bytes:
    """Two zero blocks, then zeros up to a full 10 KiB record (as GNU tar writes)."""
    end = written + 2 * BLOCK
    return bytes(2 * BLOCK + (-end % RECORD))


def copy_range(src_fd: int, dst_fd: int, size: int,
               after: Callable[[int], None] | None = None) -> None:
    """Copy ``size`` bytes from ``src_fd`` (at its start) to ``dst_fd`` (at its position)
    in the kernel where possible; ``after(done)`` is called every 64 MiB and at the end."""
    offset = 0
    try:
        while offset < size:
            n = os.sendfile(dst_fd, src_fd, offset, min(size - offset, 64 << 20))
            if n == 0:
                raise OSError("file shrank while it was being copied")
            offset += n
            if after is not None:
                after(offset)
        return
    except OSError as exc:
        if offset or exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise  # (sendfile refused before any byte: fall back to read/write)
    os.lseek(src_fd, 0, os.SEEK_SET)
    while offset < size:
        chunk = os.read(src_fd, min(size - offset, 1 << 20))
        if not chunk:
            raise OSError("file shrank while it was being copied")
        view = memoryview(chunk)
        while view:  # a pipe or device may take less than was given
            view = view[os.write(dst_fd, view):]
        offset += len(chunk)
        if after is not None and (offset % (64 << 20) == 0 or offset == size):
            after(offset)


class Writeback:
    """Starts the kernel's writeback of a file as it grows (``layout.start_writeback``), so
    that the ``fsync`` before the final rename finds little left to write."""

    STEP = 32 << 20

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.started = 0

    def kick(self, _done: int = 0) -> None:
        pos = os.lseek(self.fd, 0, os.SEEK_CUR)
        if pos - self.started >= self.STEP:
            start_writeback(self.fd, self.started, pos - self.started)
            self.started = pos
