"""Reading an uploaded zip of images safely, entry by entry.

The caller streams the upload to a seekable temporary file and hands it here. This module writes
nothing anywhere and never uses entry names as paths: an item carries only its position and bytes,
and the caller stores the bytes under a name it makes itself. So zip-slip names (``../../etc/passwd``,
absolute paths, backslashes) are harmless; such entries are read like any other.

The zip structures are parsed here with ``struct`` rather than by ``zipfile.ZipFile``, because
ZipFile (as of CPython 3.11.7) reads the whole central directory into memory however many records
it holds, does not refuse overlapping entries, cuts an entry's output at its *declared* size (so a
lying size shows up only as a CRC error) and decompresses bzip2/LZMA without a bound on the output
of one read. Here every count and size is checked against `ArchiveLimits` as it is read.

``read_archive`` checks the whole central directory when it is called, before any item exists, and
raises `ArchiveRefused` for an archive that must be refused as a whole (the caller answers 4xx).
It then returns an iterator of `ArchiveItem`. An entry that cannot be accepted becomes an item with
``error`` set; reading goes on with the rest. One refusal can still come mid-stream: if the bytes
*actually* decompressed pass ``max_total_bytes`` (declared sizes can lie), the iterator raises
``ArchiveRefused("too_large")``. Items already yielded stay valid; the caller should fail the job's
remaining work. Keep the file open while iterating.
"""

from __future__ import annotations

import dataclasses
import io
import stat
import struct
import zlib
from collections.abc import Iterator
from typing import IO

_END = struct.Struct("<4s4H2LH")  # end of central directory record, 22 bytes
_END64 = struct.Struct("<4sQ2H2L4Q")  # zip64 end of central directory record, 56 bytes
_LOCATOR64_SIZE = 20
_CENTRAL = struct.Struct("<4s6H3L5H2L")  # central directory record, 46 bytes (+ name, extra, comment)
_LOCAL = struct.Struct("<4s5H3L2H")  # local file header, 30 bytes (+ name, extra)
_MAX_COMMENT = 0xFFFF
_STORED, _DEFLATED = 0, 8
_CHUNK = 64 * 1024
_SIGNATURE = 4  # bytes: every record starts with "PK" and two more
_COMMENT_LENGTH = 2  # bytes: the end record's last field, the archive comment's length
_CENTRAL_OFFSET = 16  # the central record's field holding its local header's offset
_EXTRA_HEADER = struct.Struct("<2H")  # an extra field's id and length
_ZIP64_MARK = 0xFFFFFFFF  # a size or offset that did not fit 32 bits: see the zip64 extra field
_ZIP64_VALUE = 8  # bytes of each value in the zip64 extra field
# fields of the records, by position: zip64 end (entries, directory size, offset), central
# (flags, method; crc, sizes, name/extra/comment lengths), local (name and extra lengths)
_END64_DIRECTORY = slice(7, 10)
_CENTRAL_FLAGS, _CENTRAL_SIZES = slice(3, 5), slice(7, 13)
_LOCAL_LENGTHS = slice(-2, None)
# A real archive's central record is 46 bytes plus a name and a little extra; 4 KiB on average is
# generous. This bounds what is read before the records can be counted.
_DIRECTORY_BYTES_PER_ENTRY = 4096
_ARCHIVE_MAGIC = (  # (offset, signature): zip, gzip, 7z, rar, xz, bzip2, zstd, tar
    (0, b"PK\x03\x04"),
    (0, b"PK\x05\x06"),
    (0, b"PK\x07\x08"),
    (0, b"\x1f\x8b"),
    (0, b"7z\xbc\xaf\x27\x1c"),
    (0, b"Rar!\x1a\x07"),
    (0, b"\xfd7zXZ\x00"),
    (0, b"BZh"),
    (0, b"\x28\xb5\x2f\xfd"),
    (257, b"ustar"),
)


