"""DICOMweb client: STOW-RS (store) and a QIDO-RS probe, with the standard library only.

STOW-RS (PS3.18 10.5) POSTs DICOM Part-10 files to ``<url>/studies`` as one
``multipart/related; type="application/dicom"`` body and reads the answer:

- 200: every instance stored (a FailedSOPSequence, if a server sends one anyway, still counts);
- 202: some stored, with warnings (ReferencedSOPSequence, WarningReason) or failures
  (FailedSOPSequence, FailureReason); only instances listed as referenced count as stored;
- 409: none stored (conflict), the reasons in FailedSOPSequence;
- other 4xx: refused; 408, 429 and 5xx: the server is busy or down, a later retry may succeed.

The pure functions (`multipart_related`, `parse_store_response`, `classify_store_response`)
hold the rules; `DicomWebClient` is the thin I/O around them (http.client, one keep-alive
connection). Credentials come from the environment variable a destination names
(`credentials_env`), read when a client is made (at each export batch, each echo);
no message carries them: errors name the variable, never its value, and whatever
quotes a server's answer or an exception goes through `DicomWebClient.redact`.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import ssl
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Self
from urllib.parse import urlsplit

from node import __version__
from node.config import Destination
from node.errors import ConfigError

DICOM_PART = "application/dicom"
DICOM_JSON = "application/dicom+json"
USER_AGENT = f"migraine-node/{__version__}"
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
"""A STOW-RS answer is a small JSON document; more than this is read no further (and the connection dropped)."""
DETAIL_CHARS = 200
"""How much of a non-DICOM error body a message quotes."""

# PS3.18 10.5.3 / PS3.4 GG.4: the attributes of a STOW-RS response.
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
REFERENCED_SOP_INSTANCE_UID = "00081155"
WARNING_REASON = "00081196"
FAILURE_REASON = "00081197"

TRANSIENT_HTTP = frozenset({408, 429})
"""4xx statuses that say "later" rather than "no" (Request Timeout, Too Many Requests); every 5xx is transient too."""

FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
    0xC122: "referenced transfer syntax not supported",
}


class CredentialsError(ConfigError):
    """The environment variable that should hold a destination's secret is missing, empty or malformed."""


class TransportError(Exception):
    """No HTTP answer: the connection was refused, timed out or broke (always worth a retry)."""


# ---- pure functions --------------------------------------------------------------------------------

def new_boundary(parts: Sequence[bytes] = ()) -> str:
    """A multipart boundary that occurs in none of `parts` (RFC 2046 5.1.1: 1-70 characters)."""
    while True:
        boundary = f"migraine-node-{uuid.uuid4().hex}"
        token = boundary.encode("ascii")
        if not any(token in part for part in parts):
            return boundary


def multipart_content_type(boundary: str) -> str:
    return f'multipart/related; type="{DICOM_PART}"; boundary={boundary}'


def multipart_related(parts: Sequence[bytes], boundary: str) -> bytes:
    """The STOW-RS request body: each Part-10 file as an `application/dicom` part (RFC 2387)."""
    token = boundary.encode("ascii")
    if not 1 <= len(token) <= 70 or any(token in part for part in parts):
        raise ValueError("the boundary must be 1-70 characters and occur in no part")
    out = bytearray()
    for part in parts:
        out += b"--" + token + b"\r\nContent-Type: " + DICOM_PART.encode("ascii") + b"\r\n\r\n"
        out += part
        out += b"\r\n"
    out += b"--" + token + b"--\r\n"
    return bytes(out)


@dataclass(frozen=True)
class StoreResponse:
    """What a STOW-RS response says per instance: referenced (stored) and failed, each with its reason code."""

    referenced: Mapping[str, int | None] = field(default_factory=dict)  # SOP Instance UID -> WarningReason
    failed: Mapping[str, int | None] = field(default_factory=dict)  # SOP Instance UID -> FailureReason
    parsed: bool = False  # False: no DICOM JSON body (empty, XML, HTML error page, ...)


def _first(item: Mapping, tag: str) -> object:
    value = (item.get(tag) or {}).get("Value") or []
    return value[0] if value else None


def parse_store_response(content_type: str, body: bytes) -> StoreResponse:
    """The ReferencedSOPSequence and FailedSOPSequence of a DICOM JSON STOW-RS response body.

    Anything else (an empty body, XML, an HTML error page, broken JSON) is `parsed=False`.
    """
    media = content_type.split(";", 1)[0].strip().lower()
    if not body.strip() or not (media.endswith("json") or media == ""):
        return StoreResponse()
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return StoreResponse()
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    if not isinstance(data, dict):
        return StoreResponse()

    def items(tag: str, reason: str) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for item in (data.get(tag) or {}).get("Value") or []:
            if isinstance(item, dict):
                uid = _first(item, REFERENCED_SOP_INSTANCE_UID)
                code = _first(item, reason)
                if isinstance(uid, str):
                    numeric = isinstance(code, int | float) and not isinstance(code, bool)
                    out[uid.strip()] = int(code) if numeric else None
        return out

    return StoreResponse(items(REFERENCED_SOP_SEQUENCE, WARNING_REASON), items(FAILED_SOP_SEQUENCE, FAILURE_REASON),
                         parsed=True)


