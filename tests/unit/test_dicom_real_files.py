"""The DICOM reader on real files that pydicom ships (its test data), not only on generated ones."""

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from recognition import dicom

LIMITS = {"max_pixels": 4096 * 4096, "max_frames": 100, "max_bytes": 64 * 1024 * 1024}


def real(name: str) -> bytes:
    with open(get_testdata_file(name, download=False), "rb") as handle:
        return handle.read()


def relabelled(name: str, **attrs) -> bytes:
    """A shipped file with a header element changed, written back as DICOM."""
    import io

    ds = pydicom.dcmread(get_testdata_file(name, download=False))
    for key, value in attrs.items():
        if key == "TransferSyntaxUID":  # the shipped pixels, framed as that syntax would carry them
            ds.file_meta.TransferSyntaxUID = value
            ds.PixelData = pydicom.encaps.encapsulate([ds.PixelData])
        else:
            setattr(ds, key, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_ct_small_is_rescaled_to_hounsfield_units():
    data = real("CT_small.dcm")
    parsed = dicom.parse(data, **LIMITS)
    reference = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    expected = reference.pixel_array * float(reference.RescaleSlope) + float(reference.RescaleIntercept)
    assert (parsed.modality, parsed.rows, parsed.columns, parsed.frames) == ("CT", 128, 128, 1)
    assert np.array_equal(dicom.frame_modality(parsed, 0), expected.astype(np.float32))
    # no window in the file: the default spans the slice's range
    low, high = float(expected.min()), float(expected.max())
    assert parsed.default_window == pytest.approx(((low + high) / 2, high - low))
    display = dicom.frame_display(parsed, 0)
    assert display.dtype == np.uint8 and display.min() == 0 and display.max() == 255


def test_mr_small_is_shown_through_the_files_window():
    parsed = dicom.parse(real("MR_small.dcm"), **LIMITS)
    center, width = parsed.default_window
    assert (parsed.modality, center, width) == ("MR", 600.0, 1600.0)
    values, display = dicom.frame_modality(parsed, 0), dicom.frame_display(parsed, 0)
    assert (display[values <= center - width / 2] == 0).all()
    assert (display[values >= center + width / 2] == 255).all()
    inside = (values > center - width / 2 + 20) & (values < center + width / 2 - 20)
    assert display[inside].min() > 0 and display[inside].max() < 255


def test_monochrome1_shows_inverted():
    plain = dicom.frame_display(dicom.parse(real("MR_small.dcm"), **LIMITS), 0).astype(int)
    inverted = dicom.frame_display(
        dicom.parse(relabelled("MR_small.dcm", PhotometricInterpretation="MONOCHROME1"), **LIMITS), 0
    ).astype(int)
    assert np.abs((255 - plain) - inverted).max() <= 1


def test_a_real_multiframe_file_gives_each_frame():
    parsed = dicom.parse(real("rtdose.dcm"), **LIMITS)
    assert parsed.frames == 15
    frames = [dicom.frame_modality(parsed, i) for i in range(parsed.frames)]
    assert all(frame.shape == (10, 10) for frame in frames)
    assert len({frame.tobytes() for frame in frames}) > 1
    colour = dicom.parse(real("SC_rgb_rle_2frame.dcm"), **LIMITS)
    assert colour.is_color and colour.frames == 2
    assert dicom.frame_display(colour, 1).shape == (100, 100, 3)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_compressed_copies_of_mr_small_decode_to_the_same_pixels(name):
    plain = dicom.frame_modality(dicom.parse(real("MR_small.dcm"), **LIMITS), 0)
    assert np.array_equal(dicom.frame_modality(dicom.parse(real(name), **LIMITS), 0), plain)


def test_a_lossy_jpeg2000_ct_decodes_with_its_window():
    parsed = dicom.parse(real("693_J2KI.dcm"), **LIMITS)
    assert parsed.modality == "CT" and parsed.default_window[0] == 40.0
    assert dicom.frame_display(parsed, 0).shape == (512, 512)


def test_a_real_file_in_a_syntax_without_decoder_is_refused_by_name():
    data = relabelled("MR_small.dcm", TransferSyntaxUID=pydicom.uid.MPEG4HP41)
    with pytest.raises(dicom.DicomUnsupportedSyntax, match="MPEG-4") as caught:
        dicom.parse(data, **LIMITS)
    assert caught.value.header["modality"] == "MR" and caught.value.header["rows"] == 64


def test_a_truncated_real_file_is_unreadable():
    with pytest.raises(dicom.DicomUnreadable):
        dicom.parse(real("MR_truncated.dcm"), **LIMITS)


def test_the_preamble_is_the_only_change_to_a_real_file():
    data = real("CT_small.dcm")
    kept = dicom.anonymized_preamble(b"\xff" * 128 + data[128:])
    assert kept[:128] == bytes(128) and kept[128:] == data[128:]
