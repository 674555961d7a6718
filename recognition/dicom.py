"""Reading DICOM files: validation, metadata, and frames for display and for the model.

Pure functions over bytes: no Django, no storage, no database. pydicom does the parsing; the
pylibjpeg plugins (and Pillow) decode JPEG, JPEG-LS, JPEG 2000 and RLE pixel data.

Every way a DICOM object enters the platform goes through ``dicom_read`` (or ``parse``, which
uses it): web uploads, the worker that unpacks archives, and the DIMSE C-STORE SCP and STOW-RS
receivers. pydicom and pynetdicom inflate a Deflated Explicit VR Little Endian dataset whole,
without a bound (about 1 MB on the wire becomes 1 GB), so pydicom is never handed deflated bytes:
``dicom_read`` inflates them itself, counting output bytes while inflating and stopping at
``max_bytes`` (the upload byte limit), and gives pydicom the inflated dataset as Explicit VR
Little Endian. A receiver that holds a bare dataset (no Part 10 header, e.g. a C-STORE's
``event.request.DataSet``) passes its ``transfer_syntax``; it never calls ``event.dataset``.

Every exception a decoder raises on a damaged file (pydicom, numpy, pylibjpeg, Pillow) becomes
a ``DicomUnreadable`` in words, here, at the decoder: callers never see a bare library error.

Nothing here puts a patient's name or id into an error message, a log line or a repr.
"""

from __future__ import annotations

import datetime as dt
import functools
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from io import SEEK_END, BytesIO
from typing import Any, BinaryIO, TypeVar

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, get_decoder
from pydicom.uid import UID, AllTransferSyntaxes, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

PREAMBLE_SIZE = 128
MAGIC = b"DICM"
# Elements above this size (in practice Pixel Data) are read from the buffer only when needed.
DEFER_SIZE = "1 MB"
PIXEL_DATA_TAG_LE, PIXEL_DATA_TAG_BE = b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10"  # (7FE0,0010)
TRUNCATED = "This DICOM file is truncated: its image data is incomplete."
TEXT_LIMIT = 64  # the longest value DICOM allows for LO/SH-style identifiers
BITS_ALLOCATED = (1, 8, 16, 32)
GRAY = ("MONOCHROME1", "MONOCHROME2")
COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")
# PS3.5 A.5: the dataset after the file meta is raw deflate (the two JPIP ones carry no pixels)
DEFLATED_SYNTAXES = (DeflatedExplicitVRLittleEndian, "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.205")
INFLATE_CHUNK = 64 * 1024  # input fed per step; output per step is bounded by what is left of max_bytes
PIXEL_DATA_TAG = 0x7FE00010  # (7FE0,0010)
UNDEFINED_LENGTH = 0xFFFFFFFF  # an encapsulated element's length: it runs to its delimiter
COLOUR_SAMPLES = 3  # samples per pixel of a colour image
DATE_DIGITS = 8  # YYYYMMDD
# PS3.3 C.11.2.1.3.1: the SIGMOID VOI LUT function's slope, fixed by the standard
_SIGMOID_SLOPE = -4.0
_MIN_LINEAR_WIDTH = 1e-6  # a LINEAR window 1 wide would divide by zero (width - 1)


class DicomError(Exception):
    """A DICOM file this module cannot use; `code` is stable, `message` is for people."""

    code = "dicom_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code


class DicomUnreadable(DicomError):
    """Not DICOM, damaged or truncated, or without an image."""

    code = "dicom_unreadable"


class DicomUnsupportedSyntax(DicomError):
    """Valid DICOM whose pixel encoding (transfer syntax) no installed decoder handles. ``header``
    holds what is known without the pixels (see ``header_fields``), so the caller can keep the file."""

    code = "unsupported_transfer_syntax"
    header: dict = {}  # noqa: RUF012  (replaced per instance by parse)


class DicomTooLarge(DicomError):
    """More pixels per frame or more frames than the caller allows."""

    code = "dicom_too_large"


