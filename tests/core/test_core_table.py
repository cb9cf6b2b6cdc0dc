"""Table-driven engine tests: (as domain N, transaction, request) -> reply.

Each scenario runs on a fresh engine where domains 5 and 6 are introduced
and connected (unprivileged) and dom0 uses a privileged socket connection.
Initial tree: /local/domain/5 (n5), /local/domain/6 (n6), /pub (n0 r5 r6).
An expected reply is the payload (bytes, "|" standing for NUL) or an error
name (str).  Behaviour is cxenstored 4.17's unless a row says otherwise.
"""

from __future__ import annotations

import pytest

from xenstore.core import Engine, Limits
from xenstore.wire import Op, Packet

OK = b"OK|"


class Raw(bytes):
    """An expected payload taken literally ("|" is not a NUL here)."""


HELP = Raw(
    b"check\t\nlog\ton|off\nlive-update\t[-c <cmdline>] [-F] [-t <timeout>] <file>\n"
    b"    Default timeout is 60 seconds.\nlogfile\t<file>\nmemreport\t[<file>]\nprint\t<string>\n"
    b"quota\t[set <name> <val>|<domid>]\nquota-soft\t[set <name> <val>]\nhelp\t\n\0"
)


def setup_engine(limits: Limits | None = None) -> tuple[Engine, dict]:
    engine = Engine(limits)
    conns = {0: engine.connect()}
    for d in (5, 6):
        for op, payload in (
            (Op.INTRODUCE, b"%d|1|5|" % d),
            (Op.WRITE, b"/local/domain/%d|" % d),
            (Op.SET_PERMS, b"/local/domain/%d|n%d|" % (d, d)),
        ):
            out = engine.handle(conns[0], Packet(op, 1, 0, payload.replace(b"|", b"\0")))
            assert out[-1][1].payload == b"OK\0", out
        conns[d] = engine.connect(d, privileged=False)
    for op, payload in ((Op.WRITE, b"/pub|hello"), (Op.SET_PERMS, b"/pub|n0|r5|r6|")):
        engine.handle(conns[0], Packet(op, 1, 0, payload.replace(b"|", b"\0")))
    engine.take_changes()
    engine.take_effects()
    return engine, conns


