"""The LaunchAgent: filling the template in launchd/, installing it for the
current user with launchctl, removing it, and saying whether it runs."""
from __future__ import annotations

import os
import platform
import plistlib
import subprocess
import sys
from pathlib import Path
from string import Template
from xml.sax.saxutils import escape

from shared.errors import AnemllError
from shared.settings import Settings

LABEL = "com.anemll.anemlld"
TEMPLATE = Path(__file__).resolve().parents[1] / "launchd" / f"{LABEL}.plist"


def agent_path() -> Path:
    return Path.home() / "Library" / "LaunchAgents" / f"{LABEL}.plist"


def render(settings: Settings, python: str | None = None) -> bytes:
    """The filled plist, checked by plistlib."""
    args = [python or sys.executable, "-m", "anemlld"]
    if settings.home is not None:
        args += ["--home", str(settings.home)]
    text = Template(TEMPLATE.read_text(encoding="utf-8")).substitute(
        label=LABEL,
        program_arguments="\n".join(f"    <string>{escape(a)}</string>" for a in args),
        working_directory=escape(str(settings.state_dir)),
        stdout_path=escape(str(settings.logs_dir / "launchd.out.log")),
        stderr_path=escape(str(settings.logs_dir / "launchd.err.log")),
    )
    data = text.encode("utf-8")
    plist = plistlib.loads(data)  # refuses a malformed result
    if plist["Label"] != LABEL or plist["ProgramArguments"] != args:
        raise AnemllError("the LaunchAgent template did not fill as expected", "reinstall anemlld")
    return data


def _require_macos(action: str) -> None:
    if platform.system() != "Darwin":
        raise AnemllError(f"`anemlld {action}` manages a macOS LaunchAgent; launchd is macOS-only",
                          "run `anemlld` in a terminal (or under your own service manager) here; "
                          "`anemlld install --print` shows the plist that would be installed",
                          code="unsupported")


def _launchctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["launchctl", *args], capture_output=True, text=True)


def install(settings: Settings) -> Path:
    _require_macos("install")
    settings.make_dirs()
    path = agent_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    domain = f"gui/{os.getuid()}"
    _launchctl("bootout", f"{domain}/{LABEL}")  # an older copy, if any; failure means none
    path.write_bytes(render(settings))
    proc = _launchctl("bootstrap", domain, str(path))
    if proc.returncode != 0:
        raise AnemllError(f"launchctl bootstrap failed: {proc.stderr.strip()}",
                          f"check {path} and try `launchctl bootstrap {domain} {path}` by hand")
    return path


def uninstall() -> bool:
    _require_macos("uninstall")
    _launchctl("bootout", f"gui/{os.getuid()}/{LABEL}")
    path = agent_path()
    existed = path.exists()
    path.unlink(missing_ok=True)
    return existed


def status() -> str:
    _require_macos("status")
    if not agent_path().exists():
        return "not installed (run `anemlld install`)"
    proc = _launchctl("print", f"gui/{os.getuid()}/{LABEL}")
    if proc.returncode != 0:
        return f"installed at {agent_path()} but not loaded (run `anemlld install` again)"
    state = next((line.split("=", 1)[1].strip() for line in proc.stdout.splitlines()
                  if line.strip().startswith("state =")), "unknown")
    pid = next((line.split("=", 1)[1].strip() for line in proc.stdout.splitlines()
                if line.strip().startswith("pid =")), None)
    return f"loaded, {state}" + (f", pid {pid}" if pid else "")
