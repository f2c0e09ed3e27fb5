"""Strict HTTP/1.1 framing (CONTRACT.md section 3, RFC 9112) and the server's hand-off rules.

Three tiers: the parser functions directly; the server in this process with a tiny WSGI app (upgrade
hand-off, keep-alive, drain, cap, timeouts); and the real `python app.py` over raw sockets, where each
malformed head also proves that nothing of it was applied (a deposit inside it leaves the balance at 0).
"""

import fcntl
import json
import socket
import struct
import termios
import threading
import time

import pytest
import requests

import http_server
from conftest import peer_closes, wait_for
from http_server import BadRequest, Body, Request, Server, check_chunk_line, parse_head, peek_until, read_until

TIMEOUT = 5

# -- the parser, directly ---------------------------------------------------------------------------

GOOD = b"POST /api/wallet/deposit?x=1 HTTP/1.1\r\nHost: localhost:8080\r\nContent-Length: 12\r\n"


def head(*fields: bytes, line: bytes = b"POST /p HTTP/1.1", host: bytes = b"Host: x") -> bytes:
    return b"\r\n".join([line, *([host] if host else []), *fields]) + b"\r\n"


def test_a_well_formed_head_is_parsed():
    request = parse_head(GOOD + b"X-Spaces:  a  b \t\r\nExpect: 100-Continue\r\n")
    assert (request.method, request.target, request.version) == ("POST", "/api/wallet/deposit?x=1", "HTTP/1.1")
    assert request.fields == [("Host", "localhost:8080"), ("Content-Length", "12"), ("X-Spaces", "a  b"),
                              ("Expect", "100-Continue")]
    assert request.length == 12 and not request.chunked
    assert request.keep_alive and request.expect_continue


@pytest.mark.parametrize("te", [b"chunked", b"Chunked", b"CHUNKED", b"  chunked\t"])
def test_chunked_in_any_letter_case_is_chunked(te):
    request = parse_head(head(b"Transfer-Encoding: " + te))
    assert request.chunked and request.length == 0


@pytest.mark.parametrize("fields, keep_alive", [
    ((), True), ((b"Connection: close",), False), ((b"Connection: keep-alive, Close",), False),
    ((b"Connection: Upgrade",), True)])
def test_keep_alive_in_http_1_1(fields, keep_alive):
    assert parse_head(head(*fields)).keep_alive is keep_alive


@pytest.mark.parametrize("fields, keep_alive", [((), False), ((b"Connection: Keep-Alive",), True)])
def test_keep_alive_in_http_1_0(fields, keep_alive):
    request = parse_head(head(*fields, line=b"GET / HTTP/1.0", host=b""))
    assert request.version == "HTTP/1.0" and request.keep_alive is keep_alive and not request.expect_continue


def test_empty_lines_before_the_request_line_are_ignored():
    assert parse_head(b"\r\n\r\n" + GOOD).method == "POST"


@pytest.mark.parametrize("fields", [(b"Content-Length: 5", b"Content-Length: 5"), (b"Content-Length: 5, 5",)])
def test_repeated_identical_content_length_is_one_length(fields):
    assert parse_head(head(*fields)).length == 5


@pytest.mark.parametrize("target", [b"/", b"/a/b?c=d&e=%20", b"*", b"http://example.com/x?y", b"/%ff%00"])
def test_request_targets(target):
    assert parse_head(head(line=b"OPTIONS " + target + b" HTTP/1.1")).target == target.decode()


def test_obs_text_in_a_value_is_kept_as_latin_1():
    assert parse_head(head(b"X-Name: caf\xe9")).fields[-1] == ("X-Name", "caf\xe9")


def test_http_1_x_minor_versions_are_1_1():
    assert parse_head(head(line=b"GET / HTTP/1.7")).version == "HTTP/1.1"


