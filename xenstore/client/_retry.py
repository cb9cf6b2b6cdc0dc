"""Retrying a transaction on ``EAGAIN``: the policy (pure) and its result.

XenStore transactions are optimistic: a commit fails with ``EAGAIN`` when
something the transaction read changed meanwhile, and the client must redo
the whole transaction.  Retrying at once in a tight loop lets two
conflicting writers collide forever, so the wait grows exponentially with
full jitter (a random delay in ``[0, min(cap, base * 2**n)]``) and the
number of attempts is bounded.
"""

from __future__ import annotations

import random

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

__all__ = ["Backoff", "TransactionResult"]


class Backoff:
    """How often and how long to wait between transaction attempts."""

    __slots__ = ("attempts", "base", "cap", "_random")

    def __init__(
        self,
        attempts: int = 16,
        base: float = 0.0005,
        cap: float = 0.05,
        random_fn: "Callable[[], float]" = random.random,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        self.attempts = attempts
        self.base = base
        self.cap = cap
        self._random = random_fn

    def delay(self, retry: int) -> float:
        """Seconds to sleep before retry number ``retry`` (1-based)."""
        ceiling = min(self.cap, self.base * (2 ** min(retry - 1, 32)))
        return self._random() * ceiling


class TransactionResult:
    """What the transaction function returned, and how many retries it took."""

    __slots__ = ("value", "retries")

    def __init__(self, value: "Any", retries: int) -> None:
        self.value = value
        self.retries = retries

    def __repr__(self) -> str:
        return f"TransactionResult(value={self.value!r}, retries={self.retries})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TransactionResult) and (self.value, self.retries) == (other.value, other.retries)
