"""The HTTP cache: RFC 9111 rules as pure functions and a diskcache-backed store.

Never imports `webproxy`. Modules, one job each:
    model         Headers, Request, StoredResponse, Policy
    key           cache_key(url)
    cachecontrol  Cache-Control parsing
    storable      may a response be stored, which fields are kept, is a body complete
    freshness     lifetime, age, the Age to send
    vary          secondary keys
    ranges        single byte ranges, If-Range
    conditional   validation requests, 304 merge, client conditionals, stale-on-error
    decision      decide(request, stored, now, policy) -> Decision; respond(); head_for()
    invalidation  keys to drop after unsafe methods
    collapse      collapsed forwarding (one fetch per key in flight)
    eviction      the GDSF score and diskcache eviction policy
    store         Store: lookup, publish, update, purge, counters
    generation    the purge generation every process of a cache directory reads on each lookup
    fill          Fill: a body streaming into the store
    rows          the diskcache row format (diskcache.Disk subclass)
    memory        the in-process memory tier
    refresh       active refresh: which entries to refresh before they expire, and when

How a front end uses it (one request; `now` = time.time(), headers as (str, str) lists):

    store = open_store(cfg.cache)               # cache.store; policy = store.policy
    key = cache_key(url)                        # cache.key (BadURL: do not cache)
    rq = Request(method, url, headers)
    hit = store.lookup(key, headers) if method in ("GET", "HEAD") else None
    d = decide(rq, hit.stored if hit else None, now, store.policy)

    HIT / STALE_WHILE_REVALIDATE:
        status, reason, fields = head_for(d, now)   # Age, Content-Length, Content-Range done
        body: hit.body (bytes) or hit.file (open; sendfile from hit.offset, hit.size bytes, or
        d.byte_range.start / .length for 206); nothing for 304/416/HEAD. hit.close() after.
        store.count_hit(bytes_sent, memory=hit.in_memory)
        SWR: also revalidate in the background, as below, without a client.
    MISS:
        flight, leader = store.flights.join(key) if collapse.may_lead(rq) else (store.flights.get(key), False)
        a flight, not leader: if await flight.wait(collapse_wait): look up again; else fetch yourself.
        leader: fetch (request_time before sending, response_time when the head arrives);
        if storable.is_storable(rq, status, origin_headers):
            stored = storable.make_stored(rq, status, reason, origin_headers, t_req, t_resp)
            fill = store.begin_fill(key, stored)   # fill.write(chunk) ...; fill.commit() / abort()
            (commit/abort end the flight; a Content-Length mismatch is never published;
            fill.release_waiters() when the client stops reading: the fill goes on)
        else: store.flights.finish(key, False) at once: the waiters fetch for themselves
        store.count_miss()
        A fill never raises on a write error (a full disk): it abandons itself and counts the failure
        in store.write_failures, whose report(now) is the line to log (at most one a minute).
    REVALIDATE:
        fetch with conditional.revalidation_request_headers(headers, d.stored)
        o = conditional.revalidation_outcome(rq, d.stored, status_or_None, headers_or_None,
                                             t_req, t_resp, store.policy)
        UPDATE: store.update(hit, o.stored); serve head_for(respond(rq, o.stored), now) + body
        REPLACE: like a MISS with the new response;  REFETCH: fetch again without validators
        SERVE_STALE: serve head_for(respond(rq, d.stored), now);  FORWARD_ERROR: relay the error
        A MISS whose request carries Range or client conditionals may forward them as they are
        (the 206/304 answer is not storable, as in Squid) or strip them to fill the cache.
        HEAD with REVALIDATE: a conditional HEAD upstream; a 200 answer goes through
        conditional.freshen_with_head(d.stored, headers, t_req, t_resp) -> store.update or stale.
    ONLY_IF_CACHED_MISS: answer 504.   PASS: forward, store nothing.
    after any unsafe method: store.invalidate(invalidation.invalidated_keys(method, url, status, hdrs))

Background (an executor thread is fine): store.maintain() every few seconds (flushes counters,
culls to capacity); store.close() at shutdown.
"""

from cache.model import Headers, Policy, Request, StoredResponse

__all__ = ["Headers", "Policy", "Request", "StoredResponse"]
