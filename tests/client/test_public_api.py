"""The public surface of ``xenstore`` and the start-up cost of the tools."""

from __future__ import annotations

import subprocess
import sys

import xenstore


def test_every_export_resolves():
    for name in xenstore.__all__:
        assert getattr(xenstore, name) is not None, name
    assert set(xenstore.__all__) <= set(dir(xenstore))


def test_unknown_attribute():
    import pytest

    with pytest.raises(AttributeError):
        xenstore.no_such_thing  # noqa: B018


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_tools_and_sync_client_do_not_import_trio():
    for statement in ("import xenstore.cli.main", "import xenstore.cli._xs", "from xenstore import open_sync_client; open_sync_client"):
        loaded = _modules_after(statement)
        heavy = {m for m in loaded if m.split(".")[0] in ("trio", "dataclasses", "typing", "socket", "asyncio")}
        # The interpreter's own site hooks may load some of these; ours must not.
        baseline = _modules_after("pass")
        assert not (heavy - baseline), (statement, heavy - baseline)
