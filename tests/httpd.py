#!/usr/bin/env python3
"""Scriptable HTTP/1.1 test server for imagefs tests (loopback only, stdlib only).

Usage
-----
    python3 tests/httpd.py --root DIR [--port 0] [--port-file FILE] [--bind 127.0.0.1]
                           [--tls-cert PEM --tls-key PEM]

  --root DIR        directory whose files are served (URL path /a/b -> DIR/a/b).
  --port N          TCP port; 0 (default) lets the kernel choose one.
  --port-file FILE  once listening, write "<port>\\n" to FILE atomically
                    (FILE.tmp then os.replace).  The file is left in place on exit.
  --bind ADDR       loopback address to bind (default 127.0.0.1; ::1 and
                    "localhost" also accepted; non-loopback addresses are refused).
  --tls-cert PEM    serve HTTPS with this certificate (chain) ...
  --tls-key PEM     ... and its private key.  Everything else behaves the same;
                    the TLS handshake runs in the connection's own thread, and
                    a failed handshake (a client that refuses the certificate) is
                    logged as "(tls-handshake-failed)".

Once listening the server also prints "PORT <n>" on stdout (flushed).  It
exits with status 0 on SIGTERM or SIGINT.  Every request is logged as one line
on stderr, when its response is finished:
    [12:00:00.123] 127.0.0.1:40000 GET /disk.img?rate=100 range='bytes=0-' -> 206 sent=4096 (complete)
(an If-Range header, when sent, follows the range as if-range='"etag"').
(the word in parentheses says how the body ended: complete, head, stall,
reset, short, client-gone, gate-timeout, truncated, ...).  A caller that pipes
stderr must keep reading it (or redirect it to a file).

Files are streamed from disk in 64 KiB pieces (never read whole), so
multi-GiB images are fine.  Directories and missing files answer 404.

Per-request behaviour: query parameters
---------------------------------------
The query string never affects which file is served; it only scripts how.  All
parameters are optional and combinable.  Integers are decimal and >= 0; a
malformed value or an unknown parameter answers 400 (to catch typos in tests).
Parameters whose name starts with "_" or "x-" are ignored (use them to make
distinct URLs for the same file).  Flags accept "1", "true", "yes" or an empty
value as true and "0", "false", "no" as false.  NAME values are file names
relative to DIR ("..", if any, cannot leave DIR).

  rate=BYTES_PER_SEC  throttle the body: small pieces (about 20 writes a
                      second) paced so that the average rate holds.  0 = no limit.
  gate=NAME           send the headers and the first gate_after body bytes, then
                      wait (polling every 50 ms, at most 600 s) until DIR/NAME
                      exists, then send the rest.  If the wait times out the
                      connection is closed.  Not applied to HEAD.
  gate_after=N        where gate= holds the body (default: half the body of this
                      response, rounded down).  If N >= body length the whole
                      body is sent and the gate holds the end of the response
                      (only observable with chunked encoding).  If the body is
                      cut earlier (stall_after/reset_after/short), the gate
                      holds just before the cut.
  stall_after=N       send N body bytes, then send nothing more: keep the socket
                      open, sleeping in 0.5 s steps until the client closes or
                      600 s pass; then close.
  reset_after=N       send N body bytes (waiting, up to 5 s, until the kernel has
                      handed them to the peer), then reset the connection
                      (SO_LINGER 0 + close => RST).
  short=N             advertise the full Content-Length but send only N body
                      bytes, then close the connection cleanly (FIN).
                      stall_after/reset_after/short only act when N is less
                      than the body length of this response; N counts bytes of
                      this response's body (not file offsets).  If several are
                      given the smallest N wins (ties: reset_after, then
                      stall_after, then short).
  nolength=1          no Content-Length; the body uses Transfer-Encoding: chunked.
                      (Misbehaviours then cut the chunked stream mid-way.)
  nohead=1            answer HEAD with 405 Method Not Allowed (Allow: GET).
  norange=1           ignore Range / If-Range (always 200 with the full body) and
                      send no Accept-Ranges header.
  status=CODE         answer with that status code (100..599) and a short
                      text/plain body ("<code> <reason>\\n"), whatever the path.
  redirect=N          if N > 0: answer 302 with Location: the same path and query
                      with redirect=N-1 (all other parameters kept).  At 0 the
                      request is served normally.  Evaluated before status=.
  redirect_host=H     with redirect=N: the Location names host H (e.g.
                      "localhost:8080") instead of the request's Host header.
  etag=VALUE          use VALUE as the ETag (quoted unless it already is quoted or
                      starts with W/).  etag=none sends no ETag at all.
                      Default ETag: a quoted hash of (file size, mtime_ns), so
                      replacing or rewriting the file changes the validator.
  nolastmod=1         do not send Last-Modified (default: the file's mtime).
  once=NAME           the misbehaviours (stall_after, reset_after, short, status)
                      apply only while DIR/NAME does not exist.  The first request
                      that actually misbehaves creates DIR/NAME (before it
                      misbehaves), so the next request is served normally:
                      "fail once, then succeed".  Note: a HEAD answered with
                      status= does misbehave (and uses up the marker); the body
                      misbehaviours never apply to HEAD, and a response whose
                      body is no longer than N does not misbehave either.

Ranges (unless norange=1)
-------------------------
  Range: bytes=A-B, bytes=A- and bytes=-N (suffix) answer 206 with
  Content-Range; B past the end is clamped.  A start at or past the end of the
  file (or any range on an empty file) answers 416 with
  "Content-Range: bytes */SIZE".  Malformed or multi-range headers are ignored
  (200, full body).  If-Range holding an ETag (strong comparison) or an HTTP
  date (must equal Last-Modified to the second) that does not match the current
  validator answers 200 with the full body.  HEAD answers exactly the headers
  GET would, without a body.

Special paths
-------------
  GET /_count/NAME              text "<n>\\n": how many GET requests for /NAME
                                (any query, any outcome, redirects included) the
                                server has received so far.
  GET /_count/NAME?method=HEAD  the same for HEAD requests.
  (Requests to /_count/ are not themselves counted.)

Keep-alive is supported; any misbehaving response closes its connection.
"""