@dataclass(frozen=True)
class DicomFile:
    """A parsed, validated DICOM image. Identifiers are kept out of repr(); the name is not kept."""

    dataset: Dataset = field(repr=False, compare=False)
    patient_id: str = field(repr=False)
    study_instance_uid: str
    accession_number: str = field(repr=False)
    study_date: dt.date | None
    study_description: str
    modality: str
    series_instance_uid: str
    series_number: int | None
    series_description: str
    sop_instance_uid: str
    instance_number: int | None
    rows: int
    columns: int
    frames: int
    photometric: str
    transfer_syntax_name: str
    default_window: tuple[float, float] | None
    is_color: bool

    @property
    def pixels(self) -> int:
        """Pixels decoding every frame produces (rows x columns x frames)."""
        return self.rows * self.columns * self.frames

    @property
    def is_compressed(self) -> bool:
        """Pixel data in a compressed transfer syntax (JPEG, JPEG-LS, JPEG 2000, RLE...): its
        decoding costs far more CPU per pixel than copying native pixels."""
        return UID(str(self.dataset.file_meta.TransferSyntaxUID)).is_compressed


def looks_like_dicom(head: bytes) -> bool:
    """True when `head` carries the DICOM Part 10 magic b"DICM" after the 128-byte preamble."""
    return head[PREAMBLE_SIZE : PREAMBLE_SIZE + len(MAGIC)] == MAGIC


def anonymized_preamble(data: bytes) -> bytes:
    """The same file with its 128-byte preamble zeroed (a preamble can hide arbitrary content)."""
    if not looks_like_dicom(data):
        raise DicomUnreadable("This file is not a DICOM file (the DICM marker is missing).", code="not_dicom")
    return bytes(PREAMBLE_SIZE) + data[PREAMBLE_SIZE:]


@functools.cache
def decoder_names() -> tuple[str, ...]:
    """Names of the transfer syntaxes whose pixel data this installation can decode."""
    names = []
    for uid in AllTransferSyntaxes:
        try:
            if get_decoder(uid).is_available:
                names.append(UID(uid).name)
        except NotImplementedError:
            continue
    return tuple(names)


def dicom_inflate(data: bytes, *, max_bytes: int) -> tuple[bytes, UID]:
    """The same Part 10 file, never deflated: a deflated dataset is inflated with a bound (output
    bytes counted while inflating, ``DicomTooLarge`` past ``max_bytes``) and its file meta says
    Explicit VR Little Endian. Returns the bytes and the transfer syntax the file was sent in."""
    if not looks_like_dicom(data):
        raise DicomUnreadable("This file is not a DICOM file (the DICM marker is missing).", code="not_dicom")
    if len(data) > max_bytes:
        raise _too_many_bytes(max_bytes)
    stream = BytesIO(data)
    stream.seek(PREAMBLE_SIZE + len(MAGIC))
    try:
        meta = _read_file_meta_info(stream)
        received = UID(str(meta.get("TransferSyntaxUID") or ""))
    except Exception as exc:
        raise DicomUnreadable("This DICOM file is damaged and could not be read.", code="unreadable") from exc
    if received not in DEFLATED_SYNTAXES:
        return data, received
    body = _inflate_bounded(memoryview(data)[stream.tell() :], max_bytes=max_bytes)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = DicomBytesIO()
    out.write(bytes(PREAMBLE_SIZE) + MAGIC)
    try:
        write_file_meta_info(out, meta, enforce_standard=False)
    except Exception as exc:
        raise DicomUnreadable("This DICOM file is damaged and could not be read.", code="unreadable") from exc
    out.write(body)
    return out.getvalue(), received


def dicom_read(source: bytes | BinaryIO, *, max_bytes: int, transfer_syntax: str | None = None) -> Dataset:
    """THE way into pydicom for a DICOM object from outside: a Part 10 file (bytes or a binary
    file), or, with ``transfer_syntax``, a bare dataset as a DIMSE C-STORE carries it. At most
    ``max_bytes`` are read and, for a deflated dataset, inflated (``DicomTooLarge`` past it)."""
    data = source if isinstance(source, bytes | bytearray | memoryview) else source.read(max_bytes + 1)
    data = bytes(data)
    if len(data) > max_bytes:
        raise _too_many_bytes(max_bytes)
    if transfer_syntax is not None:
        data = _as_part10(data, UID(str(transfer_syntax)), max_bytes=max_bytes)
    inflated, _ = dicom_inflate(data, max_bytes=max_bytes)
    return _dcmread(inflated)


