"""The XenStore operations as methods, written once for every client flavour.

Each method builds a :class:`~xenstore.client._ops.Request` and hands it to
``self._run``.  The async client's ``_run`` is a coroutine function, so
``await client.read(path)`` works; the synchronous client's ``_run``
returns the value directly.  Transactions are the same methods bound to a
transaction id.  ``directory`` (which may need several round trips) and the
watch/transaction context managers are written per flavour.
"""

from __future__ import annotations

from ._ops import Perm, Request

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Iterable

__all__ = ["Operations"]


class Operations:
    """Mixin: ``_run(request)`` sends one request and parses its reply."""

    __slots__ = ()

    def _run(self, request: Request, tx_id: int | None = None) -> "Any":
        """Send ``request`` (with our transaction id unless ``tx_id`` is given)."""
        raise NotImplementedError

    # -- the tree (these honour the transaction id) ----------------------

    def read(self, path: str | bytes) -> "Any":
        """The node's value (``bytes``); ``XenStoreError("ENOENT")`` if missing."""
        return self._run(Request.read(path))

    def write(self, path: str | bytes, value: str | bytes) -> "Any":
        """Set the value, creating the node and missing ancestors."""
        return self._run(Request.write(path, value))

    def mkdir(self, path: str | bytes) -> "Any":
        return self._run(Request.mkdir(path))

    def rm(self, path: str | bytes) -> "Any":
        """Remove the node and its whole subtree."""
        return self._run(Request.rm(path))

    def get_perms(self, path: str | bytes) -> "Any":
        """``list[Perm]``, owner first."""
        return self._run(Request.get_perms(path))

    def set_perms(self, path: str | bytes, perms: "Iterable[Perm | str]") -> "Any":
        return self._run(Request.set_perms(path, perms))

    def directory_part(self, path: str | bytes, offset: int) -> "Any":
        """One raw ``DIRECTORY_PART`` reply (see ``directory`` for the loop)."""
        return self._run(Request.directory_part(path, offset))

    # -- watches (never part of a transaction) ---------------------------

    def add_watch(self, path: str | bytes, token: str | bytes, depth: int | None = None) -> "Any":
        """Low level ``WATCH``; events arrive tagged with ``token``."""
        return self._run(Request.watch(path, token, depth))

    def unwatch(self, path: str | bytes, token: str | bytes) -> "Any":
        """``UNWATCH``; ``False`` (not an exception) if there was no such watch."""
        return self._run(Request.unwatch(path, token))

    def reset_watches(self) -> "Any":
        """Drop every watch and transaction of this connection (daemon side)."""
        return self._run(Request.reset_watches())

    # -- low-level transactions (see ``transaction()`` for the easy way) --

    def transaction_start(self) -> "Any":
        """A new transaction id (``int``)."""
        return self._run(Request.transaction_start(), 0)

    def transaction_end(self, tx_id: int, commit: bool = True) -> "Any":
        """Commit (``EAGAIN`` on conflict) or abort transaction ``tx_id``."""
        return self._run(Request.transaction_end(commit), tx_id)

    # -- domains ---------------------------------------------------------

    def get_domain_path(self, domid: int) -> "Any":
        """``"/local/domain/<domid>"`` (as the daemon says)."""
        return self._run(Request.get_domain_path(domid))

    def introduce(self, domid: int, gfn: int, port: int) -> "Any":
        return self._run(Request.introduce(domid, gfn, port))

    def release(self, domid: int) -> "Any":
        return self._run(Request.release(domid))

    def is_domain_introduced(self, domid: int) -> "Any":
        """``bool``."""
        return self._run(Request.is_domain_introduced(domid))

    def resume(self, domid: int) -> "Any":
        return self._run(Request.resume(domid))

    def set_target(self, domid: int, target: int) -> "Any":
        return self._run(Request.set_target(domid, target))

    # -- daemon administration -------------------------------------------

    def control(self, command: str | bytes, *args: str | bytes) -> "Any":
        """``CONTROL``: the daemon's answer as ``bytes`` (``b"OK"`` usually)."""
        return self._run(Request.control(command, *args))

    def get_feature(self, domid: int | None = None) -> "Any":
        """Feature bitmap (``int``) offered to us, or to ``domid``."""
        return self._run(Request.get_feature(domid))

    def set_feature(self, domid: int, features: int) -> "Any":
        return self._run(Request.set_feature(domid, features))

    def get_quota(self, name: str | None = None, domid: int | None = None) -> "Any":
        """No name: the quota names (``list[str]``); else the value (``int``)."""
        return self._run(Request.get_quota(name, domid))

    def set_quota(self, name: str, value: int, domid: int | None = None) -> "Any":
        return self._run(Request.set_quota(name, value, domid))
