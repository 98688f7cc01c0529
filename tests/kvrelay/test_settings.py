"""Typed settings: flags over KVRELAY_* variables over defaults, clear errors, and the README's table current."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from kvrelay import settings as s

ROOT = Path(__file__).resolve().parents[2]


def parse(cls, argv, env):
    parser = argparse.ArgumentParser()
    s.add_arguments(parser, cls, env)
    return s.from_namespace(cls, parser.parse_args(argv))


def test_defaults_then_environment_then_flags():
    assert parse(s.DecodeSettings, [], {}).max_decode_batch == 128
    assert parse(s.DecodeSettings, [], {"KVRELAY_MAX_DECODE_BATCH": "64"}).max_decode_batch == 64
    got = parse(s.DecodeSettings, ["--max-decode-batch", "32"], {"KVRELAY_MAX_DECODE_BATCH": "64"})
    assert got.max_decode_batch == 32
    assert isinstance(got.max_decode_batch, int)


def test_redis_url_also_reads_the_usual_variable_but_its_own_first():
    assert parse(s.GatewaySettings, [], {"REDIS_URL": "redis://a:1/0"}).redis_url == "redis://a:1/0"
    env = {"REDIS_URL": "redis://a:1/0", "KVRELAY_REDIS_URL": "redis://b:2/0"}
    assert parse(s.GatewaySettings, [], env).redis_url == "redis://b:2/0"


def test_bools_are_flag_pairs_and_01_variables():
    assert parse(s.DecodeSettings, [], {}).overlap is True
    assert parse(s.DecodeSettings, ["--no-overlap"], {}).overlap is False
    assert parse(s.DecodeSettings, [], {"KVRELAY_OVERLAP": "0"}).overlap is False
    assert parse(s.DecodeSettings, [], {"KVRELAY_DECODE_OVERLAP": "0"}).overlap is False  # the older name
    assert parse(s.UpSettings, ["--no-decode-overlap", "--mps"], {}).decode_overlap is False


def test_optional_fields_stay_none_and_take_values():
    assert parse(s.WorkerSettings, [], {}).max_model_len is None
    assert parse(s.WorkerSettings, [], {"KVRELAY_MAX_MODEL_LEN": "4096"}).max_model_len == 4096
    assert parse(s.KVStoreSettings, [], {"KVRELAY_MODEL": ""}).model is None  # compose's ${MODEL:-}


@pytest.mark.parametrize(
    "argv, env",
    [
        ([], {"KVRELAY_MAX_BATCH_TOKENS": "lots"}),
        ([], {"KVRELAY_OVERLAP": "maybe"}),
        (["--mode", "sideways"], {}),
        (["--port", "x"], {}),
    ],
)
def test_bad_values_are_usage_errors(argv, env, capsys):
    cls = s.UpSettings if "--mode" in argv else s.DecodeSettings
    with pytest.raises(SystemExit) as exc:
        parse(cls, argv, env)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_settings_are_frozen():
    settings = s.DecodeSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1


def test_to_argv_round_trips_through_the_child_parser():
    up = s.UpSettings(model="/m", kv_dtype="int8", block_size=32, kv_cache_mb=7, decode_overlap=False)
    argv = s.to_argv(up, s.KVStoreSettings, skip=("host", "port", "redis_url", "name"))
    child = parse(s.KVStoreSettings, argv, {})
    assert (child.model, child.kv_dtype, child.block_size, child.kv_cache_mb) == ("/m", "int8", 32, 7)
    assert child.port == s.KVStoreSettings().port  # skipped: the launcher gives each child its own


def test_every_process_has_a_typed_class_with_defaults():
    for cls in s.PROCESSES.values():
        fields = dataclasses.fields(cls)
        assert fields and all(f.default is not dataclasses.MISSING for f in fields)
        assert all(f.metadata.get("help") for f in fields), cls


def test_readme_table_is_current():
    table = subprocess.run(
        [sys.executable, "-m", "kvrelay.settings"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert table in (ROOT / "README.md").read_text(), "README's settings table is stale: python -m kvrelay.settings"


def test_compose_passes_only_variables_its_processes_read():
    """A typo in the compose file (KVRELAY_KV_CACHE instead of KVRELAY_KV_CACHE_MB) would be ignored silently."""
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    by_module = {
        "services.kvstore.server": s.KVStoreSettings,
        "services.prefill.server": s.PrefillSettings,
        "services.decode.server": s.DecodeSettings,
        "gateway.server": s.GatewaySettings,
    }
    checked = 0
    for name, service in compose["services"].items():
        command = service.get("command", [])
        if "-m" not in command:
            continue
        cls = by_module[command[command.index("-m") + 1]]
        assert command[command.index("-m") + 2 :] == [], f"{name}: settings go in environment, not flags"
        known = {var for f in dataclasses.fields(cls) for var in s.env_names(f)}
        known |= {var for _, var, _ in s.SECRET_VARIABLES}  # read from the environment only (kvrelay/rpc/auth.py)
        for var in service.get("environment", {}):
            if var.startswith("KVRELAY_"):
                assert var in known, f"{name}: {var} is not a setting of {cls.__name__}"
                checked += 1
    assert checked >= 8
