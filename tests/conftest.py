from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.rawserver import RawOrigin, Script
from tests.support import Origin, ProxyProcess


@pytest.fixture(scope="session")
def origin() -> Iterator[Origin]:
    o = Origin().start()
    yield o
    o.stop()


@pytest.fixture
def make_origin() -> Iterator[Callable[[], Origin]]:
    """A fresh origin for tests that add their own routes."""
    made: list[Origin] = []

    def make() -> Origin:
        o = Origin()
        made.append(o)
        return o

    yield make
    for o in made:
        o.stop()


@pytest.fixture
def raw_origin() -> Iterator[Callable[..., RawOrigin]]:
    """Started raw-socket origins: raw_origin(respond, close_after=False) (see tests/rawserver.py)."""
    made: list[RawOrigin] = []

    def make(respond: Callable[[bytes, int], Script], **kw: Any) -> RawOrigin:
        o = RawOrigin(respond, **kw).start()
        made.append(o)
        return o

    yield make
    for o in made:
        o.stop()


@pytest.fixture
def make_proxy(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """Start webproxy processes with config overrides: make_proxy({"server": {...}})."""
    procs: list[ProxyProcess] = []

    def make(sections: dict[str, dict[str, Any]] | None = None, start: bool = True) -> ProxyProcess:
        d = tmp_path / f"proxy{len(procs)}"
        d.mkdir()
        p = ProxyProcess(d, sections)
        procs.append(p)
        return p.start() if start else p

    yield make
    for p in procs:
        p.stop()


@pytest.fixture
def proxy(make_proxy: Callable[..., ProxyProcess]) -> ProxyProcess:
    """A webproxy with the cache off: plain forwarding."""
    return make_proxy({"cache": {"enabled": False}})
