"""Invalidation (RFC 9111 4.4): an unsafe request that succeeded may have changed the resource,
so the target URI and the same-origin Location / Content-Location are dropped from the cache."""

from __future__ import annotations

from urllib.parse import urljoin

from cache.key import BadURL, cache_key, origin_of
from cache.model import SAFE_METHODS, Headers, get_one


def invalidated_keys(method: str, url: str, status: int | None, response_headers: Headers) -> list[str]:
    """Cache keys to purge after the origin answered `status` to `method url` (unknown methods
    count as unsafe; only non-error answers, 2xx and 3xx, invalidate)."""
    if method.upper() in SAFE_METHODS or status is None or not 200 <= status < 400:
        return []
    try:
        keys = [cache_key(url)]
        origin = origin_of(url)
    except BadURL:
        return []
    for name in ("location", "content-location"):
        value = get_one(response_headers, name)
        if not value:
            continue
        try:
            target = urljoin(url, value.strip())
            if origin_of(target) == origin:
                k = cache_key(target)
                if k not in keys:
                    keys.append(k)
        except (BadURL, ValueError):
            continue
    return keys
