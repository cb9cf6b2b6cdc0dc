"""open_background_nursery: the block's own exception comes out as itself
(trio >= 0.25 would wrap it in one exception group per nursery)."""

from __future__ import annotations

import traceback
from contextlib import asynccontextmanager

import pytest
import trio

from ringbuf._trio_util import open_background_nursery


@asynccontextmanager
async def open_service():
    """A typical public context manager with background tasks."""
    async with open_background_nursery() as nursery:
        nursery.start_soon(trio.sleep_forever)
        yield nursery
        nursery.cancel_scope.cancel()


async def _fail_soon(exc: BaseException) -> None:
    await trio.sleep(0)
    raise exc


async def test_block_exits_normally_and_tasks_are_cancelled():
    with trio.fail_after(5):
        async with open_service() as nursery:
            assert len(nursery.child_tasks) == 1


async def test_the_blocks_exception_passes_nested_services_unwrapped():
    cause = ValueError("cause")
    with trio.fail_after(5):
        with pytest.raises(KeyError) as info:
            async with open_service(), open_service():
                async with open_service():
                    try:
                        raise cause
                    except ValueError as exc:
                        raise KeyError("mine") from exc
    err = info.value
    assert not isinstance(err, BaseExceptionGroup)
    assert err.__cause__ is cause and err.__context__ is cause
    # The traceback still reaches the line that raised it.
    frames = [f.line for f in traceback.extract_tb(err.__traceback__)]
    assert any('raise KeyError("mine")' in (line or "") for line in frames)


async def test_an_outer_cancellation_is_caught_by_its_own_scope():
    with trio.fail_after(5):
        with trio.move_on_after(0.01) as scope:
            async with open_service():
                await trio.sleep_forever()
    assert scope.cancelled_caught


async def test_a_group_raised_by_the_block_is_passed_as_is():
    mine = ExceptionGroup("mine", [KeyError(1), KeyError(2)])
    with trio.fail_after(5):
        with pytest.raises(ExceptionGroup) as info:
            async with open_service():
                raise mine
    assert info.value is mine


async def test_a_failing_background_task_stays_in_a_group():
    boom = OSError("task")
    with trio.fail_after(5):
        with pytest.raises(ExceptionGroup) as info:
            async with open_background_nursery() as nursery:
                nursery.start_soon(_fail_soon, boom)
                await trio.sleep_forever()
    assert info.value.exceptions == (boom,)


async def test_block_and_task_failing_together_stay_a_group():
    with trio.fail_after(5):
        with pytest.raises(ExceptionGroup) as info:
            async with open_background_nursery() as nursery:
                nursery.start_soon(_fail_soon, OSError("task"))
                try:
                    await trio.sleep_forever()
                finally:
                    raise KeyError("block")
    assert sorted(type(e).__name__ for e in info.value.exceptions) == ["KeyError", "OSError"]


async def test_a_start_failure_in_the_block_comes_out_as_itself():
    async def refuses(*, task_status=trio.TASK_STATUS_IGNORED):
        raise PermissionError("no")

    with trio.fail_after(5):
        with pytest.raises(PermissionError):
            async with open_service() as nursery:
                await nursery.start(refuses)
