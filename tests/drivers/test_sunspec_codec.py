"""The codec against pysunspec2 (an independent implementation), sentinels, SFs, round trips."""

from __future__ import annotations

import math
import struct
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sunspec2.device import Model

from drivers.contract import Quality
from drivers.sunspec.codec import (
    SENTINELS,
    BlockSizeError,
    Decoder,
    EncodeError,
    EncodeRangeError,
    Field,
    decode_model,
    decode_point,
    decode_string,
    encode_points,
    encode_value,
    raw_range,
)
from drivers.sunspec.models import get_layout
from tests.drivers.sunspec_images import ModelSpec, model_words, pv_models

INTEGER_TYPES = sorted(t for t in SENTINELS if not t.startswith("float"))
WIDTH = {
    t: (1 if t.endswith(("16", "ssf", "count")) else 2 if t.endswith("32") else 4)
    for t in SENTINELS
}


def _block(words: list[int]) -> np.ndarray:
    return np.array(words, dtype=np.uint16)


def _decode_one(
    ptype: str, words: tuple[int, ...], sf_word: int | None = None
) -> tuple[float, int]:
    regs = list(words) + ([] if sf_word is None else [sf_word])
    field = Field(0, ptype, None if sf_word is None else len(words))
    values, quality = Decoder([field]).decode(_block(regs))
    return float(values[0]), int(quality[0])


def test_decode_known_block_from_pysunspec2() -> None:
    spec = pv_models(w=4321.0)[1]  # model 103 encoded by pysunspec2
    layout = get_layout(103)
    block = _block(model_words(spec))
    values, quality = decode_model(layout, block)
    got = {
        layout.points[i].name: (float(values[k]), int(quality[k]))
        for k, i in enumerate(layout.numeric)
    }
    assert got["W"] == (4321.0, Quality.GOOD)
    assert got["A"] == (pytest.approx(18.76), Quality.GOOD)
    assert got["Hz"] == (pytest.approx(50.02), Quality.GOOD)
    assert got["PF"] == (pytest.approx(98.1), Quality.GOOD)
    assert got["VAr"] == (-150.0, Quality.GOOD)
    assert got["WH"] == (123456.0, Quality.GOOD)
    assert got["St"] == (4.0, Quality.GOOD)
    assert got["W_SF"] == (0.0, Quality.GOOD)
    # Points the image leaves unset are served as sentinels by pysunspec2.
    assert math.isnan(got["AphB"][0])
    assert got["AphB"][1] == Quality.NOT_IMPLEMENTED
    assert got["TmpSnk"][1] == Quality.NOT_IMPLEMENTED  # int16 0x8000
    assert got["EvtVnd1"][1] == Quality.NOT_IMPLEMENTED  # bitfield32 0xFFFFFFFF
    assert got["DCA"][1] == Quality.NOT_IMPLEMENTED  # uint16 0xFFFF, and its SF is 0x8000 too
    assert decode_point(layout, block, "Hz") == pytest.approx(50.02)
    assert decode_point(layout, block, "AphB") is None


def test_sf_sentinel_makes_its_points_not_implemented() -> None:
    layout = get_layout(103)
    block = _block(model_words(ModelSpec(103, raw={"W": 1234, "W_SF": -32768})))
    assert decode_point(layout, block, "W") is None


def test_scale_factor_is_read_with_the_block_each_time() -> None:
    layout = get_layout(103)
    for sf, expected in ((-2, 12.34), (0, 1234.0), (2, 123400.0)):
        block = _block(model_words(ModelSpec(103, raw={"W": 1234, "W_SF": sf})))
        assert decode_point(layout, block, "W") == pytest.approx(expected)


@pytest.mark.parametrize("ptype", sorted(SENTINELS))
def test_sentinel_is_never_a_value(ptype: str) -> None:
    sentinel = SENTINELS[ptype]
    width = WIDTH[ptype]
    words = tuple((sentinel >> (16 * (width - 1 - k))) & 0xFFFF for k in range(width))
    value, quality = _decode_one(ptype, words)
    assert math.isnan(value)
    assert quality == Quality.NOT_IMPLEMENTED


def test_float_nan_that_is_not_the_sentinel_is_out_of_range() -> None:
    value, quality = _decode_one("float32", (0xFFC0, 0x0000))  # negative quiet NaN
    assert math.isnan(value)
    assert quality == Quality.OUT_OF_RANGE
    _, quality = _decode_one("float32", (0x7F80, 0x0000))  # +inf
    assert quality == Quality.OUT_OF_RANGE


