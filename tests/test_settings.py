"""Settings: a home puts everything under one folder, the platform folders are
the default, one TOML file overrides any of it, and every unknown key or bad
value is refused naming the key and the file. Durations and sizes parse in
every documented form and refuse the rest saying which forms work."""
from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import platformdirs
import pytest

from shared.errors import BadInput
from shared.settings import (FOREVER, MAX_SOCKET_PATH, Settings, TcpSettings, format_duration, parse_duration,
                             parse_memory_budget, parse_size)

GiB = 1 << 30
RAM = 16 * GiB


def load(home: Path, text: str | None = None, **kw) -> Settings:
    if text is not None:
        home.mkdir(parents=True, exist_ok=True)
        (home / "settings.toml").write_text(text)
    return Settings.load(home=home, env={}, ram_bytes=RAM, **kw)


def refused(home: Path, text: str) -> BadInput:
    with pytest.raises(BadInput) as info:
        load(home, text)
    err = info.value
    assert str(home / "settings.toml") in err.message, f"file not named: {err.message}"
    assert err.hint, f"no hint for: {err.message}"
    return err


# -- where things are -------------------------------------------------------------

def test_home_puts_every_folder_under_it_with_the_documented_defaults(tmp_path):
    s = load(tmp_path)
    assert (s.drop_dir, s.models_dir, s.failed_dir, s.state_dir, s.logs_dir, s.runtime_dir) == tuple(
        tmp_path / d for d in ("drop", "models", "failed", "state", "logs", "run"))
    assert s.home == tmp_path and s.config_file == tmp_path / "settings.toml"
    assert s.endpoint == f"ipc://{tmp_path}/run/anemlld.sock"
    assert s.journal_path.parent == s.state_dir and s.log_path.parent == s.logs_dir
    assert (s.memory_budget, s.keep_alive, s.queue_limit, s.max_frame_bytes) == (8 * GiB, 1800.0, 64, 1 << 20)
    assert (s.settle_seconds, s.rescan_seconds, s.log_level, s.tcp) == (2.0, 5.0, "INFO", None)
    assert s.stream_interval_seconds == 0.02


def test_anemll_home_variable_selects_the_home_and_the_argument_wins(tmp_path):
    by_env = Settings.load(env={"ANEMLL_HOME": str(tmp_path / "env")}, ram_bytes=RAM)
    assert by_env.drop_dir == tmp_path / "env" / "drop"
    by_arg = Settings.load(home=tmp_path / "arg", env={"ANEMLL_HOME": str(tmp_path / "env")}, ram_bytes=RAM)
    assert by_arg.drop_dir == tmp_path / "arg" / "drop"


def test_relative_home_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load(Path("h")).models_dir == tmp_path / "h" / "models"


