# -*- test-case-name: tests.test_relay -*-
"""
What the client is told: the status and headers of a relayed answer, and
answers written whole (Z.AI's error, passed on; count_tokens, counted
here). Only the relay calls these.
"""

from __future__ import annotations

from twisted.web.iweb import IResponse
from twisted.web.server import Request

from zaiproxy.relay.forward import PassOn
from zaiproxy.relay.headers import clientResponseHeaders

__all__ = ["writeCounted", "writeHead", "writePassOn"]

#: Reason phrases Twisted does not know.
_PHRASES = {429: b"Too Many Requests", 529: b"Overloaded"}


def _copyHeaders(request: Request, response: IResponse) -> None:
    headers = request.responseHeaders
    for name, values in clientResponseHeaders(response.headers):
        headers.setRawHeaders(name, values)
    if not response.headers.hasHeader(b"server"):
        # Twisted adds its own Server header otherwise.
        headers.removeHeader(b"server")


def writeHead(request: Request, response: IResponse, keepLength: bool) -> None:
    """
    The status and headers of an answer to relay; C{keepLength}: its body
    passes unchanged, so its length still holds.
    """
    request.setResponseCode(response.code, response.phrase)
    _copyHeaders(request, response)
    if keepLength and request.method != b"HEAD":
        request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % (response.length,)])


def writePassOn(request: Request, answer: PassOn) -> int:
    """
    Z.AI's error answer, unchanged (plus the X-Zai-* headers of a 429);
    the body bytes written.
    """
    response = answer.response
    request.setResponseCode(response.code, response.phrase or _PHRASES.get(response.code))
    _copyHeaders(request, response)
    for name, value in answer.headers:
        request.setHeader(name, value)
    request.setHeader(b"content-length", b"%d" % (len(answer.body),))
    written = 0
    if request.method != b"HEAD":
        request.write(answer.body)
        written = len(answer.body)
    request.finish()
    return written


def writeCounted(request: Request, body: bytes) -> int:
    """
    The answer to a count_tokens call counted here.
    """
    request.setResponseCode(200)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % (len(body),))
    request.write(body)
    request.finish()
    return len(body)
