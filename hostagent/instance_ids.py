"""The instance id of each running incarnation, given once and kept for its life.

A domain's id comes from `[collector] instance_id` (accounting/identity.py) the first time a
pass sees its incarnation (uuid, domid), and is kept until the incarnation is gone: a billing
id never moves while a VM runs, even if the XML it came from is edited. Two running domains
never share one (accounting/id_clash.py decides who keeps a clashing id; the others are billed
under their UUID). What this logs: a clash, each time one is decided, and the domains a scheme
found no id for (one line a pass, however many).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, KeysView, Mapping, Sequence

from hostagent.accounting import id_clash, identity
from hostagent.errors import SourceError
from hostagent.model import Baseline, DomainInfo, InstanceIdScheme

log = logging.getLogger(__name__)

Key = tuple[str, int]  # (uuid, domid): one incarnation


class InstanceIds:
    """Ids by incarnation; `assign` gives the new ones, `keep_only` forgets the gone ones."""

    def __init__(self, scheme: InstanceIdScheme, node_id: str, xpath: str) -> None:
        self.scheme, self.node_id, self.xpath = scheme, node_id, xpath
        self._ids: dict[Key, str] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, key: object) -> bool:
        return key in self._ids

    def holders(self) -> KeysView[Key]:
        """The incarnations that hold an id."""
        return self._ids.keys()

    def get(self, key: Key) -> str | None:
        """The id of incarnation `key`, None when it has none (yet, or refused)."""
        return self._ids.get(key)

    def keep_only(self, live: Collection[Key]) -> None:
        """Forget the incarnations that are not `live` (stopped or restarted)."""
        for key in [k for k in self._ids if k not in live]:
            del self._ids[key]

    def assign(self, fresh: Sequence[DomainInfo], live: Collection[Key],
               baselines: Mapping[str, Baseline]) -> dict[Key, str]:
        """Ids for the `fresh` incarnations (none yet), one running domain per id (`live`: the
        incarnations running now; `baselines`: who was billed under an id before a restart);
        why the others have none."""
        refused: dict[Key, str] = {}
        claims: list[id_clash.Claim] = []
        fell_back: list[tuple[str, str]] = []
        names: dict[Key, str] = {}
        for info in fresh:
            key = (info.uuid, info.domid)
            names[key] = info.name
            try:
                ident = identity.identify(info, scheme=self.scheme, node_id=self.node_id,
                                          xpath=self.xpath)
            except (SourceError, ValueError) as err:
                refused[key] = str(err)
                continue
            if ident.fallback_reason is not None:
                fell_back.append((info.name, ident.fallback_reason))
            claims.append(id_clash.Claim(key, ident.instance_id))
        held = {iid: key for key, iid in self._ids.items()}
        got = id_clash.assign(claims, held, live, baselines)
        self._ids.update(got.ids)
        refused.update(got.refused)
        for iid, holder, key in got.clashes:
            log.warning("instance id claimed by several running domains", extra={
                "instance_id": iid, "kept_by": names.get(holder, holder[0]) if holder else None,
                "domain": names[key], "billed_as": got.ids.get(key)})
        if fell_back:  # one line a pass, however many domains: the scheme found nothing
            log.warning("instance id scheme fell back to the domain UUID", extra={
                "scheme": self.scheme, "domains": len(fell_back),
                "first": fell_back[0][0], "reason": fell_back[0][1]})
        return refused
