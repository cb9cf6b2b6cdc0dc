"""Grant tables (v1): entry layout, granter-side helpers, and the pure checks.

Layout (``grant_table.h``): ``struct grant_entry_v1 { uint16 flags; uint16
domid; uint32 frame; }`` = 8 bytes, 512 entries per 4 KiB table frame.  Refs 0
and 1 are reserved for the console and xenstore pages (filled by the
toolstack); guests allocate their own refs from 8 upward.

Who does what (same split as Xen):

* The **granter** writes entries into its *own* grant-table pages
  (:class:`GrantTableView` over shared memory): ``domid``, ``frame``, then
  ``flags``.  Nothing else is involved in granting.
* The **hypervisor service** (:class:`GrantAuthority`, pure: tables and
  memories are plain buffers) checks an entry before handing out a mapping:
  type ``GTF_permit_access``, ``domid`` equal to the mapper, no writable map
  of a ``GTF_readonly`` entry, frame inside the granter's memory.  While a ref
  is mapped it keeps ``GTF_reading`` (and ``GTF_writing`` for writable maps)
  set in the granter's entry, and it refuses ``end_access`` on a mapped ref.
  It performs grant copies itself, checking both sides.

Because Python has no compare-and-swap on shared memory, revoking (``end
access``) is a request to the service, which serialises it against maps;
Xen's guest does the same check locally with a CAS.

Trust model.  A mapping is handed out as the granter's memory file
descriptor plus page offsets.  Like Xen's Dom0 (which can map any guest
memory), the process that receives the fd is trusted not to touch pages
beyond those it was granted: the file covers the whole domain memory.  All
grant checks (domid, flags, read-only, in-use) are enforced by the service,
never by the mapper.  A read-only grant is handed out on a read-only file
descriptor (re-opened ``O_RDONLY``), so the kernel refuses writable mappings
of it even for a mapper that tries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable, NamedTuple

from .memory import PAGE_SIZE

__all__ = [
    "GTF_invalid", "GTF_permit_access", "GTF_accept_transfer", "GTF_transitive",
    "GTF_type_mask", "GTF_readonly", "GTF_reading", "GTF_writing",
    "GNTST_okay", "GNTST_general_error", "GNTST_bad_domain", "GNTST_bad_gntref",
    "GNTST_bad_handle", "GNTST_no_device_space", "GNTST_permission_denied", "GNTST_bad_page",
    "GNTST_bad_copy_arg", "GNTST_eagain",
    "GNTTAB_NR_RESERVED_ENTRIES", "GNTTAB_RESERVED_CONSOLE", "GNTTAB_RESERVED_XENSTORE",
    "ENTRY_SIZE", "ENTRIES_PER_FRAME",
    "GrantEntry", "GrantError", "GrantTableView", "GrantRefAllocator", "RefBlocks",
    "CopySide", "CopySegment", "GrantAuthority", "check_map_entry",
]

# flags [grant_table.h]
GTF_invalid = 0
GTF_permit_access = 1
GTF_accept_transfer = 2
GTF_transitive = 3
GTF_type_mask = 3
GTF_readonly = 1 << 2
GTF_reading = 1 << 3
GTF_writing = 1 << 4

# status codes (int16) [grant_table.h]
GNTST_okay = 0
GNTST_general_error = -1
GNTST_bad_domain = -2
GNTST_bad_gntref = -3
GNTST_bad_handle = -4
GNTST_no_device_space = -7
GNTST_permission_denied = -8
GNTST_bad_page = -9
GNTST_bad_copy_arg = -10
GNTST_eagain = -12

GNTTAB_NR_RESERVED_ENTRIES = 8
GNTTAB_RESERVED_CONSOLE = 0
GNTTAB_RESERVED_XENSTORE = 1

ENTRY_SIZE = 8
ENTRIES_PER_FRAME = PAGE_SIZE // ENTRY_SIZE

_STATUS_NAMES = {
    GNTST_general_error: "general_error", GNTST_bad_domain: "bad_domain",
    GNTST_bad_gntref: "bad_gntref", GNTST_bad_handle: "bad_handle",
    GNTST_permission_denied: "permission_denied", GNTST_bad_page: "bad_page",
    GNTST_bad_copy_arg: "bad_copy_arg", GNTST_eagain: "eagain",
}


class GrantError(Exception):
    """A grant operation failed with a ``GNTST_*`` status."""

    def __init__(self, status: int, message: str = "") -> None:
        self.status = status
        self.detail = message
        name = _STATUS_NAMES.get(status, str(status))
        super().__init__(f"GNTST_{name}" + (f": {message}" if message else ""))


class GrantEntry(NamedTuple):
    flags: int
    domid: int
    frame: int


class GrantTableView:
    """A v1 grant table over a writable buffer (shared memory or a bytearray).

    Fields are accessed through ``memoryview.cast`` so that every field is one
    aligned native store (``flags``/``domid`` 16-bit, ``frame`` 32-bit): a
    reader in another process never sees a torn field.
    """

    def __init__(self, buffer: object) -> None:
        view = memoryview(buffer).cast("B")  # type: ignore[arg-type]
        if len(view) % ENTRY_SIZE:
            raise ValueError("grant table size must be a multiple of 8 bytes")
        self._u16 = view.cast("H")
        self._u32 = view.cast("I")
        self.nr_entries = len(view) // ENTRY_SIZE

    def release(self) -> None:
        self._u16.release()
        self._u32.release()

    def read(self, ref: int) -> GrantEntry:
        """One snapshot of entry ``ref`` (copy it once, then check the copy)."""
        if not 0 <= ref < self.nr_entries:
            raise IndexError(ref)
        return GrantEntry(self._u16[ref * 4], self._u16[ref * 4 + 1], self._u32[ref * 2 + 1])

    def flags(self, ref: int) -> int:
        return self._u16[ref * 4]

    def write(self, ref: int, domid: int, frame: int, flags: int) -> None:
        """Publish an entry the way a guest does: domid, frame, then flags.

        x86-64 keeps stores in order, so a peer that sees ``flags`` sees the
        rest of the entry.
        """
        if not 0 <= ref < self.nr_entries:
            raise IndexError(ref)
        self._u16[ref * 4 + 1] = domid
        self._u32[ref * 2 + 1] = frame
        self._u16[ref * 4] = flags

    def set_flags(self, ref: int, flags: int) -> None:
        self._u16[ref * 4] = flags


class GrantRefAllocator:
    """Granter-side allocator of free refs, drawn from the ranges this
    connection owns (see :class:`RefBlocks`); refs 0..7 are never included."""

    def __init__(self, ranges: Iterable[range] = ()) -> None:
        self._free: list[int] = []
        self._used: set[int] = set()
        for refs in ranges:
            self.add(refs)

    def add(self, refs: range) -> None:
        """Take ownership of more refs."""
        self._free.extend(reversed([r for r in refs if r >= GNTTAB_NR_RESERVED_ENTRIES]))

    @property
    def available(self) -> int:
        return len(self._free)

    def alloc(self) -> int:
        if not self._free:
            raise GrantError(GNTST_no_device_space, "no free grant refs (reserve more)")
        ref = self._free.pop()
        self._used.add(ref)
        return ref

    def free(self, ref: int) -> None:
        if ref not in self._used:
            raise ValueError(f"grant ref {ref} is not allocated")
        self._used.remove(ref)
        self._free.append(ref)


class RefBlocks:
    """The service's split of one domain's grant refs between its connections.

    Several processes of one domain (dom0's toolstack, backends, frontends)
    write the same grant table; each connection allocates only from blocks
    the service gave it, so two processes never pick the same ref.  A guest's
    single connection simply owns one block covering the whole table.  Pure.
    """

    def __init__(self, nr_entries: int, block_size: int) -> None:
        first = GNTTAB_NR_RESERVED_ENTRIES
        self._free = [range(start, min(start + block_size, nr_entries))
                      for start in range(first, nr_entries, block_size)]
        self._owned: dict[Hashable, list[range]] = {}

    def claim(self, owner: Hashable, count: int = 1) -> list[range]:
        """Blocks totalling at least ``count`` refs (fewer if the table runs out)."""
        got: list[range] = []
        while self._free and sum(len(r) for r in got) < count:
            got.append(self._free.pop(0))
        self._owned.setdefault(owner, []).extend(got)
        return got

    def claim_all(self, owner: Hashable) -> list[range]:
        return self.claim(owner, 1 << 32)

    def release(self, owner: Hashable, in_use: Callable[[int], bool]) -> list[range]:
        """Take back an owner's blocks; returns them.  A block with a ref
        still in use (mapped by a peer) is retired instead of reused."""
        blocks = self._owned.pop(owner, [])
        for refs in blocks:
            if not any(in_use(r) for r in refs):
                self._free.append(refs)
        self._free.sort(key=lambda r: r.start)
        return blocks


def check_map_entry(entry: GrantEntry, mapper: int, readonly: bool) -> int:
    """Xen's checks for mapping (or copying through) one entry: a ``GNTST_*``."""
    if entry.flags & GTF_type_mask != GTF_permit_access or entry.domid != mapper:
        return GNTST_general_error
    if not readonly and entry.flags & GTF_readonly:
        return GNTST_general_error
    return GNTST_okay


class CopySide(NamedTuple):
    """One side of a grant copy: a grant ref of ``domid`` or, when ``ref`` is
    None, frame ``gfn`` of the caller itself."""

    domid: int
    offset: int
    ref: int | None = None
    gfn: int | None = None


class CopySegment(NamedTuple):
    source: CopySide
    dest: CopySide
    length: int


@dataclass
class _Mapping:
    mapper: int
    granter: int
    refs: tuple[int, ...]
    readonly: bool


@dataclass
class _Granter:
    table: GrantTableView
    memory: memoryview
    nr_pages: int
    dying: bool = False
    # ref -> [readonly maps, writable maps]
    active: dict[int, list[int]] = field(default_factory=dict)


class GrantAuthority:
    """The service's grant logic for all domains.  Pure: no I/O.

    Each domain is registered with its grant table and memory as buffers.
    Mapping returns a *handle* covering a batch of refs (all or nothing, like
    Linux gntdev); the caller turns it into a file descriptor + offsets.
    """

    def __init__(self, max_maps_per_domain: int = 4096) -> None:
        self._granters: dict[int, _Granter] = {}
        self._mappings: dict[int, _Mapping] = {}
        self._maps_by_mapper: dict[int, int] = {}
        #: like Xen's maptrack table size: live map handles one domain may hold
        self.max_maps_per_domain = max_maps_per_domain
        self._next_handle = 1

    # -- domains ---------------------------------------------------------

    def add_domain(self, domid: int, table: object, memory: object) -> None:
        if domid in self._granters:
            raise ValueError(f"domain {domid} already registered")
        mem = memoryview(memory).cast("B")  # type: ignore[arg-type]
        self._granters[domid] = _Granter(GrantTableView(table), mem, len(mem) // PAGE_SIZE)

    def mark_dying(self, domid: int) -> None:
        """No new maps or copies through this domain's grants."""
        self._granters[domid].dying = True

    def remove_domain(self, domid: int) -> None:
        """Forget a domain (its foreign maps must be gone: see :meth:`foreign_maps`)."""
        granter = self._granters.pop(domid)
        granter.table.release()
        granter.memory.release()

    def has_domain(self, domid: int) -> bool:
        return domid in self._granters

    def foreign_maps(self, granter: int) -> int:
        """How many live mappings (by anyone) of this domain's grants."""
        return sum(1 for m in self._mappings.values() if m.granter == granter)

    def handles_of(self, mapper: int) -> list[int]:
        return [h for h, m in self._mappings.items() if m.mapper == mapper]

    # -- map / unmap -----------------------------------------------------

    def map(self, mapper: int, granter_id: int, refs: Iterable[int], readonly: bool) -> tuple[int, list[int]]:
        """Map refs of ``granter_id`` for ``mapper``: ``(handle, frames)``.

        Raises :class:`GrantError` (and maps nothing) if any ref fails.
        """
        refs = tuple(refs)
        granter = self._granters.get(granter_id)
        if granter is None or granter.dying:
            raise GrantError(GNTST_bad_domain, f"domain {granter_id}")
        if not refs:
            raise GrantError(GNTST_general_error, "no refs")
        if self._maps_by_mapper.get(mapper, 0) >= self.max_maps_per_domain:
            raise GrantError(GNTST_no_device_space, f"domain {mapper} holds too many mappings")
        frames = []
        for ref in refs:
            if not 0 <= ref < granter.table.nr_entries:
                raise GrantError(GNTST_bad_gntref, f"ref {ref}")
            entry = granter.table.read(ref)
            status = check_map_entry(entry, mapper, readonly)
            if status != GNTST_okay:
                raise GrantError(status, f"ref {ref} of domain {granter_id}")
            if entry.frame >= granter.nr_pages:
                raise GrantError(GNTST_bad_page, f"ref {ref} frame {entry.frame}")
            frames.append(entry.frame)
        for ref in refs:
            counts = granter.active.setdefault(ref, [0, 0])
            counts[0 if readonly else 1] += 1
            self._sync_flags(granter, ref)
        handle = self._next_handle
        self._next_handle += 1
        self._mappings[handle] = _Mapping(mapper, granter_id, refs, readonly)
        self._maps_by_mapper[mapper] = self._maps_by_mapper.get(mapper, 0) + 1
        return handle, frames

    def mapper_of(self, handle: int) -> int | None:
        mapping = self._mappings.get(handle)
        return None if mapping is None else mapping.mapper

    def unmap(self, mapper: int, handle: int) -> int:
        """Undo a map; returns the granter's domid."""
        mapping = self._mappings.get(handle)
        if mapping is None or mapping.mapper != mapper:
            raise GrantError(GNTST_bad_handle, f"handle {handle}")
        del self._mappings[handle]
        self._maps_by_mapper[mapper] -= 1
        if not self._maps_by_mapper[mapper]:
            del self._maps_by_mapper[mapper]
        granter = self._granters.get(mapping.granter)
        if granter is None:
            return mapping.granter
        for ref in mapping.refs:
            counts = granter.active[ref]
            counts[0 if mapping.readonly else 1] -= 1
            if counts == [0, 0]:
                del granter.active[ref]
            self._sync_flags(granter, ref)
        return mapping.granter

    def release_mapper(self, mapper: int) -> list[int]:
        """Unmap everything ``mapper`` holds (it died); returns the granters touched."""
        touched = []
        for handle in self.handles_of(mapper):
            touched.append(self._mappings[handle].granter)
            self.unmap(mapper, handle)
        return touched

    def is_mapped(self, granter_id: int, ref: int) -> bool:
        granter = self._granters.get(granter_id)
        return granter is not None and ref in granter.active

    @staticmethod
    def _sync_flags(granter: _Granter, ref: int) -> None:
        # Mirror the service's own map counts into the shared entry.
        counts = granter.active.get(ref, (0, 0))
        flags = granter.table.flags(ref) & ~(GTF_reading | GTF_writing)
        if counts[0] or counts[1]:
            flags |= GTF_reading
        if counts[1]:
            flags |= GTF_writing
        granter.table.set_flags(ref, flags)

    # -- toolstack ---------------------------------------------------------

    def seed(self, granter_id: int, ref: int, grantee: int, frame: int, readonly: bool) -> None:
        """Fill an entry on the granter's behalf (the toolstack pre-filling
        the reserved console/xenstore refs, like ``xc_dom_gnttab_seed``)."""
        granter = self._granters[granter_id]
        if not 0 <= ref < granter.table.nr_entries:
            raise GrantError(GNTST_bad_gntref, f"ref {ref}")
        if not 0 <= frame < granter.nr_pages:
            raise GrantError(GNTST_bad_page, f"frame {frame}")
        if ref in granter.active:
            raise GrantError(GNTST_eagain, f"ref {ref} is mapped")
        granter.table.write(ref, grantee, frame, GTF_permit_access | (GTF_readonly if readonly else 0))

    # -- revoke ----------------------------------------------------------

    def end_access(self, granter_id: int, ref: int) -> None:
        """Clear entry ``ref`` of the granter, refused while it is mapped."""
        granter = self._granters[granter_id]
        if not 0 <= ref < granter.table.nr_entries:
            raise GrantError(GNTST_bad_gntref, f"ref {ref}")
        if ref in granter.active:
            raise GrantError(GNTST_eagain, f"ref {ref} is mapped")
        granter.table.set_flags(ref, 0)

    def revoke_unmapped(self, granter_id: int, refs: Iterable[int]) -> None:
        """Clear the entries among ``refs`` that nobody maps (a granting
        process went away; what is still mapped stays until unmapped)."""
        granter = self._granters.get(granter_id)
        if granter is None:
            return
        for ref in refs:
            if 0 <= ref < granter.table.nr_entries and ref not in granter.active:
                granter.table.set_flags(ref, 0)

    # -- copy ------------------------------------------------------------

    def _resolve(self, caller: int, side: CopySide, write: bool, length: int) -> tuple[memoryview, int]:
        if side.offset < 0 or length < 0 or side.offset + length > PAGE_SIZE:
            raise GrantError(GNTST_bad_copy_arg, "copy crosses a page boundary")
        if side.ref is None:
            if side.domid != caller or side.gfn is None:
                raise GrantError(GNTST_permission_denied, "frames of other domains need a grant")
            owner = self._granters.get(caller)
            if owner is None:
                raise GrantError(GNTST_bad_domain, f"domain {caller}")
            frame = side.gfn
        else:
            owner = self._granters.get(side.domid)
            if owner is None or owner.dying:
                raise GrantError(GNTST_bad_domain, f"domain {side.domid}")
            if not 0 <= side.ref < owner.table.nr_entries:
                raise GrantError(GNTST_bad_gntref, f"ref {side.ref}")
            entry = owner.table.read(side.ref)
            status = check_map_entry(entry, caller, readonly=not write)
            if status != GNTST_okay:
                raise GrantError(status, f"ref {side.ref} of domain {side.domid}")
            frame = entry.frame
        if not 0 <= frame < owner.nr_pages:
            raise GrantError(GNTST_bad_page, f"frame {frame}")
        return owner.memory, frame * PAGE_SIZE + side.offset

    def copy_one(self, caller: int, seg: CopySegment) -> int:
        """Perform one copy segment; returns its ``GNTST_*`` status."""
        try:
            src_mem, src_off = self._resolve(caller, seg.source, False, seg.length)
            dst_mem, dst_off = self._resolve(caller, seg.dest, True, seg.length)
        except GrantError as err:
            return err.status
        dst_mem[dst_off:dst_off + seg.length] = src_mem[src_off:src_off + seg.length]
        return GNTST_okay

    def copy(self, caller: int, segments: Iterable[CopySegment]) -> list[int]:
        return [self.copy_one(caller, seg) for seg in segments]
