"""DICOM TLS contexts following PS3.15 B.9 (BCP 195, RFC 8996): TLS 1.2 or 1.3 only.

TLS 1.0 and 1.1 are refused (RFC 8996 deprecates them); on TLS 1.2 only AEAD suites
with forward secrecy are offered (BCP 195 / RFC 9325 4.2), and TLS 1.3's suites are all
of that kind. Compression and renegotiation are off. The same certificate and key serve
as the node's server identity and its client identity for mutual TLS.

The server-side handshake is done by ``handshake`` with a deadline, on the connection's
own thread: pynetdicom does it inside ``accept`` on its single accept thread, where one
client that connects and says nothing blocks every other association.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable

from dicomnode.config import TlsSettings

# TLS 1.2 suites: ECDHE/DHE key exchange with AES-GCM or ChaCha20-Poly1305 only.
BCP195_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
                  "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
                  "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
                  "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384")


class TlsHandshakeFailed(Exception):
    """The peer did not complete a handshake this node accepts; ``reason`` is loggable."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx


def server_context(settings: TlsSettings) -> ssl.SSLContext:
    """The listener's context; with ``require_client_cert`` callers must present a
    certificate signed by ``ca`` (mutual TLS)."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(settings.cert, settings.key)
    if settings.ca is not None:
        ctx.load_verify_locations(cafile=settings.ca)
        ctx.verify_mode = (ssl.CERT_REQUIRED if settings.require_client_cert
                           else ssl.CERT_OPTIONAL)
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(settings: TlsSettings) -> ssl.SSLContext:
    """Outgoing associations: verify the peer against ``ca`` (the system store if none)
    and present the node's certificate for peers that require mutual TLS."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    if settings.ca is not None:
        ctx.load_verify_locations(cafile=settings.ca)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    ctx.load_cert_chain(settings.cert, settings.key)
    ctx.check_hostname = settings.check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context_for(settings: TlsSettings | None, destination: str) -> ssl.SSLContext | None:
    """The context for an outgoing association to ``destination``, None for plain TCP."""
    if settings is None or destination not in settings.destinations:
        return None
    return client_context(settings)


def handshake(sock: socket.socket, ctx: ssl.SSLContext, deadline: float,
              on_wrapped: Callable[[ssl.SSLSocket], None] | None = None) -> ssl.SSLSocket:
    """Server-side handshake that gives up at ``deadline`` (time.monotonic).

    ``on_wrapped`` learns the TLS socket before the handshake starts, so whoever may
    need to close the connection meanwhile (a shutdown, an eviction) holds the object
    that now owns it. On failure the connection is closed here.
    """
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TlsHandshakeFailed("no time left for the TLS handshake")
    try:
        tls = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    except (OSError, ValueError) as exc:
        raise TlsHandshakeFailed(f"cannot start TLS: {exc.__class__.__name__}") from exc
    if on_wrapped is not None:
        on_wrapped(tls)
    tls.settimeout(remaining)
    try:
        tls.do_handshake()
    except ssl.SSLError as exc:
        tls.close()
        raise TlsHandshakeFailed(f"TLS handshake refused: {exc.reason or exc.__class__.__name__}"
                                 ) from exc
    except TimeoutError as exc:
        tls.close()
        raise TlsHandshakeFailed("TLS handshake not completed in time") from exc
    except OSError as exc:
        tls.close()
        raise TlsHandshakeFailed(f"TLS handshake broken off: {exc.__class__.__name__}") from exc
    return tls
