"""The bulk-upload zip reader on its own: every archive is built here, in memory, with zipfile and struct."""

import builtins
import dataclasses
import gzip
import io
import os
import random
import struct
import tarfile
import tracemalloc
import zipfile
import zlib

import pytest

from recognition import archive
from recognition.archive import ArchiveItem, ArchiveLimits, ArchiveRefused, read_archive

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png(seed: int, size: int = 2000) -> bytes:
    """PNG-like bytes that do not compress much, different for every seed."""
    return PNG_MAGIC + random.Random(seed).randbytes(size)


def make_zip(entries, compression=zipfile.ZIP_DEFLATED, comment: bytes = b"") -> bytes:
    """entries: (name or ZipInfo, bytes) pairs."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as zf:
        for name, data in entries:
            zf.writestr(name, data)
        zf.comment = comment
    return buffer.getvalue()


def central_records(data: bytes) -> list[int]:
    """Offsets of the central directory records, in order."""
    end = data.rfind(b"PK\x05\x06")
    count, _, at = struct.unpack_from("<HLL", data, end + 10)
    records = []
    for _ in range(count):
        records.append(at)
        at += 46 + sum(struct.unpack_from("<3H", data, at + 28))
    return records


def local_header(data: bytes, index: int) -> int:
    return struct.unpack_from("<L", data, central_records(data)[index] + 42)[0]


def patch(data: bytes, at: int, fmt: str, *values) -> bytes:
    patched = bytearray(data)
    struct.pack_into(fmt, patched, at, *values)
    return bytes(patched)


def forge_size(data: bytes, index: int, file_size: int) -> bytes:
    """Declare another uncompressed size for one entry, in both its headers."""
    data = patch(data, central_records(data)[index] + 24, "<L", file_size)
    return patch(data, local_header(data, index) + 22, "<L", file_size)


def read(data: bytes, limits: ArchiveLimits = ArchiveLimits()) -> list[ArchiveItem]:  # noqa: B008
    return list(read_archive(io.BytesIO(data), limits))


def refusal(data: bytes, limits: ArchiveLimits = ArchiveLimits()) -> str:  # noqa: B008
    """The refusal's code, raised by read_archive itself, before anything is iterated."""
    with pytest.raises(ArchiveRefused) as caught:
        read_archive(io.BytesIO(data), limits)
    assert caught.value.message and str(caught.value) == caught.value.message
    return caught.value.code


def outcomes(items: list[ArchiveItem]) -> list[tuple[int, str]]:
    return [(item.index, item.error) for item in items]


class Unseekable(io.RawIOBase):
    """Makes zipfile write data descriptors, as streaming zip tools do."""

    def __init__(self):
        self.buffer = io.BytesIO()

    def writable(self):
        return True

    def write(self, data):
        return self.buffer.write(data)


# Accepted archives


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED])
@pytest.mark.parametrize("comment", [b"", b"made by the integration engine"])
def test_three_images_come_back_in_order_with_exact_bytes(compression, comment):
    images = [png(1), png(2), png(3, 0)]
    items = read(make_zip([("a.png", images[0]), ("b.png", images[1]), ("c.png", images[2])], compression, comment))
    assert items == [ArchiveItem(0, images[0], ""), ArchiveItem(1, images[1], ""), ArchiveItem(2, images[2], "")]


def test_a_streamed_archive_with_data_descriptors_reads_the_same():
    images = [png(4), png(5)]
    stream = Unseekable()
    with zipfile.ZipFile(stream, "w", zipfile.ZIP_DEFLATED) as zf:
        for i, image in enumerate(images):
            with zf.open(f"{i}.png", "w") as entry:
                entry.write(image)
    data = stream.buffer.getvalue()
    assert struct.unpack_from("<H", data, 6)[0] & 0x8  # the data descriptor flag is really set
    assert [item.data for item in read(data)] == images


def test_data_prepended_to_the_archive_does_not_shift_the_entries():
    images = [png(6), png(7)]
    data = b"#!/bin/sh self-extractor stub\n" * 10 + make_zip([("a.png", images[0]), ("b.png", images[1])])
    assert [item.data for item in read(data)] == images


