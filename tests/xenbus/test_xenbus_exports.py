"""The public surface of the package."""

import subprocess
import sys

import xenbus


def test_reexports_resolve_to_their_modules():
    for name in dir(xenbus):
        if name.startswith("_"):
            continue
        obj = getattr(xenbus, name)
        module = getattr(obj, "__module__", None)
        if module is not None and module.startswith("xenbus"):
            assert getattr(sys.modules[module], name) is obj


def test_driver_names_are_lazy():
    assert xenbus.Frontend.__module__ == "xenbus.driver"
    assert {"Frontend", "Backend", "Store", "transact"} <= set(dir(xenbus))


def test_pure_parts_do_not_import_the_driver():
    code = "import sys, xenbus.state, xenbus.handshake, xenbus.paths; print('xenbus.driver' in sys.modules, 'trio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
