"""A radiologist's view of the PACS: the OHIF Viewer served on loopback, fed by Orthanc's DICOMweb.

Why this exists: a DICOM SR that passes dciodvfy can still show up in a real
viewer as an empty panel or an error. `ViewerServer` lets the demo
(`migraine-node demo --viewer`) and the browser tests open what the node sent
to PACS in the OHIF Viewer v3, exactly as a radiologist would.

The OHIF build is the prebuilt `dist/` of npm's `@ohif/app` (see `make ohif`);
nothing is built here. The server serves that folder, a generated
`app-config.js`, and proxies `/dicom-web/...` to Orthanc so that the browser
sees one origin (no CORS set-up in Orthanc, no cross-origin isolation issues).

Never logs patient data: request lines are logged at DEBUG without their query
string (QIDO searches carry PatientName), and response bodies never.
"""

from __future__ import annotations

import glob
import http.client
import http.server
import json
import logging
import mimetypes
import os
import posixpath
import threading
import urllib.parse
from pathlib import Path

from node.errors import NodeError

log = logging.getLogger(__name__)

OHIF_VERSION = "3.13.2"
"""The `@ohif/app` version `make ohif` installs (and the one the browser tests were written against)."""
OHIF_DIST_ENV = "MIGRAINE_OHIF_DIST"
REPO_ROOT = Path(__file__).resolve().parent.parent
OHIF_DIST_CANDIDATES = (
    REPO_ROOT / ".cache" / "ohif" / "node_modules" / "@ohif" / "app" / "dist",
    Path("/usr/share/migraine-node/ohif"),
)
DICOMWEB_ROOT = "/dicom-web/"
# Debian's orthanc-dicomweb puts a symlink into Orthanc's default plugin folder; the versioned
# file lives in /usr/lib/orthanc.
DICOMWEB_PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so.*",
)

# Request headers passed on to Orthanc. Accept selects metadata vs. multipart frames; Host makes
# Orthanc write BulkDataURIs that point back at this server (same origin). Accept-Encoding is not
# passed: loopback needs no compression and the proxy then never has to deal with encodings.
_FORWARD_REQUEST_HEADERS = ("Accept", "Host", "Range", "If-None-Match", "If-Modified-Since")
_FORWARD_RESPONSE_HEADERS = ("Content-Type", "Content-Range", "ETag", "Last-Modified", "Cache-Control")
_CHUNK = 256 * 1024


def find_ohif_dist() -> Path | None:
    """The OHIF Viewer build to serve: $MIGRAINE_OHIF_DIST, then `make ohif`'s cache, then a system copy.

    A folder counts only if it holds `index.html`, so a half-finished download is not picked up.
    """
    env = os.environ.get(OHIF_DIST_ENV)
    for candidate in ((Path(env),) if env else ()) + OHIF_DIST_CANDIDATES:
        if (candidate / "index.html").is_file():
            return candidate
    return None


def orthanc_dicomweb_plugin() -> str | None:
    """Path of Orthanc's DICOMweb plugin (Debian package `orthanc-dicomweb`), or None if not installed."""
    for pattern in DICOMWEB_PLUGIN_CANDIDATES:
        for path in sorted(glob.glob(pattern)):
            if os.path.isfile(path):
                return path
    return None


def orthanc_dicomweb_config(root: str = DICOMWEB_ROOT) -> dict:
    """The `DicomWeb` section of an Orthanc configuration, for use with `ViewerServer`.

    Metadata is read in "Full" from the stored files: the SR's content tree is not among the
    main DICOM tags that Orthanc indexes, and OHIF renders an SR from its metadata.
    WADO-URI stays off: OHIF is configured for WADO-RS only.
    """
    return {"Enable": True, "Root": root, "EnableWado": False, "Ssl": False,
            "StudiesMetadata": "Full", "SeriesMetadata": "Full"}