def zip64_archive(image: bytes, offset: int = 0, compressed: int | None = None) -> bytes:
    """One stored entry whose central record keeps its sizes and offset in a zip64 extra field, and a
    zip64 end record: what archives over 4 GiB carry, forged small here."""
    name, crc = b"big.png", zlib.crc32(image)
    compressed = len(image) if compressed is None else compressed
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 45, 0, 0, 0, 0, crc, len(image), len(image), len(name), 0)
    extra = struct.pack("<2H3Q", 1, 24, len(image), compressed, offset)
    wide = 0xFFFFFFFF  # "see the zip64 extra field"
    versions_flags_method_time_date = (45, 45, 0, 0, 0, 0)
    lengths_disk_attributes = (len(name), len(extra), 0, 0, 0, 0)
    central = struct.pack(
        "<4s6H3L5H2L", b"PK\x01\x02", *versions_flags_method_time_date, crc, wide, wide, *lengths_disk_attributes, wide
    )
    directory = central + name + extra
    start = len(local) + len(name) + len(image)
    end64 = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, 1, 1, len(directory), start)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, start + len(directory), 1)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return local + name + image + directory + end64 + locator + end


def test_zip64_records_are_understood():
    data = zip64_archive(png(8))
    assert zipfile.ZipFile(io.BytesIO(data)).read("big.png") == png(8)  # the forgery is a valid zip
    assert read(data) == [ArchiveItem(0, png(8), "")]


@pytest.mark.parametrize("offset, compressed", [(2**64 - 1, None), (0, 2**64 - 1)], ids=["offset", "size"])
def test_zip64_values_past_the_end_refuse_the_archive_rather_than_crash(offset, compressed):
    assert refusal(zip64_archive(png(8), offset, compressed)) == "overlapping_entries"


def test_directories_are_skipped_and_indexes_stay_positions():
    images = [png(9), png(10)]
    data = make_zip([("scans/", b""), ("scans/a.png", images[0]), ("empty/", b""), ("scans/b.png", images[1])])
    assert read(data) == [ArchiveItem(1, images[0], ""), ArchiveItem(3, images[1], "")]


def test_an_archive_whose_name_says_archive_is_judged_by_content():
    assert read(make_zip([("really-a-scan.zip", png(11))])) == [ArchiveItem(0, png(11), "")]


# Zip-slip names: read like any other, nothing written


def listing(root) -> set[str]:
    return {os.path.join(folder, name) for folder, dirs, files in os.walk(root) for name in dirs + files}


def test_zip_slip_names_are_read_as_plain_items_and_nothing_is_written(tmp_path, monkeypatch):
    names = ["../../etc/passwd", "/etc/cron.d/evil", "..\\..\\windows\\system32\\evil.dll", "C:/evil.png", "a/../../b"]
    images = [png(20 + i) for i in range(len(names))]
    upload = tmp_path / "uploads" / "deep" / "upload.zip"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(make_zip(list(zip(names, images, strict=True))))
    monkeypatch.chdir(upload.parent)
    before = (listing(tmp_path), sorted(os.listdir(tmp_path.parent)), sorted(os.listdir(os.getcwd())))

    def no_writing(*args, **kwargs):
        raise AssertionError(f"the archive reader opened a file: {args}")

    with upload.open("rb") as fileobj, monkeypatch.context() as during:
        during.setattr(builtins, "open", no_writing)
        during.setattr(os, "open", no_writing)
        items = list(read_archive(fileobj))

    after = (listing(tmp_path), sorted(os.listdir(tmp_path.parent)), sorted(os.listdir(os.getcwd())))
    assert after == before
    assert items == [ArchiveItem(i, image, "") for i, image in enumerate(images)]
    assert [field.name for field in dataclasses.fields(ArchiveItem)] == ["index", "data", "error"]
    assert not any(name.encode() in item.data or name in repr(item) for name, item in zip(names, items, strict=True))