def describe_failure_reason(code: int | None) -> str:
    if code is None:
        return "no FailureReason given"
    name = FAILURE_REASONS.get(code) or ("out of resources" if 0xA700 <= code <= 0xA7FF else "")
    return f"FailureReason 0x{code:04X}" + (f" {name}" if name else "")


def failure_is_transient(code: int | None) -> bool:
    """A FailureReason that a retry may overcome: out of resources (0xA7xx), as for C-STORE."""
    return code is not None and 0xA700 <= code <= 0xA7FF


def http_is_transient(status: int) -> bool:
    return status >= 500 or status in TRANSIENT_HTTP


def body_detail(content_type: str, body: bytes, limit: int = DETAIL_CHARS) -> str:
    """A short, single-line quote of a textual error body ('' for binary or empty ones)."""
    media = content_type.split(";", 1)[0].strip().lower()
    if not body.strip() or not (media.startswith("text/") or media.endswith(("json", "xml")) or media == ""):
        return ""
    text = body[: limit * 4].decode("utf-8", errors="replace")
    text = re.sub(r"<[^>]*>", " ", text) if "html" in media or text.lstrip().startswith("<") else text
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class StoreOutcome:
    """What one STOW-RS answer means for the instances sent."""

    status: int  # the HTTP status
    stored: Mapping[str, int | None]  # SOP Instance UID -> WarningReason (None: plainly stored)
    failed: Mapping[str, str]  # SOP Instance UID -> why it was not stored
    transient: bool  # a retry may succeed (the failures are all 408/429/5xx or out of resources)
    message: str  # "" when every instance was stored

    @property
    def all_stored(self) -> bool:
        return not self.failed


def classify_store_response(status: int, reason: str, content_type: str, body: bytes,
                            sent: Sequence[str], labels: Mapping[str, str] | None = None) -> StoreOutcome:
    """A STOW-RS answer -> per-instance outcome (PS3.18 10.5.3).

    `sent`: the SOP Instance UIDs in the request; `labels`: how messages name them (e.g. "sr").
    """
    labels = labels or {}
    response = parse_store_response(content_type, body)
    status_line = f"HTTP {status} {reason}".strip()
    stored: dict[str, int | None] = {}
    failed: dict[str, str] = {}
    transient_codes: list[bool] = []
    if 200 <= status < 300:
        for uid in sent:
            if uid in response.failed:
                code = response.failed[uid]
                failed[uid] = describe_failure_reason(code)
                transient_codes.append(failure_is_transient(code))
            elif uid in response.referenced:
                stored[uid] = response.referenced[uid]
            elif status in (200, 204):  # "all instances stored"; a body listing them is optional
                stored[uid] = None
            else:
                failed[uid] = "not acknowledged in the response"
                transient_codes.append(True)
        transient = all(transient_codes)
        if not failed:
            return StoreOutcome(status, stored, {}, False, "")
        details = "; ".join(f"{labels.get(uid, uid)}: {why}" for uid, why in failed.items())
        return StoreOutcome(status, stored, failed, transient, f"{status_line}: {details}")
    # Not 2xx: nothing was stored.
    transient = http_is_transient(status)
    listed = {uid: response.failed[uid] for uid in sent if uid in response.failed}
    if listed and not transient:
        transient = all(failure_is_transient(code) for code in listed.values())  # e.g. 409 with 0xA700 only
    for uid in sent:
        failed[uid] = describe_failure_reason(listed[uid]) if uid in listed else status_line
    if listed:
        detail = "; ".join(f"{labels.get(uid, uid)}: {describe_failure_reason(code)}" for uid, code in listed.items())
    else:
        detail = body_detail(content_type, body)
    return StoreOutcome(status, {}, failed, transient, status_line + (f": {detail}" if detail else ""))


def authorization(destination: Destination, environ: Mapping[str, str] | None = None) -> str | None:
    """The Authorization header value for `destination`, read from its `credentials_env` now.

    Raises CredentialsError (naming the variable, never its value) when it is missing or malformed.
    """
    if destination.auth == "none":
        return None
    name = destination.credentials_env or ""
    value = (os.environ if environ is None else environ).get(name, "")
    if not value.strip():
        raise CredentialsError(f'{destination.name}: auth = "{destination.auth}" reads its secret from the '
                               f"environment variable {name}, which is not set or empty")
    if destination.auth == "basic":
        if ":" not in value or re.search(r"[\x00-\x1f\x7f]", value):
            raise CredentialsError(f'{destination.name}: auth = "basic" expects "user:password" (no control '
                                   f"characters) in the environment variable {name}")
        return "Basic " + base64.b64encode(value.encode("utf-8")).decode("ascii")
    token = value.strip()
    if not re.fullmatch(r"[\x21-\x7e]+", token):
        raise CredentialsError(f'{destination.name}: auth = "bearer" expects a token of visible ASCII characters '
                               f"in the environment variable {name}")
    return f"Bearer {token}"


