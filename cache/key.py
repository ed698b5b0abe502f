"""The primary cache key: the target URI, normalised only where RFC 3986 says it is the same URI."""

from __future__ import annotations

DEFAULT_PORTS = {"http": 80, "https": 443, "ftp": 21, "gopher": 70}


class BadURL(ValueError):
    pass


def split_url(url: str) -> tuple[str, str, int | None, str]:
    """(scheme, host, port or None, path-and-query) of an absolute URL; the fragment is dropped."""
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme or not scheme.isascii() or not scheme.replace("+", "").replace(".", "").replace("-", "").isalnum():
        raise BadURL(f"not an absolute URL: {url!r}")
    cut = len(rest)
    for ch in "/?#":
        i = rest.find(ch)
        if 0 <= i < cut:
            cut = i
    authority, tail = rest[:cut], rest[cut:]
    tail = tail.split("#", 1)[0]
    authority = authority.rpartition("@")[2]  # userinfo is not part of the resource identity
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise BadURL(f"bad IPv6 host in {url!r}")
        host, port_s = authority[: end + 1], authority[end + 1 :].lstrip(":")
    else:
        host, _, port_s = authority.partition(":")
    if not host:
        raise BadURL(f"no host in {url!r}")
    port = None
    if port_s:
        if not port_s.isdigit() or int(port_s) > 65535:
            raise BadURL(f"bad port in {url!r}")
        port = int(port_s)
    return scheme.lower(), host.lower(), port, tail


def cache_key(url: str) -> str:
    """scheme://host[:port]/path?query with scheme and host lower-cased, the default port dropped,
    an empty path written "/", and the path and query bytes kept exactly as sent."""
    scheme, host, port, tail = split_url(url)
    if port is not None and port != DEFAULT_PORTS.get(scheme):
        host = f"{host}:{port}"
    if not tail.startswith("/"):
        tail = "/" + tail
    return f"{scheme}://{host}{tail}"


def origin_of(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, effective port) for same-origin checks."""
    scheme, host, port, _ = split_url(url)
    return scheme, host, port if port is not None else DEFAULT_PORTS.get(scheme)
