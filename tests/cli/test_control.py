"""xenstore-control against our daemon (expected texts recorded from Xen 4.17's tool)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def socket_path(xenstored_module_factory):
    return xenstored_module_factory.start("-I", "on").socket_path


def control(socket_path: str, *args: str) -> tuple[int, str, str]:
    code = "import sys; from xenstore.cli.main import main_control; sys.argv[0] = 'xenstore-control'; sys.exit(main_control())"
    env = dict(os.environ, XENSTORED_PATH=socket_path)
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=30)
    return done.returncode, done.stdout, done.stderr


def test_usage(socket_path):
    assert control(socket_path) == (2, "", "Usage:\nxenstore-control <command> [<arg>...]\n")


def test_help_and_unknown_command(socket_path):
    rc, help_text, err = control(socket_path, "help")
    assert rc == 0 and err == "" and "quota" in help_text and help_text.endswith("\n")
    rc, out, err = control(socket_path, "no-such-command")
    assert (rc, out) == (3, "")
    assert err == "Command not supported. Valid commands are:\n" + help_text


def test_no_daemon(tmp_path):
    assert control(str(tmp_path / "none"), "help") == (1, "", "Failed to contact Xenstored.\n")
