"""Posting alerts to Alertmanager's API: what is sent, credentials, and failures."""

import base64
import time

import pytest

from stream_lstm.kafka.local_broker import free_port
from stream_lstm.relay.alertmanager import AlertmanagerError, post_alerts, to_alert
from tests.relay.alertmanager_stub import AlertmanagerStub

EVENT = {"event": "open", "alert_id": "pump-1@1700000000000", "device_id": "pump-1",
         "start_ts": 1700000000.0, "ts": 1700000060.0, "peak_likelihood": 0.99999,
         "peak_ts": 1700000060.0, "value": None, "expected_low": 60.0, "expected_high": 75.0}


@pytest.fixture
def stub():
    am = AlertmanagerStub()
    yield am
    am.close()


def test_alerts_are_posted_as_alertmanager_takes_them(stub):
    firing, resolved = to_alert(EVENT), to_alert(EVENT | {"event": "close", "reason": "expired"})
    post_alerts(stub.url, [firing, resolved])
    (got,) = stub.received
    assert got == [firing, resolved]
    assert got[0]["labels"] == got[1]["labels"]  # one incident: the same identity
    assert got[1]["annotations"]["closed_because"] == "expired"
    assert "n/a at the peak" in got[0]["annotations"]["summary"]  # a null value is said, not a crash


def test_credentials_in_the_url_go_as_basic_auth_and_never_into_errors(stub):
    url = stub.url.replace("http://", "http://relay:s%3Ccret@")
    post_alerts(url, [to_alert(EVENT)])
    assert stub.headers[0]["Authorization"] == "Basic " + base64.b64encode(b"relay:s<cret").decode()
    dead = f"http://relay:s3cret@127.0.0.1:{free_port()}"
    with pytest.raises(AlertmanagerError) as err:
        post_alerts(dead, [to_alert(EVENT)], timeout_s=2.0)
    assert "not reachable" in str(err.value) and "s3cret" not in str(err.value)


def test_an_error_status_is_an_error(stub):
    stub.fail = 1
    with pytest.raises(AlertmanagerError, match="503"):
        post_alerts(stub.url, [to_alert(EVENT)])
    assert stub.received == []


def test_a_redirect_is_not_a_delivery(stub):
    """urllib would follow it as a GET without the alerts (and with the credentials), and the
    login page's 200 would count as delivered."""
    stub.redirect = True
    with pytest.raises(AlertmanagerError, match="302"):
        post_alerts(stub.url.replace("http://", "http://relay:pw@"), [to_alert(EVENT)])
    assert stub.received == []


def test_times_from_a_device_clock_never_hold_an_alert_open_or_break_the_mapping():
    ahead = EVENT | {"start_ts": 1700000500.0, "ts": 1700000600.0}  # a device clock 400 s ahead
    resolved = to_alert(ahead | {"event": "close"}, now=1700000100.0)
    assert resolved["startsAt"] == resolved["endsAt"] == "2023-11-14T22:15:00Z"  # now: resolved now
    for bad in (float("inf"), float("nan"), 1e20, -5.0):
        with pytest.raises(ValueError, match="out of range"):
            to_alert(EVENT | {"start_ts": bad})
        # (a peak_ts of 1e18 was an OSError from formatting it: the relay ended at every start)
        with pytest.raises(ValueError, match="out of range"):
            to_alert(EVENT | {"peak_ts": bad})
    assert to_alert(EVENT | {"peak_ts": None})["annotations"]["peak_at"] == "n/a"


def test_an_address_with_a_query_is_refused_at_start():
    """The API's path is appended to the address: '...?token=x' posted to
    '...?token=x/api/v2/alerts', answered 405 for ever."""
    from stream_lstm.relay.alertmanager import check_url

    for url in ("http://am:9093/?token=s3cret", "http://am:9093/#x"):
        with pytest.raises(ValueError, match="base address, without '\\?' or '#': not 'http://am:9093/'") as refused:
            check_url(url)
        assert "s3cret" not in str(refused.value)


def test_an_error_status_says_whether_sending_again_could_help(stub):
    stub.refuse = {"pump-1"}
    with pytest.raises(AlertmanagerError) as err:
        post_alerts(stub.url, [to_alert(EVENT)])
    assert err.value.status == 400 and err.value.refused
    stub.fail = 1
    with pytest.raises(AlertmanagerError) as err:
        post_alerts(stub.url, [to_alert(EVENT | {"device_id": "pump-2"})])
    assert err.value.status == 503 and not err.value.refused
    # About the relay or its URL, not the alert: every alert waits (all 4xx counted as refused,
    # and a rotated password dropped every alert while the relay said it was ready).
    for status in (401, 403, 404, 405):
        stub.status_for_all = status
        with pytest.raises(AlertmanagerError) as err:
            post_alerts(stub.url, [to_alert(EVENT)])
        assert err.value.status == status and not err.value.refused


def test_https_with_a_private_ca_is_refused_with_a_hint_then_taken_with_ssl_cert_file(tmp_path, monkeypatch):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "am.pem", tmp_path / "am.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)
    am = AlertmanagerStub(tls=(str(cert), str(key)))
    try:
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        with pytest.raises(AlertmanagerError, match="SSL_CERT_FILE") as err:
            post_alerts(am.url, [to_alert(EVENT)], timeout_s=5.0)
        assert err.value.status is None and not am.received  # unreachable, retried: not refused
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        post_alerts(am.url, [to_alert(EVENT)], timeout_s=5.0)
        assert am.alerts()[0]["labels"]["device_id"] == "pump-1"
    finally:
        am.close()


