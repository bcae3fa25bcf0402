"""hil.sunspec_image against pysunspec2, an independent SunSpec implementation.

The image is laid out by our own code from the JSON; pysunspec2's `Model` lays out and decodes
the same bytes with its own code. Offsets, lengths and every decoded value must agree.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
import sunspec2.device as ss_device
from hypothesis import given
from hypothesis import strategies as st

from hil.server import MODELS, SiteSimulator
from hil.sunspec_image import (
    END_MODEL_ID,
    PointDef,
    RegisterBank,
    SunSpecModelError,
    build_layout,
    decode_raw,
    encode_raw,
    load_model_def,
    mandatory_refs,
)

from .conftest import PV7, QUIET_SITE, site_spec

ALL_MODELS = sorted({mid for chain in MODELS.values() for mid in chain})
# Device id of the first device of each group in the test site (conftest QUIET_SITE + pv7).
GROUP_DEVICE = {"pv": "pv1", "battery": "bat1", "meter": "meter1", "pv-7xx": "pv7"}


def _their_points(model: ss_device.Model) -> dict[str, Any]:
    """pysunspec2's points of a model, with fixed groups flattened as "<group>.<point>"."""
    points: dict[str, Any] = dict(model.points)
    for gname, group in model.groups.items():
        points.update({f"{gname}.{name}": point for name, point in group.points.items()})
    return points


@pytest.mark.parametrize("model_id", ALL_MODELS)
def test_layout_matches_pysunspec2(model_id: int) -> None:
    ours = load_model_def(model_id)
    theirs = ss_device.Model(model_id=model_id)
    assert ours.length == theirs.len - 2
    assert [(p.name, p.offset, p.size) for p in ours.points.values()] == [
        (name, point.offset, point.len) for name, point in _their_points(theirs).items()
    ]


def test_model_lengths_are_the_published_ones() -> None:
    lengths = {mid: load_model_def(mid).length for mid in ALL_MODELS}
    assert lengths == {
        1: 66,
        103: 50,
        120: 26,
        121: 30,
        123: 24,
        124: 24,
        203: 105,
        701: 153,
        702: 50,
        704: 65,
        802: 62,
    }


def test_fixed_groups_are_laid_out_after_the_top_level_points() -> None:
    ctl = load_model_def(704)
    assert [n for n in ctl.points if "." in n][:2] == ["PFWInj.PF", "PFWInj.Ext"]
    pf = ctl.points["PFWInj.PF"]
    assert (pf.offset, pf.sf, pf.writable) == (59, "PF_SF", True)


def _sim_after_steps(steps: int = 10) -> SiteSimulator:
    sim = SiteSimulator(site_spec(devices=[*QUIET_SITE["devices"], PV7]), seed=3)
    for _ in range(steps):
        sim.step()
    return sim


def _model_bytes(bank: RegisterBank, row: int, model_id: int) -> bytes:
    off = bank.layout.model_offsets[model_id]
    length = load_model_def(model_id).length + 2
    return bank.regs[row, off : off + length].astype(">u2").tobytes()


@pytest.mark.parametrize("kind", list(GROUP_DEVICE))
def test_every_point_decodes_the_same_in_pysunspec2(kind: str) -> None:
    sim = _sim_after_steps()
    device_id = GROUP_DEVICE[kind]
    bank = sim._banks[kind]
    for model_id in MODELS[kind]:
        mdef = load_model_def(model_id)
        theirs = ss_device.Model(
            model_id=model_id, model_len=mdef.length, data=_model_bytes(bank, 0, model_id)
        )
        for name, point in _their_points(theirs).items():
            ours = sim.read_point(device_id, f"{model_id}.{name}")
            expected = point.cvalue
            if isinstance(expected, float) or isinstance(ours, float):
                assert ours == pytest.approx(expected), f"{model_id}.{name}"
            else:
                assert ours == expected, f"{model_id}.{name}"


@pytest.mark.parametrize("kind", list(GROUP_DEVICE))
def test_every_mandatory_point_is_implemented(kind: str) -> None:
    sim = _sim_after_steps()
    device_id = GROUP_DEVICE[kind]
    layout = build_layout(MODELS[kind])
    missing = [ref for ref in mandatory_refs(layout) if sim.read_point(device_id, ref) is None]
    assert missing == []