def app_config_js(dicomweb_path: str = DICOMWEB_ROOT.rstrip("/")) -> str:
    """OHIF's `window.config` for one DICOMweb data source at this origin's `dicomweb_path`.

    Settings follow what Orthanc's DICOMweb plugin supports: no `includefield` in QIDO, no
    `/thumbnail` endpoint (thumbnails are rendered from WADO-RS frames), no fuzzy matching.
    The study list stays on so a user can find the study by hand in the demo. OHIF's
    "investigational use only" banner keeps its default (once per browser session): it is true
    of this research software too.
    """
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "orthanc",
        "configuration": {
            "friendlyName": "Orthanc (migraine-node)",
            "name": "orthanc",
            "qidoSupportsIncludeField": False,
            "supportsReject": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": True,
            "singlepart": "bulkdata",
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
        },
    }
    config = {
        "name": "migraine-node",
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showLoadingIndicator": True,
        "showErrorDetails": "always",
        "strictZSpacingForVolumeViewport": True,
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 10},
        "defaultDataSourceName": "orthanc",
        "dataSources": [source],
    }
    # The roots are absolute URLs built in the browser from its own origin, so the config is
    # correct whatever host name or port the user opened.
    root = json.dumps(dicomweb_path)
    return (
        "/* Generated by migraine-node (node/viewer.py): one DICOMweb source, same origin. */\n"
        f"window.config = {json.dumps(config, indent=2)};\n"
        "(function () {\n"
        f"  var root = window.location.origin + {root};\n"
        "  var c = window.config.dataSources[0].configuration;\n"
        "  c.qidoRoot = c.wadoRoot = c.wadoUriRoot = root;\n"
        "})();\n"
    )


