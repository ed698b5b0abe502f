"""Raw TCP tunnelling: the byte relay, upstream connect, transparent listener, port forwarder and
the SOCKS5 listener.

Knows sockets, not HTTP, and never imports `webproxy`.
"""

from tunnel.connect import (
    DialDNSError,
    DialError,
    DialRefused,
    DialTimeout,
    DialUnreachable,
    open_upstream,
)
from tunnel.forwarder import Forwarder, ForwarderSettings, serve_forwarders
from tunnel.origdst import original_dst
from tunnel.relay import RelayResult, detach_socket, relay
from tunnel.socks import SessionRecord, SocksServer, SocksSettings, serve_socks
from tunnel.transparent import TransparentListener, looks_like_http, serve_transparent

__all__ = [
    "Forwarder", "ForwarderSettings", "RelayResult", "SessionRecord", "SocksServer", "SocksSettings",
    "TransparentListener", "DialDNSError",
    "DialError", "DialRefused", "DialTimeout", "DialUnreachable", "detach_socket",
    "looks_like_http", "open_upstream", "original_dst", "relay", "serve_forwarders", "serve_socks", "serve_transparent",
]