# Entries that fail on their own


def test_a_symbolic_link_is_a_failed_item_and_the_others_are_read():
    link = zipfile.ZipInfo("scan.png")
    link.external_attr = 0o120777 << 16
    data = make_zip([("a.png", png(30)), (link, b"/etc/passwd"), ("b.png", png(31))])
    items = read(data)
    assert outcomes(items) == [(0, ""), (1, "symbolic links are not accepted"), (2, "")]
    assert items[1].data is None and items[2].data == png(31)


def test_a_regular_file_with_unix_permissions_is_not_taken_for_a_link():
    regular = zipfile.ZipInfo("scan.png")
    regular.external_attr = 0o100644 << 16
    assert read(make_zip([(regular, png(32))])) == [ArchiveItem(0, png(32), "")]


def nested_zip() -> bytes:
    return make_zip([("inner.png", png(40))])


def nested_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("inner.png")
        info.size = len(png(41))
        tar.addfile(info, io.BytesIO(png(41)))
    return buffer.getvalue()


@pytest.mark.parametrize(
    "inner",
    [nested_zip, lambda: gzip.compress(png(42)), nested_tar, lambda: b"7z\xbc\xaf\x27\x1c" + png(43)],
    ids=["zip", "gzip", "tar", "7z"],
)
def test_an_archive_inside_the_archive_is_a_failed_item_whatever_its_name(inner):
    data = make_zip([("a.png", png(44)), ("scan.png", inner()), ("b.png", png(45))])
    assert outcomes(read(data)) == [(0, ""), (1, "archives inside the archive are not accepted"), (2, "")]


def test_an_encrypted_entry_is_a_failed_item():
    data = make_zip([("a.png", png(50)), ("secret.png", png(51)), ("b.png", png(52))])
    flags = struct.unpack_from("<H", data, central_records(data)[1] + 8)[0]
    data = patch(data, central_records(data)[1] + 8, "<H", flags | 0x1)
    data = patch(data, local_header(data, 1) + 6, "<H", flags | 0x1)
    items = read(data)
    assert outcomes(items) == [(0, ""), (1, "encrypted entries are not accepted"), (2, "")]
    assert items[1].data is None


def spy_on_decompression(monkeypatch) -> list[int]:
    """The sizes of the chunks decompressed, as they are decompressed."""
    inflated = []
    original = archive._decompressed

    def counting(*args):
        for chunk in original(*args):
            inflated.append(len(chunk))
            yield chunk

    monkeypatch.setattr(archive, "_decompressed", counting)
    return inflated


RATIO_ERROR = "the entry decompresses to more than 100 times its compressed size"


def bomb(megabytes: int = 20) -> bytes:
    return make_zip([("a.png", png(60)), ("bomb.png", b"\0" * (megabytes * 1024 * 1024)), ("b.png", png(61))])


def peak_memory(function):
    tracemalloc.start()
    try:
        result = function()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_declared_high_ratio_bomb_is_a_failed_item_without_decompressing_it(monkeypatch):
    data = bomb()
    inflated = spy_on_decompression(monkeypatch)
    items, peak = peak_memory(lambda: read(data, ArchiveLimits(max_ratio=100)))
    assert outcomes(items) == [(0, ""), (1, RATIO_ERROR), (2, "")]
    assert sum(inflated) == len(png(60)) + len(png(61))  # only the two images were decompressed
    assert peak < 2 * 1024 * 1024  # 20 MiB were never held


def test_a_bomb_that_lies_about_its_size_is_caught_while_reading(monkeypatch):
    data = forge_size(bomb(), 1, 10)  # declares 10 bytes, inflates to 20 MiB
    compressed = struct.unpack_from("<L", data, central_records(data)[1] + 20)[0]
    inflated = spy_on_decompression(monkeypatch)
    items, peak = peak_memory(lambda: read(data, ArchiveLimits(max_ratio=100)))
    assert outcomes(items) == [(0, ""), (1, RATIO_ERROR), (2, "")]
    assert 100 * compressed < sum(inflated) <= 100 * compressed + 64 * 1024  # stopped just past 100 x, not at 20 MiB
    assert peak < 8 * 1024 * 1024


