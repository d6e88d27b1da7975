"""Prometheus exposition of the view: per-instance gauges/counters, pass health, emission.

Labels are bounded: `instance` and `owner` take one value per running instance (at most one
series set per domain on this host), `sink` one per configured sink, `route` one per route
template (never the raw path), `code` one per status class.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from hostagent.api.pass_gate import PassGate
from hostagent.api.view import ApiView

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BREAKER_STATES = ("closed", "open", "half_open")


class ViewCollector(Collector):
    """Reads the current snapshot at scrape time (nothing is kept between scrapes)."""

    def __init__(self, view: ApiView, api_counters: Mapping[tuple[str, str], int],
                 gate: PassGate | None = None) -> None:
        self.view = view
        self.api_counters = api_counters
        self.gate = gate

    def collect(self) -> Iterator[Metric]:
        """Yield every family."""
        yield from self._instances()
        yield from self._passes()
        yield from self._emission()
        yield from self._rules()
        yield from self._owners()
        yield from self._tail()
        req = CounterMetricFamily("hostagent_api_requests", "API requests by route and class",
                                  labels=["route", "code"])
        for (route, code), n in sorted(self.api_counters.items()):
            req.add_metric([route, code], n)
        yield req
        if self.gate is not None:
            g = self.gate
            for name, doc, value in (
                ("hostagent_api_deferred_requests",
                 "requests that waited for a collector pass to end", g.deferred_requests),
                ("hostagent_api_deferred_seconds", "time requests spent waiting for passes",
                 g.deferred_s),
                ("hostagent_api_deferral_timeouts",
                 "requests served before the pass ended (api.yield_to_pass_max_s reached)",
                 g.timed_out_waits),
                ("hostagent_pass_drain_seconds",
                 "time passes waited for API requests in flight before accounting", g.drain_s)):
                yield CounterMetricFamily(name, doc, value=value)

    def _instances(self) -> Iterator[Metric]:
        snap = self.view.snapshot
        lab = ["instance", "owner"]
        g: dict[str, GaugeMetricFamily] = {
            name: GaugeMetricFamily(f"hostagent_instance_{name}", doc, labels=lab)
            for name, doc in [
                ("vcpus", "allocated vCPUs"),
                ("memory_alloc_bytes", "allocated memory"),
                ("memory_used_bytes", "guest memory in use (last period)"),
                ("cpu_percent", "average CPU use in the last period, % of allocation"),
                ("storage_bytes", "disk allocation"),
                ("gpu_util_percent", "average GPU utilisation in the last period"),
                ("last_update_timestamp_seconds", "wall time of the last reading"),
            ]}
        c: dict[str, CounterMetricFamily] = {
            name: CounterMetricFamily(f"hostagent_instance_{name}", doc, labels=lab)
            for name, doc in [
                ("cpu_seconds", "CPU time of the current incarnation"),
                ("network_egress_bytes", "bytes sent by the guest (all NICs)"),
                ("network_ingress_bytes", "bytes received by the guest (all NICs)"),
                ("disk_read_bytes", "bytes read from disks"),
                ("disk_write_bytes", "bytes written to disks"),
            ]}
        for iid, iv in snap.instances.items():
            labels = [iid, iv.owner.user_id if iv.owner else ""]
            s, u = iv.sample, iv.usage
            g["last_update_timestamp_seconds"].add_metric(labels, iv.updated_wall_ns / 1e9)
            if s is not None:
                g["vcpus"].add_metric(labels, s.vcpus)
                g["memory_alloc_bytes"].add_metric(labels, s.memory_alloc_bytes)
                if s.cpu_ns is not None:
                    c["cpu_seconds"].add_metric(labels, s.cpu_ns / 1e9)
                if s.nics:
                    c["network_egress_bytes"].add_metric(
                        labels, sum(n.guest_tx_bytes for n in s.nics))
                    c["network_ingress_bytes"].add_metric(
                        labels, sum(n.guest_rx_bytes for n in s.nics))
                rd = [d.rd_bytes for d in s.disks if d.rd_bytes is not None]
                wr = [d.wr_bytes for d in s.disks if d.wr_bytes is not None]
                if rd:
                    c["disk_read_bytes"].add_metric(labels, sum(rd))
                if wr:
                    c["disk_write_bytes"].add_metric(labels, sum(wr))
            if u is not None:
                if u.memory_bytes is not None:
                    g["memory_used_bytes"].add_metric(labels, u.memory_bytes)
                if u.cpu_percent_avg is not None:
                    g["cpu_percent"].add_metric(labels, u.cpu_percent_avg)
                if u.storage_bytes is not None:
                    g["storage_bytes"].add_metric(labels, u.storage_bytes)
                if u.gpu_util_avg is not None:
                    g["gpu_util_percent"].add_metric(labels, u.gpu_util_avg)
        yield from g.values()
        yield from c.values()

    def _rules(self) -> Iterator[Metric]:
        if self.view.rules_health is None:
            return
        h = self.view.rules_health()
        by = GaugeMetricFamily("hostagent_threshold_rules", "threshold rules in force by layer",
                               labels=["source"])
        for src, n in sorted(h.get("by_source", {}).items()):
            by.add_metric([src], n)
        yield by
        yield CounterMetricFamily("hostagent_threshold_rule_loads_refused",
                                  "rule loads refused (the previous set stayed in force)",
                                  value=h.get("failures", 0))
        yield GaugeMetricFamily("hostagent_threshold_rules_load_error",
                                "1 while the last rules load was refused", value=int(
                                    bool(h.get("last_error"))))
        if h.get("central_age_s") is not None:
            yield GaugeMetricFamily("hostagent_threshold_rules_central_age_seconds",
                                    "age of the central rule set in force (stale-while-error)",
                                    value=h["central_age_s"])

    def _passes(self) -> Iterator[Metric]:
        p = self.view.snapshot.pass_info
        yield GaugeMetricFamily("hostagent_instances", "running instances seen by the last pass",
                                value=len(self.view.snapshot.instances))
        yield CounterMetricFamily("hostagent_passes", "collection passes", value=p.passes)
        yield CounterMetricFamily("hostagent_pass_failures", "passes that did not commit",
                                  value=p.failed_passes)
        errors = CounterMetricFamily(
            "hostagent_domain_read_errors",
            "per-domain read errors (that domain's readings missing), by read step",
            labels=["reason"])
        for reason, n in sorted(p.read_errors_total.items()):
            errors.add_metric([reason], n)
        yield errors
        if p.duration_s is not None:
            yield GaugeMetricFamily("hostagent_pass_duration_seconds", "last pass duration",
                                    value=p.duration_s)
        if p.unattributed_cpu_s is not None:
            yield CounterMetricFamily(
                "hostagent_unattributed_cpu_seconds",
                "CPU of the VMs' parent cgroup (v2) that no usage event billed: billing "
                "completeness of the whole host, near zero when complete",
                value=p.unattributed_cpu_s)
        if p.last_ok_wall_ns is not None:
            yield GaugeMetricFamily("hostagent_last_committed_pass_timestamp_seconds",
                                    "start of the last committed pass",
                                    value=p.last_ok_wall_ns / 1e9)

        if self.view.pass_settings is not None:
            settings = self.view.pass_settings()
            yield GaugeMetricFamily("hostagent_pass_interval_seconds",
                                    "collector.interval_s: seconds between passes",
                                    value=settings["interval_s"])
            yield GaugeMetricFamily("hostagent_pass_timeout_seconds",
                                    "collector.pass_timeout_s: a pass's deadline",
                                    value=settings["timeout_s"])

    def _owners(self) -> Iterator[Metric]:
        if self.view.owners_health is None:
            return
        h = self.view.owners_health()
        lookups = CounterMetricFamily("hostagent_owner_lookups",
                                      "owner lookups at the account service by result",
                                      labels=["result"])
        for result in ("ok", "not_found", "failed"):
            lookups.add_metric([result], float(h.get(f"lookup_{result}", 0)))
        refreshes = CounterMetricFamily("hostagent_owner_refreshes",
                                        "owner index refreshes by result", labels=["result"])
        for result in ("ok", "failed"):
            refreshes.add_metric([result], float(h.get(f"refresh_{result}", 0)))
        yield lookups
        yield refreshes

    def _tail(self) -> Iterator[Metric]:
        if self.view.tail_health is None:
            return
        h = self.view.tail_health()
        yield CounterMetricFamily("hostagent_light_samples",
                                  "light samples taken (periodic, at a VM's end, lifecycle)",
                                  value=float(h.get("light_samples", 0)))
        yield CounterMetricFamily("hostagent_light_sample_errors", "light samples that failed",
                                  value=float(h.get("light_sample_errors", 0)))
        yield CounterMetricFamily(
            "hostagent_vm_ends_seen",
            "VM cgroups seen emptying (cgroup.events populated 0), each read at once",
            value=float(h.get("vm_ends_seen", 0)))
        yield GaugeMetricFamily(
            "hostagent_vm_ends_watched",
            "1 while the end of every VM is watched (light samples every "
            "watched_sample_interval_s), 0 while some is not (every sample_interval_s)",
            value=1.0 if h.get("vm_ends_watched") else 0.0)
        closeouts = CounterMetricFamily(
            "hostagent_closeouts", "ended QEMU processes closed out by a pass, by reason",
            labels=["reason"])
        for reason, n in sorted(h.get("closeouts", {}).items()):
            closeouts.add_metric([reason], float(n))
        yield closeouts
        yield GaugeMetricFamily(
            "hostagent_domain_xml_changes_heard",
            "1 while libvirt's XML change events are heard (domain XML re-read when it changed, "
            "and hourly), 0 while not (re-read every 600 s)",
            value=1.0 if h.get("xml_changes_heard") else 0.0)
        reads = CounterMetricFamily(
            "hostagent_domain_xml_reads",
            "domain XML reads by why: new, reshaped (new process, hot-plug), changed, periodic",
            labels=["reason"])
        for reason, n in sorted(h.get("domain_xml_reads", {}).items()):
            reads.add_metric([reason], float(n))
        yield reads

    def _emission(self) -> Iterator[Metric]:
        if self.view.emission_metrics is None:
            return
        m: Any = self.view.emission_metrics()
        lab = ["sink"]
        fams = {
            n: CounterMetricFamily(f"hostagent_events_{n}", f"events {n} per sink", labels=lab)
            for n in ("published", "failed", "retried", "rejected", "dead_lettered")}
        depth = GaugeMetricFamily("hostagent_outbox_depth", "events pending per sink", labels=lab)
        age = GaugeMetricFamily("hostagent_outbox_oldest_pending_age_seconds",
                                "age of the oldest pending event", labels=lab)
        dead = GaugeMetricFamily("hostagent_outbox_dead_letters",
                                 "dead letters kept per sink (replay re-queues them)", labels=lab)
        breaker = GaugeMetricFamily("hostagent_sink_breaker_state",
                                    "1 for the breaker's current state", labels=["sink", "state"])
        lat = HistogramMetricFamily("hostagent_sink_latency_seconds", "delivery latency",
                                    labels=lab)
        for name, s in sorted(m.sinks.items()):
            for n, fam in fams.items():
                fam.add_metric([name], getattr(s, n))
            depth.add_metric([name], s.depth)
            dead.add_metric([name], s.dead_letters)
            if s.oldest_pending_age_s is not None:
                age.add_metric([name], s.oldest_pending_age_s)
            for st in BREAKER_STATES:
                breaker.add_metric([name, st], 1.0 if s.breaker_state == st else 0.0)
            buckets = [("+Inf" if le == float("inf") else repr(float(le)), n)
                       for le, n in s.latency_buckets]
            lat.add_metric([name], buckets, s.latency_sum_s)
        yield from fams.values()
        yield from (depth, age, dead, breaker, lat)
        yield GaugeMetricFamily("hostagent_outbox_used_bytes", "outbox bytes in use",
                                value=m.store_used_bytes)
        if m.store_max_bytes is not None:
            yield GaugeMetricFamily("hostagent_outbox_max_bytes", "outbox.max_bytes: the cap",
                                    value=m.store_max_bytes)


def exposition(view: ApiView, api_counters: Mapping[tuple[str, str], int],
               gate: PassGate | None = None) -> bytes:
    """The text exposition of everything (a fresh registry per scrape: no global state)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ViewCollector(view, api_counters, gate))
    return generate_latest(reg)