SCENARIOS: dict[str, list[tuple]] = {
    "basic read/write": [
        (0, 0, Op.WRITE, b"/a/b/c|value", OK),
        (0, 0, Op.READ, b"/a/b/c|", b"value"),
        (0, 0, Op.READ, b"/a/b|", b""),
        (0, 0, Op.DIRECTORY, b"/a|", b"b|"),
        (0, 0, Op.WRITE, b"/a/bin|\x00x\x00", OK),  # NULs are part of the value
        (0, 0, Op.READ, b"/a/bin|", b"\x00x\x00"),
        (0, 0, Op.DIRECTORY, b"/a|", b"b|bin|"),  # creation order
        (0, 0, Op.WRITE, b"/a/e|", OK),  # empty value
        (0, 0, Op.READ, b"/a/e|", b""),
        (0, 0, Op.READ, b"/nope|", "ENOENT"),
        (0, 0, Op.DIRECTORY, b"/a/e|", b""),
        (0, 0, Op.MKDIR, b"/a/b|", OK),  # exists: fine
        (0, 0, Op.RM, b"/a/b|", OK),
        (0, 0, Op.READ, b"/a/b/c|", "ENOENT"),
        (0, 0, Op.RM, b"/a/b|", OK),  # missing, parent exists
        (0, 0, Op.RM, b"/a/x/y|", "ENOENT"),  # parent missing too
        (0, 0, Op.RM, b"/|", "EINVAL"),
        (0, 0, Op.WRITE, b"/a/b|1", OK),
        (0, 0, Op.DIRECTORY, b"/a|", b"bin|e|b|"),  # re-created: moves to the end
        (0, 0, Op.GET_PERMS, b"/|", b"n0|"),
        (0, 0, Op.DIRECTORY, b"/tool|", b"xenstored|"),
        (0, 0, Op.READ, b"/tool/xenstored|", b""),
    ],
    "payload and path validation": [
        (0, 0, Op.READ, b"", "EINVAL"),
        (0, 0, Op.READ, b"/pub", "EINVAL"),  # no NUL
        (0, 0, Op.READ, b"/pub|x|", "EINVAL"),  # exactly one NUL, as last byte
        (0, 0, Op.READ, b"/pub|x", "EINVAL"),
        (0, 0, Op.WRITE, b"/pub", "EINVAL"),  # WRITE needs the path's NUL
        (0, 0, Op.READ, b"|", "EINVAL"),  # "" -> /local/domain/0/
        (0, 0, Op.READ, b"/a//b|", "EINVAL"),
        (0, 0, Op.READ, b"/a/|", "EINVAL"),
        (0, 0, Op.READ, b"/a b|", "EINVAL"),
        (0, 0, Op.READ, b"/a\xff|", "EINVAL"),
        (0, 0, Op.READ, b"@introduceDomain|", "EINVAL"),
        (0, 0, Op.READ, b"/A-Z_a@z09|", "ENOENT"),  # every allowed character
        (0, 0, Op.WRITE, b"/" + b"p" * 2047 + b"|", OK),  # 2048 in total
        (0, 0, Op.WRITE, b"/" + b"p" * 2048 + b"|", "EINVAL"),
        (0, 0, Op.WRITE, b"/local/domain/1/" + b"p" * 2048 + b"|", OK),  # relative part counts
        (0, 0, Op.WRITE, b"/local/domain/1/" + b"p" * 2049 + b"|", "EINVAL"),
        (0, 0, Op.WRITE, b"/local/domain/123456/" + b"p" * 2028 + b"|", "EINVAL"),  # 6 digits: no prefix rule
        (0, 0, Op.WRITE, b"rel|x", OK),  # dom0 socket: /local/domain/0/rel
        (0, 0, Op.READ, b"/local/domain/0/rel|", b"x"),
    ],
    "relative paths of a guest": [
        (5, 0, Op.WRITE, b"data|v", OK),
        (5, 0, Op.READ, b"/local/domain/5/data|", b"v"),
        (5, 0, Op.READ, b"data|", b"v"),
        (5, 0, Op.GET_PERMS, b"data|", b"n5|"),
        (5, 0, Op.GET_DOMAIN_PATH, b"5|", b"/local/domain/5|"),
        (5, 0, Op.GET_DOMAIN_PATH, b"junk|", b"/local/domain/0|"),  # atoi
        (5, 0, Op.GET_DOMAIN_PATH, b"-1|", b"/local/domain/4294967295|"),
    ],
    "permission domids print as C ints (checked against cxenstored)": [
        (0, 0, Op.SET_PERMS, b"/pub|n0|r-1|b0xffffffff|w2147483647|r0x7ffffff0|w-999999999|", OK),
        (0, 0, Op.GET_PERMS, b"/pub|", b"n0|r-1|b-1|w2147483647|r2147483632|w-999999999|"),
    ],
    "permissions": [
        (5, 0, Op.READ, b"/pub|", b"hello"),
        (5, 0, Op.WRITE, b"/pub|x", "EACCES"),
        (5, 0, Op.READ, b"/pub/missing|", "ENOENT"),  # readable ancestor: ENOENT
        (5, 0, Op.WRITE, b"/pub/new|x", "EACCES"),  # ancestor not writable
        (5, 0, Op.READ, b"/tool/missing|", "EACCES"),  # unreadable ancestor hides existence
        (5, 0, Op.READ, b"/local/domain/6|", "EACCES"),
        (5, 0, Op.DIRECTORY, b"/|", "EACCES"),
        (5, 0, Op.MKDIR, b"/pub|", "EACCES"),  # exists, but still needs write
        (5, 0, Op.RM, b"/pub/none|", "EACCES"),
        (0, 0, Op.SET_PERMS, b"/pub|n0|w5|", OK),
        (5, 0, Op.READ, b"/pub/missing|", "EACCES"),  # write-only ancestor: EACCES for reads
        (5, 0, Op.WRITE, b"/pub/new|x", OK),  # ... but creation is allowed
        (5, 0, Op.GET_PERMS, b"/pub/new|", b"n5|w5|"),  # inherited, owned by the creator
        (5, 0, Op.RM, b"/pub/none|", OK),
        (0, 0, Op.SET_PERMS, b"/pub|n0|r5|r5|w5|", OK),
        (5, 0, Op.WRITE, b"/pub|x", "EACCES"),  # first matching entry decides
        (0, 0, Op.SET_PERMS, b"/pub|b0|", OK),  # entry 0's letter applies to others
        (6, 0, Op.WRITE, b"/pub|by6", OK),
        (0, 0, Op.SET_PERMS, b"/pub|r6|", OK),  # owner 6: full access whatever the letter
        (6, 0, Op.WRITE, b"/pub|again", OK),
        (5, 0, Op.WRITE, b"/pub|x", "EACCES"),
        (5, 0, Op.READ, b"/pub|", b"again"),
    ],
    "set_perms": [
        (5, 0, Op.WRITE, b"n|", OK),
        (5, 0, Op.SET_PERMS, b"n|n5|r0x10|b010|", OK),  # strtol(..., 0): hex and octal
        (5, 0, Op.GET_PERMS, b"n|", b"n5|r16|b8|"),  # always emitted in decimal
        (5, 0, Op.SET_PERMS, b"n|n6|", "EPERM"),  # unprivileged owner change
        (5, 0, Op.SET_PERMS, b"n|n5|r1|r2|r3|r4|r6|", "ENOSPC"),  # 6 entries > 5
        (5, 0, Op.SET_PERMS, b"n|n5|r1|r2|r3|r4|", OK),
        (5, 0, Op.SET_PERMS, b"n|x5|", "EINVAL"),
        (5, 0, Op.SET_PERMS, b"n|n|", "EINVAL"),
        (5, 0, Op.SET_PERMS, b"n|n5x|", "EINVAL"),
        (5, 0, Op.SET_PERMS, b"n|", "EINVAL"),  # at least one entry
        (5, 0, Op.SET_PERMS, b"n|n5", "EINVAL"),  # entries are NUL-terminated
        (5, 0, Op.SET_PERMS, b"/pub|n5|", "EACCES"),  # needs write and ownership
        (5, 0, Op.SET_PERMS, b"missing|n5|", "ENOENT"),
        (0, 0, Op.SET_PERMS, b"/pub|n32752|", "ENOENT"),  # owner must exist
        (0, 0, Op.SET_PERMS, b"/pub|n0|r32752|", OK),  # other entries need not
        (0, 0, Op.SET_PERMS, b"/pub|n5|", OK),  # privileged: any owner
        (5, 0, Op.SET_PERMS, b"/pub|n5|r6|", OK),
        (0, 0, Op.SET_PERMS, b"@introduceDomain|n0|r5|", OK),
        (0, 0, Op.SET_PERMS, b"@bogus|n0|", "EINVAL"),
        (5, 0, Op.SET_PERMS, b"@releaseDomain|n5|", "EACCES"),
        (0, 0, Op.GET_PERMS, b"@introduceDomain|", "EINVAL"),
    ],
    "transactions": [
        (0, 0, Op.TRANSACTION_START, b"|", b"1|"),
        (0, 0, Op.TRANSACTION_START, b"", b"2|"),  # payload ignored
        (0, 1, Op.TRANSACTION_START, b"|", "EBUSY"),  # no nesting
        (0, 9, Op.TRANSACTION_START, b"|", "ENOENT"),
        (0, 1, Op.WRITE, b"/t|in", OK),
        (0, 1, Op.READ, b"/t|", b"in"),
        (0, 0, Op.READ, b"/t|", "ENOENT"),  # isolated until commit
        (0, 2, Op.READ, b"/t|", "ENOENT"),
        (0, 1, Op.TRANSACTION_END, b"X|", "EINVAL"),  # exactly T or F ...
        (0, 1, Op.TRANSACTION_END, b"T", "EINVAL"),
        (0, 1, Op.TRANSACTION_END, b"T|", OK),  # ... and the transaction stayed open
        (0, 0, Op.READ, b"/t|", b"in"),
        (0, 1, Op.TRANSACTION_END, b"T|", "ENOENT"),
        (0, 0, Op.TRANSACTION_END, b"T|", "ENOENT"),  # there is no transaction 0
        (0, 0, Op.TRANSACTION_END, b"X|", "EINVAL"),  # argument checked first
        (0, 9, Op.TRANSACTION_END, b"X|", "ENOENT"),  # unknown tx id checked before
        (0, 9, Op.WRITE, b"/t|x", "ENOENT"),
        (0, 9, Op.WATCH, b"/t|tok|", OK),  # WATCH ignores tx_id
        (0, 2, Op.TRANSACTION_END, b"F|", OK),
        (0, 0, Op.TRANSACTION_START, b"|", b"3|"),
        (0, 3, Op.READ, b"/t|", b"in"),
        (0, 0, Op.WRITE, b"/t|outside", OK),
        (0, 3, Op.TRANSACTION_END, b"T|", "EAGAIN"),  # read node changed
        (0, 0, Op.TRANSACTION_START, b"|", b"4|"),
        (0, 4, Op.WRITE, b"/t|mine", OK),
        (0, 0, Op.WRITE, b"/pub|unrelated", OK),
        (0, 4, Op.TRANSACTION_END, b"T|", OK),  # unrelated write: no conflict
        (0, 0, Op.READ, b"/t|", b"mine"),
        (0, 4, Op.GET_DOMAIN_PATH, b"3|", "ENOENT"),
    ],
    "transaction quotas (>= instead of cxenstored's >)": [
        *[(5, 0, Op.TRANSACTION_START, b"|", b"%d|" % i) for i in range(1, 11)],
        (5, 0, Op.TRANSACTION_START, b"|", "ENOSPC"),
        (0, 0, Op.TRANSACTION_START, b"|", b"1|"),  # privileged: exempt
        (5, 10, Op.TRANSACTION_END, b"F|", OK),
        (5, 0, Op.TRANSACTION_START, b"|", b"11|"),
    ],
    "watches": [
        (0, 0, Op.WATCH, b"/w|tok|", OK),
        (0, 0, Op.WATCH, b"/w|tok|", "EEXIST"),
        (0, 0, Op.WATCH, b"/w|tok2|", OK),
        (0, 0, Op.WATCH, b"/w|tok|3|", "EINVAL"),  # no depth argument (4.17)
        (0, 0, Op.WATCH, b"/w|", "EINVAL"),
        (0, 0, Op.WATCH, b"/w//x|t|", "EINVAL"),
        (0, 0, Op.WATCH, b"@anything/goes here|t|", OK),  # @ names: any syntax
        (0, 0, Op.UNWATCH, b"/w|tok|", OK),
        (0, 0, Op.UNWATCH, b"/w|tok|", "ENOENT"),
        (5, 0, Op.WATCH, b"rel|t|", OK),
        (5, 0, Op.UNWATCH, b"/local/domain/5/rel|t|", OK),  # compared resolved
        (0, 0, Op.RESET_WATCHES, b"|", OK),
        (0, 0, Op.UNWATCH, b"/w|tok2|", "ENOENT"),
    ],
    "privileged operations": [
        (5, 0, Op.INTRODUCE, b"9|1|2|", "EACCES"),
        (5, 0, Op.RELEASE, b"6|", "EACCES"),
        (5, 0, Op.IS_DOMAIN_INTRODUCED, b"5|", "EACCES"),
        (5, 0, Op.RESUME, b"5|", "EACCES"),
        (5, 0, Op.SET_TARGET, b"5|6|", "EACCES"),
        (5, 0, Op.CONTROL, b"print|x|", "EACCES"),
        (5, 0, Op.GET_FEATURE, b"", "EACCES"),
        (5, 0, Op.SET_QUOTA, b"nodes|1|", "EACCES"),
        (5, 9, Op.INTRODUCE, b"9|1|2|", "EACCES"),  # privilege checked before tx id
        (5, 0, Op.ERROR, b"", "ENOSYS"),
        (0, 0, Op.WATCH_EVENT, b"", "ENOSYS"),
        (0, 0, Op.ERROR, b"", "ENOSYS"),
        (0, 0, 20, b"", "ENOSYS"),
        (0, 0, Op.INVALID, b"", "ENOSYS"),
        (0, 0, 27, b"", "ENOSYS"),
        (0, 9, 99, b"", "ENOSYS"),  # type checked before tx id
    ],
    "domains": [
        (0, 0, Op.IS_DOMAIN_INTRODUCED, b"5|", b"T|"),
        (0, 0, Op.IS_DOMAIN_INTRODUCED, b"0|", b"T|"),
        (0, 0, Op.IS_DOMAIN_INTRODUCED, b"32752|", b"T|"),  # DOMID_SELF
        (0, 0, Op.IS_DOMAIN_INTRODUCED, b"7|", b"F|"),
        (0, 0, Op.INTRODUCE, b"7|1|0|", "EINVAL"),  # port must be > 0
        (0, 0, Op.INTRODUCE, b"7|1|", "EINVAL"),
        (0, 0, Op.INTRODUCE, b"32752|1|5|", "EINVAL"),  # reserved domid
        (0, 0, Op.INTRODUCE, b"0|1|5|", OK),  # dom0 is always introduced
        (0, 0, Op.INTRODUCE, b"7|-4096|5|", OK),  # gfn is signed
        (0, 0, Op.INTRODUCE, b"7|1|6|", OK),  # again: rebind
        (0, 0, Op.IS_DOMAIN_INTRODUCED, b"7|", b"T|"),
        (0, 0, Op.RESUME, b"0|", "EINVAL"),
        (0, 0, Op.RESUME, b"8|", "ENOENT"),
        (0, 0, Op.RESUME, b"7|", OK),
        (0, 0, Op.SET_TARGET, b"7|8|", "ENOENT"),
        (0, 0, Op.SET_TARGET, b"7|", "EINVAL"),
        (0, 0, Op.SET_TARGET, b"6|5|", OK),
        (6, 0, Op.WRITE, b"/local/domain/5/by6|x", OK),  # 6 now acts as owner of 5's nodes
        (6, 0, Op.GET_PERMS, b"/local/domain/5/by6|", b"n6|"),
        (0, 0, Op.RELEASE, b"0|", "EINVAL"),
        (0, 0, Op.RELEASE, b"8|", "ENOENT"),
        (0, 0, Op.RELEASE, b"7|", OK),
        (0, 0, Op.IS_DOMAIN_INTRODUCED, b"7|", b"F|"),
        (0, 0, Op.RELEASE, b"7|", "ENOENT"),
        (0, 0, Op.RELEASE, b"5|", OK),  # removes every node 5 owns
        (0, 0, Op.READ, b"/local/domain/5|", "ENOENT"),
        (0, 0, Op.READ, b"/local/domain/6|", b""),
    ],
    "features (cxenstored >= 4.21)": [
        (0, 0, Op.GET_FEATURE, b"", b"3|"),
        (0, 0, Op.GET_FEATURE, b"5|", b"3|"),
        (0, 0, Op.GET_FEATURE, b"32752|", "ENOENT"),
        (0, 0, Op.SET_FEATURE, b"5|1|", "EBUSY"),  # already introduced
        (0, 0, Op.SET_FEATURE, b"9|4|", "EINVAL"),  # unsupported bit
        (0, 0, Op.SET_FEATURE, b"9|1|", OK),
        (0, 0, Op.GET_FEATURE, b"9|", b"1|"),
        (0, 0, Op.SET_FEATURE, b"9|", "EINVAL"),
    ],
    "quotas via GET/SET_QUOTA (cxenstored >= 4.22)": [
        (
            0,
            0,
            Op.GET_QUOTA,
            b"",
            b"nodes watches outstanding memory soft-memory transactions transaction-nodes "
            b"node-permissions path-max node-size|",
        ),
        (0, 0, Op.GET_QUOTA, b"nodes|", b"1000|"),
        (0, 0, Op.GET_QUOTA, b"soft-memory|", b"2097152|"),
        (0, 0, Op.GET_QUOTA, b"bogus|", "EINVAL"),
        (0, 0, Op.GET_QUOTA, b"5|nodes|", b"1000|"),
        (0, 0, Op.SET_QUOTA, b"5|nodes|3|", OK),
        (0, 0, Op.GET_QUOTA, b"5|nodes|", b"3|"),
        (0, 0, Op.GET_QUOTA, b"6|nodes|", b"1000|"),
        (5, 0, Op.WRITE, b"a|", OK),  # 5 owns /local/domain/5 and a
        (5, 0, Op.WRITE, b"b|", OK),
        (5, 0, Op.WRITE, b"c|", "ENOSPC"),
        (0, 0, Op.SET_QUOTA, b"nodes|2|", OK),
        (6, 0, Op.WRITE, b"a|", OK),
        (6, 0, Op.WRITE, b"b|", "ENOSPC"),
        (0, 0, Op.SET_QUOTA, b"nodes|0|", OK),  # 0 disables the check
        (6, 0, Op.WRITE, b"b|", OK),
        (0, 0, Op.SET_QUOTA, b"nodes|", "EINVAL"),
        (0, 0, Op.SET_QUOTA, b"32752|nodes|1|", "ENOENT"),
        (0, 0, Op.SET_QUOTA, b"x|nodes|1|", "EINVAL"),
    ],
    "node quotas": [
        (0, 0, Op.CONTROL, b"quota|set|nodes|3|", OK),
        (5, 0, Op.WRITE, b"a|", OK),
        (5, 0, Op.WRITE, b"b|", OK),
        (5, 0, Op.WRITE, b"c|", "ENOSPC"),
        (5, 0, Op.MKDIR, b"x/y|", "ENOSPC"),
        (5, 0, Op.WRITE, b"a|update is fine", OK),
        (5, 0, Op.RM, b"b|", OK),
        (5, 0, Op.WRITE, b"c|", OK),
        (0, 0, Op.WRITE, b"/local/domain/5/by0|", OK),  # privileged: exempt
        (0, 0, Op.CONTROL, b"quota|set|nodes|1000|", OK),
        (0, 0, Op.CONTROL, b"quota|set|node-size|100|", OK),
        (5, 0, Op.WRITE, b"n|" + b"z" * 67, OK),  # 24 + 8 + 67 = 99
        (5, 0, Op.WRITE, b"n|" + b"z" * 68, "ENOSPC"),  # 100 >= 100
        (5, 0, Op.WRITE, b"n|" + b"z" * 58, OK),
        (5, 0, Op.SET_PERMS, b"n|n5|r1|", OK),  # 24 + 16 + 58 = 98
        (5, 0, Op.SET_PERMS, b"n|n5|r1|r2|", "ENOSPC"),
        (5, 0, Op.WRITE, b"n/a|", "ENOSPC"),  # the parent's child list grows to 100
        (0, 0, Op.WRITE, b"/local/domain/5/n|" + b"z" * 500, OK),
    ],
    "watch quota (E2BIG in 4.17)": [
        (0, 0, Op.CONTROL, b"quota|set|watches|2|", OK),
        (5, 0, Op.WATCH, b"a|1|", OK),
        (5, 0, Op.WATCH, b"a|2|", OK),
        (5, 0, Op.WATCH, b"a|3|", "E2BIG"),
    ],
    "directory_part": [
        (0, 0, Op.WRITE, b"/d/aa|", OK),
        (0, 0, Op.WRITE, b"/d/bbb|", OK),
        (0, 0, Op.DIRECTORY_PART, b"/d|0|", b"GEN|aa|bbb||"),
        (0, 0, Op.DIRECTORY_PART, b"/d|3|", b"GEN|bbb||"),
        (0, 0, Op.DIRECTORY_PART, b"/d|1|", b"GEN|a|bbb||"),  # byte offset, even mid-name
        (0, 0, Op.DIRECTORY_PART, b"/d|7|", b"GEN||"),
        (0, 0, Op.DIRECTORY_PART, b"/d|100|", b"GEN||"),
        (0, 0, Op.DIRECTORY_PART, b"/d|", "EINVAL"),
        (0, 0, Op.DIRECTORY_PART, b"/d|0|x|", "EINVAL"),
        (0, 0, Op.DIRECTORY_PART, b"/nope|0|", "ENOENT"),
        (5, 0, Op.DIRECTORY_PART, b"/d|0|", "EACCES"),
    ],
    "control": [
        (0, 0, Op.CONTROL, b"help|", HELP),
        (0, 0, Op.CONTROL, b"help|x|", "EINVAL"),
        (0, 0, Op.CONTROL, b"check|", OK),
        (0, 0, Op.CONTROL, b"log|on|", OK),
        (0, 0, Op.CONTROL, b"log|maybe|", "EINVAL"),
        (0, 0, Op.CONTROL, b"print|hello|", OK),
        (0, 0, Op.CONTROL, b"print|", "EINVAL"),
        (0, 0, Op.CONTROL, b"bogus|", "EINVAL"),
        (0, 0, Op.CONTROL, b"", "EINVAL"),
        (0, 0, Op.CONTROL, b"quota|set|bogus|3|", "EINVAL"),
        (0, 0, Op.CONTROL, b"quota|set|nodes|0x10|", "EINVAL"),
        (0, 0, Op.CONTROL, b"quota|set|nodes|-1|", "EINVAL"),
        (0, 0, Op.CONTROL, b"quota|9|", "ENOENT"),  # not introduced
        (0, 0, Op.CONTROL, b"quota|1|2|", "EINVAL"),
        (
            0,
            0,
            Op.CONTROL,
            b"quota|5|",
            b"Domain 5:\nnodes           :        1\nwatches         :        0\ntransactions    :        0\n"
            b"outstanding     :        0\nmemory          :       47\n|",  # /local/domain/5: 24+8+15 (cxenstored)
        ),
        (0, 0, Op.CONTROL, b"quota-soft|", b"Quota settings:\nmemory           :  2097152 Total Xenstore memory per domain (warning level)\n|"),
        (0, 0, Op.CONTROL, b"quota-soft|set|memory|100|", OK),
        (0, 0, Op.CONTROL, b"quota-soft|set|nodes|100|", "EINVAL"),
        (0, 0, Op.CONTROL, b"live-update|-s|", b"Not in live-update session.|"),
    ],
}


def run_scenario(name: str) -> None:
    engine, conns = setup_engine()
    for i, (who, tx, op, payload, expected) in enumerate(SCENARIOS[name]):
        out = engine.handle(conns[who], Packet(op, 100 + i, tx, payload.replace(b"|", b"\0")))
        replies = [p for c, p in out if c is conns[who] and p.op != Op.WATCH_EVENT]
        assert len(replies) == 1, (i, out)
        reply = replies[0]
        assert (reply.req_id, reply.tx_id) == (100 + i, tx)  # both echoed, errors too
        if isinstance(expected, str):
            got = (reply.op, reply.payload)
            assert got == (Op.ERROR, expected.encode() + b"\0"), (i, SCENARIOS[name][i], got)
        else:
            if not isinstance(expected, Raw):
                expected = expected.replace(b"|", b"\0")
            got = (reply.op, reply.payload)
            if expected.startswith(b"GEN\0"):  # generation numbers are ours to choose
                gen, _, rest = reply.payload.partition(b"\0")
                assert gen.isdigit(), reply
                got, expected = (reply.op, rest), expected[4:]
            assert got == (op, expected), (i, SCENARIOS[name][i], reply)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(name):
    run_scenario(name)
