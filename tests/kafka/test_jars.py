"""Kafka's jars: fetched with Maven once, then reused without it; the pom is the one source."""

from pathlib import Path
from xml.etree import ElementTree

import pytest

from stream_lstm.kafka.jars import KAFKA_VERSION, fetch_jars, find_pom

# No broker is started here, but the first fetch needs mvn and the network, as the broker does.
pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]
REPO = Path(__file__).resolve().parents[2]
POM_NS = {"m": "http://maven.apache.org/POM/4.0.0"}


def test_fetch_reuses_cached_jars_without_maven(monkeypatch, tmp_path):
    libs = fetch_jars()  # the normal cache: fetched once (mvn), then reused
    assert (libs / f"kafka_2.13-{KAFKA_VERSION}.jar").exists()
    assert list(libs.glob("log4j-slf4j-impl-*.jar")), "the log4j2 binding is on the classpath"
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no mvn, no java: must not be needed
    assert fetch_jars() == libs


def test_the_pom_is_the_one_source_of_the_dependency_set():
    pom = find_pom()
    assert pom.resolve() == (REPO / "deploy" / "kafka" / "pom.xml").resolve()
    version = ElementTree.parse(pom).find("m:properties/m:kafka.version", POM_NS)
    assert version is not None and version.text == KAFKA_VERSION, "pom and KAFKA_VERSION differ"
