"""Domain life cycle for the ``uxl`` toolstack (what libxl does).

Over a dom0 hypervisor connection and a privileged XenStore client:

* :func:`create_domain` -- build a guest: domain, magic pages, primary
  console (grant ref 0 seeded, unbound port), XenStore ring and tree
  (:func:`xenbus.toolstack.introduce_guest`), console keys (§4.1, libxl's
  permissions), ``/vm/<uuid>``, ``/libxl/<domid>``; then start the guest
  process under a per-domain monitor (:mod:`.monitor`, like xl's
  per-domain daemon) that cleans up when the guest ends;
* :func:`destroy_domain` -- kill it and clean up (devices, homes, RELEASE);
* :func:`request_shutdown` -- the PV control protocol (§4.3);
* :func:`list_domains`, :func:`find_domain`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any

import trio

from ringbuf.grants import GNTTAB_RESERVED_CONSOLE
from ringbuf.hypervisor import ENV_FD, HypervisorError
from xenstore.wire import XenStoreError

from ..console import ConsoleRingInfo, console_backend_entries, console_frontend_entries
from ..paths import DeviceId, domain_path
from ..start_info import ConsoleStart, magic_frames
from .config import DomainConfig
from .introduce import introduce_guest, release_guest

__all__ = [
    "CreatedDomain",
    "DomainRow",
    "create_domain",
    "write_device",
    "destroy_domain",
    "cleanup_domain",
    "request_shutdown",
    "wait_domain_gone",
    "list_domains",
    "find_domain",
    "DomainNotFound",
]

MONITOR_MODULE = "xenbus.toolstack.monitor"


class DomainNotFound(LookupError):
    pass


@dataclass(frozen=True)
class CreatedDomain:
    domid: int
    name: str
    uuid: str
    monitor_pid: int


async def _read(xs: Any, path: str) -> str | None:
    try:
        return (await xs.read(path)).decode(errors="replace")
    except XenStoreError:
        return None


async def _names(xs: Any) -> dict[int, str]:
    try:
        children = await xs.directory("/local/domain")
    except XenStoreError:
        return {}
    out = {}
    for child in children:
        if child.isdigit():
            name = await _read(xs, f"/local/domain/{child}/name")
            if name is not None:
                out[int(child)] = name
    return out


async def find_domain(xs: Any, spec: str) -> int:
    """A domain by id or by name (``DomainNotFound`` otherwise)."""
    names = await _names(xs)
    if spec.isdigit():
        domid = int(spec)
        if domid in names or await _read(xs, f"/local/domain/{domid}/domid") is not None:
            return domid
        raise DomainNotFound(f"no domain {domid}")
    matches = [d for d, n in names.items() if n == spec]
    if not matches:
        raise DomainNotFound(f"no domain named {spec!r}")
    return matches[0]


async def write_toolstack_entries(t: Any, domid: int, config: DomainConfig, vm_uuid: str, console: ConsoleStart | None) -> None:
    """Everything the toolstack writes besides the store keys
    (:func:`~xenbus.toolstack.introduce.write_domain_tree`): ``~/vm``,
    ``/vm/<uuid>``, ``/libxl/<domid>``, and the primary console's frontend
    and backend directories (libxl ``libxl__device_console_add``)."""
    readable = ["n0", f"r{domid}"]
    home = domain_path(domid)
    vm = f"/vm/{vm_uuid}"
    await t.write(f"{home}/vm", vm)
    await t.set_perms(f"{home}/vm", readable)
    await t.mkdir(vm)
    await t.set_perms(vm, readable)
    for key, value in {"uuid": vm_uuid, "name": config.name, "start_time": f"{time.time():.2f}"}.items():
        await t.write(f"{vm}/{key}", value)
    libxl = f"/libxl/{domid}"
    await t.write(f"{libxl}/type", "pv")
    await t.write(f"{libxl}/uuid", vm_uuid)
    for devid in range(1, config.consoles + 1):
        await write_device(t, DeviceId("console", frontend_domid=domid, backend_domid=0, devid=devid),
                           console_frontend_entries, console_backend_entries)
    if console is None:
        return
    dev = DeviceId("console", frontend_domid=domid, backend_domid=0, devid=0)
    await t.mkdir(dev.frontend)
    await t.set_perms(dev.frontend, dev.frontend_perms)
    for key, value in console_frontend_entries(dev, ring=ConsoleRingInfo(console.gfn, console.port)).items():
        await t.write(f"{dev.frontend}/{key}", value)
    await t.mkdir(dev.backend)
    await t.set_perms(dev.backend, dev.backend_perms)
    for key, value in console_backend_entries(dev).items():
        await t.write(f"{dev.backend}/{key}", value)
    await t.write(f"{dev.libxl_path}/frontend", dev.frontend)
    await t.write(f"{dev.libxl_path}/backend", dev.backend)


async def write_device(t: Any, dev: DeviceId, frontend_entries: Any, backend_entries: Any) -> None:
    """A XenBus device's two directories (libxl ``libxl__device_generic_add``):
    cross references, ``state = 1``, permissions, and the toolstack's copy."""
    for path, perms, entries in ((dev.frontend, dev.frontend_perms, frontend_entries(dev)),
                                 (dev.backend, dev.backend_perms, backend_entries(dev))):
        await t.mkdir(path)
        await t.set_perms(path, list(perms))
        for key, value in entries.items():
            await t.write(f"{path}/{key}", value)
    await t.write(f"{dev.libxl_path}/frontend", dev.frontend)
    await t.write(f"{dev.libxl_path}/backend", dev.backend)


