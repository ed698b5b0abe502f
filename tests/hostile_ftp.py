"""A hostile FTP server for tests: raw sockets in a thread, every reply scripted by the test.

By default it behaves (greets, logs anyone in, answers TYPE/PWD/CWD/MDTM, offers EPSV/PASV on a
data listener it really opens); a test replaces any command's handler with its own function
`handler(ctl, arg)`, which writes whatever it likes on the control connection (`ctl.send`) and
the data connection (`ctl.data()`). What the proxy sent is recorded in `commands`, and every
connection made to the data listener in `data_connections`.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any

Handler = Callable[["Control", str], None]


class Control:
    """One control connection, as the scripts see it."""

    def __init__(self, server: HostileFtp, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.data_listener: socket.socket | None = None
        self._data: socket.socket | None = None

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def passive(self) -> int:
        """Open a data listener and return its port."""
        if self.data_listener is not None:
            self.data_listener.close()
        ls = socket.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen(4)
        ls.settimeout(10)
        self.data_listener = ls
        return ls.getsockname()[1]

    def data(self) -> socket.socket:
        """The data connection the proxy opened to the last passive port."""
        if self._data is None:
            assert self.data_listener is not None, "no EPSV/PASV before the transfer"
            self._data, peer = self.data_listener.accept()
            self.server.data_connections.append(peer)
        return self._data

    def close_data(self) -> None:
        if self._data is not None:
            self._data.close()
            self._data = None


def _epsv(ctl: Control, arg: str) -> None:
    ctl.send(f"229 Entering Extended Passive Mode (|||{ctl.passive()}|)\r\n")


def _pasv(ctl: Control, arg: str) -> None:
    port = ctl.passive()
    ctl.send(f"227 Entering Passive Mode (127,0,0,1,{port >> 8},{port & 255})\r\n")


def _cwd(ctl: Control, arg: str) -> None:
    ctl.send("550 not a directory\r\n" if "." in arg.rsplit("/", 1)[-1] else "250 ok\r\n")


DEFAULTS: dict[str, Handler] = {
    "USER": lambda ctl, arg: ctl.send("331 password please\r\n"),
    "PASS": lambda ctl, arg: ctl.send("230 logged in\r\n"),
    "PWD": lambda ctl, arg: ctl.send('257 "/"\r\n'),
    "TYPE": lambda ctl, arg: ctl.send("200 ok\r\n"),
    "MDTM": lambda ctl, arg: ctl.send("550 no time\r\n"),
    "SIZE": lambda ctl, arg: ctl.send("550 no size\r\n"),
    "CWD": _cwd,
    "EPSV": _epsv,
    "PASV": _pasv,
    "QUIT": lambda ctl, arg: ctl.send("221 bye\r\n"),
}


class HostileFtp:
    def __init__(self, greeting: Callable[[Control], None] | bytes = b"220 hostile ftp\r\n",
                 **handlers: Handler) -> None:
        self.greeting = greeting
        self.handlers = {**DEFAULTS, **handlers}
        self.commands: list[str] = []
        self.data_connections: list[Any] = []
        self.errors: list[BaseException] = []
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()

    @property
    def url(self) -> str:
        return f"ftp://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.lsock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, sock: socket.socket) -> None:
        ctl = Control(self, sock)
        sock.settimeout(30)
        try:
            if callable(self.greeting):
                self.greeting(ctl)
            else:
                ctl.send(self.greeting)
            buf = b""
            while True:
                while b"\r\n" not in buf:
                    chunk = sock.recv(4096)
                    if not chunk:
                        return
                    buf += chunk
                line, buf = buf.split(b"\r\n", 1)
                text = line.decode("utf-8", "surrogateescape")
                self.commands.append(text)
                cmd, _, arg = text.partition(" ")
                handler = self.handlers.get(cmd.upper())
                if handler is None:
                    ctl.send("502 not implemented\r\n")
                else:
                    handler(ctl, arg)
        except OSError:
            pass
        except BaseException as e:  # a script's own mistake: keep it for the test to see
            self.errors.append(e)
        finally:
            ctl.close_data()
            if ctl.data_listener is not None:
                ctl.data_listener.close()
            sock.close()

    def close(self) -> None:
        self.lsock.close()
