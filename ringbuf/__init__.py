"""Shared-memory rings, grant tables, event channels and the hypervisor service.

Each Xen domain is an ordinary Linux process; the ``uxen-hypervisor`` service
is the single authority for domains, their memory, grant tables and event
channels.  See the submodules for details.
"""

# Event channels
from .evtchn import VIRQ_DOM_EXC as VIRQ_DOM_EXC
from .evtchn import EventChannel as EventChannel
from .evtchn import PeerClosedError as PeerClosedError
from .evtchn import eventfd_pair as eventfd_pair

# Domain memory
from .memory import PAGE_SIZE as PAGE_SIZE
from .memory import DomainMemory as DomainMemory
from .memory import FrameAllocator as FrameAllocator

# Grant tables
from .grants import CopySegment as CopySegment
from .grants import CopySide as CopySide
from .grants import GrantEntry as GrantEntry
from .grants import GrantError as GrantError
from .grants import GrantTableView as GrantTableView

# Hypervisor service client
from .hypervisor import DOMID_SELF as DOMID_SELF
from .hypervisor import DomainInfo as DomainInfo
from .hypervisor import GrantMapping as GrantMapping
from .hypervisor import HypervisorClient as HypervisorClient
from .hypervisor import HypervisorError as HypervisorError
from .hypervisor import open_hypervisor as open_hypervisor

# Generic shared rings (ring.h)
from .ring import RING_IDX_MASK as RING_IDX_MASK
from .ring import BackRing as BackRing
from .ring import FrontRing as FrontRing
from .ring import RingFullError as RingFullError
from .ring import RingIndexError as RingIndexError
from .ring import RingStatistics as RingStatistics
from .ring import RingTypes as RingTypes
from .ring import SharedRing as SharedRing
from .ring import define_ring_types as define_ring_types
from .ring import ring_size as ring_size

# Byte rings (xenstore and console pages)
from .byte_ring import ByteQueue as ByteQueue
from .byte_ring import ByteRing as ByteRing
from .byte_ring import ByteRingRole as ByteRingRole
from .byte_ring import ConsoleRing as ConsoleRing
from .byte_ring import XenstoreRing as XenstoreRing

# Ring types of the split drivers
from .layouts import BLKIF_RING as BLKIF_RING
from .layouts import NETIF_CTRL_RING as NETIF_CTRL_RING
from .layouts import NETIF_RX_RING as NETIF_RX_RING
from .layouts import NETIF_TX_RING as NETIF_TX_RING
