"""Gateway config: TOML → frozen models, unknown keys rejected, every problem named precisely."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import dergw.v1
from drivers import registry
from drivers.contract import DeviceKind
from gateway import cli
from gateway.config import (
    MAX_BATCH_RECORDS,
    ConfigError,
    GatewayConfig,
    check_config_main,
    load_config,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config.example.toml"


class FakeParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    host: str
    port: int = Field(default=502, ge=1, le=65535)
    unit_id: int = Field(default=1, ge=0, le=247)
    timeout_s: float = Field(default=1.0, gt=0)


class OtherParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    device: str


def _register(monkeypatch: pytest.MonkeyPatch, name: str, module: str, **models: type) -> None:
    mod = types.ModuleType(module)
    for attr, model in models.items():
        setattr(mod, attr, model)
    monkeypatch.setitem(sys.modules, module, mod)
    attr = next(iter(models))
    monkeypatch.setitem(
        registry.DRIVERS, name, registry.DriverSpec(module, attr, "FakeDriver", f"{name}-proto")
    )


@pytest.fixture(autouse=True)
def fake_drivers(monkeypatch: pytest.MonkeyPatch) -> None:
    _register(monkeypatch, "fake", "tests_fake_driver", FakeParams=FakeParams)
    _register(monkeypatch, "other", "tests_other_driver", OtherParams=OtherParams)


BASE = """\
[gateway]
id = "gw-1"
state_dir = "state"

[site]
id = "site-a"
name = "Site A"

