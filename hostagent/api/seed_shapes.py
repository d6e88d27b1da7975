"""Upstream (form-vm-metrics) response shapes, for callers written against the seeds. Pure.

`GET /get` answers one ``SystemMetrics`` object (seed 000, task 1.2)::

    {"timestamp": <unix s of the period end>, "instance_id", "account_id": <owner or null>,
     "cpu": {"usage_pct", "cores", "cpu_seconds"},
     "memory": {"total", "used", "usage_pct"},            bytes
     "disks": [{"device", "total", "used", "read_bytes", "write_bytes"}],
     "network": {"bytes_sent", "bytes_recv"},              bytes in the last period
     "gpus": [{"address", "model", "utilization_pct", "memory_used"}],
     "load": {"load1": null, "load5": null, "load15": null}}   a host cannot see a guest's load

Unknown readings are null. `/api/v1/health/status` answers upstream's ``{"status": "ok",
"uptime_seconds", "version"}`` when healthy ("degraded" otherwise), plus our components.
"""

from __future__ import annotations

from typing import Any

from hostagent.api.view import InstanceView


def system_metrics(iv: InstanceView) -> dict[str, Any]:
    """One instance as upstream's SystemMetrics."""
    u, s = iv.usage, iv.sample
    disks = [] if s is None else [
        {"device": d.target, "total": d.capacity_bytes, "used": d.allocation_bytes,
         "read_bytes": d.rd_bytes, "write_bytes": d.wr_bytes} for d in s.disks]
    gpus = [] if s is None else [
        {"address": g.address, "model": g.model, "utilization_pct": g.util_percent,
         "memory_used": g.fb_used_bytes} for g in s.gpus]
    return {
        "timestamp": (u.period_end_ns if u is not None else iv.updated_wall_ns) // 10**9,
        "instance_id": iv.instance_id,
        "account_id": iv.owner.user_id if iv.owner else None,
        "cpu": {"usage_pct": u.cpu_percent_avg if u else None,
                "cores": u.vcpus if u else (s.vcpus if s else None),
                "cpu_seconds": u.cpu_seconds if u else None},
        "memory": {"total": u.memory_alloc_bytes if u else (s.memory_alloc_bytes if s else None),
                   "used": u.memory_bytes if u else None,
                   "usage_pct": u.memory_percent if u else None},
        "disks": disks,
        "network": {"bytes_sent": u.net_egress_bytes if u else None,
                    "bytes_recv": u.net_ingress_bytes if u else None},
        "gpus": gpus,
        "load": {"load1": None, "load5": None, "load15": None},
    }