async def create_domain(
    hv: Any,
    xs: Any,
    config: DomainConfig,
    *,
    run_dir: str,
    xenstore_path: str | None = None,
) -> CreatedDomain:
    """Build and start a guest; see the module docstring.  On failure the
    half-built domain is destroyed again."""
    names = await _names(xs)
    if config.name in names.values():
        raise ValueError(f"a domain named {config.name!r} already exists")
    domid, fd = await hv.create_domain(config.nr_pages)
    try:
        store_gfn, console_gfn = magic_frames(config.nr_pages)
        console = None
        if config.console:
            port = await hv.alloc_unbound_for(domid, 0)
            await hv.seed_grant(domid, GNTTAB_RESERVED_CONSOLE, 0, console_gfn)
            console = ConsoleStart(console_gfn, port)
        store = await introduce_guest(hv, xs, domid, gfn=store_gfn, name=config.name, memory_kib=config.memory_kib)
        vm_uuid = str(uuidlib.uuid4())

        async def body(t: Any) -> None:
            await write_toolstack_entries(t, domid, config, vm_uuid, console)

        await xs.transact(body)
        env = dict(os.environ, **store.environment(), **{ENV_FD: str(fd)})
        if console is not None:
            env.update(console.environment())
        if xenstore_path:
            env["XENSTORED_PATH"] = xenstore_path
        os.makedirs(run_dir, exist_ok=True)
        output = os.path.join(run_dir, f"guest-{domid}.out")
        monitor = subprocess.Popen(
            [sys.executable, "-m", MONITOR_MODULE, "--domid", str(domid), "--uuid", vm_uuid,
             "--output", output, "--", *config.command],
            pass_fds=[fd],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(run_dir, f"monitor-{domid}.log"), "ab"),
            start_new_session=True,  # its own process group: destroy kills guest + monitor
        )
        await xs.write(f"/libxl/{domid}/monitor-pid", str(monitor.pid))
        return CreatedDomain(domid, config.name, vm_uuid, monitor.pid)
    except BaseException:
        with trio.CancelScope(shield=True):
            try:
                await hv.destroy_domain(domid)
            except HypervisorError:
                pass
            await cleanup_domain(xs, domid)
        raise
    finally:
        os.close(fd)


