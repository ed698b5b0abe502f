"""`webproxy run` receiving SIGTERM the moment its port opens (before the event loop is up): it
stops gracefully with exit 0, never dies of the signal's default action."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.support import ROOT, free_port, write_config


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_right_after_the_port_opens_exits_0(tmp_path, sig):
    for attempt in range(3):
        port = free_port()
        cfg = write_config(tmp_path / f"w{attempt}.toml", {
            "server": {"listen": [f"127.0.0.1:{port}"]},
            "cache": {"directory": str(tmp_path / "cache")},
            "log": {"access_log": str(tmp_path / "access.log")},
        })
        err = tmp_path / f"err{attempt}.log"
        with open(err, "wb") as errf:
            proc = subprocess.Popen([sys.executable, "-m", "webproxy", "run", "-c", str(cfg)],
                                    env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=errf, cwd=ROOT)
            client = None
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    client = socket.create_connection(("127.0.0.1", port), 1)
                    break
                except OSError:
                    time.sleep(0.002)
            assert client is not None, err.read_text()
            proc.send_signal(sig)
            code = proc.wait(20)
            client.close()
        text = err.read_text()
        assert code == 0, text
        assert "Traceback" not in text
