"""Trio idioms shared by every package of the project.

Since trio 0.25 nurseries always wrap what escapes them in exception
groups.  A nursery that is an implementation detail -- the background
tasks of a client, a host or a driver -- would then turn the caller's own
``KeyError`` (or ``Cancelled``) raised inside ``async with open_xxx():``
into ``ExceptionGroup([ExceptionGroup([KeyError()])])``, one level per
nursery on the way out.  :func:`open_background_nursery` is the nursery
to use there: the exception of the code *inside* the block comes out as
itself.  Failures of the background tasks still come out as a group,
since they are several independent errors (or one the caller did not
raise).

:func:`serve_until_signalled` is the main loop of our daemons (the
hypervisor service, the console daemon).

They live in ``ringbuf``, the bottom layer, because ``xenstore`` and
``xenbus`` both build on ``ringbuf`` and it on neither.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, NoReturn

import trio

__all__ = ["open_background_nursery", "serve_until_signalled"]


@asynccontextmanager
async def open_background_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery whose block's own exception propagates unwrapped.

    If the block raises and the nursery's exception group holds exactly
    what the block raised and nothing else (typically one exception, in as
    many one-member groups as there were nurseries), the block's exception
    itself is re-raised, with its traceback, ``__cause__`` and
    ``__context__`` as they were.  Any other group (a background task
    failed, alone or with the block) is left intact.
    """
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                yield nursery
            except BaseException as exc:
                body_error = exc
                raise
    except BaseExceptionGroup as group:
        if body_error is None or _leaf_ids(group) != _leaf_ids(body_error):
            raise
    else:
        return
    _reraise(body_error)


def _leaf_ids(exc: BaseException) -> list[int]:
    """The identities of the non-group exceptions in ``exc``, in order.

    Leaves, not groups, are compared: trio rebuilds a group the block
    raised when it splits its own ``Cancelled`` out of it.
    """
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaf_ids(sub)]
    return [id(exc)]


def _reraise(exc: BaseException) -> NoReturn:
    # Raised outside the ``except`` clause so that the group is not chained
    # as its context; restore the context anyway in case an outer handler
    # is active.
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc, context


async def serve_until_signalled(serve: Callable[..., Awaitable[Any]], *args: Any, ready_fd: int | None = None) -> None:
    """Start ``serve(*args)`` (a task that reports through ``task_status``),
    then write ``b"1"`` to ``ready_fd`` and close it (the parent's readiness
    pipe), and let it run until SIGTERM or SIGINT."""
    async with open_background_nursery() as nursery:
        await nursery.start(serve, *args)
        if ready_fd is not None:
            os.write(ready_fd, b"1")
            os.close(ready_fd)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
