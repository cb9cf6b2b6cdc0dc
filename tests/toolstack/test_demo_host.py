"""tools/demo_host.py --once: the README's first command, end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.timeout(120)
def test_demo_host_once_shows_guests_and_cleans_up():
    env = dict(os.environ)
    for key in ("XENSTORED_PATH", "UXEN_HYPERVISOR_SOCKET", "UXEN_CONSOLED_SOCKET", "UXL_RUN_DIR", "UXEN_HYPERVISOR_FD"):
        env.pop(key, None)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "demo_host.py"), "--once"], env=env,
                            capture_output=True, text=True, timeout=100)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    base = re.search(r"userxen demo host in (\S+)", out).group(1)
    for name, domid in (("demo1", 1), ("demo2", 2)):
        assert f"Created domain {name} (id {domid})" in out
        assert re.search(rf"^{name}\s+{domid}\s+1\s+1\s+-b----", out, re.M), out
        assert f'/local/domain/{domid}/name = "{name}"   (n0,r{domid})' in out
        assert f"userxen guest {name} (domid {domid}) booted." in out
        assert f"{name}: console 1 connected (#1)" in out
    assert "tick 1" in out
    for daemon in ("consoled", "xenstored", "hypervisor"):
        assert re.search(rf"stopped {daemon}\s+\(status 0\)", out), out
    assert not os.path.exists(base)
