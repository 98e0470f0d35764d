"""The relay against a real Alertmanager (Debian's ``prometheus-alertmanager``), with the stack's
own configuration (deploy/alertmanager/alertmanager.yml, checked by ``amtool``): an alert opens,
Alertmanager lists it as active with the relay's labels, then it closes and Alertmanager drops it.

Without the binaries (``apt-get install -y prometheus-alertmanager``) these tests are skipped
with that reason; `.ci/run` installs them.
"""

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from stream_lstm.kafka.local_broker import free_port
from stream_lstm.kafka.topics import TopicSpec, ensure_topics
from stream_lstm.relay.service import AlertRelay
from tests.relay.test_service import T0, event, send

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "alertmanager" / "alertmanager.yml"
need_amtool = pytest.mark.skipif(not shutil.which("amtool"),
                                 reason="amtool not installed (apt-get install -y prometheus-alertmanager)")
need_alertmanager = pytest.mark.skipif(
    not shutil.which("prometheus-alertmanager"),
    reason="prometheus-alertmanager not installed (apt-get install -y prometheus-alertmanager)")


@need_amtool
def test_the_stacks_alertmanager_configuration_passes_amtool():
    done = subprocess.run(["amtool", "check-config", str(CONFIG)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture
def alertmanager(tmp_path):
    port = free_port()
    log = (tmp_path / "alertmanager.log").open("w")
    proc = subprocess.Popen(["prometheus-alertmanager", f"--config.file={CONFIG}",
                             f"--storage.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                             "--cluster.listen-address="], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, (tmp_path / "alertmanager.log").read_text()[-2000:]
        try:
            urllib.request.urlopen(f"{url}/-/ready", timeout=2).read()
            break
        except OSError:
            assert time.monotonic() < deadline, "Alertmanager never became ready"
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(30)


def active(url: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/api/v2/alerts", timeout=5) as r:
        return json.loads(r.read())


@need_alertmanager
@pytest.mark.kafka
@pytest.mark.timeout(180)
def test_an_alert_fires_in_alertmanager_while_open_and_resolves_when_closed(settings_factory, topic_name,
                                                                           alertmanager):
    s = settings_factory(alerts_topic=f"{topic_name}-alerts", group_id=f"{topic_name}-g",
                         alertmanager_url=alertmanager)
    ensure_topics(s, [TopicSpec(s.alerts_topic, 1)])
    send(s, event("open", "pump-9", T0, T0))
    relay, seen, closed = AlertRelay(s), [], []
    deadline = time.monotonic() + 90

    def until(r) -> bool:
        listed = active(alertmanager)
        if not seen and listed:
            seen.extend(listed)
            send(s, event("close", "pump-9", T0, T0 + 3600))  # the device recovered
        elif seen and not listed:
            closed.append(True)
        return bool(closed) or time.monotonic() > deadline

    relay.run(until=until)
    assert seen and closed, (seen, closed)
    (alert,) = seen
    assert alert["labels"] == {"alertname": "StreamLstmDeviceAnomaly", "device_id": "pump-9",
                               "alert_id": f"pump-9@{int(T0 * 1000)}", "severity": "warning"}
    assert alert["status"]["state"] == "active" and alert["startsAt"].startswith("2023-11-14T22:13:20")
