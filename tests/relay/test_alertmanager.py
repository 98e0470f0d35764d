"""Posting alerts to Alertmanager's API: what is sent, credentials, and failures."""

import base64

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
