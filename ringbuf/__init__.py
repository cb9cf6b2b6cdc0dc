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
