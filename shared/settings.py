"""Where the daemon keeps things and how it behaves: one ``Settings`` record read
from one TOML file, plus the duration and size parsers that file, the sidecar
and the wire protocol share.

Resolution, first match wins:

- home: ``--home DIR`` (the ``home`` argument), else ``$ANEMLL_HOME``. With a
  home everything lives under it (``drop/ models/ failed/ state/ logs/ run/``)
  and the settings file is ``HOME/settings.toml``; without one, locations come
  from platformdirs and the file is ``<user config dir>/anemlld/settings.toml``.
- each location can be overridden in that file's ``[paths]`` table (relative
  paths are relative to the file's folder).

The daemon and the client both call ``Settings.load`` with the same home, so
they agree on the socket. Every key of the file, with its default::

    memory_budget = 0.5        # resident models together: a fraction of RAM, "50%", "8GB" or bytes
    keep_alive = "30m"         # idle time before unloading; -1 forever, 0 after each request
    queue_limit = 64           # requests waiting per model behind the running one (FIFO); more get `busy`
    prefix_cache_states = 8    # KV states each resident model keeps for prefix reuse, least recently used out
    prefix_cache_bytes = "2GiB"  # ... and at most this much of them per model
    max_frame_bytes = "1MiB"   # largest request frame; larger ones get `too_large`
    settle_seconds = 2.0       # a dropped folder must stay unchanged this long before conversion
    rescan_seconds = 5.0       # the drop folder is rescanned this often (watchdog events are hints)
    stalled_seconds = 600.0    # a folder unchanged this long yet still incomplete is handed to a job anyway,
                               # which fails it with the reason (missing shard, no weights) in failed/
    stream_interval_seconds = 0.02  # token events of one answer at most this often: tokens coming faster
                               # go together in one event (the first goes at once); 0 = one event per token
    log_level = "info"         # debug, info, warning, error, critical
    [paths]                    # each defaults to HOME/<name> or the platform folder
    drop = "..."
    models = "..."
    failed = "..."
    state = "..."              # the job journal (jobs.sqlite3)
    logs = "..."
    runtime = "..."            # the ipc socket; HOME/run
    [tcp]                      # off unless enabled, and then only with CURVE
    enabled = false
    bind = "tcp://127.0.0.1:5557"
    server_key = "..."         # the daemon's zmq.auth .key_secret file, chmod 600
    client_keys = "..."        # folder of the allowed clients' public .key files
    [http]                     # the OpenAI and Ollama HTTP APIs (docs/http.md)
    enabled = true
    bind = "127.0.0.1:11435"   # HOST:PORT; port 0 picks a free port; a non-loopback host needs api_key_file
    api_key_file = ""          # a file holding the key; if set every endpoint but /health needs
                               # "Authorization: Bearer <key>"
    cors_origins = []          # extra browser origins allowed; localhost origins always are
    max_body_bytes = "8MiB"    # larger request bodies get 413 without being read
"""
from __future__ import annotations

import difflib
import hashlib
import math
import os
import re
import stat
import sys
import tomllib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import BadInput

APP = "anemlld"
SETTINGS_FILE = "settings.toml"
SOCKET_FILE = "anemlld.sock"
JOURNAL_FILE = "jobs.sqlite3"
LOG_FILE = "anemlld.log"
HOME_ENV = "ANEMLL_HOME"

FOREVER = math.inf  # keep_alive -1: never unload for idleness
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# A unix socket path must fit sockaddr_un.sun_path: 104 bytes with the NUL on
# macOS, 108 on Linux. The stricter limit everywhere, so Linux tests catch it.
MAX_SOCKET_PATH = 103
MIN_MEMORY_BUDGET = 64 << 20
MIN_FRAME_BYTES = 4 << 10

# Folder key in [paths] -> subfolder under a home.
PATH_KEYS = {"drop": "drop", "models": "models", "failed": "failed", "state": "state",
             "logs": "logs", "runtime": "run"}
