"""Golden tests: our xenstore-* tools against Debian's, byte for byte.

Every case runs Xen's C tool (Debian ``xenstore-utils``, ``/usr/bin``) and
ours against the same daemon and the same freshly built tree, and compares
stdout, stderr, exit status and the resulting tree.  Both programs are
started through a symlink of the same name in a temp dir (``argv[0]`` is
``./xenstore-read`` for both), so even usage texts and getopt diagnostics,
which print ``argv[0]``, must match exactly.

The daemon is ours (``xenstored -I on``).  ``USERXEN_GOLDEN_SOCKET=<path>``
runs the same comparisons against any other daemon (e.g. Xen's C
xenstored), which is how the expected behaviour was checked to be Xen's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xenstore.client._sync import open_sync_client

pytestmark = pytest.mark.timeout(120)

DEBIAN = "/usr/bin"
MODES = ("read", "write", "rm", "exists", "list", "ls", "chmod", "watch")
ENTRY = {mode: f"main_{mode}" for mode in MODES}

needs_debian = pytest.mark.skipif(
    not os.path.exists(f"{DEBIAN}/xenstore-read"), reason="Debian's xenstore-utils (the reference tools) is not installed"
)

ODD = bytes(range(0, 32)) + b" ~\\\x7f\x80\xfe\xff\"'=" + "é".encode()


def _our_script(bindir: str, name: str, entry: str) -> str:
    """The installed console script if there is one, else an equivalent."""
    installed = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.exists(installed):
        return installed
    path = os.path.join(bindir, f"{name}.py")
    with open(path, "w") as f:
        f.write(f"#!{sys.executable}\nimport sys\nfrom xenstore.cli.main import {entry}\nsys.exit({entry}())\n")
    os.chmod(path, 0o755)
    return path


class Tools:
    """Two directories holding ``xenstore-*`` links: Debian's and ours."""

    def __init__(self, root: str, socket_path: str) -> None:
        self.socket_path = socket_path
        self.dirs = {"c": os.path.join(root, "c"), "py": os.path.join(root, "py")}
        for d in self.dirs.values():
            os.mkdir(d)
        names = {f"xenstore-{m}": ENTRY[m] for m in MODES}
        names["xenstore"] = "main_multiplexer"
        for name, entry in names.items():
            os.symlink(f"{DEBIAN}/{name}", os.path.join(self.dirs["c"], name))
            os.symlink(_our_script(root, name, entry), os.path.join(self.dirs["py"], name))

    def run(self, which: str, argv: list[str], env: dict | None = None, timeout: float = 20) -> tuple[int, bytes, bytes]:
        full_env = dict(os.environ, XENSTORED_PATH=self.socket_path)
        full_env.pop("POSIXLY_CORRECT", None)
        full_env.update(env or {})
        done = subprocess.run(
            [f"./{argv[0]}", *argv[1:]],
            cwd=self.dirs[which],
            env=full_env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )
        return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="module")
def socket_path(xenstored_module_factory):
    external = os.environ.get("USERXEN_GOLDEN_SOCKET")
    if external:
        return external
    return xenstored_module_factory.start("-I", "on").socket_path


@pytest.fixture(scope="module")
def tools(socket_path):
    with tempfile.TemporaryDirectory(prefix="xs-golden-") as root:
        yield Tools(root, socket_path)


def build_tree(socket_path: str) -> None:
    with open_sync_client(socket_path) as c:
        c.rm("/g")
        c.write("/g/a", b"1")
        c.write("/g/b", b"hello world")
        c.write("/g/c/d", ODD)
        c.write("/g/c/e", b"")
        c.write("/g/long", b"v" * 300)
        c.write("/g/esc-long", ODD * 3)
        c.write("/g/" + "n" * 90, b"name longer than the screen")
        c.write("/g/" + "m" * 60, b"x" * 15)
        c.write("/g/deep/" + "/".join(f"l{i}" for i in range(1, 80)), b"bottom")
        c.write("/g/deep/l1/l2/v", b"w" * 70)
        c.write("/g/perms", b"p")
        c.set_perms("/g/perms", ["n0", "r5", "w7", "b9"])
        c.mkdir("/g/empty")
        c.write("/g/tidy/x/y/z", b"")
        c.write("/g/tidy/keep", b"")
        for i in range(40):
            c.write(f"/g/many/child-{i:03d}", str(i).encode())


