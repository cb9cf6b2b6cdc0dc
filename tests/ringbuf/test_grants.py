"""Pure grant-table logic: layout, checks, and GrantAuthority against a model."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from ringbuf.grants import (
    ENTRIES_PER_FRAME, GNTST_no_device_space, GNTST_bad_copy_arg, GNTST_bad_domain, GNTST_bad_gntref, GNTST_bad_handle,
    GNTST_bad_page, GNTST_eagain, GNTST_general_error, GNTST_okay, GNTST_permission_denied,
    GTF_permit_access, GTF_readonly, GTF_reading, GTF_writing, CopySegment, CopySide, GrantAuthority,
    GrantEntry, GrantError, GrantRefAllocator, GrantTableView, RefBlocks, check_map_entry,
)
from ringbuf.memory import PAGE_SIZE


def test_entry_layout_matches_struct_grant_entry_v1():
    buf = bytearray(PAGE_SIZE)
    table = GrantTableView(buf)
    assert table.nr_entries == ENTRIES_PER_FRAME == 512
    table.write(9, domid=0x1234, frame=0xDEADBEEF, flags=GTF_permit_access | GTF_readonly)
    assert bytes(buf[72:80]) == struct.pack("<HHI", 5, 0x1234, 0xDEADBEEF)
    assert table.read(9) == GrantEntry(5, 0x1234, 0xDEADBEEF)
    with pytest.raises(IndexError):
        table.read(512)


@pytest.mark.parametrize(
    "entry, mapper, readonly, expected",
    [
        (GrantEntry(GTF_permit_access, 3, 1), 3, False, GNTST_okay),
        (GrantEntry(GTF_permit_access, 3, 1), 3, True, GNTST_okay),
        (GrantEntry(GTF_permit_access, 3, 1), 4, True, GNTST_general_error),  # not granted to us
        (GrantEntry(GTF_permit_access | GTF_readonly, 3, 1), 3, True, GNTST_okay),
        (GrantEntry(GTF_permit_access | GTF_readonly, 3, 1), 3, False, GNTST_general_error),
        (GrantEntry(0, 3, 1), 3, True, GNTST_general_error),  # invalid entry
        (GrantEntry(2, 3, 1), 3, True, GNTST_general_error),  # accept_transfer, not access
        (GrantEntry(GTF_permit_access | GTF_reading, 3, 1), 3, False, GNTST_okay),  # already mapped
    ],
)
def test_check_map_entry(entry, mapper, readonly, expected):
    assert check_map_entry(entry, mapper, readonly) == expected


def test_ref_allocator_skips_reserved_and_reuses():
    alloc = GrantRefAllocator([range(0, 10)])
    assert [alloc.alloc(), alloc.alloc()] == [8, 9]
    with pytest.raises(GrantError) as err:
        alloc.alloc()
    assert err.value.status == GNTST_no_device_space
    alloc.free(8)
    assert alloc.alloc() == 8
    with pytest.raises(ValueError):
        alloc.free(3)
    alloc.add(range(20, 22))
    assert alloc.available == 2 and alloc.alloc() == 20


def test_ref_blocks_are_disjoint_and_retired_while_mapped():
    blocks = RefBlocks(40, block_size=16)
    a = blocks.claim("a", 20)
    b = blocks.claim("b", 1)
    assert [(r.start, r.stop) for r in a] == [(8, 24), (24, 40)] and b == []
    assert blocks.release("a", in_use=lambda ref: ref == 30) == a
    assert blocks.claim("b", 100) == [range(8, 24)]  # the block with a mapped ref is retired
    assert [(r.start, r.stop) for r in RefBlocks(40, 16).claim_all("g")] == [(8, 24), (24, 40)]


def _authority(*domids, entries=16, pages=4):
    auth = GrantAuthority()
    tables, mems = {}, {}
    for d in domids:
        tables[d], mems[d] = bytearray(entries * 8), bytearray(pages * PAGE_SIZE)
        auth.add_domain(d, tables[d], mems[d])
    return auth, tables, mems


def test_map_sets_and_unmap_clears_status_bits():
    auth, tables, _ = _authority(1, 2)
    t1 = GrantTableView(tables[1])
    t1.write(8, 2, 3, GTF_permit_access)
    h_ro, frames = auth.map(2, 1, [8], readonly=True)
    assert frames == [3] and t1.flags(8) == GTF_permit_access | GTF_reading
    h_rw, _ = auth.map(2, 1, [8], readonly=False)
    assert t1.flags(8) == GTF_permit_access | GTF_reading | GTF_writing
    with pytest.raises(GrantError) as err:
        auth.end_access(1, 8)
    assert err.value.status == GNTST_eagain
    auth.unmap(2, h_rw)
    assert t1.flags(8) == GTF_permit_access | GTF_reading
    with pytest.raises(GrantError) as err:
        auth.unmap(1, h_ro)  # not the mapper
    assert err.value.status == GNTST_bad_handle
    auth.unmap(2, h_ro)
    assert t1.flags(8) == GTF_permit_access
    auth.end_access(1, 8)
    assert t1.flags(8) == 0


def test_batch_map_is_all_or_nothing():
    auth, tables, _ = _authority(1, 2)
    t1 = GrantTableView(tables[1])
    t1.write(8, 2, 0, GTF_permit_access)
    t1.write(9, 5, 1, GTF_permit_access)  # granted to someone else
    with pytest.raises(GrantError) as err:
        auth.map(2, 1, [8, 9], readonly=False)
    assert err.value.status == GNTST_general_error
    assert t1.flags(8) == GTF_permit_access and not auth.is_mapped(1, 8)


def test_copy_checks_both_sides_and_page_bounds():
    auth, tables, mems = _authority(1, 2, 3)
    GrantTableView(tables[1]).write(8, 3, 1, GTF_permit_access | GTF_readonly)
    GrantTableView(tables[2]).write(8, 3, 2, GTF_permit_access)
    mems[1][PAGE_SIZE + 10:PAGE_SIZE + 15] = b"hello"
    # a third domain copies between two domains that both granted it access
    seg = CopySegment(CopySide(1, 10, ref=8), CopySide(2, 100, ref=8), 5)
    assert auth.copy(3, [seg]) == [GNTST_okay]
    assert mems[2][2 * PAGE_SIZE + 100:2 * PAGE_SIZE + 105] == b"hello"
    # the read-only grant cannot be a destination
    assert auth.copy(3, [CopySegment(CopySide(2, 0, ref=8), CopySide(1, 0, ref=8), 5)]) == [
        GNTST_general_error]
    # crossing a page boundary
    assert auth.copy(3, [CopySegment(CopySide(1, 4090, ref=8), CopySide(3, 0, gfn=0), 10)]) == [
        GNTST_bad_copy_arg]
    # frames of another domain need a grant
    assert auth.copy(3, [CopySegment(CopySide(1, 0, gfn=1), CopySide(3, 0, gfn=0), 1)]) == [
        GNTST_permission_denied]
    # to our own frame
    assert auth.copy(3, [CopySegment(CopySide(1, 10, ref=8), CopySide(3, 7, gfn=3), 5)]) == [GNTST_okay]
    assert mems[3][3 * PAGE_SIZE + 7:3 * PAGE_SIZE + 12] == b"hello"
    assert auth.copy(3, [CopySegment(CopySide(9, 0, ref=8), CopySide(3, 0, gfn=0), 1)]) == [
        GNTST_bad_domain]


# -- stateful test against a simple model ---------------------------------------------

DOMAINS = (0, 1, 2)
NR_ENTRIES = 12
NR_PAGES = 3


class GrantAuthorityMachine(RuleBasedStateMachine):
    """Domains grant, map, unmap, revoke, copy and die; statuses and the
    shared entries' status bits must match a dictionary model."""

    handles = Bundle("handles")

    def __init__(self):
        super().__init__()
        self.auth, self.tables, self.mems = _authority(*DOMAINS, entries=NR_ENTRIES, pages=NR_PAGES)
        self.views = {d: GrantTableView(self.tables[d]) for d in DOMAINS}
        # model
        self.entries: dict[tuple[int, int], tuple[int, int, bool]] = {}  # (granter, ref) → (grantee, frame, ro)
        self.maps: dict[int, tuple[int, int, tuple[int, ...], bool]] = {}  # handle → (mapper, granter, refs, ro)
        self.dying: set[int] = set()

    def _mapped(self, granter, ref):
        return [m for m in self.maps.values() if m[1] == granter and ref in m[2]]

    def _expected_map(self, mapper, granter, refs, ro):
        if granter in self.dying:
            return GNTST_bad_domain
        for ref in refs:
            if not 0 <= ref < NR_ENTRIES:
                return GNTST_bad_gntref
            entry = self.entries.get((granter, ref))
            if entry is None or entry[0] != mapper or (entry[2] and not ro):
                return GNTST_general_error
            if entry[1] >= NR_PAGES:
                return GNTST_bad_page
        return GNTST_okay

    @rule(granter=st.sampled_from(DOMAINS), ref=st.integers(0, NR_ENTRIES - 1),
          grantee=st.sampled_from(DOMAINS + (7,)), frame=st.integers(0, NR_PAGES), ro=st.booleans())
    def grant(self, granter, ref, grantee, frame, ro):
        if self._mapped(granter, ref) or granter in self.dying:
            return  # a well-behaved granter does not rewrite an entry in use
        self.views[granter].write(ref, grantee, frame, GTF_permit_access | (GTF_readonly if ro else 0))
        self.entries[(granter, ref)] = (grantee, frame, ro)

    @rule(target=handles, mapper=st.sampled_from(DOMAINS), granter=st.sampled_from(DOMAINS),
          refs=st.lists(st.integers(0, NR_ENTRIES), min_size=1, max_size=3), ro=st.booleans())
    def map(self, mapper, granter, refs, ro):
        if mapper in self.dying:
            return -1
        expected = self._expected_map(mapper, granter, refs, ro)
        try:
            handle, frames = self.auth.map(mapper, granter, refs, ro)
        except GrantError as err:
            assert err.status == expected
            return -1
        assert expected == GNTST_okay
        assert frames == [self.entries[(granter, r)][1] for r in refs]
        self.maps[handle] = (mapper, granter, tuple(refs), ro)
        return handle

    @rule(handle=consumes(handles))
    def unmap(self, handle):
        if handle not in self.maps:
            with pytest.raises(GrantError):
                self.auth.unmap(0, handle)
            return
        mapper = self.maps.pop(handle)[0]
        self.auth.unmap(mapper, handle)

    @rule(granter=st.sampled_from(DOMAINS), ref=st.integers(0, NR_ENTRIES - 1))
    def end_access(self, granter, ref):
        if granter in self.dying:
            return
        if self._mapped(granter, ref):
            with pytest.raises(GrantError) as err:
                self.auth.end_access(granter, ref)
            assert err.value.status == GNTST_eagain
        else:
            self.auth.end_access(granter, ref)
            self.entries.pop((granter, ref), None)
            assert self.views[granter].flags(ref) == 0

    @rule(caller=st.sampled_from(DOMAINS), granter=st.sampled_from(DOMAINS),
          ref=st.integers(0, NR_ENTRIES - 1), offset=st.integers(0, PAGE_SIZE), length=st.integers(0, 64),
          to_grant=st.booleans())
    def copy(self, caller, granter, ref, offset, length, to_grant):
        if caller in self.dying:
            return
        grant_side = CopySide(granter, offset, ref=ref)
        own_side = CopySide(caller, 0, gfn=0)
        seg = CopySegment(own_side, grant_side, length) if to_grant else CopySegment(grant_side, own_side, length)
        entry = self.entries.get((granter, ref))
        if offset + length > PAGE_SIZE:
            expected = GNTST_bad_copy_arg
        elif granter in self.dying:
            expected = GNTST_bad_domain
        elif entry is None or entry[0] != caller or (to_grant and entry[2]):
            expected = GNTST_general_error
        elif entry[1] >= NR_PAGES:
            expected = GNTST_bad_page
        else:
            expected = GNTST_okay
        assert self.auth.copy(caller, [seg]) == [expected]

    @rule(domid=st.sampled_from(DOMAINS[1:]))
    def kill(self, domid):
        if domid in self.dying:
            return
        self.dying.add(domid)
        self.auth.mark_dying(domid)
        self.auth.release_mapper(domid)
        self.maps = {h: m for h, m in self.maps.items() if m[0] != domid}

    @invariant()
    def status_bits_mirror_maps(self):
        for d in DOMAINS:
            for ref in range(NR_ENTRIES):
                maps = self._mapped(d, ref)
                bits = self.views[d].flags(ref) & (GTF_reading | GTF_writing)
                expected = (GTF_reading if maps else 0) | (GTF_writing if any(not m[3] for m in maps) else 0)
                assert bits == expected, (d, ref)
                assert self.auth.is_mapped(d, ref) == bool(maps)
            assert self.auth.foreign_maps(d) == sum(1 for m in self.maps.values() if m[1] == d)


GrantAuthorityMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=30,
                                                   deadline=None)
TestGrantAuthority = GrantAuthorityMachine.TestCase


@settings(max_examples=200, deadline=None)
@given(flags=st.integers(0, 0xFFFF), domid=st.integers(0, 0xFFFF), mapper=st.integers(0, 0xFFFF),
       readonly=st.booleans())
def test_check_map_entry_matches_rules(flags, domid, mapper, readonly):
    ok = flags & 3 == GTF_permit_access and domid == mapper and (readonly or not flags & GTF_readonly)
    assert (check_map_entry(GrantEntry(flags, domid, 0), mapper, readonly) == GNTST_okay) == ok


def test_maptrack_limit_per_mapper():
    auth = GrantAuthority(max_maps_per_domain=2)
    table, mem = bytearray(16 * 8), bytearray(PAGE_SIZE)
    auth.add_domain(1, table, mem)
    GrantTableView(table).write(8, 2, 0, GTF_permit_access)
    handles = [auth.map(2, 1, [8], readonly=True)[0] for _ in range(2)]
    with pytest.raises(GrantError) as err:
        auth.map(2, 1, [8], readonly=True)
    assert err.value.status == GNTST_no_device_space
    auth.unmap(2, handles[0])
    auth.map(2, 1, [8], readonly=True)
