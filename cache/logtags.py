"""Squid-style result codes for the access log, from the cache's decisions (misses, passes and
only-if-cached 504s are logged TCP_MISS)."""

from __future__ import annotations

from cache import conditional
from cache.decision import Action, Decision

_REVALIDATION = {
    conditional.UPDATE: "TCP_REFRESH_UNMODIFIED",
    conditional.REPLACE: "TCP_REFRESH_MODIFIED",
    conditional.REFETCH: "TCP_REFRESH_MODIFIED",
    conditional.SERVE_STALE: "TCP_REFRESH_FAIL_OLD",
    conditional.FORWARD_ERROR: "TCP_REFRESH_FAIL_ERR",
}


def served_tag(decision: Decision, in_memory: bool) -> str:
    """For a request answered from a stored response (HIT or STALE_WHILE_REVALIDATE)."""
    if decision.status == 304:
        return "TCP_IMS_HIT"
    if decision.action is Action.STALE_WHILE_REVALIDATE:
        return "TCP_STALE_HIT"
    return "TCP_MEM_HIT" if in_memory else "TCP_HIT"


def revalidation_tag(outcome_action: str) -> str:
    """For a request whose stored response was revalidated (conditional.revalidation_outcome)."""
    return _REVALIDATION[outcome_action]