def dump_tree(socket_path: str, root: str = "/g") -> list:
    """Every node under ``root``: (path, value, perms), in daemon order."""
    out = []
    with open_sync_client(socket_path) as c:
        stack = [root]
        while stack:
            path = stack.pop()
            try:
                out.append((path, c.read(path), [str(p) for p in c.get_perms(path)]))
                names = c.directory(path)
            except Exception as exc:  # noqa: BLE001 - a missing root is a result too
                out.append((path, repr(exc)))
                continue
            stack.extend(reversed([f"{path}/{n}" for n in names]))
    return out


DEEP = "/g/deep/" + "/".join(f"l{i}" for i in range(1, 80))

CASES = [
    # read
    ["xenstore-read", "/g/a"],
    ["xenstore-read", "-p", "/g/a", "/g/b"],
    ["xenstore-read", "/g/c/d"],
    ["xenstore-read", "-R", "/g/c/d"],
    ["xenstore-read", "-pR", "/g/a", "/g/c/d"],
    ["xenstore-read", "/g/c/e", "/g/long"],
    ["xenstore-read", "/g/nope"],
    ["xenstore-read", "/g/a", "/g/nope", "/g/b"],
    ["xenstore-read", "-s", "/g/a"],
    ["xenstore-read"],
    ["xenstore-read", "-h"],
    ["xenstore-read", "--help"],
    ["xenstore-read", "-x", "/g/a"],
    ["xenstore-read", "--prefix", "/g/a"],
    ["xenstore-read", "--pre", "/g/a"],
    ["xenstore-read", "--raw", "/g/a"],
    ["xenstore-read", "--r", "/g/a"],
    ["xenstore-read", "--foo=1", "/g/a"],
    ["xenstore-read", "--prefix=1", "/g/a"],
    ["xenstore-read", "/g/a", "-p"],
    ["xenstore-read", "--", "-p"],
    ["xenstore-read", "-f", "/g/a"],
    ["xenstore-read", "-t", "/g/a"],
    ["xenstore-read", "-:"],
    ["xenstore-read", "-"],
    ["xenstore-read", "relative/path"],
    ["xenstore-read", ""],
    ["xenstore-read", "/g/a/"],
    ["xenstore-read", "//g"],
    ["xenstore-read", "/g/bad path"],
    # write
    ["xenstore-write", "/g/w", "1"],
    ["xenstore-write", "/g/w", "a\\tb\\x41\\101\\q\\x 4\\x0x5\\377\\"],
    ["xenstore-write", "-R", "/g/w", "a\\tb"],
    ["xenstore-write", "/g/w"],
    ["xenstore-write", "/g/w", "1", "/g/w2", "2", "/g/w3/x", ""],
    ["xenstore-write", "/g/w", "1", "/g/w2"],
    ["xenstore-write", "/g/w", "1", "bad//path", "2"],
    ["xenstore-write", "-p", "/g/w", "1"],
    ["xenstore-write", "/g/" + "z" * 3000, "1"],
    ["xenstore-write", "/g/w", b"raw \xff\xfe bytes"],  # not UTF-8: must pass through untouched
    ["xenstore-write", "-R", "/g/w", b"\xc3\xa9\x01"],
    ["xenstore-read", b"/g/\xff"],
    # rm
    ["xenstore-rm", "/g/a"],
    ["xenstore-rm", "/g/nope"],
    ["xenstore-rm", "/g/nope/x"],
    ["xenstore-rm", "-t", "/g/tidy/x/y/z"],
    ["xenstore-rm", "--tidy", "/g/c/e"],
    ["xenstore-rm", "/g/a", "/g/nope/x", "/g/b"],
    ["xenstore-rm", "/"],
    ["xenstore-rm"],
    # exists
    ["xenstore-exists", "/g/a"],
    ["xenstore-exists", "/g/nope"],
    ["xenstore-exists", "/g/a", "/g/nope"],
    ["xenstore-exists", "-p", "/g"],
    ["xenstore-exists"],
    # list
    ["xenstore-list", "/g"],
    ["xenstore-list", "-p", "/g"],
    ["xenstore-list", "-p", "/"],
    ["xenstore-list", "/g/nope"],
    ["xenstore-list", "/g/a"],
    ["xenstore-list", "/g/c", "/g/nope"],
    ["xenstore-list", "-p", "/g/many", "/g/c"],
    ["xenstore-list"],
    # ls
    ["xenstore-ls", "/g"],
    ["xenstore-ls", "-f", "/g"],
    ["xenstore-ls", "-p", "/g"],
    ["xenstore-ls", "-fp", "/g"],
    ["xenstore-ls", "--flat", "--prefix", "/g/c"],
    ["xenstore-ls", "/g/nope"],
    ["xenstore-ls", "/g/c", "/g/nope"],
    ["xenstore-ls", "-p", "/g/deep"],
    ["xenstore-ls", "/g/many", "/g/c"],
    ["xenstore-ls", "/g/"],
    ["xenstore-ls", "-R", "/g"],
    ["xenstore-ls", "/g/a"],
    # chmod
    ["xenstore-chmod", "/g/a", "r5"],
    ["xenstore-chmod", "/g/a", "n0", "r5", "w7", "b9"],
    ["xenstore-chmod", "/g/a", "x5"],
    ["xenstore-chmod", "/g/a", ""],
    ["xenstore-chmod", "/g/a"],
    ["xenstore-chmod", "-r", "/g/c", "b3"],
    ["xenstore-chmod", "-u", "/g/c/d", "r1"],
    ["xenstore-chmod", "-u", "-r", "/g/tidy/x", "n2", "r3"],
    ["xenstore-chmod", "/g/nope", "r1"],
    ["xenstore-chmod", "/g/a", "r-1"],
    ["xenstore-chmod", "/g/a", "r 12abc"],
    ["xenstore-chmod", "/g/a", "r0x10"],
    ["xenstore-chmod", "-u", "rel/x", "r1"],
    # watch (deterministic: only the initial events)
    ["xenstore-watch", "-n", "1", "/g"],
    ["xenstore-watch", "-n1", "/g/nope"],
    ["xenstore-watch", "--number=2", "/g/a", "/g/b"],
    ["xenstore-watch", "-n", "0", "/g"],
    ["xenstore-watch", "-n", "1", "rel"],
    ["xenstore-watch", "-n"],
    ["xenstore-watch", "-p", "/g"],
    ["xenstore-watch", "-n", "1", "bad//path"],
    # the multiplexer
    ["xenstore"],
    ["xenstore", "-h"],
    ["xenstore", "foo", "/g"],
    ["xenstore", "control", "help"],
    ["xenstore", "read", "/g/a"],
    ["xenstore", "read", "-h"],
    ["xenstore", "read", "-x", "/g/a"],
    ["xenstore", "ls", "-f", "/g/c"],
    ["xenstore", "write", "/g/w"],
    ["xenstore", "exists", "/g/nope"],
    ["xenstore", "list", "-h"],
    ["xenstore", "chmod", "-h"],
    ["xenstore", "watch", "-h"],
    ["xenstore", "rm", "-h"],
    ["xenstore", "ls", "-h"],
    ["xenstore", "exists", "-h"],
]


