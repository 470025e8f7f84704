# -*- test-case-name: tests.protocols.http.test_sendfile -*-
"""Boot asset bodies through C{os.sendfile}: the kernel copies page cache to socket.

Kernels and initrds are tens to hundreds of MiB sent to many machines at once. Twisted's static
producers read each chunk into Python and write it to the transport's buffer (two copies and
a Python round trip per chunk); nginx hands the file to the socket with sendfile(2), and so
does this producer, on plain TCP HTTP/1.x connections only. Anything else (TLS, HTTP/2 streams,
a transport that is not a socket) keeps Twisted's producers (L{sendfile_socket} says which).

The socket is non-blocking, so a sendfile that would block returns what fitted (or EAGAIN).
Waiting for room again uses the transport's own writability, with no second descriptor for the
same socket (the epoll reactor keys descriptors by fd): the producer is a push producer of the
request, so the L{HTTPChannel} passes the transport's C{resumeProducing} on to it; to ask for
that call the producer marks the transport's producer paused and starts it writing. When the
socket is writable the transport finds its buffer empty and resumes its producer. The
response headers go through the transport's buffer first, so the body starts only once that
buffer is empty.

The calls run in a thread pool when one is given (twistd gives C{threads-sendfile}): the
kernel's copy and the network stack's work it triggers then use every core, and a cold page
cache (the call reads from disk) never stalls the reactor. Without one they run on the reactor
thread, each call bounded (L{SendfileProducer.chunk}); either way the kernel is told the file
is read sequentially (readahead).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, BinaryIO

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IRequest
from zope.interface import implementer

#: os.sendfile, looked up at call time through this name so tests can count the calls.
_sendfile = getattr(os, "sendfile", None)


def sendfile_socket(request: IRequest) -> tcp.Connection | None:
    """The plain TCP transport of C{request}'s HTTP/1.x channel, or None when the body must go
    through Twisted's producers (TLS, HTTP/2, a non-socket transport, no sendfile here)."""
    if _sendfile is None:
        return None
    channel = getattr(request, "channel", None)
    if not isinstance(channel, HTTPChannel):
        return None
    transport = channel.transport
    if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", False) \
            or ISSLTransport.providedBy(transport):
        return None
    return transport


def _pending(transport: tcp.Connection) -> int:
    """Bytes the transport has buffered but not yet sent (FileDescriptor's buffers)."""
    return (len(transport.dataBuffer) - transport.offset
            + getattr(transport, "_tempDataLen", 0))


#: What a sendfile hop in a thread returns: bytes sent, and why it stopped (None: the budget
#: was used or the body is complete; C{"again"}: the socket is full; C{"eof"}: the file ended
#: early; an OSError: the peer or the file failed).
Outcome = tuple[int, "str | OSError | None"]


def send_some(sock_fd: int, file_fd: int, offset: int, count: int, chunk: int) -> Outcome:
    """Up to C{count} bytes of the file from C{offset} to the socket, C{chunk} per call, until
    the socket is full. Touches nothing but the two descriptors (it may run in a thread)."""
    assert _sendfile is not None
    sent = 0
    while sent < count:
        try:
            n = _sendfile(sock_fd, file_fd, offset + sent, min(count - sent, chunk))
        except (BlockingIOError, InterruptedError):
            return sent, "again"
        except OSError as e:
            return sent, e
        if n == 0:
            return sent, "eof"
        sent += n
    return sent, None


