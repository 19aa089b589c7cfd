"""A real daemon in a subprocess on a temp home, and a bare protocol client for
tests: the wire is shared.protocol, nothing else."""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import zmq

from shared import protocol
from shared.settings import Settings

REPO = Path(__file__).resolve().parents[1]


class DaemonProcess:
    def __init__(self, home: Path, settings_toml: str = "", http_toml: str = ""):
        """``http_toml``: lines for the [http] table (a free port unless it says otherwise)."""
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        (home / "settings.toml").write_text(
            'settle_seconds = 0.5\nrescan_seconds = 0.5\nlog_level = "debug"\n' + settings_toml
            + '\n[http]\n' + (http_toml or 'bind = "127.0.0.1:0"\n'))
        self.settings = Settings.load(home=home)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "DaemonProcess":
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.log = open(self.home / "daemon.stderr", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "anemlld", "--home", str(self.home)], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.stderr()[-2000:]}")
            if self.settings.socket_path.exists():
                try:
                    with Client(self.settings, timeout=2.0) as c:
                        c.request(protocol.Hello)
                    return self
                except TimeoutError:
                    pass
            time.sleep(0.2)
        raise RuntimeError(f"daemon did not answer in {timeout} s: {self.stderr()[-2000:]}")

    @property
    def http_url(self) -> str | None:
        """The HTTP base URL the daemon bound, from its ``hello``."""
        with Client(self.settings, timeout=5.0) as c:
            return c.request(protocol.Hello).data.get("http")

    def stderr(self) -> str:
        return (self.home / "daemon.stderr").read_text(errors="replace")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode if self.proc else 0


class Client:
    _ids = itertools.count(1)

    def __init__(self, settings: Settings, timeout: float = 30.0):
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(settings.endpoint)
        self.timeout = timeout

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sock.close()

    def send(self, op: type[protocol.Request], **fields) -> str:
        rid = f"t{next(self._ids)}"
        self.sock.send(protocol.encode_request(op(id=rid, **fields)))
        return rid

    def send_raw(self, frame: bytes) -> None:
        self.sock.send(frame)

    def recv(self, timeout: float | None = None) -> protocol.Event:
        if not self.sock.poll(int((timeout or self.timeout) * 1000)):
            raise TimeoutError("no reply from the daemon")
        return protocol.decode_event(self.sock.recv())

    def stream(self, op: type[protocol.Request], timeout: float | None = None, **fields) -> list[protocol.Event]:
        rid = self.send(op, **fields)
        events = []
        while True:
            ev = self.recv(timeout)
            if ev.id != rid:
                continue
            events.append(ev)
            if ev.final:
                return events

    def request(self, op: type[protocol.Request], timeout: float | None = None, **fields) -> protocol.Event:
        return self.stream(op, timeout, **fields)[-1]


def wait_for_state(client: Client, name: str, states: tuple[str, ...], timeout: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        models = {m["name"]: m for m in client.request(protocol.Models).data["models"]}
        if name in models and models[name]["state"] in states:
            return models[name]
        time.sleep(0.5)
    raise TimeoutError(f"{name} did not reach {states} in {timeout} s (models: {models})")