def _case_id(argv: list) -> str:
    text = " ".join((a if isinstance(a, str) else repr(a)) if a else "''" for a in argv)
    return text if len(text) < 60 else text[:57] + "..."


@needs_debian
@pytest.mark.parametrize("argv", CASES, ids=[_case_id(a) for a in CASES])
def test_same_as_xen(tools, socket_path, argv):
    results = {}
    for which in ("c", "py"):
        build_tree(socket_path)
        results[which] = (tools.run(which, argv), dump_tree(socket_path))
    (c_run, c_tree), (py_run, py_tree) = results["c"], results["py"]
    assert py_run[0] == c_run[0], ("exit status", py_run, c_run)
    assert py_run[1] == c_run[1], "stdout"
    assert py_run[2] == c_run[2], "stderr"
    assert py_tree == c_tree, "resulting tree"


@needs_debian
def test_no_daemon(tools, tmp_path):
    """Nothing listens: both report xs_open's errno the same way."""
    env = {"XENSTORED_PATH": str(tmp_path / "none")}
    for argv in (["xenstore-read", "/a"], ["xenstore-ls"], ["xenstore", "write", "/a", "b"]):
        assert tools.run("py", argv, env) == tools.run("c", argv, env)


@needs_debian
def test_watch_sees_changes(tools, socket_path):
    """-n 3: the initial event, then a write and a removal by someone else."""
    outputs = {}
    for which in ("c", "py"):
        build_tree(socket_path)
        env = dict(os.environ, XENSTORED_PATH=socket_path)
        proc = subprocess.Popen(
            ["./xenstore-watch", "-n", "3", "/g/c"], cwd=tools.dirs[which], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            first = proc.stdout.readline()  # the watch is registered
            with open_sync_client(socket_path) as c:
                c.write("/g/c/new", b"1")
                time.sleep(0.05)
                c.rm("/g/c/new")
            rest, err = proc.communicate(timeout=20)
        finally:
            proc.kill()
            proc.wait()
        outputs[which] = (proc.returncode, first + rest, err)
    assert outputs["py"] == outputs["c"]
    assert outputs["py"] == (0, b"/g/c\n/g/c/new\n/g/c/new\n", b"")


@needs_debian
def test_ls_width_follows_the_terminal(tools, socket_path):
    """On a tty, ls truncates to the terminal's width minus 2 (and so does -f)."""
    import pty

    def run_sized(which: str, argv: list[str]) -> bytes:
        # stty in the child sets the size before the tool asks for it.
        cmd = "stty cols 50 rows 24; exec " + " ".join(argv)
        pid, fd = pty.fork()
        if pid == 0:  # the child: never returns
            os.chdir(tools.dirs[which])
            os.environ["XENSTORED_PATH"] = socket_path
            os.execv("/bin/sh", ["/bin/sh", "-c", cmd])
        chunks = []
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the tty
                break
            if not data:
                break
            chunks.append(data)
        os.waitpid(pid, 0)
        os.close(fd)
        return b"".join(chunks)

    build_tree(socket_path)
    for argv, cut in ((["./xenstore-ls", "/g/c"], True), (["./xenstore-ls", "-p", "/g/many"], False), (["./xenstore-ls", "-f", "/g"], True)):
        ours, theirs = run_sized("py", argv), run_sized("c", argv)
        assert ours == theirs
        assert (b'\\..."' in ours) == cut  # values cut at the 50-column tty's width


TOKENS = [
    "-p", "-s", "-R", "-f", "-t", "-u", "-r", "-h", "-x", "-pR", "-fp", "--", "-", "",
    "--prefix", "--raw", "--pre", "--r", "--tidy", "--flat", "--help=1", "--bogus",
    "/g/a", "/g/b", "/g/c", "/g/c/d", "/g/nope", "/g/many", "rel", "/", "b3", "r0", "n0", "x1", "a\\x41\\",
]


@needs_debian
@settings(max_examples=int(os.environ.get("USERXEN_FUZZ_EXAMPLES", "40")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    mode=st.sampled_from(["read", "write", "rm", "exists", "list", "ls", "chmod"]),
    args=st.lists(st.sampled_from(TOKENS), max_size=5),
    multiplexed=st.booleans(),
)
def test_random_command_lines(tools, socket_path, mode, args, multiplexed):
    """Any mix of options and operands behaves like Xen's tool."""
    argv = ["xenstore", mode, *args] if multiplexed else [f"xenstore-{mode}", *args]
    test_same_as_xen(tools, socket_path, argv)
