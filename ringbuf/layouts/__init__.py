"""Xen's shared-page layouts as ctypes structures (x86_64 ABI, little-endian)."""

from .blkif import BLKIF_RING as BLKIF_RING
from .blkif import BlkifRequest as BlkifRequest
from .blkif import BlkifRequestDiscard as BlkifRequestDiscard
from .blkif import BlkifRequestIndirect as BlkifRequestIndirect
from .blkif import BlkifRequestSegment as BlkifRequestSegment
from .blkif import BlkifResponse as BlkifResponse
from .blkif import blkif_request_variant as blkif_request_variant
from .console import XenconsInterface as XenconsInterface
from .netif import NETIF_CTRL_RING as NETIF_CTRL_RING
from .netif import NETIF_RX_RING as NETIF_RX_RING
from .netif import NETIF_TX_RING as NETIF_TX_RING
from .netif import NetifCtrlRequest as NetifCtrlRequest
from .netif import NetifCtrlResponse as NetifCtrlResponse
from .netif import NetifExtraInfo as NetifExtraInfo
from .netif import NetifRxRequest as NetifRxRequest
from .netif import NetifRxResponse as NetifRxResponse
from .netif import NetifTxRequest as NetifTxRequest
from .netif import NetifTxResponse as NetifTxResponse
from .sring import XEN_PAGE_SIZE as XEN_PAGE_SIZE
from .sring import SringHeader as SringHeader
from .xenstore import XenstoreDomainInterface as XenstoreDomainInterface
