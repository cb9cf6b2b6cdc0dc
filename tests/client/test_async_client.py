"""The async client against our daemon (and a scripted fake daemon for races)."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xenstore
from xenstore import Backoff, ConnectionClosed, Perm, XenStoreError
from xenstore.client._transport import StreamTransport
from xenstore.wire import Op, Packet, PacketReader

pytestmark = pytest.mark.timeout(90)

NO_WAIT = Backoff(attempts=20, base=0.0)


@pytest.fixture(scope="module")
def socket_path(xenstored_module_factory):
    return xenstored_module_factory.start("-I", "on").socket_path


async def test_operations(socket_path):
    with trio.fail_after(10):
        async with xenstore.open_client(socket_path) as c:
            await c.write("/ops/a", b"\x00bin\xff")
            await c.write("/ops/s", "text")
            assert await c.read("/ops/a") == b"\x00bin\xff"
            assert await c.read_str("/ops/s") == "text"
            await c.mkdir("/ops/dir")
            assert await c.directory("/ops") == ["a", "s", "dir"]
            assert await c.exists("/ops/dir") and not await c.exists("/ops/nope")
            await c.set_perms("/ops/a", [Perm("n", 0), "r5"])
            assert await c.get_perms("/ops/a") == [Perm("n", 0), Perm("r", 5)]
            with pytest.raises(XenStoreError) as info:
                await c.read("/ops/nope")
            assert info.value.name == "ENOENT"
            with pytest.raises(XenStoreError) as info:
                await c.write("bad//path", b"")
            assert info.value.name == "EINVAL"
            await c.rm("/ops")
            assert not await c.exists("/ops/a")
            assert await c.get_domain_path(7) == "/local/domain/7"
            assert await c.unwatch("/nothing", "no-such-token") is False


async def test_big_directory_falls_back_to_directory_part(socket_path):
    names = [f"child-with-a-rather-long-name-{i:04d}" for i in range(200)]  # > 4096 bytes
    with trio.fail_after(20):
        async with xenstore.open_client(socket_path) as c:
            async with trio.open_nursery() as nursery:
                for name in names:
                    nursery.start_soon(c.write, f"/bigdir/{name}", b"")
            assert sorted(await c.directory("/bigdir")) == names
            await c.rm("/bigdir")


class RecordingTransport(StreamTransport):
    """Counts how many requests were waiting when each batch went out."""

    def __init__(self, stream, client_box):
        super().__init__(stream)
        self.client_box = client_box
        self.max_in_flight = 0

    async def send_all(self, data):
        client = self.client_box[0]
        if client is not None:
            self.max_in_flight = max(self.max_in_flight, client.statistics()["requests_in_flight"])
        await super().send_all(data)


async def test_pipelining_many_tasks_one_connection(socket_path):
    box = [None]
    transport = RecordingTransport(await trio.open_unix_socket(socket_path), box)
    with trio.fail_after(30):
        async with xenstore.open_client(transport=transport) as c:
            box[0] = c

            async def worker(w: int) -> None:
                for i in range(20):
                    value = f"{w}:{i}".encode()
                    await c.write(f"/pipe/{w}/{i}", value)
                    assert await c.read(f"/pipe/{w}/{i}") == value

            async with trio.open_nursery() as nursery:
                for w in range(30):
                    nursery.start_soon(worker, w)
            assert len(await c.directory("/pipe")) == 30
            assert c.statistics()["requests_in_flight"] == 0
            await c.rm("/pipe")
    assert transport.max_in_flight > 5  # really pipelined, not one at a time


async def test_cancelled_request_does_not_disturb_others(socket_path):
    with trio.fail_after(10):
        async with xenstore.open_client(socket_path) as c:
            await c.write("/cancel/a", b"1")
            with trio.move_on_after(0):  # cancelled before the reply arrives
                await c.read("/cancel/a")
            assert await c.read("/cancel/a") == b"1"
            assert c.statistics()["requests_in_flight"] == 0


async def test_watch_iteration_and_values(socket_path):
    with trio.fail_after(10):
        async with xenstore.open_client(socket_path) as c, xenstore.open_client(socket_path) as writer:
            async with c.watch("/w") as events:
                assert await events.receive() == "/w"  # the initial event
                await writer.write("/w/x", b"1")
                assert await events.receive() == "/w/x"
                await writer.rm("/w/x")
                assert await events.receive() == "/w/x"
                await writer.write("/w/y", b"2")
                async for path in events:
                    assert path == "/w/y"
                    break
            assert c.statistics()["watches"] == 0

            async with c.watch("/wv") as watch:
                values = watch.values()
                assert await values.__anext__() is None  # not there yet
                await writer.write("/wv", b"a")
                assert await values.__anext__() == b"a"
                await writer.write("/wv", b"b")
                await writer.write("/wv", b"c")
                assert await values.__anext__() == b"c"  # re-read: the latest value


async def test_watch_tokens_are_unique_and_unwatched(socket_path):
    with trio.fail_after(10):
        async with xenstore.open_client(socket_path) as c:
            async with c.watch("/u") as w1, c.watch("/u") as w2:
                assert w1.token != w2.token
                assert await w1.receive() == "/u" and await w2.receive() == "/u"
            # Leaving the block sent UNWATCH: a second one finds nothing.
            assert await c.unwatch("/u", w1.token) is False


async def test_events_merge_while_unconsumed(socket_path):
    with trio.fail_after(10):
        async with xenstore.open_client(socket_path) as c:
            async with c.watch("/m") as events:
                await events.receive()
                for i in range(50):
                    await c.write("/m/x", str(i))
                await c.write("/m", b"")  # a sync point: all events are queued by now
                await trio.testing.wait_all_tasks_blocked()
                pending = [events.receive_nowait() for _ in range(events.statistics()["pending_events"])]
                assert pending == ["/m/x", "/m"]


async def test_transaction_commit_and_abort(socket_path):
    with trio.fail_after(10):
        async with xenstore.open_client(socket_path) as c:
            async with c.transaction() as t:
                await t.write("/tx/a", b"1")
                assert await t.read("/tx/a") == b"1"
                assert not await c.exists("/tx/a")  # invisible outside until commit
            assert await c.read("/tx/a") == b"1"
            with pytest.raises(RuntimeError):
                async with c.transaction() as t:
                    await t.write("/tx/b", b"2")
                    raise RuntimeError("boom")
            assert not await c.exists("/tx/b")  # aborted


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conflicts=st.lists(st.booleans(), max_size=5), start=st.integers(0, 1000))
def test_retry_counts_conflicting_writers(socket_path, conflicts, start):
    """Attempt n conflicts iff conflicts[n]: a second connection changes the
    node between the transaction's read and its commit.  The helper retries
    exactly until the first clean attempt and the increment is applied once."""

    async def main():
        async with xenstore.open_client(socket_path) as c, xenstore.open_client(socket_path) as rival:
            await c.write("/retry/n", str(start))
            attempts = 0

            async def increment(t):
                nonlocal attempts
                value = int(await t.read("/retry/n"))
                if attempts < len(conflicts) and conflicts[attempts]:
                    await rival.write("/retry/n", str(value + 1000))
                attempts += 1
                await t.write("/retry/n", str(value + 1))
                return value + 1

            result = await c.transact(increment, backoff=NO_WAIT)
            expected_retries = next((i for i, hit in enumerate(conflicts) if not hit), len(conflicts))
            assert result.retries == expected_retries
            rival_bumps = 1000 * expected_retries
            assert result.value == start + rival_bumps + 1
            assert int(await c.read("/retry/n")) == start + rival_bumps + 1

    trio.run(main)


async def test_retry_gives_up_after_the_budget(socket_path):
    with trio.fail_after(10):
        async with xenstore.open_client(socket_path) as c, xenstore.open_client(socket_path) as rival:
            await c.write("/giveup", b"0")

            async def always_conflicts(t):
                await t.read("/giveup")
                await rival.write("/giveup", b"x")
                await t.write("/giveup", b"mine")

            with pytest.raises(XenStoreError) as info:
                await c.transact(always_conflicts, backoff=Backoff(attempts=3, base=0.0))
            assert info.value.name == "EAGAIN"


async def test_concurrent_increments_lose_nothing(socket_path):
    with trio.fail_after(30):
        async with xenstore.open_client(socket_path) as setup:
            await setup.write("/counter", b"0")
        retries = []

        async def incrementer():
            async with xenstore.open_client(socket_path) as c:
                for _ in range(5):

                    async def bump(t):
                        await t.write("/counter", str(int(await t.read("/counter")) + 1))

                    retries.append((await c.transact(bump, backoff=Backoff(attempts=100))).retries)

        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(incrementer)
        async with xenstore.open_client(socket_path) as check:
            assert await check.read("/counter") == b"30"


# -- a scripted daemon: exact control over the order of bytes -----------------


async def scripted(server_stream, script):
    """Run ``script(reader_fn, send_fn)`` as the daemon side of a memory stream."""
    reader = PacketReader()

    async def next_request() -> Packet:
        while True:
            packet = reader.next_packet()
            if packet is not None:
                return packet
            data = await server_stream.receive_some(65536)
            if not data:
                raise EOFError
            reader.feed(data)

    async def send(*packets: Packet) -> None:
        await server_stream.send_all(b"".join(p.encode() for p in packets))

    await script(next_request, send)


async def test_event_before_its_reply_is_queued():
    client_stream, server_stream = trio.testing.memory_stream_pair()

    async def daemon(next_request, send):
        watch = await next_request()
        await send(watch.reply(Op.WATCH, b"OK\0"), Packet(Op.WATCH_EVENT, 0, 0, b"/e\0" + watch.args[1] + b"\0"))
        write = await next_request()
        # cxenstored's order: the event caused by the write, then the OK.
        await send(Packet(Op.WATCH_EVENT, 0, 0, b"/e/x\0" + watch.args[1] + b"\0"), write.reply(Op.WRITE, b"OK\0"))
        unwatch = await next_request()
        await send(unwatch.reply(Op.UNWATCH, b"OK\0"))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(scripted, server_stream, daemon)
            async with xenstore.open_client(transport=StreamTransport(client_stream)) as c:
                async with c.watch("/e") as events:
                    assert await events.receive() == "/e"
                    await c.write("/e/x", b"1")
                    assert events.statistics()["pending_events"] == 1
                    assert await events.receive() == "/e/x"


async def test_replies_out_of_order_reach_their_callers():
    client_stream, server_stream = trio.testing.memory_stream_pair()

    async def daemon(next_request, send):
        first, second = await next_request(), await next_request()
        await send(second.reply(Op.READ, b"second"), first.reply(Op.READ, b"first"))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(scripted, server_stream, daemon)
            async with xenstore.open_client(transport=StreamTransport(client_stream)) as c:
                results = {}

                async def read(path):
                    results[path] = await c.read(path)

                async with trio.open_nursery() as readers:
                    readers.start_soon(read, "/first")
                    await trio.testing.wait_all_tasks_blocked()
                    readers.start_soon(read, "/second")
                assert results == {"/first": b"first", "/second": b"second"}


async def test_daemon_going_away_fails_pending_requests_and_watches():
    client_stream, server_stream = trio.testing.memory_stream_pair()

    async def daemon(next_request, send):
        watch = await next_request()
        await send(watch.reply(Op.WATCH, b"OK\0"))
        await next_request()  # a READ that will never be answered
        await server_stream.aclose()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(scripted, server_stream, daemon)
            async with xenstore.open_client(transport=StreamTransport(client_stream)) as c:
                async with c.watch("/gone") as events:
                    with pytest.raises(ConnectionClosed):
                        await c.read("/x")
                    with pytest.raises(ConnectionClosed):
                        await events.receive()
                assert c.closed
                with pytest.raises(ConnectionClosed):
                    await c.read("/x")


async def test_garbage_from_the_daemon_closes_the_connection():
    client_stream, server_stream = trio.testing.memory_stream_pair()

    async def daemon(next_request, send):
        await next_request()
        await server_stream.send_all(b"\xff" * 16)  # len = 2**32 - 1: broken framing

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(scripted, server_stream, daemon)
            async with xenstore.open_client(transport=StreamTransport(client_stream)) as c:
                with pytest.raises(ConnectionClosed):
                    await c.read("/x")


async def test_exceptions_in_the_body_are_not_wrapped(socket_path):
    with pytest.raises(KeyError):
        async with xenstore.open_client(socket_path):
            raise KeyError("mine")



class BrokenOnSend(StreamTransport):
    def send_nowait(self, data):
        raise trio.BrokenResourceError("the ring is gone")


async def test_transport_failing_on_send_closes_the_connection():
    client_stream, _server_stream = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with xenstore.open_client(transport=BrokenOnSend(client_stream)) as c:
            with pytest.raises(ConnectionClosed):
                await c.read("/x")
            assert c.closed
