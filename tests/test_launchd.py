"""The LaunchAgent plist and the macOS-only commands."""
from __future__ import annotations

import platform
import plistlib

import pytest

from anemlld import launchd
from shared.errors import AnemllError
from shared.settings import Settings


def test_plist_is_valid_and_names_our_interpreter_home_and_logs(tmp_path):
    settings = Settings.load(home=tmp_path / "home & <co>")  # characters XML must escape
    plist = plistlib.loads(launchd.render(settings, python="/opt/py/bin/python3"))
    assert plist["Label"] == "com.anemll.anemlld"
    assert plist["ProgramArguments"] == ["/opt/py/bin/python3", "-m", "anemlld", "--home",
                                         str(settings.home)]
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ProcessType"] == "Interactive"
    assert plist["StandardErrorPath"].startswith(str(settings.logs_dir))
    assert "EnvironmentVariables" not in plist  # settings live in the settings file


def test_without_a_home_the_daemon_uses_the_platform_folders(tmp_path, monkeypatch):
    monkeypatch.delenv("ANEMLL_HOME", raising=False)
    plist = plistlib.loads(launchd.render(Settings.load(env={}), python="/usr/bin/python3"))
    assert plist["ProgramArguments"] == ["/usr/bin/python3", "-m", "anemlld"]


@pytest.mark.skipif(platform.system() == "Darwin", reason="on macOS these really run launchctl")
@pytest.mark.parametrize("action", [lambda s: launchd.install(s), lambda s: launchd.uninstall(),
                                    lambda s: launchd.status()])
def test_launchd_commands_say_they_are_macos_only(action, tmp_path):
    with pytest.raises(AnemllError) as info:
        action(Settings.load(home=tmp_path))
    assert "macOS" in info.value.message and "--print" in info.value.hint