[uplink]
transport = "grpc"
target = "127.0.0.1:50051"
"""

PV = """
[[devices]]
id = "pv-1"
kind = "pv"
driver = "fake"
[devices.params]
host = "10.0.0.5"
"""

PCC = """
[[devices]]
id = "meter-1"
kind = "meter"
driver = "fake"
role = "pcc"
[devices.params]
host = "10.0.0.6"
port = 1502
"""


def _write(tmp_path: Path, text: str, name: str = "site.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _problems(tmp_path: Path, text: str) -> list[str]:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    prefix = f"{path}: "
    assert all(p.startswith(str(path)) for p in info.value.problems)
    assert str(info.value) == "\n".join(info.value.problems)
    return [p.removeprefix(prefix) for p in info.value.problems]


# -- valid configs --------------------------------------------------------------------------------


def test_minimal_config_gets_defaults(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, BASE))
    assert config.gateway.id == "gw-1"
    assert config.gateway.log_level == "INFO"
    assert config.site.substation == ""
    assert config.site.feeder == ""
    assert config.site.export_limit_w is None
    assert config.site.import_limit_w is None
    up = config.uplink
    assert (up.keepalive_s, up.reconnect_max_s, up.batch_max_records, up.inflight_batches) == (
        20.0,
        30.0,
        500,
        4,
    )
    c = config.control
    assert (c.period_s, c.revert_timeout_s, c.refresh_s, c.meter_stale_periods) == (
        1.0,
        60,
        10.0,
        3,
    )
    assert (c.export_margin_w, c.assumed_min_load_w) == (50.0, 0.0)
    assert c.fallback.model_dump() == {
        "export_limit_w": None,
        "import_limit_w": None,
        "max_gen_pct": None,
        "connect": None,
    }
    assert config.outbox.commit_interval_s == 0.1
    assert config.outbox.quota_bytes is None
    assert config.devices == ()
    assert config.pcc_meter is None


def test_devices_and_driver_params(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, BASE + PV + PCC))
    pv, meter = config.devices
    assert pv.kind is DeviceKind.PV
    assert meter.kind is DeviceKind.METER
    assert pv.poll_period_s == 1.0
    assert pv.role is None
    assert isinstance(pv.params, FakeParams)
    assert pv.params == FakeParams(host="10.0.0.5")
    assert meter.params == FakeParams(host="10.0.0.6", port=1502)
    assert config.pcc_meter is meter


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, BASE + PV))
    with pytest.raises(ValidationError):
        config.gateway.id = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        config.devices[0].params.host = "x"  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        config.devices.append(config.devices[0])  # type: ignore[attr-defined]


def test_relative_state_dir_resolves_against_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    path = _write(conf_dir, BASE)
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("etc/site.toml"))
    assert config.gateway.state_dir == conf_dir / "state"
    assert config.gateway.state_dir.is_absolute()
    absolute = _write(conf_dir, BASE.replace('"state"', '"/var/lib/dergw"'), "abs.toml")
    assert load_config(absolute).gateway.state_dir == Path("/var/lib/dergw")
    assert load_config(str(path)).gateway.state_dir == conf_dir / "state"


def test_log_level_is_case_insensitive(tmp_path: Path) -> None:
    text = BASE.replace('state_dir = "state"', 'state_dir = "state"\nlog_level = "debug"')
    assert load_config(_write(tmp_path, text)).gateway.log_level == "DEBUG"


def test_no_pcc_needed_without_limits(tmp_path: Path) -> None:
    text = BASE + "\n[control.fallback]\nmax_gen_pct = 50\n" + PV
    assert load_config(_write(tmp_path, text)).pcc_meter is None


def test_limits_without_controllable_devices_need_no_pcc(tmp_path: Path) -> None:
    text = BASE.replace('name = "Site A"', 'name = "Site A"\nexport_limit_w = 0')
    meter = PCC.replace('role = "pcc"\n', "")
    assert load_config(_write(tmp_path, text + meter)).pcc_meter is None


@pytest.mark.parametrize(
    ("target", "host", "port"),
    [
        ("127.0.0.1:50051", "127.0.0.1", 50051),
        ("headend.example.net:443", "headend.example.net", 443),
        ("localhost:1", "localhost", 1),
        ("[::1]:50051", "::1", 50051),
        ("[2001:db8::2]:65535", "2001:db8::2", 65535),
    ],
)
def test_valid_targets(tmp_path: Path, target: str, host: str, port: int) -> None:
    text = BASE.replace('"127.0.0.1:50051"', f'"{target}"')
    uplink = load_config(_write(tmp_path, text)).uplink
    assert (uplink.target, uplink.host, uplink.port) == (target, host, port)


def test_max_batch_records_matches_the_wire_limit() -> None:
    assert dergw.v1.MAX_RECORDS_PER_BATCH == MAX_BATCH_RECORDS


# -- one problem, named exactly -------------------------------------------------------------------


def _set(section: str, line: str) -> str:
    """BASE with `line` added to `[section]` (added as a new table if absent)."""
    header = f"[{section}]\n"
    if header in BASE:
        return BASE.replace(header, header + line + "\n")
    return BASE + f"\n{header}{line}\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            BASE.replace('id = "gw-1"', 'id = "GW 1"'),
            "gateway.id: String should match pattern",
        ),
        (BASE.replace('id = "site-a"', 'id = "-site"'), "site.id: String should match pattern"),
        (BASE.replace('name = "Site A"', 'name = ""'), "site.name: String should have at least"),
        (
            _set("site", "export_limit_w = -1"),
            "site.export_limit_w: Input should be greater than or equal to 0",
        ),
        (_set("site", "import_limit_w = inf"), "site.import_limit_w: Input should be a finite"),
        (_set("site", "export_limit_w = nan"), "site.export_limit_w: Input should be a finite"),
        (_set("gateway", 'log_level = "LOUD"'), "gateway.log_level: Input should be 'DEBUG'"),
        (
            BASE.replace('transport = "grpc"', 'transport = "amqp"'),
            "uplink.transport: Input should be 'grpc' or 'mqtt'",
        ),
        (
            BASE.replace('transport = "grpc"\n', ""),
            "uplink.transport: required key is missing",
        ),
        (BASE.replace('"127.0.0.1:50051"', '"127.0.0.1"'), "uplink.target: '127.0.0.1': expected"),
        (BASE.replace('"127.0.0.1:50051"', '"host:0"'), "uplink.target: 'host:0': port must be"),
        (
            BASE.replace('"127.0.0.1:50051"', '"host:99999"'),
            "uplink.target: 'host:99999': port must be",
        ),
        (BASE.replace('"127.0.0.1:50051"', '"::1:50051"'), "put an IPv6 address in brackets"),
        (BASE.replace('"127.0.0.1:50051"', '"[zz]:50051"'), "'zz' is not an IPv6 address"),
        (BASE.replace('"127.0.0.1:50051"', '"bad_host:1"'), "is not a valid host name"),
        (
            _set("uplink", "batch_max_records = 0"),
            "uplink.batch_max_records: Input should be greater",
        ),
        (
            _set("uplink", "batch_max_records = 2001"),
            "uplink.batch_max_records: Input should be less",
        ),
        (
            _set("uplink", "inflight_batches = 0"),
            "uplink.inflight_batches: Input should be greater",
        ),
        (_set("control", "period_s = 0.01"), "control.period_s: Input should be greater"),
        (_set("control", "period_s = 61"), "control.period_s: Input should be less"),
        (
            _set("control", "period_s = 40\nrefresh_s = 50"),
            "control.revert_timeout_s: must be at least 2 × period_s = 80 s",
        ),
        (
            _set("control", "revert_timeout_s = 1.5"),
            "control.revert_timeout_s: Input should be a valid integer",
        ),
        (
            _set("control", "refresh_s = 60"),
            "control.refresh_s: must be less than revert_timeout_s = 60 s",
        ),
        (
            _set("control", "period_s = 5\nrefresh_s = 2"),
            "control.refresh_s: must be at least period_s = 5 s",
        ),
        (
            _set("control", "meter_stale_periods = 0"),
            "control.meter_stale_periods: Input should be greater",
        ),
        (
            _set("control.fallback", "max_gen_pct = 101"),
            "control.fallback.max_gen_pct: Input should be less",
        ),
        (
            _set("control.fallback", "connect = 3"),
            "control.fallback.connect: Input should be a valid boolean",
        ),
        (_set("outbox", "quota_bytes = 0"), "outbox.quota_bytes: Input should be greater than 0"),
        (
            _set("outbox", "commit_interval_s = 0"),
            "outbox.commit_interval_s: Input should be greater",
        ),
        (
            BASE + PV.replace('kind = "pv"', 'kind = "wind"'),
            "devices[0].kind: Input should be 'pv', 'battery' or 'meter'",
        ),
        (
            BASE + PV.replace('driver = "fake"', 'driver = "nope"'),
            "devices[0].driver: unknown driver 'nope'; known drivers: ",
        ),
        (
            BASE + PV + PCC.replace("port = 1502", "port = 65536"),
            "devices[1].params.port: Input should be less than or equal to 65535",
        ),
        (
            BASE + PV.replace('host = "10.0.0.5"\n', ""),
            "devices[0].params.host: required key is missing",
        ),
        (
            BASE + PV.replace("[devices.params]\n", "").replace('host = "10.0.0.5"\n', ""),
            "devices[0].params.host: required key is missing",
        ),
        (
            BASE
            + PV.replace('driver = "fake"', 'driver = "other"').replace('host = "10.0.0.5"', ""),
            "devices[0].params.device: required key is missing",
        ),
        (
            BASE + PV.replace('kind = "pv"', 'kind = "pv"\nrole = "pcc"'),
            "devices[0].role: only a meter can be the pcc (point of common coupling); "
            "this device is kind 'pv'",
        ),
        (
            BASE + PV.replace('kind = "pv"', 'kind = "pv"\nrole = "main"'),
            "devices[0].role: Input should be 'pcc'",
        ),
        (
            BASE + PV + PCC + PCC.replace("meter-1", "meter-2"),
            "devices[2].role: only one meter may be the pcc; devices[1] already is",
        ),
        (
            BASE + PV + PCC + PV.replace('kind = "pv"', 'kind = "battery"'),
            "devices[2].id: duplicate device id 'pv-1' (also devices[0])",
        ),
        (
            _set("site", "export_limit_w = 5000") + PV,
            'devices: a meter with role = "pcc" is required: site.export_limit_w is enforced',
        ),
        (
            _set("control.fallback", "import_limit_w = 0") + PV,
            'devices: a meter with role = "pcc" is required: control.fallback.import_limit_w',
        ),
        (
            BASE + PV.replace('kind = "pv"', 'kind = "pv"\npoll_period_s = 0'),
            "devices[0].poll_period_s: Input should be greater than or equal to 0.01",
        ),
    ],
)
def test_single_problem(tmp_path: Path, text: str, expected: str) -> None:
    problems = _problems(tmp_path, text)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected) or expected in problems[0], problems[0]


def test_example_from_the_brief(tmp_path: Path) -> None:
    devices = PV + PV.replace("pv-1", "pv-2") + PCC.replace("port = 1502", "port = 70000")
    path = _write(tmp_path, BASE + devices)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == (
        f"{path}: devices[2].params.port: Input should be less than or equal to 65535",
    )


# -- unknown keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("verbose = true\n" + BASE, "verbose: unknown key; allowed here: gateway, site,"),
        (
            _set("gateway", "stat_dir = 'x'"),
            "gateway.stat_dir: unknown key; did you mean 'state_dir'?",
        ),
        (
            _set("site", "export_limit = 1"),
            "site.export_limit: unknown key; did you mean 'export_limit_w'?",
        ),
        (_set("control", "refresh = 5"), "control.refresh: unknown key; did you mean 'refresh_s'?"),
        (_set("control.fallback", "max_gen = 5"), "control.fallback.max_gen: unknown key;"),
        (_set("outbox", "quota = 5"), "outbox.quota: unknown key; did you mean 'quota_bytes'?"),
        (
            BASE + PV.replace('kind = "pv"', 'kind = "pv"\npoll_s = 2'),
            "devices[0].poll_s: unknown key;",
        ),
        (
            BASE + PV + PCC.replace("port = 1502", "prot = 1502"),
            "devices[1].params.prot: unknown key; did you mean 'port'? allowed here: host, port, "
            "unit_id, timeout_s",
        ),
        (
            BASE + PV.replace("[devices.params]", "[devices.param]"),
            "devices[0].param: unknown key; did you mean 'params'?",
        ),
    ],
)
def test_unknown_keys_are_rejected(tmp_path: Path, text: str, expected: str) -> None:
    problems = _problems(tmp_path, text)
    assert any(p.startswith(expected) for p in problems), problems


def test_misspelt_table_is_unknown_and_the_real_one_missing(tmp_path: Path) -> None:
    assert _problems(tmp_path, BASE.replace("[site]", "[sites]")) == [
        "site: required key is missing",
        "sites: unknown key; did you mean 'site'? allowed here: gateway, site, uplink, control, "
        "outbox, security, local_api, devices",
    ]


def test_params_of_an_unknown_driver_are_not_second_guessed(tmp_path: Path) -> None:
    text = BASE + PV.replace('driver = "fake"', 'driver = "nope"').replace(
        'host = "10.0.0.5"', "color = 'red'"
    )
    problems = _problems(tmp_path, text)
    assert len(problems) == 1
    assert problems[0].startswith("devices[0].driver: unknown driver 'nope'; known drivers: ")
    assert "fake" in problems[0]
    assert "sunspec-modbus" in problems[0]


# -- many problems at once ------------------------------------------------------------------------


def test_every_field_problem_is_reported_one_per_line(tmp_path: Path) -> None:
    text = (
        BASE.replace('id = "gw-1"', 'id = "GW"').replace('"127.0.0.1:50051"', '"nowhere"')
        + "\n[control]\nperiod_s = 0\nbogus = 1\n"
        + PV.replace('kind = "pv"', 'kind = "pvv"')
        + PCC.replace("port = 1502", "port = -1")
    )
    problems = _problems(tmp_path, text)
    assert [p.split(":", 1)[0] for p in problems] == [
        "gateway.id",
        "uplink.target",
        "control.period_s",
        "control.bogus",
        "devices[0].kind",
        "devices[1].params.port",
    ]


def test_cross_checks_report_every_problem(tmp_path: Path) -> None:
    text = (
        BASE + PV + PV + PCC + PCC.replace("meter-1", "meter-2") + PCC.replace("meter-1", "meter-3")
    )
    problems = _problems(tmp_path, text)
    assert problems == [
        "devices[1].id: duplicate device id 'pv-1' (also devices[0])",
        "devices[3].role: only one meter may be the pcc; devices[2] already is",
        "devices[4].role: only one meter may be the pcc; devices[2] already is",
    ]


# -- file-level problems --------------------------------------------------------------------------


def test_toml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE.replace('name = "Site A"', "name = Site A"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}:7:8: TOML syntax error: ")


def test_duplicate_toml_key_is_a_syntax_error(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE.replace('name = "Site A"', 'name = "A"\nname = "B"'))
    with pytest.raises(ConfigError, match=r"site\.toml:8:\d+: TOML syntax error"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == (f"{path}: config file not found",)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(BASE.replace("Site A", "Caf\xe9").encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_unloadable_driver_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        registry.DRIVERS,
        "ghost",
        registry.DriverSpec("tests_no_such_module", "Params", "Driver", "ghost"),
    )
    problems = _problems(tmp_path, BASE + PV.replace('driver = "fake"', 'driver = "ghost"'))
    assert len(problems) == 1
    assert problems[0].startswith(
        "devices[0].params: cannot check: driver 'ghost' is not available"
    )


def test_model_validate_without_file_keeps_relative_state_dir() -> None:
    config = GatewayConfig.model_validate(
        {
            "gateway": {"id": "gw", "state_dir": "rel"},
            "site": {"id": "s", "name": "S"},
            "uplink": {"transport": "grpc", "target": "h:1"},
        }
    )
    assert config.gateway.state_dir == Path("rel")


# -- config.example.toml --------------------------------------------------------------------------


class StandInSunSpecParams(BaseModel):
    """The subset of the SunSpec driver's params model that the example config uses."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    host: str
    port: int = Field(default=502, ge=1, le=65535)
    unit_id: int = Field(default=1, ge=1, le=247)
    timeout_s: float = Field(default=1.0, gt=0)


