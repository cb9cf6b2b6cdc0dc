"""A ``uxen-hypervisor`` subprocess for tests (the guest and ringbuf fixtures)."""

from __future__ import annotations

from ringbuf.hypervisor.main import service_process as hypervisor_service

__all__ = ["hypervisor_service"]
