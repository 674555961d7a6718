"""A deflated DICOM that inflates past the upload limit is refused while inflating, in bounded memory."""

import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from recognition import dicom
from tests.unit.test_dicom import LIMITS, ct_dataset, make_dataset, to_bytes

ROOT = Path(__file__).resolve().parents[2]
INFLATED = 1024**3  # about 1 GB once inflated ...
LIMIT = 50 * 1024 * 1024  # ... against the default upload limit


def deflated_bomb(inflated_bytes: int = INFLATED) -> bytes:
    """A valid Part 10 file in Deflated Explicit VR Little Endian: a small CT header, then Pixel
    Data of ``inflated_bytes`` zeros, compressed as it is built (about 1 MB for 1 GB)."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    head = DicomBytesIO()
    head.write(bytes(128) + b"DICM")
    write_file_meta_info(head, meta)
    header = Dataset()
    header.SOPClassUID, header.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    header.Rows, header.Columns, header.SamplesPerPixel, header.BitsAllocated = 512, 512, 1, 16
    header.BitsStored, header.HighBit, header.PixelRepresentation = 16, 15, 0
    header.PhotometricInterpretation = "MONOCHROME2"
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, header)
    # (7FE0,0010) OW, then a 4-byte length: explicit VR little endian
    body.write(b"\xe0\x7f\x10\x00OW\x00\x00" + inflated_bytes.to_bytes(4, "little"))
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [packer.compress(body.getvalue())]
    zeros, left = bytes(16 * 1024 * 1024), inflated_bytes
    while left > 0:
        parts.append(packer.compress(zeros[: min(left, len(zeros))]))
        left -= len(zeros)
    parts.append(packer.flush())
    return head.getvalue() + b"".join(parts)


@pytest.fixture(scope="session")
def bomb_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "bomb.dcm"
    path.write_bytes(deflated_bomb())
    return path


# peak resident memory from /proc (VmHWM): ru_maxrss would carry over the forking parent's peak
PROBE = """
import json, sys
from recognition import dicom
def peak():
    line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
data = open(sys.argv[1], "rb").read()
before = peak()
try:
    dicom.parse(data, max_pixels=40_000_000, max_frames=300, max_bytes=int(sys.argv[2]))
    outcome = "parsed"
except dicom.DicomError as exc:
    outcome = exc.code
after = peak()
print(json.dumps({"outcome": outcome, "before": before, "after": after}))
"""


def test_a_deflate_bomb_is_refused_while_inflating_and_memory_stays_bounded(bomb_file):
    assert bomb_file.stat().st_size < 2 * 1024 * 1024  # small on the wire
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, str(bomb_file), str(LIMIT)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr
    measured = json.loads(probe.stdout.strip().splitlines()[-1])
    assert measured["outcome"] == "too_many_bytes"
    grew = measured["after"] - measured["before"]
    # the inflated bytes are held at most once or twice (the buffer and its copy), never 1 GB
    assert grew < 3 * LIMIT, f"peak memory grew by {grew / 2**20:.0f} MiB"
    assert measured["after"] < INFLATED / 4


def test_inflating_stops_at_the_limit_and_says_so_in_words():
    data = deflated_bomb(8 * 1024 * 1024)
    with pytest.raises(dicom.DicomTooLarge) as caught:
        dicom.dicom_read(data, max_bytes=4 * 1024 * 1024)
    assert caught.value.code == "too_many_bytes" and "4 MB" in caught.value.message
    assert dicom.dicom_read(data, max_bytes=9 * 1024 * 1024).Rows == 512  # under the limit it reads


def test_pydicom_is_never_handed_deflated_bytes(monkeypatch):
    seen = []
    real = dicom.pydicom.dcmread
    monkeypatch.setattr(dicom.pydicom, "dcmread", lambda fp, **kw: seen.append(fp.getvalue()) or real(fp, **kw))
    ds = make_dataset(np.arange(64, dtype=np.uint16).reshape(8, 8))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    parsed = dicom.parse(to_bytes(ds), **LIMITS)

    assert parsed.transfer_syntax_name == "Deflated Explicit VR Little Endian"  # as it was received
    assert seen and all(b"1.2.840.10008.1.2.1.99" not in blob[:512] for blob in seen)
    assert str(parsed.dataset.file_meta.TransferSyntaxUID) == ExplicitVRLittleEndian


def test_a_bare_deflated_dataset_from_a_network_receiver_goes_through_the_same_bound():
    """What a C-STORE SCP holds: the dataset's bytes in the negotiated transfer syntax, no Part 10 header."""
    ds = ct_dataset()
    plain = DicomBytesIO()
    plain.is_little_endian, plain.is_implicit_VR = True, False
    write_dataset(plain, ds)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bare = packer.compress(plain.getvalue()) + packer.flush()

    read = dicom.dicom_read(bare, max_bytes=1024 * 1024, transfer_syntax=DeflatedExplicitVRLittleEndian)
    assert read.Rows == 32 and read.PatientID == ds.PatientID
    with pytest.raises(dicom.DicomTooLarge):
        dicom.dicom_read(bare, max_bytes=1024, transfer_syntax=DeflatedExplicitVRLittleEndian)


# Reads of a stored original (never of bytes from outside), so each file's count of dcmread calls
# is pinned: every DICOM original stored passed the bounded inflater first (the upload's
# dicom.parse, the ingest's dicom_inflate/dicom_read, both bounded by SIGHTLINE_MAX_UPLOAD_BYTES),
# so inflating it again cannot grow past that limit. A new call in these files is flagged too.
# objects.py (source_dataset, _read_instance): the stored original's header for the objects built
# from it; sending.py (_c_store): the stored instance's file meta before sending it as it is.
STORED_ORIGINAL_READS = {"dicomnet/objects.py": 2, "dicomnet/sending.py": 1}


def test_no_code_but_the_bounded_reader_calls_pydicom_s_reader_or_inflates():
    """A later receiver (DIMSE, STOW-RS) that called dcmread or zlib itself would skip the bound."""
    offenders = []
    for folder in ("accounts", "config", "dicomnet", "recognition", "workers"):
        for path in (ROOT / folder).rglob("*.py"):
            name = str(path.relative_to(ROOT))
            if name == "recognition/dicom.py":
                continue
            text = path.read_text()
            calls = ["read_file(", "zlib.decompress("]
            if name != "recognition/archive.py":  # zip entries: its own inflater, bounded by ArchiveLimits
                calls.append("decompressobj(")
            reads = text.count("dcmread(")
            if any(call in text for call in calls) or reads > STORED_ORIGINAL_READS.get(name, 0):
                offenders.append(name)
    assert offenders == [], "read DICOM through recognition.dicom.dicom_read (bounded inflating)"


def test_a_bare_dataset_in_a_plain_syntax_reads_as_it_came():
    plain = DicomBytesIO()
    plain.is_little_endian, plain.is_implicit_VR = True, True
    write_dataset(plain, ct_dataset())
    read = dicom.dicom_read(plain.getvalue(), max_bytes=1024 * 1024, transfer_syntax=ImplicitVRLittleEndian)
    assert read.Rows == 32 and str(read.file_meta.TransferSyntaxUID) == ImplicitVRLittleEndian
    with pytest.raises(dicom.DicomTooLarge):  # the bytes on the wire are bounded too
        dicom.dicom_read(plain.getvalue(), max_bytes=1024, transfer_syntax=ImplicitVRLittleEndian)