@pytest.mark.parametrize("params_model", ["real", "stand-in"])
def test_example_config_is_valid(monkeypatch: pytest.MonkeyPatch, params_model: str) -> None:
    if params_model == "stand-in":
        _register(monkeypatch, "sunspec-modbus", "tests_sunspec_standin", P=StandInSunSpecParams)
    config = load_config(EXAMPLE)
    assert config.uplink.target == "127.0.0.1:50051"
    assert config.site.substation
    assert config.site.feeder
    assert [d.kind for d in config.devices] == [DeviceKind.PV, DeviceKind.BATTERY, DeviceKind.METER]
    assert {d.driver for d in config.devices} == {"sunspec-modbus"}
    pcc = config.pcc_meter
    assert pcc is not None
    assert pcc.kind is DeviceKind.METER
    expected_model = (
        StandInSunSpecParams
        if params_model == "stand-in"
        else registry.params_model("sunspec-modbus")
    )
    # The example targets the demo simulator: one Modbus TCP port, unit ids 1-3.
    for unit_id, device in enumerate(config.devices, start=1):
        assert type(device.params) is expected_model
        assert device.params.model_dump(include={"host", "port", "unit_id"}) == {
            "host": "127.0.0.1",
            "port": 5020,
            "unit_id": unit_id,
        }
    assert config.gateway.state_dir == REPO / "var" / "gw-example-01"