def _is_monitor(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return MONITOR_MODULE.encode() in f.read()
    except OSError:
        return False


async def cleanup_domain(xs: Any, domid: int, *, vm_uuid: str | None = None) -> bool:
    """Remove what the toolstack wrote for ``domid`` (device backends in
    dom0's home, ``/vm/<uuid>``, ``/libxl/<domid>``, the home) and RELEASE
    it.  With ``vm_uuid``, only if the domain is still that one (a monitor
    cleaning up after its guest must not touch a newer domain with the same
    id).  Returns whether anything was there."""
    vm = await _read(xs, f"{domain_path(domid)}/vm")
    if vm_uuid is not None and vm != f"/vm/{vm_uuid}":
        return False
    try:
        kinds = await xs.directory(f"{domain_path(0)}/backend")
    except XenStoreError:
        kinds = []
    for kind in kinds:
        await _rm(xs, f"{domain_path(0)}/backend/{kind}/{domid}")
    if vm is not None and vm.startswith("/vm/") and "/" not in vm[4:]:
        await _rm(xs, vm)
    await _rm(xs, f"/libxl/{domid}")
    await release_guest(xs, domid)
    return vm is not None


async def _rm(xs: Any, path: str) -> None:
    try:
        await xs.rm(path)
    except XenStoreError as exc:
        if exc.name != "ENOENT":
            raise


async def destroy_domain(hv: Any, xs: Any, domid: int) -> None:
    """``xl destroy``: the domain dies at once (its process is killed),
    then its XenStore state is cleaned up."""
    if domid == 0:
        raise ValueError("domain 0 cannot be destroyed")
    pid_text = await _read(xs, f"/libxl/{domid}/monitor-pid")
    try:
        await hv.destroy_domain(domid)
    except HypervisorError:
        pass  # already gone
    if pid_text and pid_text.isdigit() and _is_monitor(int(pid_text)):
        try:
            os.killpg(int(pid_text), signal.SIGKILL)
        except ProcessLookupError:
            pass
    await cleanup_domain(xs, domid)


async def request_shutdown(xs: Any, domid: int, reason: str = "poweroff") -> None:
    """Write ``control/shutdown`` (the guest acknowledges by clearing it)."""
    if reason not in ("poweroff", "reboot", "halt", "suspend"):
        raise ValueError(f"unknown shutdown reason {reason!r}")
    if await _read(xs, f"{domain_path(domid)}/domid") is None:
        raise DomainNotFound(f"no domain {domid}")
    await xs.write(f"{domain_path(domid)}/control/shutdown", reason)


async def wait_domain_gone(hv: Any, xs: Any, domid: int) -> None:
    """Until the domain has died and been cleaned up (its home is gone)."""
    while True:
        info = await hv.domain_info(domid)
        if info is None and await _read(xs, f"{domain_path(domid)}/domid") is None:
            return
        await trio.sleep(0.05)


@dataclass(frozen=True)
class DomainRow:
    name: str
    domid: int
    mem_mib: int
    vcpus: int
    state: str
    cpu_time: float


def _state(info: Any) -> str:
    # xl's six columns: r(unning) b(locked) p(aused) s(hutdown) c(rashed) d(ying)
    flags = ["-"] * 6
    if info.dying:
        flags[5] = "d"
    elif info.shutdown:
        flags[4 if info.shutdown_reason == 3 else 3] = "c" if info.shutdown_reason == 3 else "s"
    else:
        flags[1] = "b"  # a guest process is blocked unless it is computing
    return "".join(flags)


def _cpu_time(pid: int | None) -> float:
    """User + system time of the guest process (0 if unknown)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime stime
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


async def list_domains(hv: Any, xs: Any) -> list[DomainRow]:
    names = await _names(xs)
    rows = []
    for info in await hv.list_domains():
        name = "Domain-0" if info.domid == 0 else names.get(info.domid, f"(domain {info.domid})")
        pid = None
        if info.domid:
            text = await _read(xs, f"/libxl/{info.domid}/guest-pid")
            pid = int(text) if text and text.isdigit() else None
        rows.append(DomainRow(name, info.domid, info.nr_pages * 4 // 1024, 1, _state(info), _cpu_time(pid)))
    return rows


def format_rows(rows: list[DomainRow]) -> str:
    """``xl list``'s table."""
    lines = [f"{'Name':<40}{'ID':>5}{'Mem':>6}{'VCPUs':>6}{'State':>10}{'Time(s)':>9}"]
    for r in rows:
        lines.append(f"{r.name:<40}{r.domid:>5}{r.mem_mib:>6}{r.vcpus:>6}{r.state:>10}{r.cpu_time:>9.1f}")
    return "\n".join(lines)