TOP_KEYS = ("memory_budget", "keep_alive", "queue_limit", "prefix_cache_states", "prefix_cache_bytes",
            "max_frame_bytes", "settle_seconds", "rescan_seconds", "stalled_seconds", "stream_interval_seconds",
            "log_level")
TCP_KEYS = ("enabled", "bind", "server_key", "client_keys")
HTTP_KEYS = ("enabled", "bind", "api_key_file", "cors_origins", "max_body_bytes")
TABLES = ("paths", "tcp", "http")
DEFAULT_HTTP_BIND = "127.0.0.1:11435"  # one above Ollama's 11434, so both can run
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

DURATION_FORMS = ('a number of seconds, a duration such as "45s", "30m", "2h" or "1h30m", '
                  '-1 to keep forever, or 0 to unload after each request')
SIZE_FORMS = 'a number of bytes or a size such as "512MB" or "8GB" (K, M, G, T are powers of 1024)'


# -- durations and sizes ------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(value: Any, key: str = "keep_alive", where: str = "") -> float:
    """Seconds from ``"30m"``, ``"2h"``, ``"45s"``, ``"1h30m"``, ``"500ms"``, a number
    of seconds (int, float or numeric string), ``-1`` (forever: ``math.inf``) or
    ``0`` (unload after each request)."""
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value) if abs(value) < 1e12 else math.inf  # float(10**400) would raise
    elif isinstance(value, str):
        text = value.strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION_PART.findall(text)
            if parts and "".join(n + u for n, u in parts) == text:
                seconds = sum(float(n) * _SECONDS[u] for n, u in parts)
    if seconds is not None and seconds == -1:
        return FOREVER
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        raise BadInput(f"{_at(where)}{key} = {value!r} is not a duration", f"use {DURATION_FORMS}")
    return seconds


def env_count(name: str, default: int) -> int:
    """A positive whole number from the environment variable ``name`` (the
    tuning knobs ANEMLL_PORTABLE_THREADS, ANEMLL_QUANTIZE_THREADS), or
    ``default`` when it is unset or empty."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise BadInput(f"{name}={value!r} is not a positive whole number",
                       f"set {name} to a count such as {default}, or unset it")
    return count


def format_duration(seconds: float | None) -> str:
    """The short form ``parse_duration`` reads back: ``1h30m``, ``45s``, ``forever``."""
    if seconds is None or math.isinf(seconds):
        return "forever"
    if seconds < 1 and seconds:
        return f"{seconds * 1000:g}ms"
    whole, frac = divmod(seconds, 1)
    h, rest = divmod(int(whole), 3600)
    m, s = divmod(rest, 60)
    out = (f"{h}h" if h else "") + (f"{m}m" if m else "")
    if s or frac or not out:
        out += f"{s + frac:g}s"
    return out


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([kmgt])(?:i?b)?|b)?", re.IGNORECASE)


def parse_size(value: Any, key: str, where: str = "") -> int:
    """Bytes from an integer or ``"512MB"``/``"8GiB"``/``"1.5G"`` (binary units:
    "16GB" is what Apple calls a 16 GB Mac)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
        unit = (match[2] or "").lower()
        return int(float(match[1]) * 1024 ** " kmgt".index(unit or " "))
    raise BadInput(f"{_at(where)}{key} = {value!r} is not a size", f"use {SIZE_FORMS}")


def parse_memory_budget(value: Any, ram_bytes: int, where: str = "") -> int:
    """A fraction of RAM (``0.5``, ``"50%"``) or a size (``"8GB"``, bytes) -> bytes."""
    key = "memory_budget"
    fraction: float | None = None
    if isinstance(value, float):
        fraction = value
    elif isinstance(value, str) and value.strip().endswith("%"):
        try:
            fraction = float(value.strip()[:-1]) / 100
        except ValueError:
            fraction = -1.0
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise BadInput(f"{_at(where)}{key} = {value!r} is not a fraction of RAM between 0 and 1",
                           f'use a fraction such as 0.5 or "50%", or {SIZE_FORMS}')
        budget = int(ram_bytes * fraction)
    else:
        budget = parse_size(value, key, where)
    if budget < MIN_MEMORY_BUDGET:
        raise BadInput(f"{_at(where)}{key} = {value!r} is only {budget} bytes (a whole number counts bytes)",
                       f'give at least {MIN_MEMORY_BUDGET >> 20}MB, a fraction such as 0.5 (of '
                       f'{ram_bytes >> 20}MB RAM), or a size such as "8GB"')
    return budget


