"""The hypervisor service (``uxen-hypervisor``) and its client."""

from .client import ENV_FD as ENV_FD
from .client import ENV_SOCKET as ENV_SOCKET
from .client import HypervisorClient as HypervisorClient
from .client import HypervisorError as HypervisorError
from .client import open_hypervisor as open_hypervisor
from .domains import DOMID_SELF as DOMID_SELF
from .domains import DomainInfo as DomainInfo
from .mapping import GrantMapping as GrantMapping
from .ports import PortState as PortState
from .service import HypervisorService as HypervisorService
from .service import ServiceLimits as ServiceLimits
