"""Every result code and hierarchy tag the access log writes, in Squid's native vocabulary, so
Squid's log tools read our logs. One home: handlers assign these names, never string literals.

The cache package decides (cache.decision.Action, cache.conditional outcomes); which code such a
decision is logged under is decided here.
"""

from __future__ import annotations

from cache import conditional
from cache.decision import Action, Decision

NONE = "TAG_NONE"  # nothing was decided yet (a parse failure)
MISS = "TCP_MISS"  # fetched from the origin (also: passes, only-if-cached 504s, PURGE)
HIT = "TCP_HIT"
MEM_HIT = "TCP_MEM_HIT"
IMS_HIT = "TCP_IMS_HIT"  # the client's conditional answered 304 from the cache
STALE_HIT = "TCP_STALE_HIT"  # stale-while-revalidate
REFRESH_UNMODIFIED = "TCP_REFRESH_UNMODIFIED"
REFRESH_MODIFIED = "TCP_REFRESH_MODIFIED"
REFRESH_FAIL_OLD = "TCP_REFRESH_FAIL_OLD"
REFRESH_FAIL_ERR = "TCP_REFRESH_FAIL_ERR"
ACTIVE_REFRESH_UNMODIFIED = "TCP_ACTIVE_REFRESH_UNMODIFIED"
ACTIVE_REFRESH_MODIFIED = "TCP_ACTIVE_REFRESH_MODIFIED"
ACTIVE_REFRESH_FAIL = "TCP_ACTIVE_REFRESH_FAIL"
NONE_NONE = "NONE_NONE"  # answered by the proxy itself, no cache lookup (status page, metrics, PAC)
DENIED = "TCP_DENIED"
TUNNEL = "TCP_TUNNEL"
ABORTED_SUFFIX = "_ABORTED"  # the client left (or the origin failed) before the answer was complete

HIER_NONE = "HIER_NONE/-"


def hier_direct(peer: str) -> str:
    return f"HIER_DIRECT/{peer}"


# Through a parent proxy (webproxy.parents): the first up in config order, the only candidate, or
# chosen by hash (Squid's hier_code names; the peer is the parent's host as configured).
FIRSTUP_PARENT = "FIRSTUP_PARENT"
DEFAULT_PARENT = "DEFAULT_PARENT"
CARP = "CARP"


def hier_parent(code: str, host: str) -> str:
    return f"{code}/{host}"


def aborted(code: str) -> str:
    """`code` marked as cut short (idempotent); an undecided request counts as a miss."""
    if code.endswith(ABORTED_SUFFIX):
        return code
    return (MISS if code == NONE else code) + ABORTED_SUFFIX


def served(decision: Decision, in_memory: bool) -> str:
    """For a request answered from a stored response (HIT or STALE_WHILE_REVALIDATE)."""
    if decision.status == 304:
        return IMS_HIT
    if decision.action is Action.STALE_WHILE_REVALIDATE:
        return STALE_HIT
    return MEM_HIT if in_memory else HIT


_REVALIDATION = {
    conditional.UPDATE: REFRESH_UNMODIFIED,
    conditional.REPLACE: REFRESH_MODIFIED,
    conditional.REFETCH: REFRESH_MODIFIED,
    conditional.SERVE_STALE: REFRESH_FAIL_OLD,
    conditional.FORWARD_ERROR: REFRESH_FAIL_ERR,
}

_ACTIVE_REFRESH = {
    conditional.UPDATE: ACTIVE_REFRESH_UNMODIFIED,
    conditional.REPLACE: ACTIVE_REFRESH_MODIFIED,
}


def revalidation(outcome: str) -> str:
    """For a client request whose stored response was revalidated (conditional.revalidation_outcome)."""
    return _REVALIDATION[outcome]


def active_refresh(outcome: str) -> str:
    """For a background refresh: only an update or a replacement is a success."""
    return _ACTIVE_REFRESH.get(outcome, ACTIVE_REFRESH_FAIL)