class _Handler(http.server.BaseHTTPRequestHandler):
    """Static OHIF files, the generated config, and a read-only GET proxy to Orthanc's DICOMweb."""

    protocol_version = "HTTP/1.1"  # keep-alive: OHIF fires many small frame requests
    server: _Server

    # -- routing ---------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._route(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._route(head=True)

    def _refuse(self) -> None:
        # The viewer is read-only: a browser must never change what is in the PACS (no STOW-RS, no
        # reject). Orthanc's own REST API is not reachable through this server either. The request
        # body is not read, so the connection cannot be reused.
        self.close_connection = True
        self._send_plain(405, "read-only viewer", extra={"Allow": "GET, HEAD", "Connection": "close"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse  # noqa: N815

    def _route(self, head: bool) -> None:
        path = urllib.parse.urlsplit(self.path).path
        try:
            segments = [urllib.parse.unquote(s) for s in path.split("/")]
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]").lower()
            if host not in ("127.0.0.1", "localhost", "::1"):
                # Loopback only, by name too: a web page that rebinds its DNS name to 127.0.0.1 must not
                # read the PACS through this server.
                self._send_plain(421, "this viewer answers only to 127.0.0.1 / localhost")
            elif any(s in ("..", ".") or "\\" in s or "/" in s or "\0" in s for s in segments):
                # Encoded separators (%2F, %5C) too: the proxied path is passed on undecoded.
                self._send_plain(400, "bad path")
            elif path == self.server.dicomweb_path or path.startswith(self.server.dicomweb_path + "/"):
                self._proxy(head)
            elif path == "/app-config.js":
                self._send_bytes(200, self.server.app_config, "text/javascript; charset=utf-8", head,
                                 {"Cache-Control": "no-cache"})
            else:
                self._static(path, head)
        except (BrokenPipeError, ConnectionResetError):
            # The browser cancelled the request (OHIF aborts thumbnail and prefetch loads freely).
            self.close_connection = True

    # -- static files ----------------------------------------------------------------------------
    def _static(self, path: str, head: bool) -> None:
        dist: Path = self.server.dist
        relative = urllib.parse.unquote(path).lstrip("/")
        target = (dist / relative).resolve() if relative else dist / "index.html"
        if target.is_dir():
            target = target / "index.html"
        inside = target == dist or dist in target.parents
        if not (inside and target.is_file()):
            if "." in posixpath.basename(path):
                self._send_plain(404, "not found")
                return
            # A client-side route of the single-page app (/viewer, /studylist, ...).
            target = dist / "index.html"
        content_type = _content_type(target)
        headers = {"Cache-Control": "no-cache"} if target.name == "index.html" else {}
        self._send_bytes(200, target.read_bytes(), content_type, head, headers)

    # -- DICOMweb proxy --------------------------------------------------------------------------
    def _proxy(self, head: bool) -> None:
        split = urllib.parse.urlsplit(self.path)
        upstream_path = self.server.orthanc_root + split.path[len(self.server.dicomweb_path) + 1:]
        if split.query:
            upstream_path += "?" + split.query
        headers = {k: self.headers[k] for k in _FORWARD_REQUEST_HEADERS if self.headers.get(k)}
        conn = http.client.HTTPConnection("127.0.0.1", self.server.orthanc_http_port, timeout=120)
        try:
            try:
                conn.request("HEAD" if head else "GET", upstream_path, headers=headers)
                upstream = conn.getresponse()
            except OSError as exc:
                log.warning("viewer proxy: Orthanc on port %d unreachable (%s)", self.server.orthanc_http_port,
                            type(exc).__name__)
                self._send_plain(502, "PACS (Orthanc DICOMweb) unreachable")
                return
            if upstream.status >= 400:
                log.info("viewer proxy: Orthanc answered %d for %s", upstream.status, split.path)
            self.send_response(upstream.status)
            for name in _FORWARD_RESPONSE_HEADERS:
                value = upstream.getheader(name)
                if value:
                    self.send_header(name, value)
            length = upstream.getheader("Content-Length")
            bodiless = head or upstream.status in (204, 304) or 100 <= upstream.status < 200
            chunked = not bodiless and length is None
            if length is not None:
                self.send_header("Content-Length", length)
            elif chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", "0")
            self.end_headers()
            if bodiless:
                return
            # Stream: a WADO-RS series retrieval can be large, and multipart/related bodies are
            # passed through byte for byte (the boundary lives in the forwarded Content-Type).
            while block := upstream.read1(_CHUNK):
                if chunked:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                else:
                    self.wfile.write(block)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        finally:
            conn.close()

    # -- plumbing --------------------------------------------------------------------------------
    def _send_bytes(self, status: int, body: bytes, content_type: str, head: bool,
                    extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _send_plain(self, status: int, text: str, extra: dict[str, str] | None = None) -> None:
        self._send_bytes(status, (text + "\n").encode(), "text/plain; charset=utf-8", self.command == "HEAD", extra)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # Path only: query strings may carry patient names (QIDO-RS searches from the study list).
        log.debug("viewer %s %s -> %s", self.command, urllib.parse.urlsplit(self.path).path, code)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's signature)
        # http.server's default writes to stderr, request lines included; ours go through logging only.
        log.debug("viewer: " + format, *args)


def _content_type(path: Path) -> str:
    suffix = path.suffix.lower()
    fixed = {".js": "text/javascript; charset=utf-8", ".mjs": "text/javascript; charset=utf-8",
             ".wasm": "application/wasm", ".json": "application/json", ".html": "text/html; charset=utf-8",
             ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".woff2": "font/woff2"}
    if suffix in fixed:
        return fixed[suffix]
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a browser's kept-alive connections must not block close()
    allow_reuse_address = True

    def handle_error(self, request: object, client_address: tuple) -> None:
        # socketserver's default prints to stderr; a browser dropping a connection is routine.
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        log.warning("viewer: request failed", exc_info=True)

    dist: Path
    app_config: bytes
    dicomweb_path: str
    orthanc_http_port: int
    orthanc_root: str


class ViewerServer:
    """OHIF Viewer + DICOMweb proxy to one Orthanc, on 127.0.0.1 only.

    Usage: ``with ViewerServer(orthanc_http_port) as viewer: open viewer.study_url(uid)``.
    Bound to loopback because it is an unauthenticated window onto the PACS. Orthanc must run
    with the DICOMweb plugin (`orthanc_dicomweb_plugin()`, `orthanc_dicomweb_config()`).
    No COOP/COEP headers: OHIF 3.13 renders stacks and volumes without SharedArrayBuffer.
    """

    def __init__(self, orthanc_http_port: int, dist: Path | None = None, port: int | None = None,
                 orthanc_dicomweb_root: str = DICOMWEB_ROOT) -> None:
        from node.demo import free_port

        found = Path(dist) if dist is not None else find_ohif_dist()
        if found is None or not (found / "index.html").is_file():
            where = [str(found)] if found is not None else (
                [f"${OHIF_DIST_ENV}"] + [str(p) for p in OHIF_DIST_CANDIDATES])
            raise NodeError(f"OHIF Viewer build not found (looked in {', '.join(where)}); run `make ohif` "
                            f"to fetch @ohif/app@{OHIF_VERSION}, or set {OHIF_DIST_ENV} to its dist/ folder")
        self.dist = found.resolve()
        self.orthanc_http_port = orthanc_http_port
        self.port = port or free_port()
        self._orthanc_root = "/" + orthanc_dicomweb_root.strip("/") + "/"
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def study_url(self, study_instance_uid: str) -> str:
        """The OHIF basic viewer opened on one study (OHIF's default mode, route `/viewer`)."""
        return f"{self.url}/viewer?StudyInstanceUIDs={urllib.parse.quote(study_instance_uid, safe='')}"

    def start(self) -> ViewerServer:
        if self._server is not None:
            return self
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.dist = self.dist
        server.dicomweb_path = DICOMWEB_ROOT.rstrip("/")
        server.app_config = app_config_js(server.dicomweb_path).encode()
        server.orthanc_http_port = self.orthanc_http_port
        server.orthanc_root = self._orthanc_root
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="ohif-viewer", daemon=True)
        self._thread.start()
        log.info("OHIF viewer on %s (DICOMweb proxied to Orthanc port %d)", self.url, self.orthanc_http_port)
        return self

    def close(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)
        self._server = self._thread = None

    def __enter__(self) -> ViewerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
