"""Site files: the shipped sites load, and mistakes are reported by key."""

from __future__ import annotations

from pathlib import Path

import pytest

from hil.site import SiteFileError, load_site, parse_site

SITES = Path(__file__).resolve().parents[2] / "hil" / "sites"

MINIMAL = """
name = "t"
[[devices]]
id = "pv1"
kind = "pv"
unit_id = 1
rating_w = 5000
"""


def test_demo_site_matches_the_issue() -> None:
    spec = load_site(SITES / "demo.toml")
    kinds = {d.id: d for d in spec.devices}
    assert [d.kind for d in spec.devices] == ["pv", "battery", "meter"]
    assert [d.unit_id for d in spec.devices] == [1, 2, 3]
    assert {spec.server_key(d) for d in spec.devices} == {spec.port}
    assert kinds["pv1"].rating_w == 10_000
    assert (kinds["bat1"].rating_w, kinds["bat1"].capacity_wh, kinds["bat1"].soc_pct) == (
        5000,
        10_000,
        50,
    )
    assert kinds["meter1"].role == "pcc"
    assert spec.physics_hz >= 10
    irradiance = [v for _, v in spec.profiles.irradiance]
    assert min(irradiance) >= 800
    assert max(irradiance) <= 900
    load = [v for _, v in spec.profiles.load]
    assert min(load) >= 2700
    assert max(load) <= 3300


def test_twelve_site_has_ten_varied_pv_one_battery_one_meter() -> None:
    spec = load_site(SITES / "twelve.toml")
    pv = [d for d in spec.devices if d.kind == "pv"]
    assert len(spec.devices) == 12
    assert len(pv) == 10
    assert [d.kind for d in spec.devices].count("battery") == 1
    assert [d.kind for d in spec.devices].count("meter") == 1
    ratings = [d.rating_w or 0 for d in pv]
    assert min(ratings) == 3000
    assert max(ratings) == 12_000
    assert len(set(ratings)) == 10
    assert {d.base_address for d in pv} == {0, 40000, 50000}


def test_pv7xx_site_has_a_7xx_pv_a_battery_and_a_meter() -> None:
    spec = load_site(SITES / "pv7xx.toml")
    by_id = {d.id: d for d in spec.devices}
    assert [d.kind for d in spec.devices] == ["pv", "battery", "meter"]
    assert by_id["pv1"].family == "7xx"
    assert by_id["bat1"].family == "1xx"  # the default
    assert (spec.frequency_response.droop_pct, spec.frequency_response.deadband_hz) == (5.0, 0.036)
    assert len({spec.port, *(d.port for d in spec.devices if d.port)}) == 1


def test_every_shipped_site_loads_and_builds() -> None:
    from hil.server import SiteSimulator

    for path in sorted(SITES.glob("*.toml")):
        sim = SiteSimulator(load_site(path))
        sim.step()
        assert set(sim.state().devices) == {d.id for d in sim.spec.devices}, path.name


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL.replace("unit_id = 1", 'unit_id = 1\nfamily = "8xx"'), "devices.0.family"),
        (
            MINIMAL
            + '[[devices]]\nid = "b"\nkind = "battery"\nfamily = "7xx"\nunit_id = 2\n'
            + "rating_w = 1\ncapacity_wh = 1\n",
            "PV inverters only",
        ),
        (MINIMAL + "[frequency_response]\ndroop_pct = -1\n", "frequency_response.droop_pct"),
        (MINIMAL.replace("rating_w", "ratng_w"), "devices.0.ratng_w"),
        (MINIMAL + "physics_hz = 5\n", "physics_hz"),
        (MINIMAL.replace("name", "nom"), "nom"),
        (MINIMAL.replace('"pv"', '"wind"'), "devices.0.kind"),
        (MINIMAL.replace("unit_id = 1", "unit_id = 300"), "devices.0.unit_id"),
        (MINIMAL + "[profiles]\nirradiance = [[5, 100]]\n", "profiles.irradiance"),
        (MINIMAL + "[profiles]\nload = [[0, 1], [0, 2]]\n", "profiles.load"),
        (
            MINIMAL + '[[devices]]\nid = "b"\nkind = "battery"\nunit_id = 2\nrating_w = 1\n',
            "capacity_wh",
        ),
        (MINIMAL + '[[devices]]\nid = "m"\nkind = "meter"\nunit_id = 2\n', "role = 'pcc'"),
        (MINIMAL + '[[devices]]\nid = "pv2"\nkind = "pv"\nunit_id = 1\nrating_w = 1\n', "unit_id"),
        (MINIMAL + '[[devices]]\nid = "pv1"\nkind = "pv"\nunit_id = 2\nrating_w = 1\n', "pv1"),
        (MINIMAL.replace('id = "pv1"', 'id = "has space"'), "devices.0.id"),
        (MINIMAL.replace("unit_id = 1", "unit_id = 1\nbase_address = 1"), "base_address"),
    ],
)
def test_invalid_site_names_the_key(text: str, expected: str) -> None:
    with pytest.raises(SiteFileError) as err:
        parse_site(text, source="t.toml")
    assert expected in str(err.value)
    assert "t.toml" in str(err.value)


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SiteFileError, match="not valid TOML"):
        parse_site("name = ", source="x")
    with pytest.raises(SiteFileError, match="cannot read site file"):
        load_site(tmp_path / "absent.toml")


def test_port_groups() -> None:
    spec = parse_site(
        MINIMAL
        + '[[devices]]\nid = "a"\nkind = "pv"\nunit_id = 1\nrating_w = 1\nport = 6000\n'
        + '[[devices]]\nid = "b"\nkind = "pv"\nunit_id = 1\nrating_w = 1\nport = 0\n'
        + '[[devices]]\nid = "c"\nkind = "pv"\nunit_id = 1\nrating_w = 1\nport = 0\n'
        + '[[devices]]\nid = "d"\nkind = "pv"\nunit_id = 2\nrating_w = 1\nport = 5020\n'
    )
    keys = {d.id: spec.server_key(d) for d in spec.devices}
    assert keys["pv1"] == keys["d"] == 5020  # explicit site port = the shared site server
    assert keys["a"] == 6000
    assert keys["b"] != keys["c"]  # each port-0 device gets its own free port


def test_overrides_are_validated() -> None:
    spec = parse_site(MINIMAL)
    assert spec.with_overrides(seed=9, port=0).seed == 9
    with pytest.raises(ValueError, match="port"):
        spec.with_overrides(port=70000)