@pytest.mark.parametrize("password", ["S3cr'et", 'S3cr"et', "S3 cret"])
def test_a_password_with_a_quote_or_a_space_is_delivered_and_never_said(stub, password):
    # "'" is legal in a URL's user part; the masking stopped at it and the request went to the
    # host "relay:S3cr'et@127.0.0.1" (retried for ever, the password in every warning). A '"' or
    # a space is refused with the hint to percent-encode it, without echoing it.
    from urllib.parse import quote

    from stream_lstm.config import Settings
    from stream_lstm.logs import mask_secrets
    from stream_lstm.relay.alertmanager import check_url, redacted

    raw = stub.url.replace("http://", f"http://relay:{password}@")
    assert password not in redacted(raw) and redacted(raw) == stub.url
    assert password not in str(Settings(alertmanager_url=raw).redacted())
    if password == "S3cr'et":
        assert password not in mask_secrets(f"posting to {raw} failed")
        post_alerts(check_url(raw), [to_alert(EVENT)])
    else:
        with pytest.raises(ValueError, match="percent-encode") as err:
            check_url(raw)
        assert password not in str(err.value)
        post_alerts(stub.url.replace("http://", f"http://relay:{quote(password)}@"), [to_alert(EVENT)])
    assert stub.headers[-1]["Authorization"] == "Basic " + base64.b64encode(f"relay:{password}".encode()).decode()


def test_an_answer_trickled_a_byte_at_a_time_does_not_hold_the_post():
    """A proxy that sent 200 and its headers, then one byte every few seconds, held the relay's
    loop (and its health) for ever: the body of a 2xx is not read, of an error one read's worth."""
    import socket
    import threading

    release = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))

    def serve(status: bytes) -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: 100000\r\n\r\nx")
            release.wait(60)  # ... and the rest never comes

    try:
        for status in (b"200 OK", b"503 Service Unavailable"):
            server = threading.Thread(target=serve, args=(status,), daemon=True)
            server.start()
            url = f"http://127.0.0.1:{listener.getsockname()[1]}"
            if status.startswith(b"200"):
                post_alerts(url, [])  # returns (before the fix: a 10 s read timeout per byte)
            else:
                with pytest.raises(AlertmanagerError, match="answered 503.*b'x'"):
                    post_alerts(url, [])
            assert not release.is_set() and server.is_alive()  # it did not wait for the rest
    finally:
        release.set()
        listener.close()


def test_headers_trickled_a_byte_at_a_time_do_not_hold_the_post():
    """urllib's timeout is per read: a server (or anything on the path to an http:// URL) that
    sent its status line and then a header byte every few seconds held the post, the relay's
    loop and its health for ever, and the restarted relay again (a security review). A post
    has its timeout in all; the next waits until the stuck one is over."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            while not stop.wait(0.2):
                conn.sendall(b"X")  # a header that never ends

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    server = threading.Thread(target=trickle, daemon=True)
    server.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(AlertmanagerError, match="did not answer within 1s"):
            post_alerts(url, [], timeout_s=1.0)
        assert time.monotonic() - t0 < 3
        with pytest.raises(AlertmanagerError, match="still not answered an earlier post"):
            post_alerts(url, [], timeout_s=1.0)
        stop.set()  # the trickle ends (the connection closes): so does the stuck post
        server.join(5)
        threading.Thread(target=answer, daemon=True).start()
        for _ in range(50):  # (until the stuck post's thread has seen the close)
            try:
                post_alerts(url, [], timeout_s=1.0)
                break
            except AlertmanagerError as exc:
                assert "still not answered" in str(exc)
                time.sleep(0.1)
        else:
            raise AssertionError("posting never resumed")
    finally:
        stop.set()
        listener.close()


def test_an_error_answer_whose_body_never_comes_takes_the_timeout_once():
    """Its first bytes were read after the post's deadline, with the socket's timeout again: a
    500 whose body never came held the caller twice the timeout (a review)."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 500 Oops\r\nContent-Length: 100\r\n\r\n")  # ... no body
            done.wait(30)

    threading.Thread(target=serve, daemon=True).start()
    try:
        t0 = time.monotonic()
        with pytest.raises(AlertmanagerError):
            post_alerts(f"http://127.0.0.1:{listener.getsockname()[1]}", [], timeout_s=1.0)
        assert time.monotonic() - t0 < 1.6
    finally:
        done.set()
        listener.close()


def test_an_at_sign_in_the_path_does_not_move_the_post_to_another_host():
    """The request URL was the logs' masked one, which cuts to the last '@' anywhere: once that
    allowed '/', "https://u:p@gw/tenant@team" posted the credentials to host "team" (a review)."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    got = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            got.append(conn.recv(65536))
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        post_alerts(f"http://relay:s3cret@127.0.0.1:{listener.getsockname()[1]}/tenant@team", [])
    finally:
        listener.close()
    request = got[0].decode()
    assert request.startswith("POST /tenant@team/api/v2/alerts HTTP/1.1")
    assert "Authorization: Basic " + base64.b64encode(b"relay:s3cret").decode() in request