# -- dergw check-config ---------------------------------------------------------------------------


def test_check_config_success(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = _set("site", 'substation = "sub-1"\nfeeder = "f-7"\nexport_limit_w = 5000') + PV + PCC
    path = _write(tmp_path, text)
    assert check_config_main([str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert f"{path}: OK" in out
    assert "gw-1" in out
    assert "site-a 'Site A' (substation sub-1, feeder f-7); export limit 5000 W" in out
    assert "devices  2: 1 pv, 1 meter; pcc meter meter-1" in out
    assert "uplink   grpc 127.0.0.1:50051" in out


def test_check_config_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace('id = "gw-1"', 'id = "GW"') + PV.replace('host = "10.0.0.5"', "port = 0")
    path = _write(tmp_path, text)
    assert check_config_main([str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{path}: gateway.id: String should match pattern '^[a-z0-9][a-z0-9._-]{{0,62}}$'",
        f"{path}: devices[0].params.host: required key is missing",
        f"{path}: devices[0].params.port: Input should be greater than or equal to 1",
        f"{path}: 3 problems",
    ]


def test_check_config_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert check_config_main([]) == 2
    assert "usage: dergw check-config" in capsys.readouterr().err
    assert check_config_main(["a.toml", "b.toml"]) == 2
    assert check_config_main(["--help"]) == 0
    assert "usage: dergw check-config" in capsys.readouterr().out


def test_dispatcher_routes_to_check_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["check-config", str(_write(tmp_path, BASE))]) == 0
    assert "devices  0" in capsys.readouterr().out
    assert cli.main(["check-config", str(tmp_path / "absent.toml")]) == 1


# -- interlocks and the kernel's tuning -----------------------------------------------------------


def test_interlocks_are_validated(tmp_path: Path) -> None:
    text = (
        BASE
        + PV
        + PCC
        + """
[[control.interlocks]]
name = "zero export relay"
export_limit_w = 0

[[control.interlocks]]
name = "ghost"
device = "pv-9"
max_gen_pct = 50

[[control.interlocks]]
name = "empty"
"""
    )
    assert _problems(tmp_path, text) == [
        "control.interlocks[2]: an interlock must set at least one limit (or connect = false)",
    ]
    fixed = text.replace('[[control.interlocks]]\nname = "empty"\n', "")
    assert _problems(tmp_path, fixed) == [
        "control.interlocks[1].device: unknown device 'pv-9'; devices: meter-1, pv-1",
    ]


def test_an_interlock_cannot_force_a_connection(tmp_path: Path) -> None:
    text = BASE + PV + '\n[[control.interlocks]]\nname = "x"\nconnect = true\n'
    (problem,) = _problems(tmp_path, text)
    assert problem.startswith("control.interlocks[0].connect:")


def test_soc_window_must_be_a_window(tmp_path: Path) -> None:
    assert _problems(tmp_path, _set("control", "soc_min_pct = 90\nsoc_max_pct = 80")) == [
        "control.soc_min_pct: must be below soc_max_pct = 80 %",
    ]


def test_security_intent_keys_file_defaults_to_the_state_dir(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, BASE))
    state_dir = config.gateway.state_dir
    assert config.security.intent_keys_path(state_dir) == tmp_path / "state" / "intent-keys.json"
    relative = load_config(_write(tmp_path, BASE + '\n[security]\nintent_keys_file = "k.json"\n'))
    assert relative.security.intent_keys_path(state_dir) == tmp_path / "k.json"
    assert _problems(tmp_path, BASE + "\n[security]\nintent_key_file = 'k.json'\n")[0].startswith(
        "security.intent_key_file: unknown key; did you mean 'intent_keys_file'?"
    )
