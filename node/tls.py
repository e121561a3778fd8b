"""DICOM TLS (PS3.15 B.1 and B.9, the BCP 195 profiles): SSL contexts for the SCP and for each destination.

- `server_context([node.tls])`: the TLS listener. TLS 1.2 or newer (`min_version`), ECDHE with
  AES-GCM (TLS 1.2; TLS 1.3 has only AEAD suites), no compression, no renegotiation. A client
  certificate is required when `require_client_certificate`; without it, one that is offered is
  still verified against `ca_bundle` when a bundle is given (DCMTK's "verify if present").
- `client_context([[destinations]] tls)`: export, C-GET/C-MOVE and C-ECHO to a TLS-only PACS. The
  PACS's certificate must chain to `ca_bundle` and carry `server_name` (default: the destination's
  host) unless `verify_hostname = false`; our own certificate is sent when one is configured.

A key or certificate that cannot be used is a ConfigError naming the key (`[node.tls] private_key`).
An encrypted private key is refused, never prompted for: the node runs unattended.

`failure(context)` says why a client handshake failed (the exception is recorded on the
context's socket by `_RecordingSocket`, since pynetdicom only logs it) and whether retrying can help.
"""

from __future__ import annotations

import logging
import os
import ssl
import stat
from pathlib import Path

from node.config import Destination, DestinationTls, NodeTls
from node.errors import ConfigError

log = logging.getLogger(__name__)

# PS3.15 B.9 (Non-downgrading BCP 195 TLS Profile): TLS 1.2 suites with ECDHE key exchange and
# AES-GCM; TLS 1.3 suites are OpenSSL's (all AEAD) and are not affected by this list.
BCP195_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
))
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_OPTIONS = ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE

# Handshake failures that retrying cannot mend: the configuration of one side must change.
_PERMANENT_REASONS = (
    "CERTIFICATE", "UNKNOWN_CA", "HANDSHAKE_FAILURE", "PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL",
    "WRONG_VERSION_NUMBER", "NO_SHARED_CIPHER", "NO_PROTOCOLS_AVAILABLE", "NO_SUITABLE", "INSUFFICIENT_SECURITY",
    "ACCESS_DENIED",
)


def _refuse_passphrase() -> bytes:
    raise _EncryptedKey


class _EncryptedKey(Exception):
    pass


def _check_certificates(path: Path, what: str) -> None:
    """`path` holds at least one PEM certificate (a scratch context parses it)."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(path))
    except OSError as exc:  # ssl.SSLError is an OSError too
        if isinstance(exc, ssl.SSLError):
            raise ConfigError(f"{what}: {path} holds no PEM certificate ({exc.reason or exc})") from None
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None


def _load_chain(context: ssl.SSLContext, certificate: Path, private_key: Path, section: str) -> None:
    _check_certificates(certificate, f"{section} certificate")
    try:
        mode = os.stat(private_key).st_mode
    except OSError as exc:
        raise ConfigError(f"{section} private_key: cannot read {private_key}: {exc.strerror or exc}") from None
    if mode & stat.S_IROTH:
        log.warning("%s private_key: %s can be read by every user (chmod 600 it)", section, private_key)
    try:
        context.load_cert_chain(str(certificate), str(private_key), password=_refuse_passphrase)
    except _EncryptedKey:
        raise ConfigError(f"{section} private_key: {private_key} is encrypted; the node cannot type a "
                          "passphrase: give an unencrypted key readable only by the node's user") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"{section} private_key: {private_key} is not the key of certificate "
                              f"{certificate}") from None
        raise ConfigError(f"{section} private_key: {private_key} is not a PEM private key "
                          f"({exc.reason or exc})") from None
    except OSError as exc:
        raise ConfigError(f"{section} private_key: cannot read {private_key}: {exc.strerror or exc}") from None


def _load_ca(context: ssl.SSLContext, ca_bundle: Path, section: str) -> None:
    _check_certificates(ca_bundle, f"{section} ca_bundle")
    context.load_verify_locations(cafile=str(ca_bundle))


def _base(context: ssl.SSLContext, min_version: str) -> ssl.SSLContext:
    context.minimum_version = _VERSIONS[min_version]
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= _OPTIONS
    return context


class _ClosingSocket(ssl.SSLSocket):
    """Closed even when shutdown() fails (the peer already went): pynetdicom calls shutdown() then
    close() in one try block, and would leave the socket open for the garbage collector."""

    def shutdown(self, how: int) -> None:
        try:
            super().shutdown(how)
        except OSError:
            self.close()
            raise


class _RecordingSocket(_ClosingSocket):
    """Keeps the last TLS error on its context: pynetdicom only logs it, and export must say why."""

    def _record(self, exc: BaseException) -> None:
        self.context.last_error = exc  # type: ignore[attr-defined]

    def connect(self, address):  # noqa: ANN001, ANN201 - as ssl.SSLSocket's
        try:
            return super().connect(address)
        except OSError as exc:
            self._record(exc)
            self.close()  # pynetdicom's own clean-up skips close() when shutdown() fails
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            return super().recv(buflen, flags)
        except ssl.SSLError as exc:  # TLS 1.3: the server refuses our certificate after our handshake ended
            self._record(exc)
            raise


class ServerContext(ssl.SSLContext):
    sslsocket_class = _ClosingSocket


def server_context(tls: NodeTls) -> ssl.SSLContext:
    """The SCP's TLS context for `[node.tls]`; ConfigError when a file cannot be used."""
    if tls.certificate is None or tls.private_key is None:
        raise ConfigError("[node.tls] needs certificate and private_key")
    context = _base(ServerContext(ssl.PROTOCOL_TLS_SERVER), tls.min_version)
    _load_chain(context, tls.certificate, tls.private_key, "[node.tls]")
    if tls.ca_bundle is not None:
        _load_ca(context, tls.ca_bundle, "[node.tls]")
    if tls.require_client_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_bundle is not None:
        context.verify_mode = ssl.CERT_OPTIONAL  # one that is offered must be trusted
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


