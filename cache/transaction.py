"""One cache transaction as named steps (RFC 9111 4), pure: no sockets, no store, `now` given.

A driver (webproxy.caching) asks `begin` what to do with a request and the stored response it
found, carries the step out, and, when the step went to the origin, asks `after_fetch` what the
answer means. The same steps serve a client's request and a background refresh (stale-while-
revalidate, active refresh): only what "serve" and "relay" do differs.

    begin(...)        -> Serve | Fetch | Answer | Pass
    after_fetch(...)  -> Serve (304 merged, or stale on error) | Store | Relay | Fetch (refetch)

`outcome` names what happened, for the access log (conditional.UPDATE, REPLACE...; MISS, HIT).
"""

from __future__ import annotations

from dataclasses import dataclass

from cache import conditional
from cache.collapse import may_lead
from cache.decision import Action, Decision, decide, respond
from cache.model import Headers, Policy, Request, StoredResponse
from cache.storable import is_interim, is_storable, make_stored

MISS = "miss"
HIT = "hit"


@dataclass(frozen=True, slots=True)
class Serve:
    """Answer from the stored response: head_for(decision, now), body from the store. `update`:
    write this head to the store first (a 304 merged into it). `background`: also revalidate
    without the client (stale-while-revalidate)."""

    decision: Decision
    outcome: str = HIT
    update: StoredResponse | None = None
    background: bool = False


@dataclass(frozen=True, slots=True)
class Fetch:
    """Ask the origin: with `stored`'s validators (a revalidation), or unconditionally (a miss or a
    refetch). A miss first waits for the collapsed-forwarding flight of its key, if one is in the
    air; when none is, it starts one only if `lead` (cache.collapse.may_lead)."""

    stored: StoredResponse | None = None
    outcome: str = MISS
    lead: bool = False

    @property
    def conditional(self) -> bool:
        return self.stored is not None

    def request_headers(self, headers: Headers) -> Headers:
        if self.stored is None:
            return headers
        return conditional.revalidation_request_headers(headers, self.stored)


@dataclass(frozen=True, slots=True)
class Store:
    """Relay the origin's answer and store it as `stored` while it streams."""

    stored: StoredResponse
    outcome: str = MISS


@dataclass(frozen=True, slots=True)
class Relay:
    """Relay the origin's answer (or its failure); store nothing."""

    outcome: str = MISS


@dataclass(frozen=True, slots=True)
class Answer:
    """Answer without the origin or the store (only-if-cached with nothing stored: 504)."""

    status: int
    message: str


@dataclass(frozen=True, slots=True)
class Pass:
    """Not the cache's business: forward the request as it is."""


Step = Serve | Fetch | Store | Relay | Answer | Pass


def begin(request: Request, stored: StoredResponse | None, now: float, policy: Policy) -> Step:
    """The first step for `request`, given what the store found for it."""
    d = decide(request, stored, now, policy)
    action = d.action
    if action is Action.HIT:
        return Serve(d)
    if action is Action.STALE_WHILE_REVALIDATE:
        return Serve(d, background=True)
    if action is Action.ONLY_IF_CACHED_MISS:
        return Answer(504, f"{request.url[:200]} is not in the cache (the request said only-if-cached)")
    if action is Action.PASS:
        return Pass()
    if action is Action.REVALIDATE:
        assert d.stored is not None
        if request.method.upper() == "HEAD":
            return Pass()  # a HEAD does not refresh the stored GET: just ask the origin
        return Fetch(d.stored)
    return Fetch(lead=may_lead(request))


def refresh(stored: StoredResponse) -> Fetch:
    """The first step of a background refresh: always a revalidation of what is stored."""
    return Fetch(stored)


def after_fetch(request: Request, fetch: Fetch, status: int | None, headers: Headers | None,
                reason: str, request_time: float, response_time: float, policy: Policy) -> Step:
    """What the origin's answer to `fetch` means. `status` None: no answer at all (the driver then
    relays the failure unless stale may be served). `headers` must carry the declared
    Content-Length, which is how a short body is later told from a complete one."""
    if status is not None and is_interim(status):
        # A 1xx is not the answer to the request (RFC 9110 15.2): it is never stored nor merged into
        # the stored response (RFC 9111 3, 4.3.4). The upstream client passes interim responses on
        # and reads on to the final one; this keeps the rule true should one ever arrive here.
        return Relay(fetch.outcome)
    if not fetch.conditional:
        if status is not None and request.method.upper() == "GET" and is_storable(request, status, headers or []):
            return Store(make_stored(request, status, reason, headers or [], request_time, response_time),
                         fetch.outcome)
        return Relay(fetch.outcome)
    stored = fetch.stored
    assert stored is not None
    o = conditional.revalidation_outcome(request, stored, status, headers, request_time, response_time, policy)
    if o.action == conditional.UPDATE:
        assert o.stored is not None
        # The merged response is stored anew, so the rules for storing apply to it (RFC 9111 3): a
        # 304 whose Cache-Control does not parse, or says private or no-store, updates nothing.
        # This client still gets the merged answer; the stored one stays stale, validated again.
        keep = is_storable(request, o.stored.status, o.stored.headers)
        return Serve(respond(request, o.stored), conditional.UPDATE, update=o.stored if keep else None)
    if o.action == conditional.SERVE_STALE:
        return Serve(respond(request, stored), conditional.SERVE_STALE)
    if o.action == conditional.REFETCH:
        return Fetch(None, conditional.REFETCH, may_lead(request))
    if o.action == conditional.REPLACE and status is not None and is_storable(request, status, headers or []):
        return Store(make_stored(request, status, reason, headers or [], request_time, response_time),
                     conditional.REPLACE)
    return Relay(o.action)