def _as_part10(data: bytes, syntax: UID, *, max_bytes: int) -> bytes:
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if syntax in DEFLATED_SYNTAXES else syntax
    body = _inflate_bounded(memoryview(data), max_bytes=max_bytes) if syntax in DEFLATED_SYNTAXES else data
    out = DicomBytesIO()
    out.write(bytes(PREAMBLE_SIZE) + MAGIC)
    write_file_meta_info(out, meta, enforce_standard=False)
    out.write(body)
    return out.getvalue()


def _inflate_bounded(deflated: memoryview, *, max_bytes: int) -> bytes:
    """Raw deflate (PS3.5 A.5) inflated step by step: no step may produce more than what is left
    of ``max_bytes`` plus one byte, so a bomb is refused having used about ``max_bytes`` of memory."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    try:
        for start in range(0, len(deflated), INFLATE_CHUNK):
            pending = bytes(deflated[start : start + INFLATE_CHUNK])
            while pending and not inflater.eof:
                out += inflater.decompress(pending, max_bytes - len(out) + 1)
                if len(out) > max_bytes:
                    raise _too_many_bytes(max_bytes, inflated=True)
                pending = inflater.unconsumed_tail
            if inflater.eof:
                break
        while not inflater.eof and (piece := inflater.decompress(b"", max_bytes - len(out) + 1)):
            out += piece
            if len(out) > max_bytes:
                raise _too_many_bytes(max_bytes, inflated=True)
    except zlib.error as exc:
        raise DicomUnreadable("This DICOM file's compressed data is damaged.", code="unreadable") from exc
    if not inflater.eof:
        raise DicomUnreadable(TRUNCATED, code="truncated")
    return bytes(out)


def _too_many_bytes(max_bytes: int, *, inflated: bool = False) -> DicomTooLarge:
    what = "Inflated, this DICOM file is" if inflated else "This DICOM file is"
    return DicomTooLarge(f"{what} larger than {max_bytes // (1024 * 1024)} MB, the limit.", code="too_many_bytes")


def _dcmread(data: bytes) -> Dataset:
    try:
        return pydicom.dcmread(BytesIO(data), defer_size=DEFER_SIZE)
    except Exception as exc:
        raise DicomUnreadable("This DICOM file is damaged and could not be read.", code="unreadable") from exc


def parse(data: bytes, *, max_pixels: int, max_frames: int, max_bytes: int, decode_first: bool = True) -> DicomFile:
    """Read and validate a DICOM image; raises a DicomError subclass when it cannot be used.

    ``decode_first`` decodes frame 0 now (proving the pixels decode, and giving the default
    window); without it nothing is decoded, ``default_window`` is None, and the caller decodes
    each frame later, in a worker, each frame failing alone."""
    data, received = dicom_inflate(data, max_bytes=max_bytes)
    ds = _dcmread(data)

    pixel_elem = ds.get_item(PIXEL_DATA_TAG, keep_deferred=True)
    if pixel_elem is None:
        # pydicom drops an encapsulated element cut off before its end; its tag is still in the bytes
        if PIXEL_DATA_TAG_LE in data or PIXEL_DATA_TAG_BE in data:
            raise DicomUnreadable(TRUNCATED, code="truncated")
        raise DicomUnreadable("This DICOM file contains no image (no Pixel Data).", code="no_pixel_data")
    # a deferred element is only seeked over while reading, so a cut-off file is caught here;
    # a deflated file is read from pydicom's inflated copy, whose offsets differ from `data`'s
    stream = getattr(ds, "buffer", None)
    size = stream.seek(0, SEEK_END) if stream is not None else len(data)
    length, offset = getattr(pixel_elem, "length", None), getattr(pixel_elem, "value_tell", None)
    if length is not None and length != UNDEFINED_LENGTH and offset is not None and offset + length > size:
        raise DicomUnreadable(TRUNCATED, code="truncated")

    try:
        syntax = _check_syntax(ds, received)
    except DicomUnsupportedSyntax as exc:
        exc.header = {**header_fields(ds), "rows": _int(ds, "Rows") or 0, "columns": _int(ds, "Columns") or 0}
        raise
    rows, columns, frames, photometric = _check_image_attributes(ds)
    if rows * columns > max_pixels:
        raise DicomTooLarge(
            f"The image is {columns} x {rows} pixels ({rows * columns:,}); the limit is {max_pixels:,} per frame.",
            code="too_many_pixels",
        )
    if frames > max_frames:
        raise DicomTooLarge(f"The file has {frames} frames; the limit is {max_frames}.", code="too_many_frames")

    is_color = photometric in COLOR
    window = None
    if decode_first:
        window = _guarded(lambda: _default_window(ds, 0, _decode(ds, 0), is_color=is_color))

    return DicomFile(
        dataset=ds,
        **header_fields(ds),
        rows=rows,
        columns=columns,
        frames=frames,
        photometric=photometric,
        transfer_syntax_name=syntax.name,
        default_window=window,
        is_color=is_color,
    )


def header_fields(ds: Dataset) -> dict:
    """Patient, study, series and instance fields (never the patient's name)."""
    return {
        "patient_id": _text(ds, "PatientID"),
        "study_instance_uid": _text(ds, "StudyInstanceUID"),
        "accession_number": _text(ds, "AccessionNumber"),
        "study_date": _date(ds, "StudyDate"),
        "study_description": _text(ds, "StudyDescription"),
        "modality": _text(ds, "Modality"),
        "series_instance_uid": _text(ds, "SeriesInstanceUID"),
        "series_number": _int(ds, "SeriesNumber"),
        "series_description": _text(ds, "SeriesDescription"),
        "sop_instance_uid": _text(ds, "SOPInstanceUID"),
        "instance_number": _int(ds, "InstanceNumber"),
    }


_T = TypeVar("_T")


def _guarded(work: Callable[[], _T]) -> _T:
    """Run decoding work; any exception but our own (pydicom, numpy, pylibjpeg, Pillow on a
    damaged file: KeyError, AttributeError, ValueError...) becomes a DicomUnreadable in words."""
    try:
        return work()
    except DicomError:
        raise
    except MemoryError as exc:
        raise DicomTooLarge("Decoding this DICOM image needs more memory than is available.") from exc
    except Exception as exc:
        raise DicomUnreadable(
            "The image data in this DICOM file could not be decoded; the file may be damaged or "
            "describe its pixels inconsistently.",
            code="decode_failed",
        ) from exc


def _default_window(ds: Dataset, index: int, arr: np.ndarray, *, is_color: bool) -> tuple[float, float]:
    if is_color:
        return (128.0, 256.0)  # the full uint8 range
    return _window_of(ds, index, _to_modality(ds, index, arr))


def _window_of(ds: Dataset, index: int, values: np.ndarray) -> tuple[float, float]:
    low, high = float(values.min()), float(values.max())
    return _file_window(ds, index) or _lut_window(ds) or ((low + high) / 2.0, max(high - low, 1.0))


def frame_window(dicom: DicomFile, index: int, values: np.ndarray | None = None) -> tuple[float, float]:
    """The default window for frame `index` (the file's, its VOI LUT's, or the frame's range);
    ``values``: that frame's modality values when they are decoded already."""
    if dicom.is_color:
        return (128.0, 256.0)
    values = frame_modality(dicom, index) if values is None else values
    return _guarded(lambda: _window_of(dicom.dataset, index, values))


def frame_modality(dicom: DicomFile, index: int) -> np.ndarray:
    """Frame `index` in modality units (e.g. HU) as float32 HxW, or uint8 HxWx3 RGB for colour."""
    if not 0 <= index < dicom.frames:
        raise IndexError(f"frame {index} does not exist; this file has {dicom.frames} frame(s)")
    return _guarded(lambda: _frame_modality(dicom, index))


def _frame_modality(dicom: DicomFile, index: int) -> np.ndarray:
    arr = _decode(dicom.dataset, index)
    if dicom.is_color:
        return _to_rgb8(dicom.dataset, arr)
    return _to_modality(dicom.dataset, index, arr)


def frame_display(dicom: DicomFile, index: int, values: np.ndarray | None = None) -> np.ndarray:
    """Frame `index` as uint8 for viewing and for the model: windowed HxW grayscale or HxWx3 RGB.

    Grayscale uses the file's window, else its VOI LUT, else the frame's own min/max; MONOCHROME1
    is inverted so that dense tissue is bright, as in MONOCHROME2.
    """
    values = frame_modality(dicom, index) if values is None else values  # ``values``: that frame's, decoded once
    if dicom.is_color:
        return values
    return _guarded(lambda: _display(dicom, index, values))


def _display(dicom: DicomFile, index: int, values: np.ndarray) -> np.ndarray:
    ds = dicom.dataset
    window = _file_window(ds, index)
    if window is not None:
        function = str(_lookup(ds, index, "FrameVOILUTSequence", "VOILUTFunction") or "LINEAR").upper()
        scaled = _apply_window(values, *window, function=function)
    elif (looked_up := _apply_voi_lut(ds, values)) is not None:
        scaled = looked_up
    else:
        scaled = _rescale(values.astype(np.float64), float(values.min()), float(values.max()))
    out = np.rint(scaled * 255.0).astype(np.uint8)
    if dicom.photometric == "MONOCHROME1" or str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE":
        out = 255 - out
    return out


def _check_syntax(ds: Dataset, received: UID) -> UID:
    """The syntax the file was sent in (a deflated one is inflated already) and whether it decodes."""
    uid = received if str(received) else None
    if not uid:
        raise DicomUnreadable(
            "This DICOM file does not say how its image is encoded (no Transfer Syntax UID).", code="unreadable"
        )
    uid = UID(str(uid))
    label = f"'{uid.name}' ({uid})" if uid.name != str(uid) else f"an unrecognised one ({uid})"
    try:
        available = get_decoder(uid).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise DicomUnsupportedSyntax(
            f"This image is encoded with the transfer syntax {label}, which this server cannot decode. "
            f"Supported: {', '.join(decoder_names())}."
        )
    return uid


def _check_image_attributes(ds: Dataset) -> tuple[int, int, int, str]:
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples, bits = int(ds.SamplesPerPixel), int(ds.BitsAllocated)
        stored = int(ds.get("BitsStored") or bits)
        frames = int(ds.get("NumberOfFrames") or 1)
        photometric = str(ds.PhotometricInterpretation).strip().upper()
    except (AttributeError, TypeError, ValueError) as exc:
        raise DicomUnreadable(
            "This DICOM file lacks the attributes that describe its image (rows, columns, bits, colour model).",
            code="bad_image_attributes",
        ) from exc
    colour_ok = (samples == 1 and photometric in (*GRAY, "PALETTE COLOR")) or (
        samples == COLOUR_SAMPLES and photometric in COLOR
    )
    if min(rows, columns, frames) < 1 or bits not in BITS_ALLOCATED or not 0 < stored <= bits or not colour_ok:
        raise DicomUnreadable(
            f"This DICOM file describes its image inconsistently ({rows} x {columns}, {frames} frame(s), "
            f"{samples} sample(s) of {bits} bits, {photometric or 'no colour model'}).",
            code="bad_image_attributes",
        )
    return rows, columns, frames, photometric


def _decode(ds: Dataset, index: int) -> np.ndarray:
    try:
        arr, _ = get_decoder(ds.file_meta.TransferSyntaxUID).as_array(ds, index=index)
    except Exception as exc:
        raise DicomUnreadable(
            "The image data in this DICOM file could not be decoded; the file may be damaged or truncated.",
            code="decode_failed",
        ) from exc
    return arr


def _to_modality(ds: Dataset, index: int, arr: np.ndarray) -> np.ndarray:
    if "ModalityLUTSequence" in ds:
        return apply_modality_lut(arr, ds).astype(np.float32)
    slope = _number(_lookup(ds, index, "PixelValueTransformationSequence", "RescaleSlope"))
    intercept = _number(_lookup(ds, index, "PixelValueTransformationSequence", "RescaleIntercept"))
    return arr.astype(np.float32) * np.float32(slope or 1.0) + np.float32(intercept or 0.0)


def _to_rgb8(ds: Dataset, arr: np.ndarray) -> np.ndarray:
    bits = int(ds.get("BitsStored") or ds.BitsAllocated)
    if str(ds.PhotometricInterpretation).strip().upper() == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)[..., :COLOUR_SAMPLES]
        bits = 8 * arr.dtype.itemsize
    if arr.dtype == np.uint8:
        return arr
    return np.rint(arr.astype(np.float64) * (255.0 / (2**bits - 1))).clip(0, 255).astype(np.uint8)