@pytest.mark.parametrize("forged", [False, True], ids=["declared", "lying"])
def test_an_entry_over_the_size_limit_is_caught_by_declaration_or_while_reading(monkeypatch, forged):
    data = make_zip([("big.png", png(70, 300_000))])
    inflated = spy_on_decompression(monkeypatch)
    items = read(forge_size(data, 0, 1000) if forged else data, ArchiveLimits(max_entry_bytes=128 * 1024))
    assert outcomes(items) == [(0, "the entry decompresses to more than 128 KiB")]
    if forged:  # read in chunks until just past the limit
        assert 128 * 1024 < sum(inflated) <= 192 * 1024
    else:  # never decompressed at all
        assert inflated == []


def test_an_entry_larger_than_declared_but_within_limits_is_damaged():
    data = forge_size(make_zip([("a.png", png(72, 4000))]), 0, 1000)
    assert outcomes(read(data)) == [(0, "the entry is damaged: it holds 4,008 bytes, not the 1,000 declared")]


def test_a_wrong_checksum_is_damage():
    data = make_zip([("a.png", png(73)), ("b.png", png(74))])
    crc = struct.unpack_from("<L", data, central_records(data)[0] + 16)[0]
    data = patch(data, central_records(data)[0] + 16, "<L", crc ^ 1)
    assert outcomes(read(data)) == [(0, "the entry is damaged: its checksum does not match its contents"), (1, "")]


def test_corrupt_deflate_data_is_damage():
    data = make_zip([("a.png", png(75)), ("b.png", png(76))])
    start = local_header(data, 0) + 30 + len("a.png")
    data = patch(data, start, "<B", 0xFF)  # block type 3: invalid
    [first, second] = read(data)
    assert first.data is None and first.error.startswith("the entry is damaged: ") and second.error == ""


def test_an_unsupported_compression_method_is_damage():
    data = make_zip([("a.png", png(77)), ("b.png", png(78))], zipfile.ZIP_BZIP2)
    assert outcomes(read(data)) == [
        (0, "the entry is damaged: its compression method (12) is not supported"),
        (1, "the entry is damaged: its compression method (12) is not supported"),
    ]


# Whole archives refused


@pytest.mark.parametrize("maximum, refused", [(3, False), (2, True)])
def test_too_many_entries_refuse_the_archive(maximum, refused):
    data = make_zip([(f"{i}.png", png(80 + i)) for i in range(3)])
    if refused:
        assert refusal(data, ArchiveLimits(max_entries=maximum)) == "too_many_entries"
    else:
        assert len(read(data, ArchiveLimits(max_entries=maximum))) == 3


def test_entries_are_counted_even_when_the_end_record_understates_them():
    data = make_zip([(f"{i}.png", png(90 + i)) for i in range(5)])
    end = data.rfind(b"PK\x05\x06")
    data = patch(data, end + 8, "<2H", 2, 2)
    assert len(zipfile.ZipFile(io.BytesIO(data)).infolist()) == 5  # zipfile itself would read all five
    assert refusal(data, ArchiveLimits(max_entries=2)) == "too_many_entries"


def test_an_end_record_claiming_too_many_entries_refuses_the_archive():
    data = make_zip([(f"{i}.png", png(95 + i)) for i in range(3)])
    end = data.rfind(b"PK\x05\x06")
    assert refusal(patch(data, end + 8, "<2H", 9, 9), ArchiveLimits(max_entries=5)) == "too_many_entries"


def test_a_central_directory_larger_than_the_entry_limit_could_need_is_refused_before_it_is_read():
    entries = []
    for i in range(3):
        entry = zipfile.ZipInfo(f"{i}.png")
        entry.comment = b"c" * 60_000  # per-entry comments live in the central directory
        entries.append((entry, png(98 + i)))
    data = make_zip(entries)
    assert len(read(data)) == 3
    assert refusal(data, ArchiveLimits(max_entries=3)) == "too_many_entries"


