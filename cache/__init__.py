"""The HTTP cache: RFC 9111 rules as pure functions and a diskcache-backed store.

Never imports `webproxy`. Modules, one job each:
    model         Headers, Request, StoredResponse, Policy
    key           cache_key(url)
    cachecontrol  Cache-Control parsing
    storable      may a response be stored, which fields are kept, is a body complete
    freshness     lifetime, age, the Age to send
    vary          secondary keys
    ranges        single byte ranges, If-Range
    conditional   validation requests, 304 merge, client conditionals
    decision      decide(request, stored, now, policy) -> Decision; head_for(decision, now)
    invalidation  keys to drop after unsafe methods
    collapse      collapsed forwarding (one fetch per key in flight)
    eviction      the GDSF score and diskcache eviction policy
    store         Store: lookup, fill, update, purge, counters
"""

from cache.model import Headers, Policy, Request, StoredResponse

__all__ = ["Headers", "Policy", "Request", "StoredResponse"]