def _apply_window(values: np.ndarray, center: float, width: float, *, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing onto [0, 1]."""
    x = values.astype(np.float64)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(_SIGMOID_SLOPE * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    return np.clip((x - (center - 0.5)) / max(width - 1.0, _MIN_LINEAR_WIDTH) + 0.5, 0.0, 1.0)


def _rescale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(values.shape, dtype=np.float64)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def _file_window(ds: Dataset, index: int) -> tuple[float, float] | None:
    center = _number(_lookup(ds, index, "FrameVOILUTSequence", "WindowCenter"))
    width = _number(_lookup(ds, index, "FrameVOILUTSequence", "WindowWidth"))
    if center is None or width is None or width <= 0:
        return None
    return (center, width)


def _lut_window(ds: Dataset) -> tuple[float, float] | None:
    try:
        entries, first = int(ds.VOILUTSequence[0].LUTDescriptor[0]) or 2**16, int(ds.VOILUTSequence[0].LUTDescriptor[1])
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None
    return (first + entries / 2.0, float(entries))


def _apply_voi_lut(ds: Dataset, values: np.ndarray) -> np.ndarray | None:
    """The file's first VOI LUT applied to `values`, onto [0, 1]; None when there is no usable one."""
    if (window := _lut_window(ds)) is None:
        return None
    first, entries = int(window[0] - window[1] / 2), int(window[1])
    try:
        table = apply_voi(np.arange(first, first + entries), ds, 0).astype(np.float64)
        # clip first: pydicom 3.0.2 casts to the LUT's dtype before clipping, so out-of-range values would wrap
        inputs = np.clip(np.rint(values), first, first + entries - 1).astype(np.int64)
        mapped = apply_voi(inputs, ds, 0).astype(np.float64)
    except Exception:
        return None
    return _rescale(mapped, float(table.min()), float(table.max()))


def _lookup(ds: Dataset, index: int, group: str, keyword: str) -> Any:
    """An attribute for frame `index`: per-frame group, then shared group (enhanced objects), then top level."""
    try:
        per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
        shared = ds.get("SharedFunctionalGroupsSequence") or []
        for item in (per_frame[index] if index < len(per_frame) else None, shared[0] if shared else None):
            inner = item.get(group) if item is not None else None
            if inner and keyword in inner[0]:
                return inner[0].get(keyword)
        return ds.get(keyword)
    except Exception:
        return None


def _number(value: Any) -> float | None:
    if isinstance(value, list | tuple | MultiValue):
        value = value[0] if len(value) else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:
        value = None
    if isinstance(value, MultiValue):
        value = "\\".join(str(v) for v in value)
    return "" if value is None else str(value).strip()[:TEXT_LIMIT]


def _int(ds: Dataset, keyword: str) -> int | None:
    number = _number(_text(ds, keyword))
    return int(number) if number is not None and number.is_integer() else None


def _date(ds: Dataset, keyword: str) -> dt.date | None:
    raw = _text(ds, keyword).replace(".", "")  # "YYYY.MM.DD" is the old ACR-NEMA form
    digits = raw[:DATE_DIGITS]
    if len(digits) < DATE_DIGITS or not (digits.isascii() and digits.isdigit()):
        return None
    try:
        return dt.date.fromisoformat(digits)  # a DA is a calendar date: no datetime, so no time zone to lose
    except ValueError:
        return None