@pytest.mark.parametrize(
    ("kind", "ref", "words"),
    [
        ("pv", "123.VArWMaxPct", [0x8000]),  # int16
        ("pv", "120.MaxChaRte", [0xFFFF]),  # uint16 (PV has no storage rating)
        ("pv", "121.VArAct", [0xFFFF]),  # enum16
        ("pv", "103.EvtVnd1", [0xFFFF, 0xFFFF]),  # bitfield32
        ("pv", "1.Opt", [0] * 8),  # string
        ("battery", "802.WarrDt", [0xFFFF, 0xFFFF]),  # uint32
        ("battery", "802.DisChaRte_SF", [0x8000]),  # sunssf
        ("battery", "124.VAChaMax", [0xFFFF]),
        ("meter", "203.TotVAhExp", [0, 0]),  # acc32
        ("meter", "203.TotVArh_SF", [0x8000]),
    ],
)
def test_unimplemented_points_serve_sentinels(kind: str, ref: str, words: list[int]) -> None:
    sim = _sim_after_steps(1)
    bank = sim._banks[kind]
    pdef, off = bank.layout.point(ref)
    assert bank.regs[0, off : off + pdef.size].tolist() == words
    device_id = {"pv": "pv1", "battery": "bat1", "meter": "meter1"}[kind]
    assert sim.read_point(device_id, ref) is None


@pytest.mark.parametrize("kind", list(GROUP_DEVICE))
def test_map_structure_suns_chain_end(kind: str) -> None:
    layout = build_layout(MODELS[kind])
    regs = RegisterBank(layout, 1).regs[0]
    assert struct.pack(">2H", *regs[:2]) == b"SunS"
    addr, seen = 2, []
    while regs[addr] != END_MODEL_ID:
        seen.append(int(regs[addr]))
        addr += int(regs[addr + 1]) + 2
    assert tuple(seen) == MODELS[kind]
    assert regs[addr + 1] == 0
    assert addr + 2 == layout.length


def test_models_this_builder_cannot_lay_out_are_refused() -> None:
    with pytest.raises(SunSpecModelError, match="repeating"):
        load_model_def(160)
    with pytest.raises(SunSpecModelError, match="not among"):
        load_model_def(9999)
    with pytest.raises(SunSpecModelError, match="common model"):
        build_layout((103,))


_INT_TYPES = {
    "int16": (">h", st.integers(-32767, 32767)),
    "uint16": (">H", st.integers(0, 0xFFFE)),
    "int32": (">i", st.integers(-(2**31) + 1, 2**31 - 1)),
    "uint32": (">I", st.integers(0, 2**32 - 2)),
    "acc32": (">I", st.integers(1, 2**32 - 1)),
    "acc64": (">Q", st.integers(1, 2**64 - 1)),
}


def _pdef(ptype: str) -> PointDef:
    size = struct.calcsize(_INT_TYPES[ptype][0]) // 2
    return PointDef(0, "x", ptype, size, 0, False, False, None, {}, None)


@given(data=st.data())
def test_integer_codec_round_trips_big_endian(data: st.DataObject) -> None:
    ptype = data.draw(st.sampled_from(sorted(_INT_TYPES)))
    fmt, values = _INT_TYPES[ptype]
    value = data.draw(values)
    words = encode_raw(_pdef(ptype), value)
    assert decode_raw(_pdef(ptype), words) == value
    assert struct.unpack(fmt, struct.pack(f">{len(words)}H", *words))[0] == value


@given(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=32))
def test_string_round_trip(text: str) -> None:
    pdef = load_model_def(1).points["SN"]
    assert decode_raw(pdef, encode_raw(pdef, text)) == (text or None)


def test_columns_scale_per_row_and_saturate() -> None:
    layout = build_layout(MODELS["pv"])
    bank = RegisterBank(layout, 3)
    for row, sf in enumerate((-2, -1, 0)):
        bank.set_raw(row, "123.WMaxLimPct_SF", sf)
        bank.set_raw(row, "103.W_SF", sf + 2)
    bank.set_column("123.WMaxLimPct", np.array([55.55, 55.55, 55.55]))
    assert [bank.get_raw(r, "123.WMaxLimPct") for r in range(3)] == [5555, 556, 56]
    bank.set_column("103.W", np.array([1e9, -1e9, np.nan]))
    assert [bank.get_raw(r, "103.W") for r in range(3)] == [32767, -32767, None]