@pytest.mark.parametrize("ptype", INTEGER_TYPES)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_integer_round_trip(ptype: str, data: st.DataObject) -> None:
    lo, hi = raw_range(ptype)
    sf = 0 if ptype == "sunssf" else data.draw(st.integers(-6, 4), label="sf")
    # Engineering values are float64: exact only while |raw| x 10^|sf| < 2**53 (64-bit counters
    # beyond that lose their last digits, which is inherent to a float64 reading).
    bound = 2**53 // 10 ** abs(sf)
    lo, hi = max(lo, -bound), min(hi, bound)
    raw = data.draw(st.integers(lo, hi), label="raw")
    value = raw / 10.0 ** (-sf) if sf < 0 else raw * 10.0**sf  # the double nearest raw x 10^sf
    words = encode_value(ptype, value, sf)
    assert len(words) == WIDTH[ptype]
    unsigned = int.from_bytes(struct.pack(f">{len(words)}H", *words), "big")
    assert unsigned == raw % (1 << (16 * WIDTH[ptype]))  # two's complement, big-endian words
    decoded, quality = _decode_one(ptype, words, None if sf == 0 else sf & 0xFFFF)
    assert quality == Quality.GOOD
    assert decoded == value


@pytest.mark.parametrize("ptype", ["int16", "uint16", "int32", "uint32", "acc32"])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_engineering_round_trip_within_half_a_step(ptype: str, data: st.DataObject) -> None:
    sf = data.draw(st.integers(-3, 2), label="sf")
    lo, hi = raw_range(ptype)
    step = 10.0**sf
    value = data.draw(st.floats((lo + 1) * step, (hi - 1) * step), label="value")
    words = encode_value(ptype, value, sf)
    decoded, quality = _decode_one(ptype, words, sf & 0xFFFF)
    assert quality == Quality.GOOD
    assert abs(decoded - value) <= step / 2 * (1 + 1e-9)


@settings(max_examples=100, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False, width=32))
def test_float32_round_trip(value: float) -> None:
    words = encode_value("float32", value)
    assert words != (0x7FC0, 0x0000)
    decoded, quality = _decode_one("float32", words)
    assert quality == Quality.GOOD
    assert decoded == value