def total_ram_bytes() -> int:
    """Physical memory of this machine."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        import subprocess  # macOS without SC_PHYS_PAGES

        return int(subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True,
                                  check=True).stdout)


# -- the record ---------------------------------------------------------------

@dataclass(frozen=True)
class TcpSettings:
    """TCP is served only with CURVE: the daemon's secret certificate and a
    folder of the public certificates of clients allowed in (zmq.auth format)."""

    bind: str  # e.g. "tcp://0.0.0.0:5557"
    server_key: Path  # a zmq.auth ``.key_secret`` file, readable by its owner only
    client_keys: Path  # folder of ``.key`` files, one per allowed client


@dataclass(frozen=True)
class HttpSettings:
    """The HTTP APIs. ``api_key`` is the key read from ``api_key_file`` (None: no key)."""

    host: str = "127.0.0.1"
    port: int = 11435
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 8 << 20

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS or self.host.startswith("127.")


@dataclass(frozen=True)
class Settings:
    config_file: Path  # read if it exists; the defaults otherwise
    home: Path | None
    drop_dir: Path
    models_dir: Path
    failed_dir: Path
    state_dir: Path  # the SQLite job journal lives here
    logs_dir: Path
    runtime_dir: Path  # the ipc socket; owner-only (0700)
    memory_budget: int = 0  # bytes; what resident models may take together
    keep_alive: float = 1800.0  # seconds an idle model stays; FOREVER or 0
    queue_limit: int = 64  # requests that may wait per model behind the running one
    prefix_cache_states: int = 8  # KV states kept per resident model for prefix reuse
    prefix_cache_bytes: int = 2 << 30  # their total size per model
    max_frame_bytes: int = 1 << 20  # largest request frame accepted
    settle_seconds: float = 2.0  # a dropped folder must be unchanged this long
    rescan_seconds: float = 5.0  # drop-folder rescan period (watchdog events are hints)
    stalled_seconds: float = 600.0  # unchanged yet incomplete this long: converted anyway, to fail clearly
    stream_interval_seconds: float = 0.02  # least time between token events of one answer
    log_level: str = "INFO"
    tcp: TcpSettings | None = None  # None: TCP off
    http: HttpSettings | None = HttpSettings()  # None: HTTP off

    DEFAULT_MEMORY_FRACTION = 0.5

    @property
    def socket_path(self) -> Path:
        return self.runtime_dir / SOCKET_FILE

    @property
    def endpoint(self) -> str:
        return f"ipc://{self.socket_path}"

    @property
    def journal_path(self) -> Path:
        return self.state_dir / JOURNAL_FILE

    @property
    def log_path(self) -> Path:
        return self.logs_dir / LOG_FILE

    @classmethod
    def load(cls, home: str | os.PathLike | None = None, config_file: str | os.PathLike | None = None,
             env: Mapping[str, str] = os.environ, *, ram_bytes: int | None = None) -> "Settings":
        """Settings for ``home`` (else ``$ANEMLL_HOME``, else the user's platform
        folders), from ``config_file`` (else the home's or the user's settings.toml)."""
        home = home or env.get(HOME_ENV) or None
        home_path = _absolute(Path(home)) if home else None
        if config_file is not None:
            config = _absolute(Path(config_file))
            if not config.is_file():
                raise BadInput(f"settings file {config} does not exist",
                               "check the path, or leave it out to use the defaults")
        else:
            config = (home_path or _platform_dirs().user_config_path) / SETTINGS_FILE
        data = _read_toml(config) if config.is_file() else {}
        return cls._from_mapping(data, config, home_path, ram_bytes or total_ram_bytes())

    @classmethod
    def _from_mapping(cls, data: dict, config: Path, home: Path | None, ram_bytes: int) -> "Settings":
        where = str(config)
        _check_keys(data, TOP_KEYS + TABLES, "", where)
        for table in TABLES:
            if table in data and not isinstance(data[table], dict):
                raise BadInput(f"{where}: {table} must be a table", f"write it as [{table}] with keys below it")
        paths_table = data.get("paths", {})
        _check_keys(paths_table, tuple(PATH_KEYS), "paths", where)

        defaults = _home_dirs(home) if home else _platform_defaults()
        dirs: dict[str, Path] = {}
        for key in PATH_KEYS:
            if key in paths_table:
                dirs[key] = _path_value(paths_table[key], f"[paths] {key}", config)
            else:
                dirs[key] = defaults[key]
        if len(os.fsencode(dirs["runtime"] / SOCKET_FILE)) > MAX_SOCKET_PATH:
            if "runtime" in paths_table:
                raise BadInput(f"{where}: [paths] runtime = {paths_table['runtime']!r} makes the socket path "
                               f"longer than the {MAX_SOCKET_PATH} characters a unix socket allows",
                               'choose a shorter folder, such as "/tmp/anemlld"')
            dirs["runtime"] = _short_runtime_dir(dirs["runtime"])

        values: dict[str, Any] = {}
        budget = data.get("memory_budget", cls.DEFAULT_MEMORY_FRACTION)
        values["memory_budget"] = parse_memory_budget(budget, ram_bytes, where)
        if "keep_alive" in data:
            values["keep_alive"] = parse_duration(data["keep_alive"], "keep_alive", where)
        if "queue_limit" in data:
            values["queue_limit"] = _int_at_least(data["queue_limit"], "queue_limit", 0, where)
        if "prefix_cache_states" in data:
            values["prefix_cache_states"] = _int_at_least(data["prefix_cache_states"], "prefix_cache_states", 0,
                                                          where)
        if "prefix_cache_bytes" in data:
            values["prefix_cache_bytes"] = parse_size(data["prefix_cache_bytes"], "prefix_cache_bytes", where)
        if "max_frame_bytes" in data:
            size = parse_size(data["max_frame_bytes"], "max_frame_bytes", where)
            if size < MIN_FRAME_BYTES:
                raise BadInput(f"{where}: max_frame_bytes = {data['max_frame_bytes']!r} is too small",
                               f"give at least {MIN_FRAME_BYTES} bytes; the default is 1MiB")
            values["max_frame_bytes"] = size
        for key, low in (("settle_seconds", 0.0), ("rescan_seconds", 0.1), ("stalled_seconds", 0.0),
                         ("stream_interval_seconds", 0.0)):
            if key in data:
                values[key] = _seconds_at_least(data[key], key, low, where)
        if "log_level" in data:
            level = data["log_level"]
            if not isinstance(level, str) or level.lower() not in LOG_LEVELS:
                raise BadInput(f"{where}: log_level = {level!r} is not a log level",
                               f"use one of {', '.join(LOG_LEVELS)}")
            values["log_level"] = level.upper()
        values["tcp"] = _tcp(data.get("tcp", {}), config)
        values["http"] = _http(data.get("http", {}), config)

        return cls(config_file=config, home=home, drop_dir=dirs["drop"], models_dir=dirs["models"],
                   failed_dir=dirs["failed"], state_dir=dirs["state"], logs_dir=dirs["logs"],
                   runtime_dir=dirs["runtime"], **values)

    def make_dirs(self) -> None:
        """Create every folder; the runtime folder owner-only (0700), refusing one
        that belongs to someone else (it would let them listen in)."""
        for folder in (self.drop_dir, self.models_dir, self.failed_dir, self.state_dir, self.logs_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.runtime_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.runtime_dir.mkdir(mode=0o700)
        except FileExistsError:
            pass
        info = self.runtime_dir.lstat()
        if not stat.S_ISDIR(info.st_mode):
            raise BadInput(f"runtime folder {self.runtime_dir} is not a folder (a link or a file)",
                           "remove it, or set [paths] runtime in " f"{self.config_file} to another folder")
        if info.st_uid != os.geteuid():
            raise BadInput(f"runtime folder {self.runtime_dir} belongs to another user",
                           "set [paths] runtime in " f"{self.config_file} to a folder of your own")
        if stat.S_IMODE(info.st_mode) != 0o700:
            os.chmod(self.runtime_dir, 0o700)


# -- helpers ------------------------------------------------------------------

def _platform_dirs():
    import platformdirs

    return platformdirs.PlatformDirs(APP, appauthor=False)


def _platform_defaults() -> dict[str, Path]:
    dirs = _platform_dirs()
    data = dirs.user_data_path
    try:
        with warnings.catch_warnings():  # platformdirs warns when it falls back to /tmp
            warnings.simplefilter("ignore")
            runtime = dirs.user_runtime_path
    except PermissionError as e:
        raise BadInput(f"no usable runtime folder for the socket: {e}",
                       "set XDG_RUNTIME_DIR, or [paths] runtime in the settings file") from e
    return {"drop": data / "drop", "models": data / "models", "failed": data / "failed",
            "state": dirs.user_state_path, "logs": dirs.user_log_path, "runtime": runtime}


def _home_dirs(home: Path) -> dict[str, Path]:
    return {key: home / sub for key, sub in PATH_KEYS.items()}


def _short_runtime_dir(long: Path) -> Path:
    """A deep home (pytest's temp folders on macOS) would make the socket path
    too long to bind: use a short folder named after it instead, so the daemon
    and the client still derive the same one. ``make_dirs`` checks its owner."""
    digest = hashlib.sha256(str(long).encode()).hexdigest()[:12]
    return Path("/tmp") / f"anemlld-{os.geteuid()}-{digest}"


def _absolute(path: Path) -> Path:
    # abspath, not resolve: resolving /var -> /private/var on macOS only lengthens the socket path
    return Path(os.path.abspath(path.expanduser()))


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{path} is not valid TOML: {e}", "fix the line named above") from e
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror}", "check that the file is readable") from e


def _at(where: str) -> str:
    return f"{where}: " if where else ""


def _check_keys(table: Mapping, keys: tuple[str, ...], table_name: str, where: str) -> None:
    for key in table:
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
            hint = (f"did you mean {close[0]!r}? " if close else "") + f"valid keys are: {', '.join(keys)}"
            what = f"table [{key}]" if isinstance(table[key], dict) else f"key {key!r}"
            raise BadInput(f"{where}: unknown {what}" + (f" in [{table_name}]" if table_name else ""), hint)


def _path_value(value: Any, key: str, config: Path) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise BadInput(f"{config}: {key} = {value!r} is not a folder path",
                       'write a path in quotes, such as "~/anemll/drop"')
    path = Path(value).expanduser()
    return _absolute(path if path.is_absolute() else config.parent / path)


def _int_at_least(value: Any, key: str, low: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise BadInput(f"{where}: {key} = {value!r} is not a whole number of at least {low}",
                       f"set {key} to an integer such as 4")
    return value


def _seconds_at_least(value: Any, key: str, low: float, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        raise BadInput(f"{where}: {key} = {value!r} is not a number of seconds of at least {low:g}",
                       f"set {key} to a number such as 2.0")
    return float(value)


def _tcp(table: dict, config: Path) -> TcpSettings | None:
    where = str(config)
    _check_keys(table, TCP_KEYS, "tcp", where)
    enabled = table.get("enabled", False)
    if not isinstance(enabled, bool):
        raise BadInput(f"{where}: [tcp] enabled = {enabled!r} is not true or false",
                       "write enabled = true or false")
    if not enabled:
        return None
    bind = table.get("bind", "tcp://127.0.0.1:5557")
    if not isinstance(bind, str) or not re.fullmatch(r"tcp://[^\s:/]+:\d{1,5}", bind):
        raise BadInput(f"{where}: [tcp] bind = {bind!r} is not a tcp endpoint",
                       'write it as "tcp://HOST:PORT", such as "tcp://0.0.0.0:5557"')
    hint = ("TCP is served only with CURVE encryption: create certificates with "
            "zmq.auth.create_certificates and set [tcp] server_key (the daemon's .key_secret file) "
            "and client_keys (a folder of the allowed clients' .key files)")
    for key in ("server_key", "client_keys"):
        if key not in table:
            raise BadInput(f"{where}: [tcp] is enabled but {key} is not set", hint)
    server_key = _path_value(table["server_key"], "[tcp] server_key", config)
    client_keys = _path_value(table["client_keys"], "[tcp] client_keys", config)
    if not server_key.is_file() or "secret-key" not in server_key.read_text(errors="replace"):
        raise BadInput(f"{where}: [tcp] server_key {server_key} is not a CURVE secret certificate", hint)
    if sys.platform != "win32" and stat.S_IMODE(server_key.stat().st_mode) & 0o077:
        raise BadInput(f"{where}: [tcp] server_key {server_key} can be read by other users",
                       f"run: chmod 600 {server_key}")
    if not client_keys.is_dir():
        raise BadInput(f"{where}: [tcp] client_keys {client_keys} is not a folder", hint)
    return TcpSettings(bind=bind, server_key=server_key, client_keys=client_keys)


def _http(table: dict, config: Path) -> HttpSettings | None:
    where = str(config)
    _check_keys(table, HTTP_KEYS, "http", where)
    enabled = table.get("enabled", True)
    if not isinstance(enabled, bool):
        raise BadInput(f"{where}: [http] enabled = {enabled!r} is not true or false", "write enabled = true or false")
    if not enabled:
        return None
    bind = table.get("bind", DEFAULT_HTTP_BIND)
    match = re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[^\s:/\[\]]+):(\d{1,5})", bind) if isinstance(bind, str) else None
    if match is None or int(match[2]) > 65535:
        raise BadInput(f"{where}: [http] bind = {bind!r} is not HOST:PORT",
                       f'write it as "{DEFAULT_HTTP_BIND}" ("127.0.0.1:0" picks a free port)')
    host, port = match[1].strip("[]"), int(match[2])
    key = None
    key_file = table.get("api_key_file", "")
    if not isinstance(key_file, str):
        raise BadInput(f"{where}: [http] api_key_file = {key_file!r} is not a path", 'write a path in quotes, or ""')
    if key_file:
        path = _path_value(key_file, "[http] api_key_file", config)
        try:
            key = path.read_text().strip()
        except OSError as e:
            raise BadInput(f"{where}: [http] api_key_file {path} cannot be read: {e.strerror}",
                           "create it with the key on one line (for example: openssl rand -hex 24 > FILE; "
                           "chmod 600 FILE)") from e
        if not key or any(c.isspace() for c in key):
            raise BadInput(f"{where}: [http] api_key_file {path} holds no key (or one with spaces)",
                           "put the key on one line by itself")
        if sys.platform != "win32" and stat.S_IMODE(path.stat().st_mode) & 0o077:
            raise BadInput(f"{where}: [http] api_key_file {path} can be read by other users", f"run: chmod 600 {path}")
    origins = table.get("cors_origins", [])
    if not isinstance(origins, list) or not all(
            isinstance(o, str) and re.fullmatch(r"https?://[^\s/]+", o) for o in origins):
        raise BadInput(f"{where}: [http] cors_origins = {origins!r} is not a list of origins",
                       'write origins as scheme://host[:port] with no path, such as ["http://192.168.1.5:3000"]')
    size = parse_size(table.get("max_body_bytes", "8MiB"), "[http] max_body_bytes", where)
    if size < MIN_FRAME_BYTES:
        raise BadInput(f"{where}: [http] max_body_bytes = {size} is too small",
                       f"give at least {MIN_FRAME_BYTES} bytes; the default is 8MiB")
    http = HttpSettings(host=host, port=port, api_key=key, cors_origins=tuple(origins), max_body_bytes=size)
    if not http.loopback and key is None:
        raise BadInput(f"{where}: [http] bind = {bind!r} listens beyond this machine without an API key",
                       "set [http] api_key_file to a file holding a key, or bind to 127.0.0.1")
    return http
