"""The warm pool's wire: how a client asks the zygote for a worker.

A request is a 4-byte length and a JSON body (argv, cwd, environment,
umask, interpreter), sent with the client's stdin/stdout/stderr attached
(SCM_RIGHTS). The zygote answers with JSON lines: ``{"pid": N}`` once the
worker is forked (or ``{"refused": REASON}``), then ``{"status": S}`` when
it exits. Standard library only, and no dataclasses: the client imports
this and dataclasses costs it ~20 ms (inspect, ast, dis).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
from typing import Any

# How long the zygote waits for a connected client to send its request; a
# client that stalls longer is dropped (it then falls back on its own).
REQUEST_TIMEOUT_S = 5.0
# Bound on sending a few bytes to a client (it only ever reads them).
SEND_TIMEOUT_S = 1.0
# Variables read once when the interpreter or a native library starts: a
# forked worker keeps the zygote's values, so a request whose values differ
# is refused. Every PYTHON* variable counts, as do these and *_NUM_THREADS.
_STARTUP_ENV_NAMES = frozenset({"LD_PRELOAD", "LD_LIBRARY_PATH", "MALLOC_CONF"})
# -u is given on both command lines; the variable makes no difference.
_STARTUP_ENV_IGNORED = frozenset({"PYTHONUNBUFFERED"})
_HEADER = struct.Struct("!I")
_MAX_REQUEST_BYTES = 16 << 20


def startup_env(env: dict[str, str]) -> dict[str, str]:
    """The variables of ``env`` that must match between zygote and worker."""
    return {
        key: value
        for key, value in env.items()
        if key not in _STARTUP_ENV_IGNORED
        and (key.startswith("PYTHON") or key in _STARTUP_ENV_NAMES or key.endswith("_NUM_THREADS"))
    }


def say(message: str) -> None:
    try:
        sys.stderr.write(f"jitckpt warm pool: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


class Request:
    def __init__(self, fds: list[int]) -> None:
        self.argv: list[str] = []
        self.cwd = ""
        self.env: dict[str, str] = {}
        self.umask = 0o022
        self.executable = ""
        self.fds = fds

    def close_fds(self) -> None:
        for fd in set(self.fds):
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


def read_request(conn: socket.socket) -> Request:
    data, fds, _flags, _addr = socket.recv_fds(conn, 65536, 3)
    request = Request(list(fds))
    try:
        while len(data) < _HEADER.size:
            chunk = conn.recv(65536)
            if not chunk:
                raise ValueError("client closed before its request")
            data += chunk
        (size,) = _HEADER.unpack_from(data)
        if size > _MAX_REQUEST_BYTES:
            raise ValueError(f"request of {size} bytes")
        while len(data) < _HEADER.size + size:
            chunk = conn.recv(65536)
            if not chunk:
                raise ValueError("client closed during its request")
            data += chunk
        body = json.loads(data[_HEADER.size : _HEADER.size + size])
        request.argv = [str(a) for a in body["argv"]]
        request.cwd = str(body["cwd"])
        request.env = {str(k): str(v) for k, v in body["env"].items()}
        request.umask = int(body["umask"])
        request.executable = str(body["executable"])
        if len(request.fds) != 3 or not request.argv:
            raise ValueError(f"{len(request.fds)} fds, argv {request.argv!r}")
    except BaseException:
        request.close_fds()
        raise
    return request


def send_message(conn: socket.socket, message: dict[str, Any]) -> bool:
    try:
        conn.settimeout(SEND_TIMEOUT_S)
        conn.sendall(json.dumps(message).encode() + b"\n")
        return True
    except OSError:
        return False


def send_request(sock: socket.socket, argv: list[str]) -> None:
    mask = os.umask(0)
    os.umask(mask)
    body = json.dumps(
        {
            "argv": argv,
            "cwd": os.getcwd(),
            "env": dict(os.environ),
            "umask": mask,
            "executable": sys.executable,
        }
    ).encode()
    data = _HEADER.pack(len(body)) + body
    # The fds travel with the first bytes; a signal may cut sendmsg short.
    sent = socket.send_fds(sock, [data], stdio_fds())
    if sent < len(data):  # (sending nothing to a zygote that has answered is EPIPE)
        sock.sendall(data[sent:])


def stdio_fds() -> list[int]:
    """The client's fds 0-2, with /dev/null standing in for a closed one."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDWR))
    return fds


class Lines:
    """JSON-lines reader on the client's socket; None on EOF or error."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def next(self) -> dict[str, Any] | None:
        while b"\n" not in self.buffer:
            try:
                chunk = self.sock.recv(4096)
            except OSError:  # reset, or socket.timeout
                return None
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message