@dataclasses.dataclass(frozen=True)
class ArchiveLimits:
    max_entries: int = 10_000
    max_entry_bytes: int = 50 * 1024 * 1024  # per entry, uncompressed, counted while reading
    max_total_bytes: int = 2 * 1024**3  # whole archive, uncompressed: declared AND actually read
    max_ratio: float = 100.0  # per entry: uncompressed / compressed (declared, and again as read)


class ArchiveRefused(Exception):
    """The whole archive is refused. ``code`` is for programs, ``message`` for people."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass(frozen=True)
class ArchiveItem:
    index: int  # position of the entry's record in the central directory (0-based, directories counted)
    data: bytes | None  # the entry's bytes when accepted
    error: str  # "" when accepted; otherwise why this entry became a failed item, in words


@dataclasses.dataclass(frozen=True)
class _Entry:
    index: int
    name: bytes
    flags: int
    method: int
    crc: int
    compressed: int
    size: int
    mode: int
    header_offset: int
    data_offset: int = 0


class _EntryFailed(Exception):
    pass


def read_archive(fileobj: IO[bytes], limits: ArchiveLimits = ArchiveLimits()) -> Iterator[ArchiveItem]:
    """Check the archive as a whole now, then return an iterator of its items (files only).

    Raises `ArchiveRefused` at once with code ``not_a_zip``, ``too_many_entries``, ``too_large``
    (declared sizes), ``overlapping_entries`` or ``inconsistent_headers``; the iterator may raise
    ``too_large`` later, when the bytes actually decompressed pass ``limits.max_total_bytes``.
    ``fileobj`` is a seekable binary file, read from (never written) while iterating.
    """
    entries = _checked_entries(fileobj, limits)
    return _items(fileobj, entries, limits)


def _amount(n: float) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{int(n)} bytes"


def _directory_extent(fileobj: IO[bytes]) -> tuple[int, int, int, int]:
    """From the end records: declared entry count, the central directory's real start and size, and
    how far the whole archive sits from where it says it is (data prepended, as in self-extractors)."""
    file_size = fileobj.seek(0, io.SEEK_END)
    tail_start = max(0, file_size - _END.size - _MAX_COMMENT)
    fileobj.seek(tail_start)
    tail = fileobj.read()
    at = len(tail) - _END.size  # the usual case, no archive comment; else search as zipfile does
    if at < 0 or tail[at : at + _SIGNATURE] != b"PK\x05\x06" or tail[-_COMMENT_LENGTH:] != b"\0\0":
        at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _END.size:
        raise ArchiveRefused("not_a_zip", "The file is not a zip archive, or its end is missing.")
    _, _, _, _, count, size, offset, _ = _END.unpack_from(tail, at)
    end = tail_start + at
    if end >= _LOCATOR64_SIZE + _END64.size:
        fileobj.seek(end - _LOCATOR64_SIZE - _END64.size)
        record = fileobj.read(_END64.size + _LOCATOR64_SIZE)
        if record[_END64.size : _END64.size + _SIGNATURE] == b"PK\x06\x07":
            if record[:_SIGNATURE] != b"PK\x06\x06":
                raise _damaged_directory()
            count, size, offset = _END64.unpack_from(record)[_END64_DIRECTORY]
            end -= _LOCATOR64_SIZE + _END64.size
    start = end - size
    if start < offset:
        raise _damaged_directory()
    return count, start, size, start - offset


def _damaged_directory() -> ArchiveRefused:
    return ArchiveRefused("not_a_zip", "The zip archive's central directory is damaged.")


def _read_directory(fileobj: IO[bytes], limits: ArchiveLimits) -> tuple[list[_Entry], int]:
    count, start, size, shift = _directory_extent(fileobj)
    too_many = ArchiveRefused("too_many_entries", f"The archive has more than {limits.max_entries:,} entries.")
    if count > limits.max_entries or size > limits.max_entries * _DIRECTORY_BYTES_PER_ENTRY:
        raise too_many
    fileobj.seek(start)
    directory = fileobj.read(size)  # bounded just above
    entries: list[_Entry] = []
    at = 0
    while at < size:  # the declared count can lie; the records themselves are counted
        if len(entries) == limits.max_entries:
            raise too_many
        if size - at < _CENTRAL.size or directory[at : at + _SIGNATURE] != b"PK\x01\x02":
            raise _damaged_directory()
        fields = _CENTRAL.unpack_from(directory, at)
        flags, method, crc, compressed, uncompressed, name_len, extra_len, comment_len = (
            fields[_CENTRAL_FLAGS] + fields[_CENTRAL_SIZES]
        )
        name_start = at + _CENTRAL.size
        extra_start = name_start + name_len
        at = extra_start + extra_len + comment_len
        if at > size:
            raise _damaged_directory()
        extra = directory[extra_start : extra_start + extra_len]
        uncompressed, compressed, offset = _zip64_values(extra, uncompressed, compressed, fields[_CENTRAL_OFFSET])
        name = directory[name_start:extra_start]
        mode = fields[15] >> 16  # Unix file type and permissions
        entries.append(_Entry(len(entries), name, flags, method, crc, compressed, uncompressed, mode, offset + shift))
    return entries, start


def _zip64_values(extra: bytes, uncompressed: int, compressed: int, offset: int) -> tuple[int, int, int]:
    """Sizes and offset that do not fit 32 bits are 0xFFFFFFFF, the real values in the zip64 extra field."""
    values = [uncompressed, compressed, offset]
    while len(extra) >= _EXTRA_HEADER.size:
        kind, length = _EXTRA_HEADER.unpack_from(extra)
        start = _EXTRA_HEADER.size
        body, extra = extra[start : start + length], extra[start + length :]
        if kind == 1:
            wide = iter(struct.unpack_from(f"<{len(body) // _ZIP64_VALUE}Q", body))
            for i, value in enumerate(values):
                if value == _ZIP64_MARK:
                    values[i] = next(wide, None)
                    if values[i] is None:
                        raise _damaged_directory()
            break
    return values[0], values[1], values[2]


def _checked_entries(fileobj: IO[bytes], limits: ArchiveLimits) -> list[_Entry]:
    entries, directory_start = _read_directory(fileobj, limits)
    if sum(entry.size for entry in entries) > limits.max_total_bytes:
        raise ArchiveRefused("too_large", f"The archive declares more than {_amount(limits.max_total_bytes)} in all.")
    located, spans, missing, mismatched = [], [], [], []
    for entry in entries:
        header, name_len, extra_len = b"", 0, 0
        if entry.header_offset + _LOCAL.size <= directory_start:  # else refused below, without seeking to 2**64
            fileobj.seek(entry.header_offset)
            header = fileobj.read(_LOCAL.size)
        if len(header) < _LOCAL.size or header[:_SIGNATURE] != b"PK\x03\x04":
            missing.append(entry)
        else:
            name_len, extra_len = _LOCAL.unpack(header)[_LOCAL_LENGTHS]
            if fileobj.read(name_len) != entry.name:
                mismatched.append(entry)
        data_offset = entry.header_offset + _LOCAL.size + name_len + extra_len
        spans.append((entry.header_offset, data_offset + entry.compressed))
        located.append(dataclasses.replace(entry, data_offset=data_offset))
    spans.sort()
    if any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False)) or any(
        end > directory_start for _, end in spans
    ):
        message = "Entries of the archive overlap each other or its central directory (a zip bomb's trick)."
        raise ArchiveRefused("overlapping_entries", message)
    if missing:
        raise ArchiveRefused("not_a_zip", f"Entry {missing[0].index} has no local header where the directory says.")
    if mismatched:
        message = f"Entry {mismatched[0].index} has a different name in its local header than in the directory."
        raise ArchiveRefused("inconsistent_headers", message)
    return located


class _Total:
    """Bytes actually decompressed so far, across entries: declared sizes can lie."""

    def __init__(self, limit: int):
        self.limit, self.read = limit, 0

    def add(self, n: int) -> None:
        self.read += n
        if self.read > self.limit:
            message = f"The archive decompresses to more than {_amount(self.limit)} in all."
            raise ArchiveRefused("too_large", message)


def _items(fileobj: IO[bytes], entries: list[_Entry], limits: ArchiveLimits) -> Iterator[ArchiveItem]:
    total = _Total(limits.max_total_bytes)
    for entry in entries:
        if entry.name.endswith(b"/"):
            continue  # a directory: nothing to read
        try:
            data, error = _read_entry(fileobj, entry, limits, total), ""
        except _EntryFailed as failure:
            data, error = None, str(failure)
        except (ArchiveRefused, OSError):
            raise  # the archive as a whole (too large as read), or the file under it: not this entry's
        except Exception as exc:  # a case this reader did not foresee: this entry fails, the rest go on
            data, error = None, f"the entry could not be read ({type(exc).__name__})"
        yield ArchiveItem(entry.index, data, error)


def _read_entry(fileobj: IO[bytes], entry: _Entry, limits: ArchiveLimits, total: _Total) -> bytes:
    by_size = f"the entry decompresses to more than {_amount(limits.max_entry_bytes)}"
    by_ratio = f"the entry decompresses to more than {limits.max_ratio:g} times its compressed size"
    ratio_ceiling = limits.max_ratio * max(entry.compressed, 1)
    if stat.S_ISLNK(entry.mode):
        raise _EntryFailed("symbolic links are not accepted")
    if entry.flags & 0x1:
        raise _EntryFailed("encrypted entries are not accepted")
    if entry.method not in (_STORED, _DEFLATED):
        raise _EntryFailed(f"the entry is damaged: its compression method ({entry.method}) is not supported")
    if entry.size > limits.max_entry_bytes:
        raise _EntryFailed(by_size)
    if entry.size > ratio_ceiling:
        raise _EntryFailed(by_ratio)
    content, crc = io.BytesIO(), 0
    for chunk in _decompressed(fileobj, entry):
        total.add(len(chunk))
        size = content.tell() + len(chunk)
        if size > limits.max_entry_bytes:
            raise _EntryFailed(by_size)
        if size > ratio_ceiling:
            raise _EntryFailed(by_ratio)
        content.write(chunk)
        crc = zlib.crc32(chunk, crc)
    data = content.getvalue()
    if len(data) != entry.size:
        raise _EntryFailed(f"the entry is damaged: it holds {len(data):,} bytes, not the {entry.size:,} declared")
    if crc != entry.crc:
        raise _EntryFailed("the entry is damaged: its checksum does not match its contents")
    if any(data[at : at + len(magic)] == magic for at, magic in _ARCHIVE_MAGIC):
        raise _EntryFailed("archives inside the archive are not accepted")
    return data


def _decompressed(fileobj: IO[bytes], entry: _Entry) -> Iterator[bytes]:
    """The entry's bytes in chunks of at most _CHUNK, however much they expand."""
    fileobj.seek(entry.data_offset)
    left, pending = entry.compressed, b""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS) if entry.method == _DEFLATED else None
    while True:
        if not pending and left:
            pending = fileobj.read(min(_CHUNK, left))
            if not pending:
                raise _EntryFailed("the entry is damaged: the archive ends inside it")
            left -= len(pending)
        if inflater is None:  # stored
            if not pending:
                return
            yield pending
            pending = b""
            continue
        try:
            chunk = inflater.decompress(pending, _CHUNK)
        except zlib.error as exc:
            raise _EntryFailed(f"the entry is damaged: {exc}")
        pending = inflater.unconsumed_tail
        if chunk:
            yield chunk
        if inflater.eof:
            return
        if not chunk and not pending and not left:
            raise _EntryFailed("the entry is damaged: its compressed data ends early")