def public_url(url: str) -> str:
    """`url` without any user:password@ part (which belongs in credentials_env, not in the URL)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl()


def where(destination: Destination) -> str:
    """`destination.describe()` made safe for messages."""
    if destination.url is None:
        return destination.describe()
    return f"{destination.name} ({public_url(destination.url)})"


# ---- I/O ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HttpAnswer:
    status: int
    reason: str
    content_type: str
    body: bytes


class DicomWebClient:
    """HTTP to one DICOMweb base URL over one keep-alive connection; use as a context manager.

    Raises TransportError when no answer comes (refused, timed out, reset); at construction,
    CredentialsError when the destination's secret cannot be read and ConfigError when its url
    cannot be used (credentials in it, a bad port).
    """

    def __init__(self, destination: Destination, timeout: float, environ: Mapping[str, str] | None = None) -> None:
        if destination.url is None:
            raise ValueError(f"{destination.name} is not a DICOMweb destination")
        self.destination = destination
        self.timeout = timeout
        parts = urlsplit(destination.url)
        if "@" in parts.netloc:
            raise ConfigError(f"{where(destination)}: the url holds a user name or password; give auth and "
                              "credentials_env instead (the secret belongs in the environment, not the config)")
        try:
            self._port = parts.port
        except ValueError:
            raise ConfigError(f"{where(destination)}: the url's port is not a number from 1 to 65535") from None
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._base = parts.path.rstrip("/")
        self._authorization = authorization(destination, environ)
        secret = (os.environ if environ is None else environ).get(destination.credentials_env or "", "")
        self._secrets = sorted({s for s in (secret, secret.strip(), self._authorization or "",
                                            (self._authorization or "").partition(" ")[2],
                                            *secret.split(":", 1)[1:],
                                            parts.password or "") if len(s) >= 4}, key=len, reverse=True)
        self._conn: http.client.HTTPConnection | None = None
        self._used = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def redact(self, text: str) -> str:
        """`text` with every form of this destination's secret replaced by ***."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._https:
                self._conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout,
                                                         context=ssl.create_default_context())
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
            self._used = False
        return self._conn

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> HttpAnswer:
        """One request to `<url><path>`; a keep-alive connection the server closed meanwhile is reopened once."""
        all_headers = {"User-Agent": USER_AGENT, **(headers or {})}
        if self._authorization:
            all_headers["Authorization"] = self._authorization
        for attempt in (1, 2):
            reused = self._conn is not None and self._used
            conn = self._connection()
            try:
                if conn.sock is None:
                    try:
                        conn.connect()
                    except (OSError, http.client.HTTPException) as exc:
                        raise TransportError(f"cannot connect to {where(self.destination)}: "
                                             f"{self.redact(_error_text(exc))}") from None
                conn.request(method, self._base + path, body=body, headers=all_headers)
                self._used = True
                response = conn.getresponse()
                data = response.read(MAX_RESPONSE_BYTES + 1)
                if len(data) > MAX_RESPONSE_BYTES or response.will_close:
                    self.close()
                return HttpAnswer(response.status, response.reason or "", response.getheader("Content-Type", ""),
                                  data[:MAX_RESPONSE_BYTES])
            except TransportError:
                self.close()
                raise
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                stale = isinstance(exc, http.client.RemoteDisconnected | ConnectionResetError | BrokenPipeError)
                if reused and stale and attempt == 1:
                    continue  # the server closed the idle keep-alive connection: once more on a new one
                raise TransportError(f"no answer from {where(self.destination)}: "
                                     f"{self.redact(_error_text(exc))}") from None
        raise AssertionError("unreachable")

    def store(self, parts: Sequence[bytes]) -> HttpAnswer:
        """STOW-RS: POST the Part-10 files to <url>/studies."""
        boundary = new_boundary(parts)
        return self.request("POST", "/studies", multipart_related(parts, boundary),
                            {"Content-Type": multipart_content_type(boundary), "Accept": DICOM_JSON})

    def probe(self) -> float:
        """QIDO-RS `GET <url>/studies?limit=1`: milliseconds to a 200 or 204, else TransportError or HttpError."""
        started = time.perf_counter()
        answer = self.request("GET", "/studies?limit=1", headers={"Accept": DICOM_JSON})
        if answer.status not in (200, 204):
            detail = body_detail(answer.content_type, answer.body)
            raise HttpError(answer.status, self.redact(f"HTTP {answer.status} {answer.reason}".strip()
                                                       + (f": {detail}" if detail else "")))
        return (time.perf_counter() - started) * 1000


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error_text(exc: BaseException) -> str:
    """A short reason for a socket-level error ("connection refused", "timed out")."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