@implementer(IPushProducer)
class SendfileProducer:
    """Sends C{size} bytes of C{file} from C{offset} as the body of C{request} with sendfile.

    Same contract as Twisted's static producers: C{start()} registers it with the request and
    sends; once everything is sent it unregisters, finishes the request and closes the file.
    The request's C{sentLength} counts the bytes sent (metrics and the boot timeline read it).

    With C{run} (a thread pool's C{run}), each hop of sendfile calls runs in that pool: the
    kernel's copy and the network stack's work for it then use every core, not the reactor's
    one, and a read from a cold disk never stalls the reactor. The hop uses a duplicate of the
    socket's descriptor, so a connection closed meanwhile cannot have its number reused under
    it; the duplicate and the file are closed once no hop is running.

    @cvar chunk: most bytes one sendfile call may send (bounds one call when the page cache
        is cold); the socket's free buffer usually bounds it first.
    @cvar budget: most bytes one hop sends before it lets the reactor (and other
        connections) have their turn.
    @cvar tail: the last bytes of the body, sent from the reactor thread (see
        L{resumeProducing}).
    """

    chunk = 4 << 20
    budget = 16 << 20
    tail = 256 << 10
    log = Logger()

    def __init__(self, request: Any, transport: tcp.Connection, file: BinaryIO,
                 offset: int, size: int, run: Callable[..., Deferred[Any]] | None = None,
                 ) -> None:
        self.request: Any = request
        self.transport = transport
        self.file: BinaryIO | None = file
        self.offset = offset
        self.remaining = size
        self.run = run
        self.calls = 0
        self._busy = False
        self._sock_fd = -1

    def start(self) -> None:
        try:
            os.posix_fadvise(self.file.fileno(), self.offset, self.remaining,  # type: ignore[union-attr]
                             os.POSIX_FADV_SEQUENTIAL)
        except (AttributeError, OSError):
            pass
        self.request.registerProducer(self, True)
        self.request.write(b"")  # the status line and headers, into the transport's buffer
        if self.remaining <= 0:
            self._done()
            return
        self._sock_fd = os.dup(self.transport.fileno()) if self.run is not None \
            else self.transport.fileno()
        self._wait()

    def _wait(self) -> None:
        """Be resumed when the transport's buffer is empty and the socket writable."""
        self.transport.producerPaused = True
        self.transport.startWriting()

    def resumeProducing(self) -> None:
        if self.request is None or self.file is None or self._busy:
            return
        if _pending(self.transport):
            self._wait()
            return
        self.calls += 1
        if self.run is None or self.remaining <= self.tail:
            # The last bytes go from the reactor thread, and the request finishes in the same
            # call: a client that has everything and hangs up is then never seen to leave
            # before the response was finished (which would count it as aborted).
            self._sent(send_some(self._sock_fd, self.file.fileno(), self.offset,
                                 min(self.remaining, self.budget), self.chunk))
            return
        self._busy = True
        self.run(send_some, self._sock_fd, self.file.fileno(), self.offset,
                 min(self.remaining - self.tail, self.budget), self.chunk,
                 ).addBoth(self._hop_done)

    def _hop_done(self, outcome: Any) -> None:
        self._busy = False
        if self.request is None:  # the connection went while the hop ran
            self._close()
            return
        if isinstance(outcome, Failure):
            outcome = (0, outcome.value if isinstance(outcome.value, OSError)
                       else OSError(str(outcome.value)))
        self._sent(outcome)

    def _sent(self, outcome: Outcome) -> None:
        sent, why = outcome
        self.offset += sent
        self.remaining -= sent
        self.request.sentLength += sent
        if isinstance(why, OSError):
            # The peer went away (EPIPE, ECONNRESET) or the file cannot be read: the response
            # cannot be completed, so the connection goes (its loss ends the request).
            self.log.info("sendfile to {peer} stopped: {error}",
                          peer=self.transport.getPeer(), error=str(why))
            self._abort()
        elif why == "eof":
            # The file is shorter than when its Content-Length was sent (truncated meanwhile).
            self.log.warn("sendfile: file ended {missing} bytes early", missing=self.remaining)
            self._abort()
        elif self.remaining <= 0:
            self._done()
        else:
            self._wait()

    def pauseProducing(self) -> None:
        # Nothing to do: nothing is ever buffered in the transport by this producer, and it
        # only sends when the transport resumes it.
        pass

    def stopProducing(self) -> None:
        """The connection was lost: stop, and close the file (after a running hop)."""
        self.request = None
        if not self._busy:
            self._close()

    def _done(self) -> None:
        request, self.request = self.request, None
        self._close()
        request.unregisterProducer()
        request.finish()

    def _abort(self) -> None:
        self._close()
        self.transport.abortConnection()

    def _close(self) -> None:
        file, self.file = self.file, None
        if file is not None:
            file.close()
        fd, self._sock_fd = self._sock_fd, -1
        if fd >= 0 and self.run is not None:
            os.close(fd)
