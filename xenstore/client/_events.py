"""Pending watch events of one watch, pure (no trio).

Events are hints ("look again at this path"), so an event for a path that
is already waiting to be consumed adds nothing: it is merged with the
waiting one.  The queue is therefore bounded by the number of distinct
paths, whatever the event rate, and keeps first-arrival order.
"""

from __future__ import annotations

__all__ = ["EventQueue"]


class EventQueue:
    __slots__ = ("_paths",)

    def __init__(self) -> None:
        # dict as an ordered set: insertion order = delivery order.
        self._paths: dict[str, None] = {}

    def push(self, path: str) -> bool:
        """Queue ``path``; ``False`` if it was already waiting (merged)."""
        if path in self._paths:
            return False
        self._paths[path] = None
        return True

    def pop(self) -> str | None:
        """The oldest waiting path, or ``None``."""
        if not self._paths:
            return None
        path = next(iter(self._paths))
        del self._paths[path]
        return path

    def __len__(self) -> int:
        return len(self._paths)