class ClientContext(ssl.SSLContext):
    """A client context that remembers why its last connection failed (`failure()`)."""

    sslsocket_class = _RecordingSocket
    last_error: BaseException | None = None


def client_context(tls: DestinationTls, where: str = "[[destinations]] tls") -> ClientContext:
    """The context to reach a TLS destination; `where` names the destination in errors."""
    context = _base(ClientContext(ssl.PROTOCOL_TLS_CLIENT), "1.2")
    _load_ca(context, tls.ca_bundle, where)
    context.check_hostname = tls.verify_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    if tls.certificate is not None and tls.private_key is not None:
        _load_chain(context, tls.certificate, tls.private_key, where)
    return context


def tls_args(destination: Destination) -> tuple[ClientContext, str] | None:
    """pynetdicom's `tls_args` (context, server_hostname) for a destination; None without `tls`."""
    if destination.tls is None:
        return None
    context = client_context(destination.tls, f"[[destinations]] {destination.name} tls")
    return context, destination.tls.server_name or destination.host or ""


def failure(context: ssl.SSLContext | None) -> tuple[bool, str] | None:
    """Why the last connection with `context` failed in TLS, and whether that is permanent; None if it did not."""
    exc = getattr(context, "last_error", None)
    if not isinstance(exc, ssl.SSLError):  # nothing, or no TLS spoken yet (connection refused, unreachable)
        return None
    if isinstance(exc, ssl.SSLCertVerificationError):
        return True, f"TLS: the peer's certificate is not trusted: {exc.verify_message or exc.reason}"
    if not isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        reason = str(exc.reason or exc)
        permanent = any(word in reason.upper() for word in _PERMANENT_REASONS)
        return permanent, f"TLS handshake failed: {describe(exc)}"
    return False, f"TLS handshake failed: {describe(exc)}"


def describe(exc: BaseException, handshake_seconds: float | None = None) -> str:
    """A short reason for a failed handshake, for logs and delivery rows."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not trusted ({exc.verify_message or exc.reason})"
    if isinstance(exc, TimeoutError) or (isinstance(exc, OSError) and "timed out" in str(exc)):
        return f"no TLS handshake within {handshake_seconds:g} s" if handshake_seconds else "timed out"
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError, BrokenPipeError)):
        return "the peer closed the connection during the handshake"
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or "")
        hints = {
            "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no client certificate (require_client_certificate)",
            "WRONG_VERSION_NUMBER": "not TLS (a plain DICOM peer on a TLS port?)",
            "HTTP_REQUEST": "not TLS (an HTTP request)",
            "UNSUPPORTED_PROTOCOL": "TLS version below the minimum",
            "NO_SHARED_CIPHER": "no cipher suite in common",
            "CERTIFICATE_REQUIRED": "the peer requires our certificate",
            "UNKNOWN_CA": "the peer does not trust our certificate (unknown CA)",
        }
        for key, text in hints.items():
            if key in reason.upper():
                return f"{text} [{reason}]"
        return reason or str(exc)
    return f"{type(exc).__name__}: {exc}"
