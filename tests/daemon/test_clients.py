"""Third-party clients against our daemon: Debian's xenstore-* tools and pyxs."""

from __future__ import annotations

import os
import subprocess

import pytest

pytestmark = pytest.mark.timeout(60)

TOOLS = "/usr/bin"
needs_tools = pytest.mark.skipif(not os.path.exists(f"{TOOLS}/xenstore-read"), reason="Debian xenstore-utils not installed")


def xs(daemon, tool, *args, check=True):
    env = dict(os.environ, XENSTORED_PATH=daemon.socket_path)
    done = subprocess.run([f"{TOOLS}/xenstore-{tool}", *args], env=env, capture_output=True, text=True, timeout=20)
    if check:
        assert done.returncode == 0, (tool, args, done.stderr)
    return done


@pytest.fixture(scope="module")
def daemon(xenstored_module_factory):
    return xenstored_module_factory.start()


@needs_tools
def test_debian_tools(daemon):
    xs(daemon, "write", "/deb/a", "hello world", "/deb/b/c", "2")
    assert xs(daemon, "read", "/deb/a").stdout == "hello world\n"
    assert xs(daemon, "read", "/deb/a", "/deb/b/c").stdout == "hello world\n2\n"
    assert xs(daemon, "list", "/deb").stdout.split() == ["a", "b"]
    assert xs(daemon, "exists", "/deb/b/c").returncode == 0
    assert xs(daemon, "exists", "/deb/nope", check=False).returncode != 0
    assert xs(daemon, "read", "/deb/nope", check=False).returncode != 0
    xs(daemon, "chmod", "/deb/a", "n3", "r5")
    xs(daemon, "chmod", "-r", "/deb/b", "b7")
    ls = xs(daemon, "ls", "-fp", "/deb").stdout.splitlines()
    assert '/deb/a = "hello world"   (n3,r5)' in ls
    assert '/deb/b/c = "2"   (b7)' in ls
    xs(daemon, "rm", "/deb/b")
    assert xs(daemon, "list", "/deb").stdout.split() == ["a"]


@needs_tools
def test_debian_watch(daemon):
    env = dict(os.environ, XENSTORED_PATH=daemon.socket_path)
    watch = subprocess.Popen([f"{TOOLS}/xenstore-watch", "-n", "3", "/debw"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert watch.stdout.readline().strip() == "/debw"  # the initial event
        xs(daemon, "write", "/debw/x", "1")
        assert watch.stdout.readline().strip() == "/debw/x"
        xs(daemon, "rm", "/debw")
        assert watch.stdout.readline().strip() == "/debw"
        assert watch.wait(10) == 0
    finally:
        watch.kill()
        watch.wait()


def test_pyxs(daemon):
    pyxs = pytest.importorskip("pyxs")
    with pyxs.Client(unix_socket_path=daemon.socket_path) as c:
        c.write(b"/pyxs/a", b"1")
        c.mkdir(b"/pyxs/dir")
        assert c.read(b"/pyxs/a") == b"1"
        assert sorted(c.list(b"/pyxs")) == [b"a", b"dir"]
        assert c.exists(b"/pyxs/a") and not c.exists(b"/pyxs/zz")
        c.set_perms(b"/pyxs/a", [b"n0", b"r4"])
        assert c.get_perms(b"/pyxs/a") == [b"n0", b"r4"]
        c.delete(b"/pyxs/dir")
        assert c.list(b"/pyxs") == [b"a"]
        # Transactions: commit, rollback, and a conflict (EAGAIN).
        c.transaction()
        c.write(b"/pyxs/tx", b"committed")
        assert c.commit()
        c.transaction()
        c.write(b"/pyxs/rolled", b"x")
        c.rollback()
        assert c.read(b"/pyxs/tx") == b"committed" and not c.exists(b"/pyxs/rolled")
        with pyxs.Client(unix_socket_path=daemon.socket_path) as other:
            c.transaction()
            c.read(b"/pyxs/a")
            c.write(b"/pyxs/b", b"in tx")
            other.write(b"/pyxs/a", b"changed")
            assert c.commit() is False  # EAGAIN
            assert not c.exists(b"/pyxs/b")


def test_pyxs_watch(daemon):
    pyxs = pytest.importorskip("pyxs")
    with pyxs.Client(unix_socket_path=daemon.socket_path) as c, pyxs.Client(unix_socket_path=daemon.socket_path) as writer:
        m = c.monitor()
        m.watch(b"/pyxsw", b"tok")
        events = m.wait()
        assert next(events) == (b"/pyxsw", b"tok")
        writer.write(b"/pyxsw/k", b"v")
        assert next(events) == (b"/pyxsw/k", b"tok")
        m.unwatch(b"/pyxsw", b"tok")
