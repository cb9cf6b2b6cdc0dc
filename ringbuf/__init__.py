"""Shared-memory rings, grant tables, event channels and the hypervisor service.

Each Xen domain is an ordinary Linux process; the ``uxen-hypervisor`` service
is the single authority for domains, their memory, grant tables and event
channels.  See the submodules for details.
"""

from .evtchn import VIRQ_DOM_EXC as VIRQ_DOM_EXC
from .evtchn import EventChannel as EventChannel
from .evtchn import PeerClosedError as PeerClosedError
from .evtchn import eventfd_pair as eventfd_pair