@pytest.mark.parametrize("maximum, refused", [(3 * 2008, False), (3 * 2008 - 1, True)])
def test_a_declared_total_over_the_limit_refuses_the_archive(maximum, refused):
    data = make_zip([(f"{i}.png", png(100 + i)) for i in range(3)])
    if refused:
        assert refusal(data, ArchiveLimits(max_total_bytes=maximum)) == "too_large"
    else:
        assert len(read(data, ArchiveLimits(max_total_bytes=maximum))) == 3


def test_two_records_pointing_at_the_same_data_refuse_the_archive():
    data = make_zip([("a.png", png(110)), ("b.png", png(111))])
    assert len(read(data)) == 2
    data = patch(data, central_records(data)[1] + 42, "<L", local_header(data, 0))
    assert refusal(data) == "overlapping_entries"


def test_data_running_into_the_central_directory_refuses_the_archive():
    data = make_zip([("a.png", png(112)), ("b.png", png(113))])
    compressed = struct.unpack_from("<L", data, central_records(data)[1] + 20)[0]
    data = patch(data, central_records(data)[1] + 20, "<L", compressed + 1)
    assert refusal(data) == "overlapping_entries"


def test_a_local_name_that_differs_from_the_directory_refuses_the_archive():
    data = make_zip([("a.png", png(114)), ("b.png", png(115))])
    data = patch(data, local_header(data, 1) + 30, "<1s", b"x")
    assert refusal(data) == "inconsistent_headers"


def truncated_directory() -> bytes:
    data = make_zip([("a.png", png(120)), ("b.png", png(121))])
    return data[: central_records(data)[1] + 10]


def damaged_directory() -> bytes:
    data = make_zip([("a.png", png(122)), ("b.png", png(123))])
    return patch(data, central_records(data)[1], "<4s", b"PK\x01\x09")


@pytest.mark.parametrize(
    "data",
    [lambda: b"", lambda: png(124), lambda: gzip.compress(png(125)), truncated_directory, damaged_directory],
    ids=["empty", "png", "gzip", "truncated", "damaged"],
)
def test_not_a_zip_is_refused(data):
    assert refusal(data()) == "not_a_zip"


def test_bytes_actually_read_past_the_total_limit_refuse_the_rest_mid_stream():
    images = [png(130, 4000), png(131, 4000), png(132, 4000)]
    data = forge_size(make_zip([(f"{i}.png", image) for i, image in enumerate(images)]), 2, 1000)
    items = read_archive(io.BytesIO(data), ArchiveLimits(max_total_bytes=9100))  # declares 9,016 bytes
    assert next(items) == ArchiveItem(0, images[0], "")
    assert next(items) == ArchiveItem(1, images[1], "")
    with pytest.raises(ArchiveRefused) as caught:
        next(items)
    assert caught.value.code == "too_large"


def test_an_error_the_reader_did_not_foresee_fails_that_entry_alone(monkeypatch):
    """Whatever goes wrong inside one entry, short of the archive as a whole being too large or
    the file under it failing, is that entry's failure in words; the entries after it still come."""
    real = archive._read_entry

    def unforeseen(fileobj, entry, limits, total):
        if entry.index == 1:
            raise ValueError("a case nobody thought of")
        return real(fileobj, entry, limits, total)

    monkeypatch.setattr(archive, "_read_entry", unforeseen)
    items = read(make_zip([("a.png", png(1)), ("b.png", png(2)), ("c.png", png(3))]))
    assert [item.data is not None for item in items] == [True, False, True]
    assert items[1].error == "the entry could not be read (ValueError)"


def test_a_failing_file_under_the_archive_still_ends_the_reading(monkeypatch):
    def unreadable(fileobj, entry, limits, total):
        raise OSError("the disk under the archive failed")

    monkeypatch.setattr(archive, "_read_entry", unreadable)
    with pytest.raises(OSError):
        read(make_zip([("a.png", png(1))]))
