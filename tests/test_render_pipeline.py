"""The greyscale and palette pipeline of rendered images against PS3.3's definitions (and
dcmtk's output, which these cases were checked against): Presentation LUT Shape, VOI LUT
output range, a LINEAR window of width 1, bits above Bits Stored, big endian palettes."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import httpx
import jpeg_ls
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import JPEGLSLossless

from tests.helpers import ROOT, inst_url, make_instance, multipart_body, stow_headers, to_bytes

pytestmark = pytest.mark.db


async def _png(client: httpx.AsyncClient, raw: bytes, **params: str) -> np.ndarray:
    r = await client.post(f"{ROOT}/studies", content=multipart_body([raw]), headers=stow_headers())
    assert r.status_code in (200, 202), r.text
    ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)
    r = await client.get(f"{inst_url(ds)}/rendered", params=params, headers={"Accept": "image/png"})
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(r.content)))


def _ramp(**extra: object) -> Dataset:
    """12 bits stored, values 0..4095 along the row."""
    ds = make_instance(rows=2, cols=4096)
    ds.BitsStored, ds.HighBit = 12, 11
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.tile(np.arange(4096, dtype=np.uint16), 2).tobytes()
    return ds


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
async def test_presentation_lut_shape_inverse(
    app_client: httpx.AsyncClient, photometric: str
) -> None:
    """PS3.3 C.11.6.1.2: INVERSE inverts the VOI output: a MONOCHROME2 image is shown
    inverted (it was not); MONOCHROME1, whose minimum is white anyway, once, not twice."""
    plain = await _png(app_client, to_bytes(_ramp(PhotometricInterpretation=photometric)))
    inverse = await _png(
        app_client,
        to_bytes(_ramp(PhotometricInterpretation=photometric, PresentationLUTShape="INVERSE")),
    )
    if photometric == "MONOCHROME2":
        assert plain[0, 0] == 0 and plain[0, -1] == 255
        assert np.array_equal(inverse, 255 - plain)
    else:
        assert plain[0, 0] == 255 and np.array_equal(inverse, plain)


async def test_voi_lut_output_is_scaled_by_its_range(app_client: httpx.AsyncClient) -> None:
    """A VOI LUT's output is 0..2^n - 1, n its Descriptor's third value (PS3.3 C.11.2.1.1):
    an identity LUT over an image of 1000..3000 shows 1000..3000 of 4095, not black to white
    (it was stretched to the frame's own range)."""
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.LUTData = list(range(4096))
    item["LUTData"].VR = "US"
    ds = _ramp(VOILUTSequence=Sequence([item]))
    values = np.clip(np.arange(4096), 1000, 3000).astype(np.uint16)
    ds.PixelData = np.tile(values, 2).tobytes()
    px = await _png(app_client, to_bytes(ds))
    want = np.round(values / 4095 * 255).astype(np.uint8)
    assert np.abs(px[0].astype(int) - want).max() <= 1
    assert px.min() == round(1000 / 4095 * 255)


@pytest.mark.parametrize("packing", ["US words", "OW two per word"])
async def test_eight_bit_voi_lut_of_more_than_256_entries(
    app_client: httpx.AsyncClient, packing: str
) -> None:
    """An 8-bit VOI LUT of 2048 entries from 1024 on: entry k applies to value 1024 + k. As
    pydicom indexes it (8-bit indices, which wrap) the image came out in stripes."""
    lut = (np.linspace(0, 1, 2048) ** 2 * 255).astype(np.uint8)
    item = Dataset()
    item.LUTDescriptor = [2048, 1024, 8]
    if packing == "US words":
        item.LUTData = [int(v) for v in lut]
        item["LUTData"].VR = "US"
    else:
        item.add_new(0x00283006, "OW", lut.tobytes())
    px = await _png(app_client, to_bytes(_ramp(VOILUTSequence=Sequence([item]))))
    index = np.clip(np.arange(4096) - 1024, 0, 2047)
    assert np.array_equal(px[0], lut[index])


async def test_linear_window_of_width_1_is_a_threshold(app_client: httpx.AsyncClient) -> None:
    """PS3.3 C.11.2.1.2.1: LINEAR with width 1 maps x <= c - 0.5 to the minimum and the rest
    to the maximum (the value at the center was mid grey, LINEAR_EXACT's answer)."""
    px = await _png(app_client, to_bytes(_ramp(WindowCenter=100, WindowWidth=1)))
    assert px[0, 99] == 0 and px[0, 100] == 255 and px[0, 101] == 255
    exact = await _png(
        app_client, to_bytes(_ramp()), window="100,1,LINEAR_EXACT", accept="image/png"
    )
    assert exact[0, 100] == 128


async def test_float_pixels_windowed_linear_of_width_1_map_exactly(
    app_client: httpx.AsyncClient,
) -> None:
    """Float pixel data windowed 0.5/1 LINEAR (as a parametric map of 0..1 values is) is
    mapped as LINEAR_EXACT: the threshold LINEAR's definition gives would show all of it
    white."""
    ds = _float_instance(np.array([[0.0, 0.25, 0.5, 1.0]], dtype="<f4"))
    ds.WindowCenter, ds.WindowWidth = 0.5, 1.0
    px = await _png(app_client, to_bytes(ds))
    assert list(px[0]) == [0, 64, 128, 255]


async def test_bits_above_bits_stored_are_not_shown(app_client: httpx.AsyncClient) -> None:
    """JPEG-LS of 16-bit precision holding 12 stored bits and junk above them (as dcmcjpls
    writes from such a file): the junk is masked off, as for the same pixels uncompressed
    (the image came out nearly white)."""
    values = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (16, 1))
    junk = values | np.uint16(0xA000)
    ds = make_instance(rows=16, cols=256, WindowCenter=2048, WindowWidth=4096)
    ds.BitsStored, ds.HighBit = 12, 11
    ds.PixelData = junk.tobytes()
    plain = await _png(app_client, to_bytes(ds))
    codestream = jpeg_ls.encode_array(junk, lossy_error=0)
    ds = make_instance(rows=16, cols=256, WindowCenter=2048, WindowWidth=4096)
    ds.BitsStored, ds.HighBit = 12, 11
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([bytes(codestream)])
    ds["PixelData"].VR = "OB"
    jls = await _png(app_client, to_bytes(ds))
    assert np.array_equal(jls, plain)
    assert plain[0, 0] == 0 and plain[0, -1] == 254  # 4080 of a 0..4095 window


