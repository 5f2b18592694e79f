"""keep_freed_memory: applies on glibc, the CLI applies it unless the environment switches it off."""

from __future__ import annotations

import sys

import pytest

from edgeseg.cli import main
from edgeseg.deploy import allocator


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_applies_on_glibc():
    assert allocator.keep_freed_memory() is True  # mallopt accepted both parameters


def test_cli_applies_it_unless_disabled(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.delenv(allocator.ENV_SWITCH, raising=False)
    assert main(["info", "topformer-tiny", "--json"]) == 0
    assert calls == [1]
    for off in ("0", "off", "False"):
        monkeypatch.setenv(allocator.ENV_SWITCH, off)
        assert main(["info", "topformer-tiny", "--json"]) == 0
    assert calls == [1]
    capsys.readouterr()


def test_switches_read_off_words_and_say_what_they_do_not_know(monkeypatch, caplog):
    from edgeseg.models.native import env_switch

    for value, on in [("0", False), ("off", False), ("No", False), ("1", True), ("yes", True), ("", True)]:
        monkeypatch.setenv("EDGESEG_TEST_SWITCH", value)
        assert env_switch("EDGESEG_TEST_SWITCH") is on, value
    assert not caplog.records
    monkeypatch.setenv("EDGESEG_TEST_SWITCH", "disable")
    assert env_switch("EDGESEG_TEST_SWITCH") and env_switch("EDGESEG_TEST_SWITCH")
    assert len(caplog.records) == 1 and "'disable' is not one of" in caplog.records[0].getMessage()