# Every malformed head of the contract and RFC 9112; the value is the expected status.
MALFORMED = {
    "no colon": (head(b"X-Junk"), 400),
    "space before colon": (head(b"X-Junk : 1"), 400),
    "tab before colon": (head(b"X-Junk\t: 1"), 400),
    "empty name": (head(b": 1"), 400),
    "bad name character": (head(b"X(Junk): 1"), 400),
    "bare CR in value": (head(b"X-Junk: a\rb"), 400),
    "bare CR ending a value": (head(b"X-Junk: a\r"), 400),
    "bare CR line": (head(b"\r"), 400),
    "bare LF inside the head": (head(b"X-Junk: a\nX-Other: b"), 400),
    "NUL in value": (head(b"X-Junk: a\x00b"), 400),
    "NUL in name": (head(b"X-Ju\x00nk: a"), 400),
    "NUL in request line": (head(line=b"POST /p\x00 HTTP/1.1"), 400),
    "DEL in value": (head(b"X-Junk: a\x7fb"), 400),
    "vertical tab in value": (head(b"X-Junk: a\x0bb"), 400),
    "escape in value": (head(b"X-Junk: \x1b[31m"), 400),
    "obs-fold with space": (head(b"X-Junk: a", b" b"), 400),
    "obs-fold with tab": (head(b"X-Junk: a", b"\tb"), 400),
    "obs-fold as first field": (head(b" X-Junk: a"), 400),
    "TE chunked;q=1": (head(b"Transfer-Encoding: chunked;q=1"), 400),
    "TE xchunked": (head(b"Transfer-Encoding: xchunked"), 400),
    "TE identity": (head(b"Transfer-Encoding: identity"), 400),
    "TE vertical tab": (head(b"Transfer-Encoding: \x0bchunked"), 400),
    "TE trailing vertical tab": (head(b"Transfer-Encoding: chunked\x0b"), 400),
    "TE gzip, chunked": (head(b"Transfer-Encoding: gzip, chunked"), 400),
    "TE chunked, chunked": (head(b"Transfer-Encoding: chunked, chunked"), 400),
    "TE chunked,": (head(b"Transfer-Encoding: chunked,"), 400),
    "TE twice": (head(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"), 400),
    "TE empty": (head(b"Transfer-Encoding:"), 400),
    "TE quoted": (head(b'Transfer-Encoding: "chunked"'), 400),
    "TE space before colon": (head(b"Transfer-Encoding : chunked"), 400),
    "TE and Content-Length": (head(b"Transfer-Encoding: chunked", b"Content-Length: 5"), 400),
    "Content-Length and TE": (head(b"Content-Length: 5", b"Transfer-Encoding: chunked"), 400),
    "TE in HTTP/1.0": (head(b"Transfer-Encoding: chunked", line=b"POST /p HTTP/1.0"), 400),
    "CL letters": (head(b"Content-Length: abc"), 400),
    "CL negative": (head(b"Content-Length: -5"), 400),
    "CL plus": (head(b"Content-Length: +5"), 400),
    "CL hex": (head(b"Content-Length: 0x5"), 400),
    "CL empty": (head(b"Content-Length:"), 400),
    "CL inner space": (head(b"Content-Length: 5 5"), 400),
    "CL exponent": (head(b"Content-Length: 1e2"), 400),
    "CL underscore": (head(b"Content-Length: 1_0"), 400),
    "CL too many digits": (head(b"Content-Length: 1234567890123456789"), 400),
    "CL repeated differing": (head(b"Content-Length: 5", b"Content-Length: 6"), 400),
    "CL differing list": (head(b"Content-Length: 5, 6"), 400),
    "CL empty list member": (head(b"Content-Length: 5,"), 400),
    "Host missing in HTTP/1.1": (head(host=b""), 400),
    "Host repeated": (head(b"Host: y"), 400),
    "Host repeated identical": (head(b"Host: x"), 400),
    "Host invalid": (head(host=b"Host: a b"), 400),
    "Host with a path": (head(host=b"Host: x/y"), 400),
    "request line double space": (head(line=b"POST  /p HTTP/1.1"), 400),
    "request line trailing space": (head(line=b"POST /p HTTP/1.1 "), 400),
    "request line tab": (head(line=b"POST\t/p HTTP/1.1"), 400),
    "request line without version": (head(line=b"POST /p"), 400),
    "request line extra word": (head(line=b"POST /p x HTTP/1.1"), 400),
    "lower-case version": (head(line=b"POST /p http/1.1"), 400),
    "version without minor": (head(line=b"POST /p HTTP/1"), 400),
    "version with two digits": (head(line=b"POST /p HTTP/1.10"), 400),
    "HTTP/2.0": (head(line=b"POST /p HTTP/2.0"), 505),
    "HTTP/0.9": (head(line=b"POST /p HTTP/0.9"), 505),
    "method with a bad character": (head(line=b'PO"ST /p HTTP/1.1'), 400),
    "method with obs-text": (head(line=b"P\xc3\x96ST /p HTTP/1.1"), 400),
    "relative target": (head(line=b"POST p HTTP/1.1"), 400),
    "target with a fragment": (head(line=b"POST /p#x HTTP/1.1"), 400),
    "target with obs-text": (head(line=b"POST /\xe9 HTTP/1.1"), 400),
    "target with a bare CR": (head(line=b"POST /p\r HTTP/1.1"), 400),
    "too many fields": (head(*[b"X-%d: 1" % i for i in range(101)]), 431),
    "empty": (b"\r\n", 400),
}


@pytest.mark.parametrize("data, status", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_heads_are_refused(data, status):
    with pytest.raises(BadRequest) as info:
        parse_head(data)
    assert info.value.status == status


def test_the_refusal_names_the_problem_without_echoing_client_bytes():
    messages = {name: _refusal(data) for name, (data, _) in MALFORMED.items()}
    assert messages["no colon"] == "header line without a colon"
    assert messages["space before colon"] == "whitespace before a colon in a header"
    assert messages["obs-fold with space"] == "obsolete line folding in a header"
    assert messages["TE and Content-Length"] == "both Transfer-Encoding and Content-Length"
    assert messages["Host missing in HTTP/1.1"] == "missing Host header"
    for message in messages.values():
        assert message.isascii() and message.isprintable() and "Junk" not in message


def _refusal(data):
    try:
        parse_head(data)
    except BadRequest as exc:
        return exc.message
    raise AssertionError("accepted")


@pytest.mark.parametrize("line, size", [(b"0", 0), (b"1f", 31), (b"1F", 31), (b"000a", 10),
                                        (b"5;ext", 5), (b"5 ; a=b ;c", 5), (b'5;a="q\\"x y"', 5)])
def test_chunk_size_lines(line, size):
    assert check_chunk_line(line) == size


@pytest.mark.parametrize("line", [b"", b"zz", b"-1", b"+5", b"0x5", b"1_0", b" 5", b"5 ", b"5;", b"5;a=",
                                  b"5;a=\x00", b"5\x00", b"ffffffffffffffff", b"5;a=b c", b"\xef5"])
def test_malformed_chunk_size_lines(line):
    with pytest.raises(BadRequest):
        check_chunk_line(line)


def _socket_pair(data: bytes):
    ours, theirs = socket.socketpair()
    theirs.sendall(data)
    theirs.shutdown(socket.SHUT_WR)
    return ours, theirs


def test_read_until_consumes_nothing_past_the_terminator():
    ours, theirs = _socket_pair(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nNEXT")
    with ours, theirs:
        assert read_until(ours, b"\r\n\r\n", 1000, time.monotonic() + 5, 0) == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        assert ours.recv(100) == b"NEXT"


def test_peek_until_leaves_the_end_of_the_head_and_counts_what_came_after_it():
    ours, theirs = _socket_pair(b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nBODYNEXT")
    with ours, theirs:
        found, unread, spare = peek_until(ours, b"\r\n\r\n", 1000, time.monotonic() + 5, 0)
        assert found == b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\n"
        assert spare == len(b"BODYNEXT")
        # Nothing of the head's last piece was consumed: the caller takes it with the body in one read.
        assert ours.recv(unread) == found[-unread:]
        assert ours.recv(100) == b"BODYNEXT"


def _pending(sock: socket.socket) -> int:
    """Bytes waiting in the socket's receive queue (not a read: the reader thread owns the socket)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


def test_read_until_finds_a_terminator_split_across_reads():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        found = []
        reader = threading.Thread(target=lambda: found.append(read_until(ours, b"\r\n\r\n", 1000,
                                                                         time.monotonic() + 5, 0)))
        reader.start()
        for piece in (b"GET / HTTP/1.1\r", b"\nHost: x\r\n", b"\r"):
            theirs.sendall(piece)
            wait_for(lambda: _pending(ours) == 0, timeout=5, message="the reader to take the piece")
        theirs.sendall(b"\nrest")
        reader.join(5)
        assert found == [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"]
        assert ours.recv(100) == b"rest"


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\nHost: x\n\n", b"GET / HTTP/1.1\r\nX: a\rb", b"GET /\x00 HTTP/1.1"])
def test_read_until_refuses_broken_line_ends_without_waiting_for_the_timeout(data):
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(data + b"more")
        start = time.monotonic()
        with pytest.raises(BadRequest):
            read_until(ours, b"\r\n\r\n", 1000, time.monotonic() + 5, 0)
        assert time.monotonic() - start < 1


def test_read_until_refuses_a_head_over_the_limit():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"GET / HTTP/1.1\r\nX: " + b"a" * 70000)
        with pytest.raises(BadRequest) as info:
            read_until(ours, b"\r\n\r\n", http_server.MAX_HEAD, time.monotonic() + 5, 0)
        assert info.value.status == 431


def test_read_until_keeps_its_deadline_however_slowly_bytes_come():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        stop = threading.Event()

        def trickle():
            while not stop.wait(0.05):
                theirs.send(b"a")

        threading.Thread(target=trickle, daemon=True).start()
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            read_until(ours, b"\r\n\r\n", 1000, start + 0.5, 0)
        stop.set()
        assert 0.4 < time.monotonic() - start < 1.5


def _chunked() -> Request:
    return parse_head(head(b"Transfer-Encoding: chunked"))


def test_a_chunked_body_with_extensions_and_trailers_reads_exactly():
    data = b"5;name=value\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT"
    ours, theirs = _socket_pair(data)
    with ours, theirs:
        body = Body(ours, _chunked(), 5)
        assert body.read(3) == b"hel"
        assert body.read() == b"lo, world"
        assert body.read() == b"" and body.complete
        assert ours.recv(100) == b"NEXT"


def test_a_content_length_body_reads_exactly():
    ours, theirs = _socket_pair(b"0123456789NEXT")
    with ours, theirs:
        request = parse_head(head(b"Content-Length: 10"))
        body = Body(ours, request, 5)
        assert body.read(100) == b"0123456789" and body.complete
        assert ours.recv(100) == b"NEXT"


def test_a_body_read_with_its_head_is_served_in_pieces_and_reads_nothing_more():
    ours, theirs = _socket_pair(b"NEXT")
    with ours, theirs:
        request = parse_head(head(b"Content-Length: 10"))
        body = Body(ours, request, 5, whole=b"0123456789")
        assert body.complete  # the socket is at the end of the request, read or not
        assert body.read(4) == b"0123"
        assert body.read(100) == b"456789" and body.complete
        assert body.read() == b""
        assert ours.recv(100) == b"NEXT"


BAD_CHUNKED = {
    "not hex": b"zz\r\nabc\r\n0\r\n\r\n",
    "0x prefix": b"0x3\r\nabc\r\n0\r\n\r\n",
    "underscore": b"0_3\r\nabc\r\n0\r\n\r\n",
    "plus": b"+3\r\nabc\r\n0\r\n\r\n",
    "leading space": b" 3\r\nabc\r\n0\r\n\r\n",
    "bare LF after size": b"3\nabc\r\n0\r\n\r\n",
    "no CRLF after data": b"3\r\nabcXX0\r\n\r\n",
    "LF after data": b"3\r\nabc\n0\r\n\r\n",
    "huge size": b"fffffffffffffffff\r\nabc\r\n0\r\n\r\n",
    "trailer without colon": b"3\r\nabc\r\n0\r\nX-Junk\r\n\r\n",
    "bare LF ending the body": b"3\r\nabc\r\n0\r\n\n",
    "cut short": b"3\r\nab",
    "no last chunk": b"3\r\nabc\r\n",
}


@pytest.mark.parametrize("data", BAD_CHUNKED.values(), ids=BAD_CHUNKED.keys())
def test_malformed_chunked_bodies_fail_and_mark_the_body(data):
    ours, theirs = _socket_pair(data)
    with ours, theirs:
        body = Body(ours, _chunked(), 5)
        with pytest.raises((BadRequest, OSError)):
            body.read()
        assert body.failed and not body.complete
        assert body.read() == b""


# -- the server in this process, with a tiny WSGI app ----------------------------------------------------


class Harness:
    """A Server around a WSGI app on a loopback port, with helpers to talk to it."""

    def __init__(self, app, **kwargs):
        self.server = Server(http_server.bind("127.0.0.1", 0), app, **kwargs)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.server.drain(2)


@pytest.fixture
def harness():
    made = []

    def make(app, **kwargs):
        made.append(Harness(app, **kwargs))
        return made[-1]

    yield make
    for h in made:
        h.close()


def echo_app(environ, start_response):
    body = environ["wsgi.input"].read()
    headers = [("Content-Type", "application/json")]
    if environ.get("HTTP_X_CLOSE"):
        headers.append(("Connection", "close"))
    text = json.dumps({"method": environ["REQUEST_METHOD"], "path": environ["PATH_INFO"],
                       "query": environ["QUERY_STRING"], "body": body.decode("latin-1"),
                       "host": environ.get("HTTP_HOST")})
    start_response("200 OK", headers + [("Content-Length", str(len(text)))])
    return [] if environ["REQUEST_METHOD"] == "HEAD" else [text.encode()]


def read_response(sock: socket.socket, buffer: bytearray, head: bool = False) -> tuple[int, dict, bytes]:
    """One response from the socket (with what was read past it kept in buffer); head: answer to a HEAD."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed; got {bytes(buffer)!r}")
        buffer += chunk
    end = buffer.index(b"\r\n\r\n")
    lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    del buffer[:end + 4]
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = 0 if head or status in (100, 204, 304) else int(headers.get("content-length", 0))
    while len(buffer) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed in a body")
        buffer += chunk
    body = bytes(buffer[:length])
    del buffer[:length]
    return status, headers, body



def test_pipelined_requests_are_answered_in_order_and_bodies_are_not_requests(harness):
    h = harness(echo_app)
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    with h.connect() as s:
        s.sendall(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled
                  + b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  + b"%x\r\n" % len(smuggled) + smuggled + b"\r\n0\r\n\r\n"
                  + b"GET /c?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        buf = bytearray()
        answers = [json.loads(read_response(s, buf)[2]) for _ in range(3)]
        assert [(a["path"], a["body"]) for a in answers] == [("/a", smuggled.decode()), ("/b", smuggled.decode()),
                                                             ("/c", "")]
        assert answers[2]["query"] == "q=1"
        assert not peer_closes(s, 0.2)  # keep-alive


def test_a_body_that_comes_after_its_head_is_read_exactly_whichever_way_it_arrives(harness):
    # The head and the first bytes of the body in one packet, the rest in another: the server cannot
    # take the body with the head (it is not all there yet, unless both packets beat it) and reads on.
    h = harness(echo_app)
    with h.connect() as s:
        s.sendall(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n012")
        s.sendall(b"3456789GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        buf = bytearray()
        answers = [json.loads(read_response(s, buf)[2]) for _ in range(2)]
        assert [(a["path"], a["body"]) for a in answers] == [("/a", "0123456789"), ("/b", "")]


def test_responses_carry_date_and_server_and_the_body_length(harness):
    h = harness(echo_app)
    with h.connect() as s:
        s.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = read_response(s, bytearray())
        assert status == 200 and headers["server"] == "wallet"
        assert headers["date"].endswith(" GMT") and int(headers["content-length"]) == len(body)


def test_head_gets_the_length_of_the_body_it_does_not_get(harness):
    h = harness(echo_app)
    with h.connect() as s:
        s.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        buf = bytearray()
        _, _, body = read_response(s, buf)
        s.sendall(b"HEAD /x HTTP/1.1\r\nHost: x\r\n\r\nGET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = read_response(s, buf, head=True)
        assert status == 200 and int(headers["content-length"]) == len(body.replace(b'"GET"', b'"HEAD"'))
        # The HEAD answer had no body: the next bytes are the next response.
        assert read_response(s, buf)[2] == body


def test_http_1_0_keep_alive_is_honoured_and_announced(harness):
    h = harness(echo_app)
    with h.connect() as s:
        s.sendall(b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        buf = bytearray()
        assert read_response(s, buf)[1]["connection"] == "keep-alive"
        s.sendall(b"GET /y HTTP/1.0\r\n\r\n")
        assert read_response(s, buf)[1]["connection"] == "close"
        assert peer_closes(s, TIMEOUT)


def test_absolute_form_target_gives_path_and_host(harness):
    h = harness(echo_app)
    with h.connect() as s:
        s.sendall(b"GET http://other:81/p?q HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = json.loads(read_response(s, bytearray())[2])
        assert (answer["path"], answer["query"], answer["host"]) == ("/p", "q", "other:81")


def test_connection_close_in_the_apps_response_closes_the_connection(harness):
    h = harness(echo_app)
    with h.connect() as s:
        s.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\nX-Close: 1\r\n\r\nGET /never HTTP/1.1\r\nHost: x\r\n\r\n")
        buf = bytearray()
        assert read_response(s, buf)[1]["connection"] == "close"
        assert peer_closes(s, TIMEOUT) and not buf


def test_a_malformed_request_after_a_good_one_gets_400_and_the_close(harness):
    h = harness(echo_app)
    with h.connect() as s:
        s.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /y HTTP/1.1\r\nHost: x\r\nX : y\r\n\r\nGET /z HTTP/1.1\r\n\r\n")
        buf = bytearray()
        assert read_response(s, buf)[0] == 200
        status, headers, body = read_response(s, buf)
        assert (status, headers["connection"], headers["content-type"]) == (400, "close", "application/json")
        assert json.loads(body) == {"error": "invalid_request", "message": "whitespace before a colon in a header"}
        assert peer_closes(s, TIMEOUT) and not buf


def test_expect_100_continue_gets_one_100_when_the_body_is_read(harness):
    h = harness(echo_app)
    with h.connect() as s:
        s.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        buf = bytearray()
        assert read_response(s, buf)[0] == 100
        s.sendall(b"{}")
        status, _, body = read_response(s, buf)
        assert status == 200 and json.loads(body)["body"] == "{}"
        s.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(s, buf)[0] == 200  # one 100 per request, none for the next


def test_a_body_the_app_did_not_read_closes_the_connection(harness):
    def refuse(environ, start_response):
        start_response("413 Content Too Large", [("Content-Type", "application/json")])
        return [b"{}"]

    h = harness(refuse)
    with h.connect() as s:
        s.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 100000\r\n\r\n")
        buf = bytearray()
        status, headers, _ = read_response(s, buf)
        assert status == 413 and headers["connection"] == "close"  # no 100 was sent: the body never came
        assert peer_closes(s, TIMEOUT)


def test_a_body_that_came_with_its_head_keeps_the_connection_even_unread(harness):
    # The body was taken from the socket with the head, so the next bytes are the next request.
    def refuse(environ, start_response):
        start_response("401 Unauthorized", [("Content-Type", "application/json")])
        return [environ["PATH_INFO"].encode()]

    h = harness(refuse)
    with h.connect() as s:
        s.sendall(b"POST /first HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
                  b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n")
        buf = bytearray()
        first, second = read_response(s, buf), read_response(s, buf)
        assert (first[0], first[2], second[0], second[2]) == (401, b"/first", 401, b"/second")
        assert "connection" not in second[1] and not peer_closes(s, 0.2)


def test_a_malformed_chunked_body_the_app_gave_up_on_is_400(harness):
    def strict_reader(environ, start_response):
        environ["wsgi.input"].read()  # raises: the app does not handle it
        start_response("200 OK", [])
        return [b"{}"]

    h = harness(strict_reader)
    with h.connect() as s:
        s.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        status, headers, body = read_response(s, bytearray())
        assert status == 400 and json.loads(body)["error"] == "invalid_request"
        assert peer_closes(s, TIMEOUT)


def test_an_app_error_is_a_json_500(harness):
    def broken(environ, start_response):
        raise RuntimeError("bug")

    h = harness(broken)
    with h.connect() as s:
        s.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = read_response(s, bytearray())
        assert status == 500 and json.loads(body)["error"] == "internal_error"


def test_an_upgrade_hands_over_the_raw_socket_at_the_end_of_the_head(harness):
    seen = {}

    def upgrading(environ, start_response):
        sock = environ["werkzeug.socket"]
        seen["type"] = type(sock)
        environ[http_server.UPGRADED] = True
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        sock.settimeout(TIMEOUT)
        seen["early"] = sock.recv(100)  # the client's bytes sent right after its head are all here
        sock.sendall(b"bye")
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b"this is never written"]

    h = harness(upgrading)
    with h.connect() as s:
        s.sendall(b"GET /anything HTTP/1.1\r\nHost: x\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\nEARLY")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        assert data == b"HTTP/1.1 101 Switching Protocols\r\n\r\nbye"  # nothing from the server after the app
    assert seen == {"type": socket.socket, "early": b"EARLY"}


def test_the_cap_sheds_one_more_connection_at_once_from_the_accepting_thread(harness):
    h = harness(echo_app, max_connections=3)
    held = [h.connect() for _ in range(3)]
    try:
        for s in held:  # each is being served (a round trip proves its thread runs)
            s.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            read_response(s, bytearray())
        threads = threading.active_count()
        start = time.monotonic()
        with h.connect() as extra:
            extra.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, body = read_response(extra, bytearray())
            assert peer_closes(extra, TIMEOUT)
        assert time.monotonic() - start < 1
        assert (status, headers["connection"]) == (503, "close")
        assert json.loads(body)["error"] == "unavailable"
        assert threading.active_count() <= threads and h.server.shed == 1
    finally:
        held[0].close()
    wait_for(lambda: h.server.connection_count() == 2, message="the closed connection to be released")
    with h.connect() as again:
        again.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(again, bytearray())[0] == 200
    for s in held[1:]:
        s.close()


def test_head_timeout_counts_from_the_connection_and_from_the_last_response(harness):
    h = harness(echo_app, head_timeout=0.5)
    start = time.monotonic()
    with h.connect() as silent, h.connect() as slow, h.connect() as kept:
        kept.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        read_response(kept, bytearray())
        answered = time.monotonic()
        for byte in b"GET / HTTP/1.1\r\nX-Slow: " + b"a" * 100:  # a byte every 0.1 s does not extend it
            try:
                slow.sendall(bytes([byte]))
            except OSError:
                break
            if peer_closes(slow, 0.1):
                break
        assert 0.4 < time.monotonic() - start < 1.5
        assert peer_closes(silent, 3) and time.monotonic() - start < 1.5
        assert peer_closes(kept, 3) and 0.4 < time.monotonic() - answered < 1.5


def test_drain_closes_idle_connections_waits_for_requests_and_leaves_upgrades(harness):
    release, upgraded_ends = threading.Event(), threading.Event()
    in_slow, in_upgrade = threading.Event(), threading.Event()

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/slow":
            in_slow.set()
            release.wait(TIMEOUT)
        if environ["PATH_INFO"] == "/upgrade":
            environ[http_server.UPGRADED] = True
            in_upgrade.set()
            upgraded_ends.wait(TIMEOUT)
            return []
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b"{}"]

    h = harness(app)
    idle, busy, upgraded = h.connect(), h.connect(), h.connect()
    with idle, busy, upgraded:
        idle.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        read_response(idle, bytearray())
        upgraded.sendall(b"GET /upgrade HTTP/1.1\r\nHost: x\r\n\r\n")
        busy.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        assert in_slow.wait(TIMEOUT) and in_upgrade.wait(TIMEOUT)
        h.server.shutdown()
        h.server.server_close()
        start = time.monotonic()
        assert h.server.drain(0.3) is False  # /slow is still running
        assert peer_closes(idle, 1)
        release.set()
        assert h.server.drain(2) is True and time.monotonic() - start < 2
        status, headers, _ = read_response(busy, bytearray())
        assert status == 200 and headers["connection"] == "close"
        assert not peer_closes(upgraded, 0.2)  # the app's protocol owns it
        upgraded_ends.set()
        assert peer_closes(upgraded, TIMEOUT)


# -- the real service: malformed heads change nothing ---------------------------------------------------


def exchange(port: int, data: bytes, timeout: float = TIMEOUT) -> tuple[bytes, bool]:
    """Send data, read until the server closes: (everything received, whether it closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            return out, False
        except ConnectionResetError:
            pass
    return out, True


def deposit_body(uid: str, amount: int = 100) -> bytes:
    return json.dumps({"user_id": uid, "amount": amount}).encode()


def deposit(uid: str, fields: bytes = b"", line: bytes = b"POST /api/wallet/deposit HTTP/1.1",
            host: bytes = b"Host: x\r\n", amount: int = 100) -> bytes:
    body = deposit_body(uid, amount)
    return line + b"\r\n" + host + fields + b"Content-Length: %d\r\n\r\n" % len(body) + body


def balance(server, uid: str) -> int:
    return requests.get(f"{server.url}/api/wallet/balance/{uid}", timeout=TIMEOUT).json()["balance"]


def assert_refused(server, data: bytes, *users: str, status: int = 400):
    reply, was_closed = exchange(server.http_port, data)
    assert reply.startswith(b"HTTP/1.1 %d " % status), reply[:300]
    assert reply.count(b"HTTP/1.1 ") == 1, reply  # one answer: nothing after it was taken for a request
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"\r\nConnection: close\r\n" in head + b"\r\n"
    assert json.loads(body)["error"] == "invalid_request"
    assert was_closed
    for user in users:
        assert balance(server, user) == 0


FIELD_RULES = {
    "no colon": b"X-Junk\r\n",
    "space before colon": b"X-Junk : 1\r\n",
    "tab before colon": b"X-Junk\t: 1\r\n",
    "bare CR": b"X-Junk: a\rb\r\n",
    "bare CR ending a line": b"X-Junk: a\r\r\n",
    "NUL": b"X-Junk: a\x00b\r\n",
    "obs-fold": b"X-Junk: a\r\n b\r\n",
    "bare LF": b"X-Junk: a\nX-Other: b\r\n",
    "vertical tab": b"X-Junk: \x0b\r\n",
    "Content-Length invalid": b"Content-Length: 1_0\r\n",
    "Content-Length repeated differing": b"Content-Length: 5\r\n",
    "Host repeated": b"Host: y\r\n",
}


@pytest.mark.parametrize("fields", FIELD_RULES.values(), ids=FIELD_RULES.keys())
def test_malformed_header_lines_are_400_closed_and_not_applied(server, uid, fields):
    assert_refused(server, deposit(uid, fields), uid)


LINE_RULES = {
    "double space": (b"POST  /api/wallet/deposit HTTP/1.1", 400),
    "lower-case version": (b"POST /api/wallet/deposit http/1.1", 400),
    "bad method": (b"PO\x00ST /api/wallet/deposit HTTP/1.1", 400),
    "bare CR in target": (b"POST /api/wallet/deposit\r HTTP/1.1", 400),
    "version 2.0": (b"POST /api/wallet/deposit HTTP/2.0", 505),
    "no version": (b"POST /api/wallet/deposit", 400),
}


@pytest.mark.parametrize("line, status", LINE_RULES.values(), ids=LINE_RULES.keys())
def test_malformed_request_lines_are_refused_and_not_applied(server, uid, line, status):
    assert_refused(server, deposit(uid, line=line), uid, status=status)


def test_missing_host_in_http_1_1_is_400_and_not_applied(server, uid):
    assert_refused(server, deposit(uid, host=b""), uid)


def test_http_1_0_without_host_is_served(server, uid):
    reply, _ = exchange(server.http_port, deposit(uid, line=b"POST /api/wallet/deposit HTTP/1.0", host=b""))
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert balance(server, uid) == 100


@pytest.mark.parametrize("fields", [b"X-Junk\r\n", b"X-Junk : 1\r\n", b"X-Junk: a\rb\r\n", b"X-Junk: a\r\n b\r\n"],
                         ids=["no colon", "space before colon", "bare CR", "obs-fold"])
def test_a_malformed_line_before_the_idempotency_key_never_applies_twice(server, uid, fields):
    """Issue 14 finding 1: lenient parsing ended the head early, dropping the key, and applied both."""
    keyed = fields + f"Idempotency-Key: drop-{uid}\r\n".encode()
    for _ in range(2):
        assert_refused(server, deposit(uid, keyed), uid)
    # The control: the same request well formed applies once and replays.
    good = f"Idempotency-Key: drop-{uid}\r\n".encode()
    first, _ = exchange(server.http_port, deposit(uid, good + b"Connection: close\r\n"))
    again, _ = exchange(server.http_port, deposit(uid, good + b"Connection: close\r\n"))
    assert first.startswith(b"HTTP/1.1 200 ") and again.startswith(b"HTTP/1.1 200 ")
    assert b"Idempotent-Replayed: true" in again
    assert balance(server, uid) == 100


TE_VARIANTS = {
    "chunked;q=1": b"Transfer-Encoding: chunked;q=1\r\n",
    "xchunked": b"Transfer-Encoding: xchunked\r\n",
    "identity": b"Transfer-Encoding: identity\r\n",
    "vertical tab": b"Transfer-Encoding: \x0bchunked\r\n",
    "gzip, chunked": b"Transfer-Encoding: gzip, chunked\r\n",
    "chunked, chunked": b"Transfer-Encoding: chunked, chunked\r\n",
    "twice": b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    "space before colon": b"Transfer-Encoding : chunked\r\n",
    "obs-fold": b"Transfer-Encoding:\r\n chunked\r\n",
    "quoted": b'Transfer-Encoding: "chunked"\r\n',
    "valid chunked": b"Transfer-Encoding: chunked\r\n",
    "valid, other case": b"Transfer-Encoding: ChUnKeD\r\n",
}


def smuggled(victim: str) -> bytes:
    return deposit(victim)


@pytest.mark.parametrize("te", TE_VARIANTS.values(), ids=TE_VARIANTS.keys())
def test_smuggling_cl_te_with_every_te_variant_is_refused(server, uid, te):
    """Content-Length covers everything; a reader of Transfer-Encoding would see a second request."""
    victim = uid + "v"
    body = b"0\r\n\r\n" + smuggled(victim)
    data = (b"POST /api/wallet/deposit HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % len(body) + te + b"\r\n"
            + body)
    assert_refused(server, data, uid, victim)


@pytest.mark.parametrize("te", TE_VARIANTS.values(), ids=TE_VARIANTS.keys())
def test_smuggling_te_cl_with_every_te_variant_is_refused(server, uid, te):
    """A short Content-Length; a reader of it would take the chunk's content for a second request."""
    victim = uid + "v"
    inner = smuggled(victim)
    chunked = b"%x\r\n" % len(inner) + inner + b"\r\n0\r\n\r\n"
    data = b"POST /api/wallet/deposit HTTP/1.1\r\nHost: x\r\n" + te + b"Content-Length: 4\r\n\r\n" + chunked
    assert_refused(server, data, uid, victim)


@pytest.mark.parametrize("te", [v for k, v in TE_VARIANTS.items() if not k.startswith("valid")],
                         ids=[k for k in TE_VARIANTS if not k.startswith("valid")])
def test_an_unknown_transfer_encoding_alone_is_refused_not_read_as_no_body(server, uid, te):
    victim = uid + "v"
    inner = deposit_body(uid)
    data = (b"POST /api/wallet/deposit HTTP/1.1\r\nHost: x\r\n" + te + b"\r\n"
            + b"%x\r\n" % len(inner) + inner + b"\r\n0\r\n\r\n" + smuggled(victim))
    assert_refused(server, data, uid, victim)


@pytest.mark.parametrize("te", [b"chunked", b"Chunked", b"CHUNKED"])
def test_a_well_formed_chunked_deposit_applies_and_the_next_request_follows(server, uid, te):
    inner = deposit_body(uid, 7)
    data = (b"POST /api/wallet/deposit HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + te + b"\r\n\r\n"
            + b"%x\r\n" % len(inner) + inner + b"\r\n0\r\n\r\n"
            + f"GET /api/wallet/balance/{uid} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    reply, was_closed = exchange(server.http_port, data)
    assert reply.count(b"HTTP/1.1 200 OK") == 2 and was_closed
    assert json.loads(reply.rpartition(b"\r\n\r\n")[2]) == {"user_id": uid, "balance": 7}


@pytest.mark.parametrize("name", [name for name in BAD_CHUNKED if name not in ("cut short", "no last chunk")])
def test_a_malformed_chunked_deposit_is_400_closed_and_not_applied(server, uid, name):
    """Each would give a lenient parser (int(x, 16), bare LF, skipped CRLF) the whole deposit."""
    inner = deposit_body(uid)
    size = b"%x" % len(inner)
    bodies = {
        "not hex": b"zz\r\n" + inner + b"\r\n0\r\n\r\n",
        "0x prefix": b"0x" + size + b"\r\n" + inner + b"\r\n0\r\n\r\n",
        "underscore": size[:1] + b"_" + size[1:] + b"\r\n" + inner + b"\r\n0\r\n\r\n",
        "plus": b"+" + size + b"\r\n" + inner + b"\r\n0\r\n\r\n",
        "leading space": b" " + size + b"\r\n" + inner + b"\r\n0\r\n\r\n",
        "bare LF after size": size + b"\n" + inner + b"\r\n0\r\n\r\n",
        "no CRLF after data": size + b"\r\n" + inner + b"XX0\r\n\r\n",
        "LF after data": size + b"\r\n" + inner + b"\n0\r\n\r\n",
        "huge size": b"fffffffffffffffff\r\n" + inner + b"\r\n0\r\n\r\n",
        "trailer without colon": size + b"\r\n" + inner + b"\r\n0\r\nX-Junk\r\n\r\n",
        "bare LF ending the body": size + b"\r\n" + inner + b"\r\n0\r\n\n",
    }
    data = b"POST /api/wallet/deposit HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + bodies[name]
    assert_refused(server, data, uid)


def test_a_body_that_looks_like_a_request_is_only_a_body(server, uid):
    body = smuggled(uid)
    data = (b"POST /api/wallet/deposit HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    reply, was_closed = exchange(server.http_port, data)
    assert reply.startswith(b"HTTP/1.1 400 ") and reply.count(b"HTTP/1.1 ") == 2 and was_closed
    assert json.loads(reply.rpartition(b"\r\n\r\n")[2]) == {"status": "ok"}
    assert balance(server, uid) == 0


def test_pipelined_deposits_on_one_connection_each_apply_once(server, uid):
    data = deposit(uid, amount=1) + deposit(uid, amount=2) + deposit(uid, b"Connection: close\r\n", amount=4)
    reply, was_closed = exchange(server.http_port, data)
    assert reply.count(b"HTTP/1.1 200 OK") == 3 and was_closed
    assert balance(server, uid) == 7


def test_date_header_on_the_services_answers(server):
    reply, _ = exchange(server.http_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"\r\nDate: " in reply and reply.startswith(b"HTTP/1.1 200 OK\r\n")


def test_the_write_callable_of_start_response_is_sent_before_the_returned_body(harness):
    def legacy(environ, start_response):
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written ")
        return [b"returned"]

    h = harness(legacy)
    with h.connect() as s:
        s.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(s, bytearray())[2] == b"written returned"


def test_drain_with_many_idle_keep_alive_connections_is_prompt(harness):
    h = harness(echo_app)
    idle = []
    for _ in range(200):
        s = h.connect()
        s.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        read_response(s, bytearray())
        idle.append(s)
    h.server.shutdown()
    h.server.server_close()
    start = time.monotonic()
    assert h.server.drain(2) is True
    assert all(peer_closes(s, 1) for s in idle) and time.monotonic() - start < 1
    wait_for(lambda: h.server.connection_count() == 0, timeout=2, message="every connection released")
    for s in idle:
        s.close()


def test_connections_waiting_for_a_request_hold_no_thread_and_closing_them_wakes_none(harness):
    h = harness(echo_app)
    threads = threading.active_count()
    fresh = [h.connect() for _ in range(300)]
    kept = []
    for _ in range(100):
        s = h.connect()
        s.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        read_response(s, bytearray())
        kept.append(s)
    wait_for(lambda: h.server.connection_count() == 400, message="every connection accepted")
    # Threads of the answered requests hand their connections back after KEEP_THREAD.
    wait_for(lambda: threading.active_count() <= threads, timeout=5, message="no thread per idle connection")
    for s in fresh + kept:
        s.close()
    wait_for(lambda: h.server.connection_count() == 0, timeout=2, message="the poller to close them all")
    assert threading.active_count() <= threads


def test_shutdown_stops_listening_at_once_and_closes_waiting_connections(harness):
    h = harness(echo_app)
    waiting = h.connect()
    wait_for(lambda: h.server.connection_count() == 1, message="the connection accepted")
    start = time.monotonic()
    assert h.server.shutdown() is True
    assert time.monotonic() - start < 0.5
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", h.port), timeout=1).recv(1)
    assert peer_closes(waiting, 1)
    waiting.close()
