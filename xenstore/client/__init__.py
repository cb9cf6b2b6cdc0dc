"""XenStore clients: async (trio) and blocking; see :mod:`xenstore` for the API.

This package's ``__init__`` imports nothing so that the blocking client
(used by the ``xenstore-*`` tools) never pulls in trio.
"""
