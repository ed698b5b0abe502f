"""webproxy: a caching, CERN-style HTTP forward proxy with a raw TCP tunnel."""

__version__ = "0.1.0"