def test_without_home_the_platform_folders_and_user_settings_file_are_used(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_RUNTIME_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    (tmp_path / "xdg_runtime_dir").mkdir(mode=0o700)
    dirs = platformdirs.PlatformDirs("anemlld", appauthor=False)
    dirs.user_config_path.mkdir(parents=True)
    (dirs.user_config_path / "settings.toml").write_text('keep_alive = "1h"\n')
    s = Settings.load(env={}, ram_bytes=RAM)
    assert s.home is None and s.config_file == dirs.user_config_path / "settings.toml"
    assert s.keep_alive == 3600.0
    assert s.drop_dir == dirs.user_data_path / "drop" and s.models_dir == dirs.user_data_path / "models"
    assert s.state_dir == dirs.user_state_path and s.logs_dir == dirs.user_log_path
    assert s.runtime_dir == dirs.user_runtime_path


def test_settings_file_overrides_every_location_and_value(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    s = load(tmp_path / "home", """
memory_budget = "8GB"
keep_alive = "1h30m"
queue_limit = 2
max_frame_bytes = "2MiB"
settle_seconds = 0.5
rescan_seconds = 1
stream_interval_seconds = 0
log_level = "debug"
[paths]
drop = "~/Drop Here"
models = "/srv/models"
failed = "failed-models"
state = "../state"
logs = "/var/log/anemlld"
runtime = "/tmp/anemll-test-rt"
""")
    home = tmp_path / "home"
    assert s.drop_dir == tmp_path / "user" / "Drop Here"
    assert s.models_dir == Path("/srv/models") and s.logs_dir == Path("/var/log/anemlld")
    assert s.failed_dir == home / "failed-models", "relative paths are relative to the settings file"
    assert s.state_dir == tmp_path / "state"
    assert s.endpoint == "ipc:///tmp/anemll-test-rt/anemlld.sock"
    assert (s.memory_budget, s.keep_alive, s.queue_limit, s.max_frame_bytes) == (8 * GiB, 5400.0, 2, 2 << 20)
    assert (s.settle_seconds, s.rescan_seconds, s.log_level) == (0.5, 1.0, "DEBUG")
    assert s.stream_interval_seconds == 0.0


def test_explicit_settings_file_is_read_and_must_exist(tmp_path):
    other = tmp_path / "other.toml"
    other.write_text("queue_limit = 9\n")
    assert Settings.load(home=tmp_path, config_file=other, env={}, ram_bytes=RAM).queue_limit == 9
    with pytest.raises(BadInput, match="does not exist"):
        Settings.load(home=tmp_path, config_file=tmp_path / "missing.toml", env={}, ram_bytes=RAM)


def test_deep_home_gets_a_short_socket_folder_both_sides_agree_on(tmp_path):
    deep = tmp_path / ("very-long-folder-name-" * 5) / "home"
    a, b = load(deep), load(deep)
    assert len(str(deep / "run" / "anemlld.sock")) > MAX_SOCKET_PATH
    assert a.runtime_dir == b.runtime_dir and str(a.runtime_dir).startswith("/tmp/anemlld-")
    assert len(str(a.socket_path)) <= MAX_SOCKET_PATH
    assert load(deep.parent / "other-home").runtime_dir != a.runtime_dir, "each home has its own socket"


def test_runtime_path_too_long_for_a_socket_is_refused_naming_the_key(tmp_path):
    err = refused(tmp_path, f'[paths]\nruntime = "/tmp/{"x" * 120}"\n')
    assert "runtime" in err.message and "shorter" in err.hint


def test_make_dirs_creates_everything_and_keeps_the_runtime_folder_owner_only(tmp_path):
    s = load(tmp_path)
    old = os.umask(0o022)
    try:
        (tmp_path / "run").mkdir(mode=0o755)
        os.chmod(tmp_path / "run", 0o755)
        s.make_dirs()
        s.make_dirs()  # twice is fine
    finally:
        os.umask(old)
    for d in (s.drop_dir, s.models_dir, s.failed_dir, s.state_dir, s.logs_dir, s.runtime_dir):
        assert d.is_dir()
    assert stat.S_IMODE(s.runtime_dir.stat().st_mode) == 0o700


def test_make_dirs_refuses_a_runtime_folder_that_is_a_link(tmp_path):
    s = load(tmp_path / "home")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "home" / "run").parent.mkdir(parents=True)
    (tmp_path / "home" / "run").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BadInput, match="not a folder"):
        s.make_dirs()


# -- refusals ----------------------------------------------------------------------

@pytest.mark.parametrize("text,words", [
    ("keep_alve = 5\n", ["keep_alve", "did you mean 'keep_alive'"]),
    ("[path]\ndrop = 'x'\n", ["path", "paths"]),
    ("[paths]\ndorp = 'x'\n", ["dorp", "did you mean 'drop'"]),
    ("[tcp]\nenable = true\n", ["enable", "did you mean 'enabled'"]),
    ("paths = 5\n", ["paths"]),
])
def test_unknown_keys_and_tables_are_refused_naming_them(tmp_path, text, words):
    err = refused(tmp_path, text)
    for w in words:
        assert w in str(err)


@pytest.mark.parametrize("text,key", [
    ("memory_budget = 0\n", "memory_budget"), ("memory_budget = 1.5\n", "memory_budget"),
    ("memory_budget = 'lots'\n", "memory_budget"), ("memory_budget = 1\n", "memory_budget"),
    ("memory_budget = '150%'\n", "memory_budget"), ("memory_budget = 'x%'\n", "memory_budget"),
    ("keep_alive = 'soon'\n", "keep_alive"), ("keep_alive = -2\n", "keep_alive"), ("keep_alive = true\n", "keep_alive"),
    ("queue_limit = -1\n", "queue_limit"), ("queue_limit = 2.5\n", "queue_limit"), ("queue_limit = '4'\n", "queue_limit"),
    ("max_frame_bytes = 10\n", "max_frame_bytes"), ("max_frame_bytes = 'big'\n", "max_frame_bytes"),
    ("settle_seconds = -1\n", "settle_seconds"), ("settle_seconds = 'x'\n", "settle_seconds"),
    ("rescan_seconds = 0\n", "rescan_seconds"), ("rescan_seconds = nan\n", "rescan_seconds"),
    ("stream_interval_seconds = -0.1\n", "stream_interval_seconds"),
    ("stream_interval_seconds = '20ms'\n", "stream_interval_seconds"),
    ("log_level = 'loud'\n", "log_level"), ("log_level = 10\n", "log_level"),
    ("[paths]\ndrop = 5\n", "drop"), ("[paths]\nmodels = ''\n", "models"),
    ("[tcp]\nenabled = 'yes'\n", "enabled"),
])
def test_bad_values_are_refused_naming_the_key_and_file(tmp_path, text, key):
    assert key in refused(tmp_path, text).message


