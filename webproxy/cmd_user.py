"""`webproxy user add NAME | remove NAME | list`: the users of the htpasswd file (bcrypt, the format
of `htpasswd -B`) that auth.backend = "htpasswd" reads. A running proxy sees the change within a
second (it watches the file's modification time)."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import tempfile

from webproxy import config
from webproxy.authbackends import HtpasswdFile, hash_password, read_htpasswd
from webproxy.config import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("-f", "--file", metavar="HTPASSWD", help="the htpasswd file (default: auth.htpasswd_file "
                       "of the config given with -c)")
    where.add_argument("-c", "--config", metavar="FILE", help="TOML config file naming auth.htpasswd_file")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = sub.add_parser("add", parents=[where], help="add a user or set a user's password")
    add.add_argument("name")
    add.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    add.add_argument("--cost", type=int, default=10, help="bcrypt cost factor, 4-31 (default 10)")
    remove = sub.add_parser("remove", parents=[where], help="remove a user")
    remove.add_argument("name")
    sub.add_parser("list", parents=[where], help="list the users")


def htpasswd_path(args: argparse.Namespace) -> str:
    if args.file:
        return str(args.file)
    if args.config:
        path = config.load(args.config).auth["htpasswd_file"]
        if path:
            return str(path)
        raise ConfigError(f"{args.config} sets no auth.htpasswd_file; name the file with -f HTPASSWD")
    raise ConfigError("which htpasswd file? name it with -f HTPASSWD or -c CONFIG (its auth.htpasswd_file)")


def check_name(name: str) -> None:
    if not name or ":" in name or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in name):
        raise ConfigError(f"{name!r} cannot be a user name (no colon, space or control character)")


def read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Password again: ") != password:
            raise ConfigError("the two passwords differ; nothing was changed")
    if not password:
        raise ConfigError("an empty password is not accepted; nothing was changed")
    return password


def write_atomically(f: HtpasswdFile) -> None:
    """Replace the file in one rename (a running proxy never reads half of it), keeping the old
    file's mode and owner; a new file is readable by its owner and group only."""
    directory = os.path.dirname(os.path.abspath(f.path))
    try:
        st = os.stat(f.path)
        mode, owner = st.st_mode & 0o7777, (st.st_uid, st.st_gid)
    except FileNotFoundError:
        mode, owner = 0o640, None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".htpasswd-", dir=directory)
    except OSError as e:
        raise ConfigError(f"cannot write {f.path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(f.text())
        os.chmod(tmp, mode)
        if owner is not None and os.geteuid() == 0:
            os.chown(tmp, *owner)
        os.replace(tmp, f.path)
    except OSError as e:
        os.unlink(tmp)
        raise ConfigError(f"cannot write {f.path}: {e.strerror}") from None


def main(args: argparse.Namespace) -> int:
    path = htpasswd_path(args)
    if args.action == "list":
        for name in read_htpasswd(path, missing_ok=True).users:
            print(name)
        return 0
    check_name(args.name)
    f = read_htpasswd(path, missing_ok=args.action == "add")
    if args.action == "remove":
        if not f.remove(args.name):
            print(f"webproxy: no user {args.name!r} in {path}", file=sys.stderr)
            return 1
        write_atomically(f)
        print(f"removed {args.name} from {path}")
        return 0
    if not 4 <= args.cost <= 31:
        raise ConfigError(f"--cost {args.cost}: bcrypt takes a cost from 4 to 31")
    existed = args.name in f.users
    f.set(args.name, hash_password(read_password(args.password_stdin), args.cost))
    write_atomically(f)
    print(f"{'updated' if existed else 'added'} {args.name} in {path}")
    return 0
