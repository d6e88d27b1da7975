"""The one exception tree of hostagent.

::

    HostAgentError
     ├── ConfigError            a bad config/rules file: names file, key, expected, found, fix
     ├── SourceError            a host source could not be read
     │    ├── SourceUnavailable the source is down (libvirtd absent, NVML missing)
     │    └── SourceTimeout     a blocking call passed its deadline and was abandoned
     ├── StateError             the state file (SQLite) is unusable
     │    ├── StateCorrupt      the file exists but is not a hostagent store: never reset silently
     │    │    └── ForeignLog   the store is intact; the -wal beside it is another database's
     │    └── StoreFull         the commit failed for lack of space; baselines were not advanced
     ├── SinkError              a delivery failed
     │    ├── SinkUnavailable   transient: transport error, timeout, 5xx; retried, never dropped
     │    └── SinkRejected      permanent: the sink says the event is unprocessable (dead letter)
     ├── OwnerLookupError       the account service could not answer
     ├── AuthError              an API credential is missing or invalid
     ├── DomainNotFound         `hostagent dump` was asked for a domain that is not running
     ├── RuleNotWritable        the API was asked to delete a rule of the file/central layer
     └── RuleExists             the API was asked to create a rule whose id is in force

Callers catch the narrowest class they can handle; the daemon counts and logs the rest.
"""

from __future__ import annotations

import reprlib

# A config value quoted in a message: one short line however large or deep the value is.
_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxstring, _QUOTE.maxother = 3, 120, 120


class HostAgentError(Exception):
    """Root of every error hostagent raises on purpose."""


class ConfigError(HostAgentError):
    """A configuration value is wrong; the message says where and how to fix it."""

    def __init__(
        self,
        file: str,
        key: str,
        expected: str,
        found: object,
        fix: str | None = None,
    ) -> None:
        self.file = file
        self.key = key
        self.expected = expected
        self.found = found
        self.fix = fix
        msg = f"{file}: [{key}] expected {expected}, found {_QUOTE.repr(found)}"
        if fix:
            msg += f"; fix: {fix}"
        super().__init__(msg)


class SourceError(HostAgentError):
    """A host source (libvirt, cgroup files, netlink, NVML) failed."""


class SourceUnavailable(SourceError):
    """The source is not there right now (daemon down, library absent)."""


class SourceTimeout(SourceError):
    """A blocking call ran past its deadline and was abandoned."""


class StateError(HostAgentError):
    """The state store cannot be used."""


class StateCorrupt(StateError):
    """The state file is damaged or foreign; refusing to reset billing state."""


class ForeignLog(StateCorrupt):
    """The store read alone is intact; the write-ahead log beside it is not its own (moving
    the log aside is the fix, not `store reset`)."""


class StoreFull(StateError):
    """The pass could not be committed for lack of disk space."""


class SinkError(HostAgentError):
    """Delivery to a sink failed."""


class SinkUnavailable(SinkError):
    """Transient failure: the event stays in the outbox and is retried."""


class SinkRejected(SinkError):
    """Permanent failure: the sink refuses this event (dead-letter candidate)."""


class OwnerLookupError(HostAgentError):
    """The account service could not be reached or answered nonsense."""


class AuthError(HostAgentError):
    """An API credential is missing, malformed or not valid."""


class DomainNotFound(HostAgentError):
    """No running domain matches the given name or UUID."""


class RuleNotWritable(HostAgentError):
    """A threshold rule comes from the rules file or the central source, not from the API."""


class RuleExists(HostAgentError):
    """A rule to create (POST) has the id of a rule in force."""