async def test_big_endian_palette_renders_as_little_endian(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """A big endian file's palette tables (OW) read in little endian order: the image was
    black (a palette of [0 256 ...] read as [0 1 ...])."""
    folder = samples / "real" / "pydicom-data"
    little = await _png(app_client, (folder / "OBXXXX1A.dcm").read_bytes())
    big = await _png(app_client, (folder / "OBXXXX1A_expb.dcm").read_bytes())
    assert little.mean() > 5
    assert np.abs(big.astype(int) - little.astype(int)).max() <= 1


async def test_float_pixels_with_nan_render_black(app_client: httpx.AsyncClient) -> None:
    """NaN in Float Pixel Data is shown black and left out of the min-max range; no numpy
    warning (an invalid cast gave undefined greys)."""
    ds = _float_instance(np.array([[0, 1, np.nan, 3], [np.inf, -np.inf, 2, 1]], dtype="<f4"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        px = await _png(app_client, to_bytes(ds))
    assert px[0, 2] == 0 and px.shape == (2, 4)


def _float_instance(values: np.ndarray) -> Dataset:
    ds = make_instance(rows=values.shape[0], cols=values.shape[1])
    del ds.PixelData
    for keyword in ("BitsStored", "HighBit", "PixelRepresentation"):
        delattr(ds, keyword)
    ds.BitsAllocated = 32
    ds.FloatPixelData = values.tobytes()
    return ds


@pytest.mark.parametrize("implicit", [False, True])
async def test_voi_lut_of_signed_data_in_either_vr_encoding(
    app_client: httpx.AsyncClient, implicit: bool
) -> None:
    """A VOI LUT of 40000 entries on signed pixels, first mapped value -100: read from an
    Implicit VR file its LUT Descriptor is SS (pydicom resolves "US or SS" by Pixel
    Representation), 40000 read as -25536; and a MultiValue, not a list. The LUT was skipped
    (min-max shown instead), and would then have failed to index (found by review)."""
    values = np.arange(-200, 200, dtype=np.int16)
    lut = (np.arange(40000) % 4096).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [40000, 65536 - 100, 12]
    item["LUTDescriptor"].VR = "US"
    item.add_new(0x00283006, "OW", lut.tobytes())
    ds = make_instance(rows=1, cols=values.size, VOILUTSequence=Sequence([item]))
    ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 1, 16, 15
    ds.PixelData = values.tobytes()
    if implicit:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True, implicit_vr=implicit)
    px = await _png(app_client, buf.getvalue())
    want = np.round(lut[np.clip(values.astype(int) + 100, 0, 39999)] / 4095 * 255)
    assert np.abs(px[0].astype(int) - want.astype(int)).max() <= 1


def _saved(ds: Dataset, implicit: bool) -> bytes:
    if implicit:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True, implicit_vr=implicit)
    return buf.getvalue()


@pytest.mark.parametrize(("vr", "implicit"), [("SS", False), ("US", False), ("SS", True)])
async def test_voi_lut_of_rescaled_values_from_a_negative_one(
    app_client: httpx.AsyncClient, vr: str, implicit: bool
) -> None:
    """A CT of unsigned stored values, Rescale Intercept -1024, and a VOI LUT from -1024 HU
    on: its first value mapped is SS because the rescaled values may be negative (PS3.3
    C.11.2.1.1), however it was written. It was read as 64512 (Pixel Representation is 0):
    every value fell below it and the image was black (dcmtk shows the LUT)."""
    lut = np.linspace(0, 65535, 4096).astype(np.uint16)
    item = Dataset()
    item.add_new(0x00283002, vr, [4096, -1024 if vr == "SS" else 64512, 16])
    item.add_new(0x00283006, "US", [int(v) for v in lut])
    ds = _ramp(RescaleIntercept=-1024, RescaleSlope=1, VOILUTSequence=Sequence([item]))
    px = await _png(app_client, _saved(ds, implicit))
    want = np.round(lut.astype(float) / 65535 * 255).astype(int)  # stored v is -1024 + v HU
    assert np.abs(px[0].astype(int) - want).max() <= 1
    assert px[0, 0] == 0 and px[0, -1] == 255


@pytest.mark.parametrize(
    ("vr", "first", "bits"), [("SS", -512, 16), ("US", 65024, 16), ("SS", -512, 12)]
)
async def test_modality_lut_of_signed_data(
    app_client: httpx.AsyncClient, vr: str, first: int, bits: int
) -> None:
    """Signed pixels -512..511 and a Modality LUT from -512 on, windowed: the first value
    mapped is signed as Pixel Representation says (PS3.3 C.11.1.1), also when written as US
    65024, and a Descriptor of 12 bits is read. Both were refused (pydicom subtracted 65024
    from int16 pixels; it has no uint12), so the image was shown unscaled, its window
    skipped, as a min-max ramp (dcmtk applies the LUT)."""
    values = np.arange(-512, 512, dtype=np.int16)
    lut = np.linspace(0, 4000, 1024).astype(np.uint16)
    item = Dataset()
    item.add_new(0x00283002, vr, [1024, first, bits])
    item.add_new(0x00283006, "US", [int(v) for v in lut])
    item.ModalityLUTType = "US"
    ds = make_instance(rows=1, cols=values.size, ModalityLUTSequence=Sequence([item]))
    ds.WindowCenter, ds.WindowWidth = 3000, 1000
    ds.PixelRepresentation = 1
    ds.PixelData = values.tobytes()
    px = await _png(app_client, to_bytes(ds))
    x = lut[values.astype(int) + 512].astype(float)
    want = np.round(np.clip((x - 2999.5) / 999 + 0.5, 0, 1) * 255).astype(int)
    assert np.abs(px[0].astype(int) - want).max() <= 1
    assert px[0, :600].max() == 0 and px[0, -1] == 255


async def test_float_pixel_data_has_no_modality_lut(app_client: httpx.AsyncClient) -> None:
    """A Modality LUT maps integer stored values (PS3.3 C.11.1.1); float pixel data has
    none, so a Modality LUT Sequence on it is left out, as when absent: its NaN is black and
    the values are shown min-max. The LUT was indexed by the floats: a NaN made an index of
    -2^63 and the image a 406 (with a RuntimeWarning on the cast); without one the floats
    were rounded into the table (found by review)."""
    values = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(1, 64)
    values[0, 3] = np.nan
    item = Dataset()
    item.LUTDescriptor = [128, 0, 16]
    item.add_new(0x00283006, "US", [4000 - 10 * v for v in range(128)])
    item.ModalityLUTType = "US"
    plain = await _png(app_client, to_bytes(_float_instance(values)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = _float_instance(values)
        ds.ModalityLUTSequence = Sequence([item])
        px = await _png(app_client, to_bytes(ds))
    assert np.array_equal(px, plain)
    assert px[0, 3] == 0 and px[0, 0] == 0 and px[0, -1] == 255


async def test_rescale_slope_of_zero_leaves_the_values_unscaled(
    app_client: httpx.AsyncClient,
) -> None:
    """A Rescale Slope of 0 maps every stored value to the intercept: taken as invalid
    (dcmtk ignores the Modality LUT then, with a warning), the values are shown unscaled and
    min-max, the instance's window (in rescaled units) skipped, as for a slope that is not a
    number. It was a blank image: every pixel -1024, below the window (found by review)."""
    ds = _ramp(RescaleSlope=0, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400)
    px = await _png(app_client, to_bytes(ds))
    want = np.round(np.arange(4096) / 4095 * 255).astype(int)
    assert np.abs(px[0].astype(int) - want).max() <= 1


@pytest.mark.parametrize("columns", [2, 4096])
async def test_multi_valued_rescale_slope_takes_its_first_value(
    app_client: httpx.AsyncClient, columns: int
) -> None:
    """Rescale Slope and Intercept are VM 1 (PS3.3 C.11.1); of `1\\2` and `-1024\\0` the first
    values are taken, as dcmtk does, and the instance's window (in rescaled units) applies.
    pydicom multiplied the pixels by the whole list: numpy broadcast it along a row of 2
    columns (the second column scaled by 2, the intercept 0 added to it) and refused any
    other width (the image shown unscaled, min-max, its window skipped)."""
    ds = make_instance(rows=1, cols=columns)
    ds.BitsStored, ds.HighBit = 12, 11
    ds.RescaleSlope, ds.RescaleIntercept = [1, 2], [-1024, 0]
    ds.WindowCenter, ds.WindowWidth = 0, 2048  # -1024 .. 1023 HU: stored 0 .. 2047
    values = np.full(columns, 1000, dtype=np.uint16) if columns == 2 else np.arange(4096)
    ds.PixelData = values.astype(np.uint16).tobytes()
    px = await _png(app_client, to_bytes(ds))
    hu = values.astype(float) - 1024
    want = np.round(np.clip((hu + 0.5) / 2047 + 0.5, 0, 1) * 255).astype(int)
    assert np.abs(px[0].astype(int) - want).max() <= 1


async def test_voi_lut_of_float_pixels_with_a_modality_lut_sequence(
    app_client: httpx.AsyncClient,
) -> None:
    """Float pixel data -1024 .. -961 with a Modality LUT Sequence (not applied: it maps
    integer stored values) and a VOI LUT from -1024 on, written as US 64512: float values are
    signed (no Pixel Representation, PS3.3 C.7.6.3.1), so the LUT's first value is -1024.
    The Modality LUT Sequence made it read as 64512 (entries after a Modality LUT are
    unsigned): every value fell below it and the image was black."""
    values = np.arange(-1024, -960, dtype=np.float32).reshape(1, 64)
    modality = Dataset()
    modality.LUTDescriptor = [128, 0, 16]
    modality.add_new(0x00283006, "US", list(range(128)))
    modality.ModalityLUTType = "US"
    voi = Dataset()
    voi.add_new(0x00283002, "US", [64, 64512, 8])
    voi.add_new(0x00283006, "US", [4 * v for v in range(64)])
    ds = _float_instance(values)
    ds.ModalityLUTSequence, ds.VOILUTSequence = Sequence([modality]), Sequence([voi])
    px = await _png(app_client, to_bytes(ds))
    want = np.round(np.arange(64) * 4 / 255 * 255).astype(int)
    assert np.abs(px[0].astype(int) - want).max() <= 1
    assert px[0, -1] > 200
