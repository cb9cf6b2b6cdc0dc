"""Toolstack steps (what libxl does for a domain), over the hypervisor
service and XenStore.  :mod:`.introduce`: give a new guest its XenStore ring."""

from .introduce import GuestStore as GuestStore
from .introduce import introduce_guest as introduce_guest
from .introduce import release_guest as release_guest
from .introduce import write_domain_tree as write_domain_tree

__all__ = ["GuestStore", "introduce_guest", "release_guest", "write_domain_tree"]