import argparse
import email.utils
import fcntl
import hashlib
import http
import ipaddress
import os
import posixpath
import signal
import socket
import socketserver
import stat
import struct
import sys
import termios
import threading
import time
import traceback
import urllib.parse
from http.server import BaseHTTPRequestHandler

PIECE = 64 * 1024          # streaming piece size
GATE_POLL = 0.05           # seconds between gate-file checks
GATE_MAX = 600.0           # longest gate wait
STALL_STEP = 0.5           # seconds between checks while stalled
STALL_MAX = 600.0          # longest stall
DRAIN_MAX = 5.0            # longest wait for the send queue before a RST

INT_PARAMS = {"rate", "gate_after", "stall_after", "reset_after", "short",
              "status", "redirect"}
FLAG_PARAMS = {"nolength", "nohead", "norange", "nolastmod"}
STR_PARAMS = {"gate", "etag", "once", "method", "redirect_host"}
TRUE_WORDS = {"", "1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}


class BadRequest(Exception):
    """A query parameter is malformed; answered with 400."""


class ClientGone(Exception):
    """The peer closed or reset the connection while we were sending."""


class Abort(Exception):
    """Stop sending and close the connection; the argument names the reason."""


def parse_params(query):
    """Parse the query string into a dict of typed values (last one wins)."""
    params = {}
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if key.startswith("_") or key.startswith("x-"):
            continue
        if key in INT_PARAMS:
            try:
                number = int(value, 10)
            except ValueError:
                raise BadRequest(f"parameter {key}={value!r} is not an integer")
            if number < 0:
                raise BadRequest(f"parameter {key}={value!r} is negative")
            params[key] = number
        elif key in FLAG_PARAMS:
            word = value.lower()
            if word in TRUE_WORDS:
                params[key] = True
            elif word in FALSE_WORDS:
                params[key] = False
            else:
                raise BadRequest(f"flag {key}={value!r} is not a boolean")
        elif key in STR_PARAMS:
            params[key] = value
        else:
            raise BadRequest(f"unknown parameter {key!r}")
    if "status" in params and not 100 <= params["status"] <= 599:
        raise BadRequest("status must be within 100..599")
    for key in ("gate", "once"):
        if key in params and not params[key].strip("/"):
            raise BadRequest(f"parameter {key} needs a file name")
    return params


def clean_relpath(path):
    """Normalise a URL path (already unquoted) to a relative path inside root."""
    return posixpath.normpath("/" + path).lstrip("/")


def parse_range(header, size):
    """Interpret a Range header against a file of SIZE bytes.

    Returns None to ignore the header (serve 200), "unsatisfiable" for 416, or
    an inclusive (first, last) pair for 206.
    """
    header = header.strip()
    if not header.lower().startswith("bytes="):
        return None
    spec = header[6:].strip()
    if "," in spec or "-" not in spec:
        return None  # multi-range or garbage: ignore (allowed by RFC 9110)
    first_s, last_s = (part.strip() for part in spec.split("-", 1))
    try:
        if first_s == "":                      # suffix: bytes=-N
            if not last_s.isdigit():
                return None
            suffix = int(last_s)
            if suffix == 0 or size == 0:
                return "unsatisfiable"
            return (max(0, size - suffix), size - 1)
        if not first_s.isdigit() or (last_s and not last_s.isdigit()):
            return None
        first = int(first_s)
        last = int(last_s) if last_s else size - 1
    except ValueError:
        return None
    if last_s and last < first:
        return None                             # invalid spec: ignore
    if first >= size:
        return "unsatisfiable"
    return (first, min(last, size - 1))


class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """Threaded TCP server; one daemon thread per connection."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, root, family, tls=None):
        self.address_family = family
        self.root = root
        self.tls = tls                         # ssl.SSLContext or None
        self.counts = {}                       # (method, "/path") -> int
        self.lock = threading.Lock()           # guards counts and once markers
        super().__init__(address, Handler)

    def server_bind(self):
        # Like HTTPServer.server_bind, minus the (possibly slow) getfqdn().
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def get_request(self):
        sock, addr = super().get_request()
        if self.tls is not None:
            # The handshake happens in the handler's thread (Handler.setup), so a slow or
            # refusing client never blocks accept().
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def count(self, method, path):
        with self.lock:
            key = (method, path)
            self.counts[key] = self.counts.get(key, 0) + 1

    def get_count(self, method, path):
        with self.lock:
            return self.counts.get((method, path), 0)

    def claim_once(self, name):
        """True if the marker DIR/NAME did not exist; it exists afterwards."""
        marker = os.path.join(self.root, clean_relpath(name))
        with self.lock:
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            os.close(fd)
            return True


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "imagefs-testhttpd/1.0"
    disable_nagle_algorithm = True

    # ----------------------------------------------------------------- entry

    def setup(self):
        if self.server.tls is not None:
            self.request.settimeout(10)
            try:
                self.request.do_handshake()
            except (OSError, ValueError) as exc:
                sys.stderr.write(f"[{_now()}] {self.client_address[0]}:{self.client_address[1]} "
                                 f"(tls-handshake-failed: {exc})\n")
                sys.stderr.flush()
                self._tls_failed = True
            self.request.settimeout(None)
        super().setup()

    def handle(self):
        if getattr(self, "_tls_failed", False):
            return
        super().handle()

    def do_GET(self):
        self._serve(head=False)

    def do_HEAD(self):
        self._serve(head=True)

    def _serve(self, head):
        self._status = None
        self._sent = 0
        self._outcome = "head" if head else "complete"
        self._chunked = False
        try:
            self._respond(head)
        except BadRequest as exc:
            self._text_response(400, f"bad request: {exc}\n", head)
        except ClientGone:
            self._outcome = "client-gone"
            self.close_connection = True
        except Abort as exc:
            self._outcome = str(exc)
            self.close_connection = True
        except Exception:  # keep serving other requests; report the bug
            self._outcome = "server-error"
            self.close_connection = True
            traceback.print_exc(file=sys.stderr)
            if self._status is None:
                try:
                    self._text_response(500, "internal test-server error\n", head)
                except OSError:
                    pass
        finally:
            self._log_line()

    # ------------------------------------------------------------- decisions

    def _respond(self, head):
        split = urllib.parse.urlsplit(self.path)
        rel = clean_relpath(urllib.parse.unquote(split.path))
        method = "HEAD" if head else "GET"

        if rel == "_count" or rel.startswith("_count/"):
            params = parse_params(split.query)
            target = "/" + clean_relpath(rel[len("_count"):])
            which = params.get("method", "GET").upper()
            self._text_response(200, f"{self.server.get_count(which, target)}\n", head)
            return

        self.server.count(method, "/" + rel)
        params = parse_params(split.query)
        if "method" in params:
            raise BadRequest("parameter 'method' is only for /_count/")

        if head and params.get("nohead"):
            self._text_response(405, "HEAD not allowed here\n", head,
                                extra=[("Allow", "GET")])
            return

        if params.get("redirect", 0) > 0:
            self._redirect(split, params.get("redirect_host"))
            return

        once = params.get("once")

        def misbehave():
            """Decide (once) that this response misbehaves."""
            return once is None or self.server.claim_once(once)

        if "status" in params and misbehave():
            code = params["status"]
            try:
                phrase = http.HTTPStatus(code).phrase
            except ValueError:
                phrase = "Scripted Status"
            self._text_response(code, f"{code} {phrase}\n", head)
            return

        path = os.path.join(self.server.root, rel)
        try:
            fobj = open(path, "rb")
        except OSError:
            self._text_response(404, "not found\n", head)
            return
        with fobj:
            st = os.fstat(fobj.fileno())
            if not stat.S_ISREG(st.st_mode):    # directories, devices, ...
                self._text_response(404, "not found\n", head)
                return
            self._serve_file(fobj, st, params, head, misbehave)

    def _serve_file(self, fobj, st, params, head, misbehave):
        size = st.st_size
        etag = self._etag(st, params)
        lastmod = None if params.get("nolastmod") else email.utils.formatdate(
            st.st_mtime, usegmt=True)

        # Pick the status and the byte span to send.
        code, first, length = 200, 0, size
        range_header = self.headers.get("Range")
        if range_header is not None and not params.get("norange"):
            if_range = self.headers.get("If-Range")
            if if_range is None or _if_range_matches(if_range, etag, st):
                span = parse_range(range_header, size)
                if span == "unsatisfiable":
                    self._text_response(416, "range not satisfiable\n", head,
                                        extra=[("Content-Range", f"bytes */{size}")])
                    return
                if span is not None:
                    code, first, length = 206, span[0], span[1] - span[0] + 1

        # Decide where (if anywhere) the body gets cut short, and how.
        cut, action = None, None
        if not head:
            for name in ("reset_after", "stall_after", "short"):  # tie order
                n = params.get(name)
                if n is not None and n < length and (cut is None or n < cut):
                    cut, action = n, name
            if cut is not None and not misbehave():
                cut, action = None, None

        headers = [("Content-Type", "application/octet-stream")]
        if not params.get("norange"):
            headers.append(("Accept-Ranges", "bytes"))
        if etag is not None:
            headers.append(("ETag", etag))
        if lastmod is not None:
            headers.append(("Last-Modified", lastmod))
        if code == 206:
            headers.append(("Content-Range",
                            f"bytes {first}-{first + length - 1}/{size}"))
        if params.get("nolength"):
            headers.append(("Transfer-Encoding", "chunked"))
            self._chunked = True
        else:
            headers.append(("Content-Length", str(length)))

        self.send_response(code)
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        if head:
            return

        # Stream the body: [gate] -> [cut action] -> end of response.
        fobj.seek(first)
        rate = params.get("rate", 0)
        limit = length if cut is None else cut
        if "gate" in params:
            gate_at = min(params.get("gate_after", length // 2), limit)
            self._pump(fobj, gate_at, rate)
            self._wait_gate(params["gate"])
            self._pump(fobj, limit - gate_at, rate)
        else:
            self._pump(fobj, limit, rate)

        if action == "reset_after":
            self._reset()
        elif action == "stall_after":
            self._stall()
        elif action == "short":
            self._outcome = "short"
            self.close_connection = True
        elif self._chunked:
            self._write(b"0\r\n\r\n", raw=True)

    def _etag(self, st, params):
        override = params.get("etag")
        if override is not None:
            if override.lower() == "none":
                return None
            if override.startswith('"') or override.startswith("W/"):
                return override
            return f'"{override}"'
        digest = hashlib.sha1(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
        return f'"{digest[:20]}"'

    def _redirect(self, split, redirect_host=None):
        pairs = urllib.parse.parse_qsl(split.query, keep_blank_values=True)
        pairs = [(k, str(int(v) - 1) if k == "redirect" else v) for k, v in pairs]
        target = split.path + "?" + urllib.parse.urlencode(pairs)
        host = redirect_host or self.headers.get("Host")
        scheme = "https" if self.server.tls is not None else "http"
        location = f"{scheme}://{host}{target}" if host else target
        self._text_response(302, f"redirect to {target}\n", self.command == "HEAD",
                            extra=[("Location", location)])

    # ------------------------------------------------------------- sending

    def send_response(self, code, message=None):
        self._status = code
        super().send_response(code, message)

    def _text_response(self, code, text, head, extra=()):
        body = text.encode()
        no_body = code < 200 or code in (204, 304)
        self.send_response(code)
        for key, value in extra:
            self.send_header(key, value)
        if not no_body:
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if not head and not no_body:
            self._write(body, raw=True)
            self._sent += len(body)

    def _write(self, data, raw=False):
        """Write body bytes (chunk-framed unless raw); map errors to ClientGone."""
        if self._chunked and not raw:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        try:
            self.wfile.write(data)
        except OSError as exc:
            raise ClientGone() from exc

    def _pump(self, fobj, count, rate):
        """Send COUNT bytes from the file's current position, paced to RATE B/s."""
        piece = PIECE if not rate else max(1, min(PIECE, rate // 20))
        start = time.monotonic()
        done = 0
        while done < count:
            data = fobj.read(min(piece, count - done))
            if not data:
                raise Abort("truncated")      # file shrank under us
            self._write(data)
            done += len(data)
            self._sent += len(data)
            if rate:
                delay = start + done / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)

    def _peer_gone(self):
        """Non-blocking check whether the client closed the connection."""
        if self.server.tls is not None:
            # TLS records cannot be read half-way: peek at the raw socket instead.
            try:
                data = socket.socket.recv(self.connection, 1, socket.MSG_DONTWAIT | socket.MSG_PEEK)
            except BlockingIOError:
                return False
            except OSError:
                return True
            return not data
        try:
            data = self.connection.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
        if not data:
            return True
        self.close_connection = True  # we swallowed pipelined bytes
        return False

    def _wait_gate(self, name):
        gate = os.path.join(self.server.root, clean_relpath(name))
        deadline = time.monotonic() + GATE_MAX
        while not os.path.exists(gate):
            if self._peer_gone():
                raise ClientGone()
            if time.monotonic() > deadline:
                raise Abort("gate-timeout")
            time.sleep(GATE_POLL)

    def _stall(self):
        self._outcome = "stall"
        self.close_connection = True
        deadline = time.monotonic() + STALL_MAX
        while time.monotonic() < deadline:
            if self._peer_gone():
                self._outcome = "stall,client-closed"
                return
            time.sleep(STALL_STEP)
        self._outcome = "stall,timeout"

    def _reset(self):
        """Abort the connection with a TCP RST after the sent bytes reached the peer."""
        self._outcome = "reset"
        self.close_connection = True
        sock = self.connection
        deadline = time.monotonic() + DRAIN_MAX
        try:
            while time.monotonic() < deadline:
                buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
                if struct.unpack("i", buf)[0] == 0:
                    break
                time.sleep(0.01)
        except (OSError, AttributeError):  # no TIOCOUTQ: best effort
            time.sleep(0.1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # detach() so that later close()/shutdown() by the server can neither
        # send a FIN first nor touch a re-used descriptor number.
        os.close(sock.detach())

    # ------------------------------------------------------------- logging

    def log_request(self, code="-", size="-"):
        pass  # replaced by _log_line (one line per finished request)

    def log_message(self, format, *args):
        # Used by BaseHTTPRequestHandler for malformed requests / send_error.
        sys.stderr.write(f"[{_now()}] {self.client_address[0]}:{self.client_address[1]} "
                         f"{format % args}\n")
        sys.stderr.flush()

    def _log_line(self):
        rng = self.headers.get("Range") if self.headers else None
        if_range = self.headers.get("If-Range") if self.headers else None
        line = (f"[{_now()}] {self.client_address[0]}:{self.client_address[1]} "
                f"{self.command} {self.path} range={'-' if rng is None else repr(rng)}"
                f"{'' if if_range is None else ' if-range=' + repr(if_range)}"
                f" -> {self._status if self._status is not None else '-'}"
                f" sent={self._sent} ({self._outcome})\n")
        sys.stderr.write(line)
        sys.stderr.flush()


def _if_range_matches(value, etag, st):
    """Does an If-Range value (ETag or HTTP date) match the current validator?"""
    value = value.strip()
    if value.startswith('"') or value.startswith("W/"):
        # Strong comparison: weak tags never match.
        return etag is not None and not value.startswith("W/") \
            and not etag.startswith("W/") and value == etag
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return False
    return when is not None and int(when.timestamp()) == int(st.st_mtime)


def _now():
    t = time.time()
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def _loopback_family(bind):
    """Return the socket family for a loopback BIND address, or exit."""
    if bind == "localhost":
        return "127.0.0.1", socket.AF_INET
    try:
        addr = ipaddress.ip_address(bind)
    except ValueError:
        sys.exit(f"httpd.py: --bind {bind!r} is not an IP address")
    if not addr.is_loopback:
        sys.exit(f"httpd.py: --bind {bind} is not a loopback address; refusing")
    return bind, socket.AF_INET6 if addr.version == 6 else socket.AF_INET


def _write_port_file(path, port):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{port}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _Stop(Exception):
    pass


def main(argv=None):
    parser = argparse.ArgumentParser(description="Scriptable loopback HTTP/1.1 test server.")
    parser.add_argument("--root", required=True, help="directory to serve")
    parser.add_argument("--port", type=int, default=0, help="port (0 = any free port)")
    parser.add_argument("--port-file", help="write the chosen port to this file")
    parser.add_argument("--bind", default="127.0.0.1", help="loopback address to bind")
    parser.add_argument("--tls-cert", help="serve HTTPS with this PEM certificate (chain)")
    parser.add_argument("--tls-key", help="the PEM private key of --tls-cert")
    args = parser.parse_args(argv)
    tls = None
    if bool(args.tls_cert) != bool(args.tls_key):
        sys.exit("httpd.py: --tls-cert and --tls-key go together")
    if args.tls_cert:
        import ssl
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(args.tls_cert, args.tls_key)

    root = os.path.abspath(args.root)
    if not os.path.isdir(root):
        sys.exit(f"httpd.py: --root {args.root!r} is not a directory")
    host, family = _loopback_family(args.bind)

    def stop(signum, frame):
        raise _Stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    server = Server((host, args.port), root, family, tls)
    try:
        port = server.server_address[1]
        if args.port_file:
            _write_port_file(args.port_file, port)
        print(f"PORT {port}", flush=True)
        sys.stderr.write(f"[{_now()}] serving {root} on {host} port {port}"
                         f"{' (https)' if tls else ''}\n")
        sys.stderr.flush()
        server.serve_forever(poll_interval=0.2)
    except _Stop:
        pass
    finally:
        server.server_close()
    sys.stderr.write(f"[{_now()}] stopped\n")
    sys.stderr.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
