from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenbus.paths import (
    DeviceId,
    backend_type_dir,
    domain_path,
    error_path,
    frontend_type_dir,
    guest_home_perms,
    guest_writable_perms,
    is_under,
    parse_backend_path,
    parse_frontend_path,
)

VBD = DeviceId("vbd", frontend_domid=5, backend_domid=0, devid=51712)


def test_vbd_directories_and_links():
    assert VBD.frontend == "/local/domain/5/device/vbd/51712"
    assert VBD.backend == "/local/domain/0/backend/vbd/5/51712"
    assert VBD.frontend_links() == {"backend": VBD.backend, "backend-id": "0", "state": "1"}
    assert VBD.backend_links() == {
        "frontend": VBD.frontend,
        "frontend-id": "5",
        "online": "1",
        "state": "1",
    }
    assert VBD.frontend_perms == ("n5", "r0")
    assert VBD.backend_perms == ("n0", "r5")
    assert VBD.libxl_path == "/libxl/5/device/vbd/51712"


def test_error_paths_follow_linux():
    assert VBD.frontend_error == "/local/domain/5/error/device/vbd/51712/error"
    assert VBD.backend_error == "/local/domain/0/error/backend/vbd/5/51712/error"
    assert error_path(5, "/local/domain/5/device/vif/0") == "/local/domain/5/error/device/vif/0/error"
    with pytest.raises(ValueError):
        error_path(5, "/local/domain/6/device/vif/0")


def test_primary_console_is_special():
    con = DeviceId("console", frontend_domid=7, backend_domid=0, devid=0)
    assert con.frontend == "/local/domain/7/console"
    assert con.backend == "/local/domain/0/backend/console/7/0"
    assert con.frontend_perms == ("n0", "r7")  # read-only for the guest
    assert "state" not in con.frontend_links()
    second = DeviceId("console", 7, 0, 1)
    assert second.frontend == "/local/domain/7/device/console/1"
    assert second.frontend_perms == ("n7", "r0")
    assert parse_frontend_path(con.frontend) == (7, "console", 0)


def test_type_dirs_and_homes():
    assert domain_path(3) == "/local/domain/3"
    assert frontend_type_dir(3, "vif") == "/local/domain/3/device/vif"
    assert backend_type_dir(0, "vif") == "/local/domain/0/backend/vif"
    assert guest_home_perms(3) == ("n0", "r3")
    assert guest_writable_perms(3) == ("n3",)


@pytest.mark.parametrize("bad", [-1, 0x7FF0, 0x7FF4, 70000])
def test_reserved_domids_rejected(bad):
    with pytest.raises(ValueError):
        domain_path(bad)
    with pytest.raises(ValueError):
        DeviceId("vbd", bad, 0, 1)


def test_is_under():
    assert is_under("/local/domain/0/backend/vbd/5/1/state", "/local/domain/0/backend/vbd/5/1")
    assert is_under("/a/b", "/a/b")
    assert not is_under("/local/domain/0/backend/vbd/5/10/state", "/local/domain/0/backend/vbd/5/1")


@pytest.mark.parametrize(
    "path",
    [
        "/local/domain/5/device/vbd",
        "/local/domain/5/device/vbd/x",
        "/local/domain/05/device/vbd/1",
        "/local/domain/5/backend/vbd/1",
        "/local/domain/32768/device/vbd/1",
        "local/domain/5/device/vbd/1",
        "/local/domain/5/device/v d/1",
    ],
)
def test_parse_frontend_rejects(path):
    with pytest.raises(ValueError):
        parse_frontend_path(path)


@pytest.mark.parametrize(
    "path",
    ["/local/domain/0/backend/vbd/5", "/local/domain/0/backend/vbd/5/1/x", "/local/domain/0/device/vbd/5/1"],
)
def test_parse_backend_rejects(path):
    with pytest.raises(ValueError):
        parse_backend_path(path)


devices = st.builds(
    DeviceId,
    kind=st.sampled_from(["vbd", "vif", "console", "vkbd", "qdisk", "9pfs"]),
    frontend_domid=st.integers(0, 0x7FEF),
    backend_domid=st.integers(0, 0x7FEF),
    devid=st.integers(0, 2**32),
)


@given(devices)
@settings(max_examples=200, deadline=None)
def test_paths_round_trip(device):
    f, kind, devid = parse_frontend_path(device.frontend)
    assert (f, kind, devid) == (device.frontend_domid, device.kind, device.devid)
    assert parse_backend_path(device.backend) == (
        device.backend_domid,
        device.kind,
        device.frontend_domid,
        device.devid,
    )
    assert is_under(device.frontend_error, domain_path(device.frontend_domid) + "/error")


@given(st.text(max_size=60))
@settings(max_examples=200, deadline=None)
def test_parsers_only_raise_value_error(text):
    for parse in (parse_frontend_path, parse_backend_path):
        try:
            parse(text)
        except ValueError:
            pass
