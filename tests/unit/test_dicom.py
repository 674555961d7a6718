"""The DICOM reader on its own: every file here is built with pydicom in the test itself."""

import datetime as dt
import io

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.uid import (
    MPEG2MPML,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from recognition import dicom

PATIENT_NAME = "Quixotic^Zebedee"
PATIENT_ID = "PID-7741-SECRET"
LIMITS = {"max_pixels": 4096 * 4096, "max_frames": 100, "max_bytes": 64 * 1024 * 1024}


def ct_pixels(rows: int = 32, cols: int = 32) -> np.ndarray:
    """Stored values 0..4095; with intercept -1024 the corners are known HU values."""
    arr = (np.arange(rows * cols, dtype=np.uint32).reshape(rows, cols) * 7 % 4096).astype(np.uint16)
    arr[0, 0], arr[0, 1], arr[0, 2], arr[0, 3] = 0, 1024, 1064, 3000  # HU -1024, 0, 40, 1976
    return arr


def make_dataset(pixels: np.ndarray, *, photometric: str = "MONOCHROME2", bits: int | None = None, **attrs) -> Dataset:
    """A minimal CT-like image; `pixels` is HxW, FxHxW, or HxWx3 for colour."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    color = photometric not in ("MONOCHROME1", "MONOCHROME2")
    shape = pixels.shape[:-1] if color else pixels.shape
    if len(shape) == 3:
        ds.NumberOfFrames = shape[0]
    ds.Rows, ds.Columns = shape[-2], shape[-1]
    ds.SamplesPerPixel = 3 if color else 1
    if color:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def ct_dataset(**attrs) -> Dataset:
    base = {"RescaleSlope": 1, "RescaleIntercept": -1024, "WindowCenter": 40, "WindowWidth": 400}
    return make_dataset(ct_pixels(), bits=12, **(base | attrs))


def to_bytes(ds: Dataset, preamble: bytes | None = None) -> bytes:
    if preamble is not None:
        ds.preamble = preamble
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def parse(ds_or_bytes, **limits) -> dicom.DicomFile:
    data = ds_or_bytes if isinstance(ds_or_bytes, bytes) else to_bytes(ds_or_bytes)
    return dicom.parse(data, **(LIMITS | limits))


# -- uncompressed grayscale -------------------------------------------------------------------------------------------


def test_a_ct_slice_maps_its_metadata_and_hides_the_patient():
    ds = ct_dataset(
        AccessionNumber="ACC-1",
        StudyDate="20240517",
        StudyDescription="CT CHEST",
        SeriesNumber=3,
        SeriesDescription="AXIAL 1mm",
        InstanceNumber=42,
    )
    parsed = parse(ds)

    assert parsed.patient_id == PATIENT_ID
    assert parsed.accession_number == "ACC-1"
    assert parsed.study_instance_uid == ds.StudyInstanceUID
    assert parsed.series_instance_uid == ds.SeriesInstanceUID
    assert parsed.sop_instance_uid == ds.SOPInstanceUID
    assert parsed.study_date == dt.date(2024, 5, 17)
    assert (parsed.study_description, parsed.series_description, parsed.modality) == ("CT CHEST", "AXIAL 1mm", "CT")
    assert (parsed.series_number, parsed.instance_number) == (3, 42)
    assert (parsed.rows, parsed.columns, parsed.frames) == (32, 32, 1)
    assert parsed.photometric == "MONOCHROME2"
    assert parsed.transfer_syntax_name == "Explicit VR Little Endian"
    assert parsed.default_window == (40.0, 400.0)
    assert parsed.is_color is False
    assert not hasattr(parsed, "patient_name")
    assert PATIENT_NAME.split("^")[0] not in repr(parsed)
    assert PATIENT_ID not in repr(parsed)


def test_frame_modality_gives_hounsfield_units():
    hu = dicom.frame_modality(parse(ct_dataset()), 0)

    assert hu.dtype == np.float32 and hu.shape == (32, 32)
    assert hu[0, :4].tolist() == [-1024.0, 0.0, 40.0, 1976.0]
    np.testing.assert_array_equal(hu, ct_pixels().astype(np.float32) - 1024)


def test_frame_display_applies_the_files_window():
    image = dicom.frame_display(parse(ct_dataset()), 0)

    assert image.dtype == np.uint8 and image.shape == (32, 32)
    # window 40/400 spans HU -160..240: air is black, bone is white, the centre is mid-grey
    assert image[0, 0] == 0
    assert image[0, 3] == 255
    assert image[0, 2] == 128
    assert image[0, 1] == round((0 - 39.5) / 399 * 255 + 127.5)


def test_without_a_window_display_spans_the_frames_range():
    ds = ct_dataset()
    del ds.WindowCenter, ds.WindowWidth
    parsed = parse(ds)
    hu = ct_pixels().astype(np.float64) - 1024

    assert parsed.default_window == ((hu.min() + hu.max()) / 2, hu.max() - hu.min())
    image = dicom.frame_display(parsed, 0)
    assert image[0, 0] == 0 and image.max() == 255
    expected = np.rint((hu - hu.min()) / (hu.max() - hu.min()) * 255)
    np.testing.assert_array_equal(image, expected.astype(np.uint8))


def test_a_voi_lut_is_used_when_there_is_no_window():
    ds = ct_dataset()
    del ds.WindowCenter, ds.WindowWidth
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]  # 256 entries from HU 0, 8-bit output
    item.LUTData = np.arange(256, dtype="<u2").tobytes()
    ds.VOILUTSequence = [item]
    parsed = parse(ds)

    assert parsed.default_window == (128.0, 256.0)
    image = dicom.frame_display(parsed, 0)
    assert image[0, 0] == 0  # HU -1024 is below the LUT
    assert image[0, 1] == 0  # HU 0 is the first entry
    assert image[0, 2] == 40  # HU 40 is entry 40
    assert image[0, 3] == 255


def test_monochrome1_is_inverted_so_dense_tissue_stays_bright():
    mono2 = dicom.frame_display(parse(ct_dataset()), 0)
    mono1 = dicom.frame_display(parse(ct_dataset(PhotometricInterpretation="MONOCHROME1")), 0)

    np.testing.assert_array_equal(mono1, 255 - mono2)
    assert mono1[0, 0] == 255 and mono1[0, 3] == 0


def test_every_frame_of_a_multiframe_file_is_distinct():
    frames = np.stack([np.full((16, 16), 100 * (i + 1), dtype=np.uint16) for i in range(3)])
    frames[:, 0, 0] = 0
    parsed = parse(make_dataset(frames, bits=12, RescaleSlope=1, RescaleIntercept=0))

    assert parsed.frames == 3
    values = [dicom.frame_modality(parsed, i) for i in range(3)]
    assert [float(v[5, 5]) for v in values] == [100.0, 200.0, 300.0]
    assert all(v.shape == (16, 16) for v in values)
    with pytest.raises(IndexError):
        dicom.frame_modality(parsed, 3)


def test_rgb_comes_back_as_uint8_rgb():
    rgb = np.random.default_rng(5).integers(0, 256, size=(8, 12, 3), dtype=np.uint8)
    parsed = parse(make_dataset(rgb, photometric="RGB"))

    assert parsed.is_color and parsed.default_window == (128.0, 256.0)
    np.testing.assert_array_equal(dicom.frame_modality(parsed, 0), rgb)
    np.testing.assert_array_equal(dicom.frame_display(parsed, 0), rgb)


def test_ybr_full_is_converted_to_rgb():
    rgb = np.random.default_rng(6).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    image = dicom.frame_display(parse(make_dataset(ybr, photometric="YBR_FULL")), 0)

    assert image.shape == (8, 8, 3) and image.dtype == np.uint8
    assert np.abs(image.astype(int) - rgb.astype(int)).max() <= 2


# -- compressed transfer syntaxes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("syntax", "name"),
    [(RLELossless, "RLE Lossless"), (JPEG2000Lossless, "JPEG 2000 Image Compression (Lossless Only)")],
)
def test_lossless_compression_decodes_exactly(syntax, name):
    ds = ct_dataset()
    ds.compress(syntax)
    parsed = parse(ds)

    assert parsed.transfer_syntax_name == name
    np.testing.assert_array_equal(dicom.frame_modality(parsed, 0), ct_pixels().astype(np.float32) - 1024)


@pytest.mark.parametrize("size", [32, 1024], ids=["small", "deferred"])
def test_deflated_files_decode_exactly(size):
    pixels = np.random.default_rng(size).integers(0, 4096, size=(size, size)).astype(np.uint16)
    ds = make_dataset(pixels, bits=12)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    data = to_bytes(ds)
    parsed = dicom.parse(data, **LIMITS)

    assert parsed.transfer_syntax_name == "Deflated Explicit VR Little Endian"
    np.testing.assert_array_equal(dicom.frame_modality(parsed, 0), pixels.astype(np.float32))
    with pytest.raises(dicom.DicomUnreadable):
        dicom.parse(data[: len(data) // 2], **LIMITS)


def test_multiframe_rle_decodes_each_frame():
    frames = np.stack([ct_pixels() // 2 + 100 * i for i in range(3)])
    ds = make_dataset(frames, bits=12)
    ds.compress(RLELossless)
    parsed = parse(ds)

    for i in range(3):
        np.testing.assert_array_equal(dicom.frame_modality(parsed, i), frames[i].astype(np.float32))


def test_jpeg_baseline_decodes_within_tolerance():
    gray = np.add.outer(np.arange(64), np.arange(64)).astype(np.uint8) * 2
    jpeg = io.BytesIO()
    Image.fromarray(gray, mode="L").save(jpeg, format="JPEG", quality=95)
    ds = make_dataset(gray)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([jpeg.getvalue()])
    ds["PixelData"].VR = "OB"
    parsed = parse(ds)

    assert parsed.transfer_syntax_name == "JPEG Baseline (Process 1)"
    decoded = dicom.frame_modality(parsed, 0)
    assert decoded.shape == (64, 64)
    assert np.abs(decoded - gray).max() <= 4
    assert float(decoded[0, 0]) < 5 and float(decoded[63, 63]) > 245


def test_an_undecodable_transfer_syntax_is_named():
    ds = make_dataset(np.zeros((16, 16), dtype=np.uint8))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3 not really a video"])
    ds["PixelData"].VR = "OB"

    with pytest.raises(dicom.DicomUnsupportedSyntax) as caught:
        parse(ds)
    assert caught.value.code == "unsupported_transfer_syntax"
    assert "MPEG2 Main Profile / Main Level" in caught.value.message
    assert "RLE Lossless" in caught.value.message  # tells the integrator what would work


def test_decoder_names_lists_the_installed_codecs():
    names = dicom.decoder_names()

    for expected in (
        "Explicit VR Little Endian",
        "JPEG Baseline (Process 1)",
        "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])",
        "JPEG-LS Lossless Image Compression",
        "JPEG 2000 Image Compression",
        "RLE Lossless",
    ):
        assert expected in names
    assert not any(name.startswith("MPEG") for name in names)


# -- files that cannot be used ----------------------------------------------------------------------------------------


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "data",
    [png_bytes(), np.random.default_rng(1).bytes(4000), b"", b"\x00" * 128 + b"DICM"],
    ids=["png", "random", "empty", "magic-only"],
)
def test_non_dicom_bytes_are_unreadable(data):
    with pytest.raises(dicom.DicomUnreadable):
        dicom.parse(data, **LIMITS)
    assert dicom.looks_like_dicom(data) is data.startswith(b"\x00" * 128 + b"DICM")


def big_native_file() -> bytes:
    """Over DEFER_SIZE, so its pixel data is deferred rather than read at parse time."""
    return to_bytes(make_dataset(np.ones((1024, 1024), dtype=np.uint16), bits=12))


def rle_file() -> bytes:
    ds = ct_dataset()
    ds.compress(RLELossless)
    return to_bytes(ds)


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")  # pydicom on the cut RLE file
@pytest.mark.parametrize("build", [lambda: to_bytes(ct_dataset()), big_native_file, rle_file])
def test_a_file_cut_inside_its_pixel_data_is_unreadable(build):
    data = build()
    with pytest.raises(dicom.DicomUnreadable) as caught:
        dicom.parse(data[: len(data) - 300], **LIMITS)
    assert caught.value.code == "truncated"
    assert "truncated" in caught.value.message
    assert dicom.parse(data, **LIMITS).rows > 0  # the whole file was fine


def test_a_file_without_pixel_data_is_unreadable():
    ds = ct_dataset()
    del ds.PixelData
    with pytest.raises(dicom.DicomUnreadable) as caught:
        parse(ds)
    assert caught.value.code == "no_pixel_data"


def test_inconsistent_image_attributes_are_unreadable():
    with pytest.raises(dicom.DicomUnreadable) as caught:
        parse(ct_dataset(SamplesPerPixel=3))
    assert caught.value.code == "bad_image_attributes"


def test_pixel_and_frame_limits():
    assert parse(ct_dataset(), max_pixels=32 * 32).rows == 32
    with pytest.raises(dicom.DicomTooLarge) as caught:
        parse(ct_dataset(), max_pixels=32 * 32 - 1)
    assert caught.value.code == "too_many_pixels"

    multi = make_dataset(np.zeros((3, 4, 4), dtype=np.uint16))
    assert parse(multi, max_frames=3).frames == 3
    with pytest.raises(dicom.DicomTooLarge) as caught:
        parse(multi, max_frames=2)
    assert caught.value.code == "too_many_frames"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bad_dates_and_numbers_become_none():
    parsed = parse(ct_dataset(StudyDate="20231301", SeriesNumber="", InstanceNumber=None))
    assert (parsed.study_date, parsed.series_number, parsed.instance_number) == (None, None, None)
    assert parse(ct_dataset(StudyDate="2023.05.17")).study_date == dt.date(2023, 5, 17)
    assert parse(ct_dataset(StudyDate="2023W201")).study_date is None  # an ISO week date is no DA
    assert parse(ct_dataset(StudyDate="2023-5-1")).study_date is None


def test_long_values_are_cut_to_64_characters():
    parsed = parse(ct_dataset(StudyDescription="A" * 64, PatientID="9" * 64))
    assert parsed.study_description == "A" * 64 and len(parsed.patient_id) == 64


# -- privacy ----------------------------------------------------------------------------------------------------------


def test_anonymized_preamble_zeroes_exactly_the_preamble():
    data = to_bytes(ct_dataset(), preamble=b"\xab" * 128)
    assert data[:128] == b"\xab" * 128

    cleaned = dicom.anonymized_preamble(data)
    assert cleaned[:128] == bytes(128)
    assert cleaned[128:] == data[128:]
    assert len(cleaned) == len(data)
    with pytest.raises(dicom.DicomUnreadable):
        dicom.anonymized_preamble(png_bytes())


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")  # pydicom on the cut RLE file
def test_no_error_message_names_the_patient():
    unsupported = ct_dataset()
    unsupported.file_meta.TransferSyntaxUID = MPEG2MPML
    unsupported.PixelData = encapsulate([b"\x00\x00\x01\xb3"])
    unsupported["PixelData"].VR = "OB"
    no_pixels = ct_dataset()
    del no_pixels.PixelData
    cases = [
        lambda: parse(unsupported),
        lambda: parse(no_pixels),
        lambda: parse(ct_dataset(SamplesPerPixel=3)),
        lambda: parse(ct_dataset(), max_pixels=1),
        lambda: parse(make_dataset(np.zeros((3, 4, 4), dtype=np.uint16)), max_frames=1),
        lambda: dicom.parse(to_bytes(ct_dataset())[:-100], **LIMITS),
        lambda: dicom.parse(rle_file()[:-100], **LIMITS),
    ]
    for case in cases:
        with pytest.raises(dicom.DicomError) as caught:
            case()
        for secret in (PATIENT_NAME, "Quixotic", "Zebedee", PATIENT_ID):
            assert secret not in str(caught.value) and secret not in caught.value.message


def test_a_secondary_capture_without_rescale_keeps_stored_values():
    ds = make_dataset(np.arange(64, dtype=np.uint8).reshape(8, 8))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    parsed = parse(ds)

    np.testing.assert_array_equal(dicom.frame_modality(parsed, 0), np.arange(64, dtype=np.float32).reshape(8, 8))
    assert dicom.frame_display(parsed, 0)[7, 7] == 255


def modality_lut_without_descriptor() -> Dataset:
    ds = ct_dataset()
    lut = Dataset()
    lut.ModalityLUTType = "HU"
    lut.add_new(0x00283006, "US", [0] * 16)  # LUTData, but no LUTDescriptor
    ds.ModalityLUTSequence = [lut]
    return ds


def test_a_decoder_exception_on_a_damaged_file_is_unreadable_in_words():
    data = to_bytes(modality_lut_without_descriptor())
    with pytest.raises(dicom.DicomUnreadable) as caught:
        parse(data)
    assert caught.value.code == "decode_failed" and "could not be decoded" in caught.value.message
    parsed = dicom.parse(data, **LIMITS, decode_first=False)  # the header alone still reads
    for step in (dicom.frame_modality, dicom.frame_display, dicom.frame_window):
        with pytest.raises(dicom.DicomUnreadable):
            step(parsed, 0)
