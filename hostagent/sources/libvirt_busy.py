"""Domains that another libvirt client kept busy during the pass's NOWAIT bulk call.

With `VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT` libvirt does not wait for a domain's job lock:
when another client holds it at that moment (`virsh domstats`, a Prometheus exporter, an
operator's `hostagent top`), the domain comes back without every figure that needs its QEMU
monitor: the balloon's memory stats, the disks' I/O bytes and their sizes. On the lab, three
clients polling in a loop saw that in 27 % of their calls; without NOWAIT, in none.

Such a domain is recognised by `balloon.current` without `balloon.rss`: libvirt reports the
first from the domain's definition, the second (the QEMU process's RSS) whenever it held the
job. It is asked again, alone and still with NOWAIT, after a pause of a few milliseconds (the
other client's query holds the job for about one); what is still busy after the last try goes
out as the bulk call gave it, and the pass defers its missing counters to the next event.
Waiting for the lock instead would let one stuck QEMU hold the pass until the call's deadline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import libvirt

from hostagent.accounting.assemble import job_skipped
from hostagent.errors import SourceUnavailable
from hostagent.source_model import DomainStats

log = logging.getLogger(__name__)

# Pauses before each new try of the still-busy domains (seconds, in the worker thread).
RETRY_PAUSES_S = (0.002, 0.01)


def ask_busy_again(
    domains: tuple[DomainStats, ...],
    ask: Callable[[list[Any]], Sequence[DomainStats]],
    *,
    pauses_s: Sequence[float] = RETRY_PAUSES_S,
    sleep: Callable[[float], object] = time.sleep,
) -> tuple[DomainStats, ...]:
    """`domains` with each busy one replaced by a complete answer of a later try, if any.

    `ask(handles)` is one `domainListGetStats` of those handles (NOWAIT, converted). A try's
    answer replaces a domain only when it is complete and of the same process (domid); a
    failed try (a domain gone meanwhile) ends the retries, keeping what the bulk call gave.
    Runs in the bulk call's worker thread.
    """
    busy = [i for i, d in enumerate(domains) if job_skipped(d.stats)]
    if not busy:
        return domains
    out = list(domains)
    for pause_s in pauses_s:
        sleep(pause_s)
        try:
            again = {d.uuid: d for d in ask([out[i].handle for i in busy])}
        except (libvirt.libvirtError, SourceUnavailable) as err:  # a domain gone meanwhile,
            # or the connection closed (shutdown): what the bulk call gave stands
            log.debug("libvirt: asking busy domains again failed", extra={"error": str(err)})
            break
        still = []
        for i in busy:
            d = again.get(out[i].uuid)
            if d is not None and d.domid == out[i].domid and not job_skipped(d.stats):
                out[i] = d
            else:
                still.append(i)
        busy = still
        if not busy:
            break
    if busy:
        log.debug("libvirt: domains still busy with another client's job",
                  extra={"domains": [out[i].name for i in busy]})
    return tuple(out)
