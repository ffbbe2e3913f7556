# -*- test-case-name: tests.test_activation -*-
"""
Socket activation: listen on the sockets systemd passed us, if any.

With C{zaiproxy.socket} the listening socket belongs to systemd, which
hands a duplicate to each process it starts.  A restart or an upgrade then
refuses no connection: while no proxy runs, the kernel queues new
connections on systemd's socket and the next process accepts them.

The protocol (sd_listen_fds(3)): C{LISTEN_PID} is our pid, C{LISTEN_FDS}
counts the descriptors, which start at 3, and C{LISTEN_FDNAMES} (systemd
227 and later) names them.  Twisted's own C{systemd:} endpoint parser
reads these variables once, when C{twisted.internet.endpoints} is first
imported, and ignores every descriptor unless C{LISTEN_FDNAMES} is set; so
we read them ourselves and adopt each descriptor with
L{AdoptedStreamServerEndpoint}, with the address family the socket really
has (C{ListenStream=8080} makes an IPv6 socket that also accepts IPv4).

Importing C{twisted.internet.endpoints} deletes C{LISTEN_PID} and
C{LISTEN_FDS} from C{os.environ}, so neither this module nor L{zaiproxy.tap}
imports it at module level: L{zaiproxy.tap.makeService} reads the
environment first.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from attrs import frozen
from twisted.internet.interfaces import IStreamServerEndpoint

__all__ = ["InheritedSocket", "ListenChoice", "Listener", "chooseListeners", "inheritedSockets"]

#: The first descriptor systemd passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3

_DOMAINS: dict[int, str] = {socket.AF_INET: "INET", socket.AF_INET6: "INET6", socket.AF_UNIX: "UNIX"}


@frozen
class Listener:
    """
    Where to listen: the endpoint, and how the log names it.
    """

    description: str
    endpoint: IStreamServerEndpoint


@frozen
class InheritedSocket:
    """
    One descriptor passed by systemd, as we found it.
    """

    index: int
    fd: int
    name: str | None
    family: int | None
    #: Why we cannot listen on it, or None if we can.
    problem: str | None

    @property
    def description(self) -> str:
        """
        The equivalent C{--listen} description, for the log.
        """
        domain = _DOMAINS.get(self.family or -1, "?")
        if self.name:
            return f"systemd:domain={domain}:index={self.index} (fd {self.fd}, {self.name})"
        return f"systemd:domain={domain}:index={self.index} (fd {self.fd})"

    def listener(self, reactor: Any) -> Listener:
        """
        An endpoint that adopts this descriptor (and closes our copy of it).
        """
        from twisted.internet.endpoints import AdoptedStreamServerEndpoint

        return Listener(self.description, AdoptedStreamServerEndpoint(reactor, self.fd, self.family))


def _probe(fd: int) -> tuple[int | None, str | None]:
    """
    The address family of descriptor C{fd}, or why it is not a listening
    stream socket we can serve HTTP on.
    """
    try:
        # socket.socket(fileno=...) detects the family and type; it owns the
        # descriptor it is given, so give it a duplicate.
        copy = os.dup(fd)
    except OSError as e:
        return None, f"not open ({e.strerror or e})"
    try:
        sock = socket.socket(fileno=copy)
    except OSError as e:
        os.close(copy)
        return None, f"not a socket ({e.strerror or e})"
    with sock:
        family = sock.family
        if family not in _DOMAINS:
            return None, f"unsupported address family {family!r}"
        if sock.type != socket.SOCK_STREAM:
            return family, "not a stream socket (ListenStream= is needed)"
        try:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        except OSError:
            listening = 1
        if not listening:
            return family, "not listening (Accept=yes is not supported)"
        return family, None


def inheritedSockets(
    environ: Mapping[str, str], pid: int, start: int = LISTEN_FDS_START
) -> list[InheritedSocket]:
    """
    The descriptors systemd passed to process C{pid}, per C{environ}: none
    unless C{LISTEN_PID} is C{pid} (a variable inherited by a child of the
    activated process is not meant for it).  C{start} is for tests.
    """
    if environ.get("LISTEN_PID", "").strip() != str(pid):
        return []
    try:
        count = int(environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    names: list[str | None] = [name or None for name in environ.get("LISTEN_FDNAMES", "").split(":")]
    if len(names) != count:
        names = [None] * count
    found = []
    for index in range(max(count, 0)):
        fd = start + index
        family, problem = _probe(fd)
        found.append(InheritedSocket(index, fd, names[index], family, problem))
    return found


@frozen
class ListenChoice:
    """
    What the proxy listens on, and what to log about the choice.
    """

    #: L{Listener}s for inherited sockets, else the C{--listen} descriptions.
    listen: tuple[Listener | str, ...]
    #: Where they came from: C{"systemd"} or C{"--listen"}.
    source: str
    notes: tuple[str, ...]
    warnings: tuple[str, ...]


def chooseListeners(
    reactor: Any,
    listen: Sequence[str],
    environ: Mapping[str, str],
    pid: int,
    start: int = LISTEN_FDS_START,
) -> ListenChoice:
    """
    Sockets passed by systemd win over C{--listen}; without them, C{--listen}.
    """
    inherited = inheritedSockets(environ, pid, start)
    warnings = [f"Ignoring {s.description} passed by systemd: {s.problem}" for s in inherited if s.problem]
    usable = [s for s in inherited if s.problem is None]
    given = " ".join(listen)
    if not usable:
        if inherited:
            warnings.append(f"No usable socket passed by systemd; listening on --listen {given}")
        return ListenChoice(tuple(listen), "--listen", (), tuple(warnings))
    note = (
        f"Socket activation: listening on {len(usable)} socket(s) passed by systemd "
        f"(LISTEN_FDS={len(inherited)}) instead of --listen {given}"
    )
    return ListenChoice(tuple(s.listener(reactor) for s in usable), "systemd", (note,), tuple(warnings))
