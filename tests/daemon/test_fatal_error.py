"""xenstored's main loop ends with the server's recorded fatal error itself
(which main() reports as "error xenstored: ..."), not with the exception
group of the nursery the server ran in."""

from __future__ import annotations

import pytest
import trio

from xenstore.daemon.journal import JournalError
from xenstore.daemon.main import _run


class _FailingServer:
    """Stands for XenstoreServer: fails its journal once serving."""

    def __init__(self) -> None:
        self.fatal_error: BaseException | None = None

    async def serve(self, listener, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep(0)
        self.fatal_error = JournalError("journal: No space left on device")
        raise self.fatal_error


class _BuggyServer(_FailingServer):
    async def serve(self, listener, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep(0)
        raise RuntimeError("a bug, not a recorded fatal error")


def test_a_journal_failure_ends_the_daemon_with_that_error(tmp_path):
    server = _FailingServer()
    with pytest.raises(JournalError) as info:
        trio.run(_run, server, str(tmp_path / "socket"), None, lambda: None, lambda: None)
    assert info.value is server.fatal_error


def test_other_task_failures_are_not_hidden(tmp_path):
    with pytest.raises(ExceptionGroup) as info:
        trio.run(_run, _BuggyServer(), str(tmp_path / "socket"), None, lambda: None, lambda: None)
    assert [type(exc) for exc in info.value.exceptions] == [RuntimeError]