def test_invalid_toml_is_refused_naming_the_file(tmp_path):
    err = refused(tmp_path, "keep_alive = \n")
    assert "not valid TOML" in err.message


# -- TCP needs CURVE -------------------------------------------------------------------

CERT = 'curve\n    public-key = "abc"\n    secret-key = "def"\n'


def curve_files(tmp_path: Path, mode: int = 0o600) -> None:
    (tmp_path / "keys" / "clients").mkdir(parents=True)
    (tmp_path / "keys" / "server.key_secret").write_text(CERT)
    os.chmod(tmp_path / "keys" / "server.key_secret", mode)


TCP_ON = '[tcp]\nenabled = true\nserver_key = "keys/server.key_secret"\nclient_keys = "keys/clients"\n'


def test_tcp_is_off_by_default_and_on_with_curve_keys(tmp_path):
    assert load(tmp_path).tcp is None
    curve_files(tmp_path)
    s = load(tmp_path, TCP_ON + 'bind = "tcp://0.0.0.0:6000"\n')
    assert s.tcp == TcpSettings("tcp://0.0.0.0:6000", tmp_path / "keys" / "server.key_secret",
                                tmp_path / "keys" / "clients")
    assert s.endpoint.startswith("ipc://"), "the ipc socket stays the local endpoint"


def test_tcp_without_curve_keys_is_refused_explaining_curve(tmp_path):
    err = refused(tmp_path, "[tcp]\nenabled = true\n")
    assert "server_key" in err.message and "CURVE" in err.hint


@pytest.mark.parametrize("change,words", [
    (lambda d: (d / "keys" / "server.key_secret").write_text("not a cert"), "not a CURVE secret"),
    (lambda d: os.chmod(d / "keys" / "server.key_secret", 0o644), "other users"),
    (lambda d: (d / "keys" / "clients").rmdir(), "not a folder"),
])
def test_tcp_key_problems_are_refused(tmp_path, change, words):
    curve_files(tmp_path)
    change(tmp_path)
    assert words in refused(tmp_path, TCP_ON).message


def test_tcp_bind_must_be_a_tcp_endpoint(tmp_path):
    curve_files(tmp_path)
    assert "bind" in refused(tmp_path, TCP_ON + 'bind = "ipc:///tmp/x"\n').message


# -- durations and sizes ----------------------------------------------------------------

@pytest.mark.parametrize("value,seconds", [
    ("30m", 1800), ("2h", 7200), ("45s", 45), ("1h30m", 5400), ("1m30s", 90), ("500ms", 0.5), ("1.5h", 5400),
    ("-1", FOREVER), (-1, FOREVER), (-1.0, FOREVER), ("0", 0), (0, 0), (90, 90), (2.5, 2.5), ("120", 120),
    (" 30M ", 1800),
])
def test_durations_in_every_documented_form(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["soon", "", "30", "m30", "30x", "1h 30m", "-5m", -2, -0.5, True, None, [1],
                                   "inf", "nan", float("inf"), 10 ** 400, "1e400"])
def test_bad_durations_are_refused_listing_the_accepted_forms(value):
    if value == "30":
        assert parse_duration(value) == 30.0  # a number of seconds in a string is fine
        return
    with pytest.raises(BadInput) as info:
        parse_duration(value, "keep_alive", "sidecar.toml")
    assert "keep_alive" in info.value.message and "sidecar.toml" in info.value.message
    assert '"30m"' in info.value.hint and "-1" in info.value.hint and "0 to unload" in info.value.hint


@pytest.mark.parametrize("seconds", [0, 0.5, 45, 90, 1800, 5400, 7200, 3661, FOREVER])
def test_format_duration_reads_back_as_the_same_duration(seconds):
    text = format_duration(seconds)
    assert parse_duration(-1 if text == "forever" else text) == seconds


def test_format_duration_is_short():
    assert [format_duration(s) for s in (1800, 5400, 45, math.inf)] == ["30m", "1h30m", "45s", "forever"]


