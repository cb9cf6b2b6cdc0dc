"""Header of a generic shared ring page (``struct <name>_sring``, io/ring.h).

Defined next to the ring logic in ``ringbuf.ring``; re-exported here so all
layouts can be found in one package.
"""

from ..ring import SRING_HEADER_SIZE as SRING_HEADER_SIZE
from ..ring import XEN_PAGE_SIZE as XEN_PAGE_SIZE
from ..ring import SringHeader as SringHeader