@settings(max_examples=100, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_float64_round_trip(value: float) -> None:
    decoded, quality = _decode_one("float64", encode_value("float64", value))
    assert quality == Quality.GOOD
    assert decoded == value


@pytest.mark.parametrize("ptype", INTEGER_TYPES)
def test_encoding_refuses_sentinels_and_out_of_range(ptype: str) -> None:
    lo, hi = raw_range(ptype)
    with pytest.raises(EncodeRangeError, match=ptype):
        encode_value(ptype, hi + 1)
    with pytest.raises(EncodeRangeError):
        encode_value(ptype, lo - 1)
    with pytest.raises(EncodeRangeError, match="not a finite number"):
        encode_value(ptype, math.nan)


def test_encoding_sentinel_values_is_refused_with_a_reason() -> None:
    with pytest.raises(EncodeRangeError, match="reserved for 'not implemented'"):
        encode_value("uint16", 65535)
    with pytest.raises(EncodeRangeError, match="reserved"):
        encode_value("int16", -32768)
    with pytest.raises(EncodeRangeError, match="reserved"):
        encode_value("acc32", 0)
    with pytest.raises(EncodeRangeError, match="does not fit float32"):
        encode_value("float32", 1e39)
    with pytest.raises(EncodeError):
        encode_value("string", 1.0)


def test_encode_points_uses_the_blocks_scale_factor_and_names_the_point() -> None:
    layout = get_layout(123)
    block = _block(model_words(pv_models()[4]))  # WMaxLimPct_SF = -2
    out = encode_points(layout, block, {"WMaxLimPct": 55.55, "WMaxLim_Ena": 1})
    assert out[5] == 5555
    assert out[9] == 1
    assert block[5] == 10000  # the input is not modified
    with pytest.raises(EncodeRangeError, match=r"123\.WMaxLimPct"):
        encode_points(layout, block, {"WMaxLimPct": 700.0})  # 70000 > 65534
    no_sf = block.copy()
    no_sf[layout.point("WMaxLimPct_SF").offset] = 0x8000
    with pytest.raises(EncodeError, match="WMaxLimPct_SF is not implemented"):
        encode_points(layout, no_sf, {"WMaxLimPct": 50.0})


def test_encode_points_matches_pysunspec2_decoding() -> None:
    layout = get_layout(103)
    block = np.zeros(layout.size, dtype=np.uint16)
    block[0], block[1] = 103, 50
    out = encode_points(
        layout,
        block,
        {"W_SF": -1, "W": -1234.5, "Hz_SF": -2, "Hz": 49.97, "WH_SF": 0, "WH": 4_000_000_000},
    )
    m = Model(103, model_len=50, data=out.astype(">u2").tobytes())
    assert m.W.cvalue == pytest.approx(-1234.5)
    assert m.Hz.cvalue == pytest.approx(49.97)
    assert m.WH.value == 4_000_000_000


def test_strings_and_legacy_common_model() -> None:
    spec = ModelSpec(1, raw={"Mn": "Acme Solar", "Md": "X", "SN": "1234"}, length=65)
    layout = get_layout(1, 65)
    block = _block(model_words(spec))
    assert len(block) == 67
    assert decode_string(layout, block, "Mn") == "Acme Solar"
    assert decode_string(layout, block, "SN") == "1234"
    assert decode_string(layout, block, "Opt") == ""  # all NUL: not implemented


def test_short_block_is_an_error() -> None:
    with pytest.raises(BlockSizeError, match="the fields need 52"):
        decode_model(get_layout(103), np.zeros(40, dtype=np.uint16))


DIFF_MODELS = (103, 113, 120, 124, 203, 213, 701, 702, 704, 802)


@pytest.mark.parametrize("model_id", DIFF_MODELS)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_random_blocks_decode_like_pysunspec2(model_id: int, data: st.DataObject) -> None:
    """Differential test: random registers, our decode vs pysunspec2's `Model(...).cvalue`."""
    layout = get_layout(model_id)
    words = data.draw(
        st.lists(
            st.one_of(st.sampled_from([0, 0xFFFF, 0x8000, 0x7FC0]), st.integers(0, 0xFFFF)),
            min_size=layout.size,
            max_size=layout.size,
        )
    )
    words[0], words[1] = model_id, layout.length
    for p in layout.points:
        if p.type == "sunssf":  # realistic exponents (or the sentinel): pysunspec2 overflows else
            words[p.offset] = data.draw(st.sampled_from([*range(-4, 5), -32768])) & 0xFFFF
    block = _block(words)
    values, quality = decode_model(layout, block)
    reference = Model(model_id, model_len=layout.length, data=block.astype(">u2").tobytes())
    points = dict(reference.points)
    for gname, group in reference.groups.items():
        if not isinstance(group, list):
            points |= {f"{gname}.{n}": p for n, p in group.points.items()}
    for k, i in enumerate(layout.numeric):
        pdef = layout.points[i]
        ref = points[pdef.name]
        sf_missing = (
            pdef.sf_index is not None and words[layout.points[pdef.sf_index].offset] == 0x8000
        )
        if ref.value is None or sf_missing:
            # pysunspec2: None for sentinels (and any float NaN); an SF sentinel leaves the point
            # unscaled there, while we refuse to report an unscalable value.
            assert quality[k] in (Quality.NOT_IMPLEMENTED, Quality.OUT_OF_RANGE), pdef.name
            assert math.isnan(values[k]), pdef.name
            continue
        expected = ref.cvalue
        if quality[k] == Quality.OUT_OF_RANGE:  # infinities from float32/64 bit patterns
            assert not math.isfinite(float(expected)), pdef.name
            continue
        assert quality[k] == Quality.GOOD, pdef.name
        assert values[k] == pytest.approx(float(expected), rel=1e-9, abs=1e-12), pdef.name


def test_decode_speed_per_model() -> None:
    """Print (not assert) the decode time of whole models."""
    lines = []
    for model_id in (103, 701, 802, 203):
        layout = get_layout(model_id)
        block = np.zeros(layout.size, dtype=np.uint16)
        decode_model(layout, block)
        n = 2000
        t0 = time.perf_counter()
        for _ in range(n):
            decode_model(layout, block)
        us = (time.perf_counter() - t0) / n * 1e6
        lines.append(f"{model_id}: {us:.1f} us for {len(layout.numeric)} points")
    print("\ndecode per model: " + "; ".join(lines))