@pytest.mark.parametrize("value,size", [
    (1024, 1024), ("1024", 1024), ("8GB", 8 * GiB), ("8 GiB", 8 * GiB), ("8g", 8 * GiB), ("512MB", 512 << 20),
    ("1.5G", 3 * GiB // 2), ("64k", 64 << 10), ("2TB", 2 << 40), ("100b", 100),
])
def test_sizes_in_every_documented_form(value, size):
    assert parse_size(value, "max_frame_bytes") == size


@pytest.mark.parametrize("value", ["lots", "8 XB", "-1", -1, 1.5, True, None, "8GBB", "GB"])
def test_bad_sizes_are_refused_with_the_forms(value):
    with pytest.raises(BadInput) as info:
        parse_size(value, "max_frame_bytes")
    assert "max_frame_bytes" in info.value.message and "8GB" in info.value.hint


@pytest.mark.parametrize("value,budget", [(0.5, 8 * GiB), (0.25, 4 * GiB), (1.0, 16 * GiB), ("50%", 8 * GiB),
                                          ("8GB", 8 * GiB), (4 * GiB, 4 * GiB)])
def test_memory_budget_is_a_fraction_of_ram_or_a_size(value, budget):
    assert parse_memory_budget(value, RAM) == budget


def test_default_memory_budget_is_half_of_this_machines_ram(tmp_path):
    from shared.settings import total_ram_bytes

    assert total_ram_bytes() > 0
    assert Settings.load(home=tmp_path, env={}).memory_budget == total_ram_bytes() // 2


def test_thread_count_knobs_from_the_environment_are_checked(monkeypatch):
    from shared.settings import env_count

    monkeypatch.delenv("ANEMLL_TEST_COUNT", raising=False)
    assert env_count("ANEMLL_TEST_COUNT", 2) == 2
    monkeypatch.setenv("ANEMLL_TEST_COUNT", " 3 ")
    assert env_count("ANEMLL_TEST_COUNT", 2) == 3
    for bad in ("0", "-1", "two", "1.5"):
        monkeypatch.setenv("ANEMLL_TEST_COUNT", bad)
        with pytest.raises(BadInput, match="ANEMLL_TEST_COUNT=.* is not a positive whole number") as e:
            env_count("ANEMLL_TEST_COUNT", 2)
        assert "unset it" in e.value.hint


# -- HTTP --------------------------------------------------------------------------

def test_http_is_on_at_127_0_0_1_11435_by_default_and_the_cache_has_its_bounds(tmp_path):
    s = load(tmp_path)
    assert (s.http.host, s.http.port, s.http.api_key, s.http.cors_origins, s.http.max_body_bytes) == (
        "127.0.0.1", 11435, None, (), 8 << 20)
    assert (s.prefix_cache_states, s.prefix_cache_bytes) == (8, 2 * GiB)
    assert load(tmp_path / "b", "prefix_cache_states = 0\nprefix_cache_bytes = '512MB'\n").prefix_cache_bytes \
        == 512 << 20


def test_http_table_reads_every_key(tmp_path):
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    key.chmod(0o600)
    s = load(tmp_path, f'[http]\nbind = "0.0.0.0:0"\napi_key_file = "{key}"\n'
                       'cors_origins = ["http://192.168.1.5:3000"]\nmax_body_bytes = "1MiB"\n')
    assert (s.http.host, s.http.port, s.http.api_key, s.http.cors_origins, s.http.max_body_bytes) == (
        "0.0.0.0", 0, "s3cret", ("http://192.168.1.5:3000",), 1 << 20)
    assert load(tmp_path / "off", "[http]\nenabled = false\n").http is None
    assert load(tmp_path / "v6", '[http]\nbind = "[::1]:8080"\n').http.host == "::1"


def test_binding_beyond_loopback_needs_an_api_key(tmp_path):
    err = refused(tmp_path, '[http]\nbind = "0.0.0.0:11435"\n')
    assert "without an API key" in err.message and "api_key_file" in err.hint


@pytest.mark.parametrize("text,needle", [
    ('[http]\nbind = "11435"\n', "bind"), ('[http]\nbind = "localhost:99999"\n', "bind"),
    ('[http]\nbind = 11435\n', "bind"), ("[http]\nenabled = 1\n", "enabled"),
    ('[http]\ncors_origins = "http://x"\n', "cors_origins"), ('[http]\ncors_origins = ["http://x/path"]\n', "cors"),
    ('[http]\nmax_body_bytes = 10\n', "max_body_bytes"), ('[http]\nport = 1\n', "port"),
    ('[http]\napi_key_file = "/nonexistent/key"\n', "cannot be read"),
])
def test_bad_http_values_are_refused_naming_the_key(tmp_path, text, needle):
    assert needle in refused(tmp_path, text).message


def test_an_api_key_file_others_can_read_or_without_a_key_is_refused(tmp_path):
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    key.chmod(0o644)
    assert "chmod 600" in refused(tmp_path, f'[http]\napi_key_file = "{key}"\n').hint
    key.write_text("\n")
    key.chmod(0o600)
    assert "holds no key" in refused(tmp_path, f'[http]\napi_key_file = "{key}"\n').message
