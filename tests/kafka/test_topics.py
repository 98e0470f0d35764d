"""Topic creation (kafka/topics.py) on the real broker: missing topics are created with their
partitions and configs, existing ones are left alone, racing creators both succeed, and the
worker's topics include a compacted changelog co-partitioned with the input topic."""

import threading
import time

import pytest
from kafka.admin import ConfigResource, ConfigResourceType

from stream_lstm.config import Settings
from stream_lstm.kafka.clients import make_admin
from stream_lstm.kafka.topics import (
    CHANGELOG_CONFIG,
    ChangelogTopicError,
    TopicNotFoundError,
    TopicSpec,
    changelog_topic_spec,
    ensure_changelog_topic,
    ensure_topics,
    ensure_worker_topics,
    partition_count,
    topic_config,
)
from stream_lstm.processes import input_partitions

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]


@pytest.fixture
def settings(bootstrap, topic_name) -> Settings:
    return Settings(bootstrap_servers=bootstrap, changelog_topic=topic_name)


def topic_configs(settings: Settings, name: str) -> dict[str, str]:
    admin = make_admin(settings)
    try:
        cfg = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)], config_filter="all")
    finally:
        admin.close()
    values = {k: v["value"] for k, v in cfg["topic"][name].items()}
    assert topic_config(settings, name) == values  # the project's own reader
    return values


def topics(settings: Settings) -> set[str]:
    admin = make_admin(settings)
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def test_topic_is_compacted_copartitioned_and_idempotent(settings):
    ensure_changelog_topic(settings, 3)
    ensure_changelog_topic(settings, 3)  # existing: fine
    name = settings.changelog_topic_name()
    assert partition_count(settings, name) == 3
    values = topic_configs(settings, name)
    assert values["cleanup.policy"] == "compact"
    assert values["min.compaction.lag.ms"] == CHANGELOG_CONFIG["min.compaction.lag.ms"]
    ensure_changelog_topic(settings, 4)  # (the input grew: see the next test)
    with pytest.raises(ChangelogTopicError, match="4 partitions but the input topic has 3"):
        ensure_changelog_topic(settings, 3)  # more than the input: not its changelog


def test_a_changelog_grows_when_the_input_topic_has_grown(settings, caplog):
    """Partitions added to the input topic: the changelog follows, the old ones keep theirs."""
    ensure_changelog_topic(settings, 2)
    name = settings.changelog_topic_name()
    ensure_changelog_topic(settings, 5)
    assert partition_count(settings, name) == 5
    assert any("has grown to 5 partitions" in r.getMessage() for r in caplog.records)
    assert topic_configs(settings, name)["cleanup.policy"] == "compact"


@pytest.mark.parametrize("configs", [{"cleanup.policy": "delete"}, {}], ids=["delete", "the broker's default"])
def test_a_changelog_that_deletes_instead_of_compacting_is_refused(settings, configs):
    # Created by someone else, or with the broker's defaults (its policy then not the topic's
    # own: it was read as unreadable and let through, a review): a quiet device's only
    # checkpoint would be deleted with its segment.
    name = settings.changelog_topic_name()
    ensure_topics(settings, [TopicSpec(name, 2, configs)])
    with pytest.raises(ChangelogTopicError, match=f"changelog topic {name} has "
                       "cleanup.policy=delete: it must be compacted"):
        ensure_changelog_topic(settings, 2)


def test_a_changelog_that_keeps_tombstones_less_long_than_the_stores_rely_on_is_said(settings, caplog):
    name = settings.changelog_topic_name()
    ensure_topics(settings, [TopicSpec(name, 2, {"cleanup.policy": "compact", "delete.retention.ms": "3600000"})])
    with caplog.at_level("WARNING", logger="stream_lstm.kafka"):
        ensure_changelog_topic(settings, 2)
    assert f"changelog topic {name} keeps tombstones for delete.retention.ms=3600000, less than the " \
           "86400000 ms" in caplog.text
    caplog.clear()
    ensure_changelog_topic(settings.model_copy(update={"changelog_topic": f"{name}-ours"}), 2)
    assert "keeps tombstones" not in caplog.text  # (created by the worker: its own)


def test_a_topic_configuration_the_broker_will_not_describe_is_said_not_read_as_delete(
        settings, monkeypatch, caplog):
    """kafka-python 3.0.12 answers a refused DescribeConfigs (no ACL for it) with an empty
    configuration: read as "delete", a compacted changelog or relay store was refused (a review)."""
    from stream_lstm.kafka import topics

    name = settings.changelog_topic_name()
    ensure_topics(settings, [TopicSpec(name, 2, {"cleanup.policy": "delete"})])
    monkeypatch.setattr(topics, "topic_config", lambda s, t: {})  # what a refusal comes back as
    with caplog.at_level("WARNING", logger="stream_lstm.kafka"):
        ensure_changelog_topic(settings, 2)  # not refused: it cannot tell
    assert f"cannot read the configuration of {name} (the principal may lack DescribeConfigs" in caplog.text



def test_missing_topics_are_created_with_their_partitions_and_configs_and_existing_ones_kept(
        settings, topic_name):
    ensure_topics(settings, [TopicSpec(f"{topic_name}-a", 3, {"retention.ms": 3_600_000}),
                             TopicSpec(f"{topic_name}-b", 1)])
    assert partition_count(settings, f"{topic_name}-a") == 3
    assert topic_configs(settings, f"{topic_name}-a")["retention.ms"] == "3600000"
    # Asked again with other partitions and configs: an existing topic is the caller's concern.
    ensure_topics(settings, [TopicSpec(f"{topic_name}-a", 5, {"retention.ms": "60000"})])
    assert partition_count(settings, f"{topic_name}-a") == 3
    assert topic_configs(settings, f"{topic_name}-a")["retention.ms"] == "3600000"
    ensure_topics(settings, [])  # nothing asked: nothing done


def test_workers_racing_to_create_the_same_topics_all_succeed(settings, topic_name):
    start, errors = threading.Barrier(3), []

    def create():
        try:
            start.wait(10)
            ensure_topics(settings, [TopicSpec(f"{topic_name}-race", 2)])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and partition_count(settings, f"{topic_name}-race") == 2


def test_the_worker_topics_follow_the_input_topics_partitions(bootstrap, topic_name):
    s = Settings(bootstrap_servers=bootstrap, input_topic=topic_name, output_topic=f"{topic_name}-out",
                 dlq_topic=f"{topic_name}-dlq", alerts_topic=f"{topic_name}-alerts",
                 group_id=f"{topic_name}-g", topic_partitions=2)
    ensure_topics(s, [TopicSpec(topic_name, 3)])  # the input topic was there first, with 3
    ensure_worker_topics(s)
    changelog = s.changelog_topic_name()
    assert {f"{topic_name}-out", f"{topic_name}-dlq", f"{topic_name}-alerts", changelog} <= topics(s)
    assert partition_count(s, f"{topic_name}-out") == 2 and partition_count(s, changelog) == 3
    assert topic_configs(s, changelog)["cleanup.policy"] == "compact"
    ensure_worker_topics(s)  # a second worker starting: nothing changes


def test_without_an_alerts_topic_none_is_created(bootstrap, topic_name):
    s = Settings(bootstrap_servers=bootstrap, input_topic=topic_name, output_topic=f"{topic_name}-out",
                 dlq_topic=f"{topic_name}-dlq", alerts_topic="", group_id=f"{topic_name}-g",
                 topic_partitions=1)
    ensure_worker_topics(s)
    assert not any(t.startswith(topic_name) and t.endswith("alerts") for t in topics(s))


def test_the_changelog_spec_is_compacted_and_named_after_the_group():
    spec = changelog_topic_spec(Settings(group_id="pumps", topic_partitions=5))
    assert (spec.name, spec.partitions) == ("pumps-state-changelog", 5)
    assert spec.config == CHANGELOG_CONFIG and spec.config is not CHANGELOG_CONFIG  # a copy
    assert changelog_topic_spec(Settings(changelog_topic="mine"), partitions=2).name == "mine"


def test_the_partition_count_of_a_missing_topic_is_an_error(settings, topic_name):
    with pytest.raises(TopicNotFoundError, match=f"topic '{topic_name}-missing' does not exist"):
        partition_count(settings, f"{topic_name}-missing")
    assert f"{topic_name}-missing" not in topics(settings)  # describing it did not create it


def test_processes_for_a_missing_input_topic_follow_the_partitions_it_will_be_created_with(
        bootstrap, topic_name):
    # The caller that relies on the error: a count of 0 made it size the workers to one.
    s = Settings(bootstrap_servers=bootstrap, input_topic=f"{topic_name}-missing", topic_partitions=7)
    assert input_partitions(s) == 7
    ensure_topics(s, [TopicSpec(s.input_topic, 3)])
    assert input_partitions(s) == 3


def test_a_runs_leftovers_are_deleted_but_a_group_in_use_is_kept(settings, topic_name, caplog):
    """delete_leftovers (evaluate's and up's end): the topics and groups that exist go, what
    does not exist is skipped, and a group with a live member stays (the broker refuses it),
    said in the log, not raised."""
    from stream_lstm.checkpointing.identity import topic_id
    from stream_lstm.kafka.clients import make_consumer
    from stream_lstm.kafka.topics import delete_leftovers

    ensure_topics(settings, [TopicSpec(f"{topic_name}-{t}", 1) for t in ("a", "b", "kept")])
    ids = {t: topic_id(settings, t, 10.0) for t in (f"{topic_name}-a", f"{topic_name}-b")}
    assert None not in ids.values()
    done, live = (make_consumer(settings, group_id=f"{topic_name}-{g}", enable_auto_commit=False)
                  for g in ("done", "live"))
    # (Both read a topic that stays: a client that knew a deleted topic could ask for it again,
    # and the broker, auto-creating topics, made it anew.)
    for consumer in (done, live):
        consumer.subscribe([f"{topic_name}-kept"])
        while not consumer.assignment():  # joined: the group exists on the broker
            consumer.poll(timeout_ms=200)
    done.commit()  # (a group with no offsets and no members is gone already)
    done.close()
    try:
        with caplog.at_level("WARNING", logger="stream_lstm.kafka"):
            gone = delete_leftovers(settings, [f"{topic_name}-a", f"{topic_name}-b", f"{topic_name}-never"],
                                    [f"{topic_name}-done", f"{topic_name}-live", f"{topic_name}-never"])
    finally:
        live.close()
    assert gone == ([f"{topic_name}-a", f"{topic_name}-b"], [f"{topic_name}-done"])
    # The topics as they were are gone: absent, or (a broker that auto-creates topics, asked
    # for one by a client that knew it) another topic of the name, with another id.
    deadline = time.monotonic() + 60  # (a deletion is asynchronous: the broker's metadata follows)
    while (left := [t for t, i in ids.items() if topic_id(settings, t, 10.0) == i]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == []
    assert f"{topic_name}-kept" in topics(settings)
    assert f"could not delete consumer group {topic_name}-live: NonEmptyGroupError" in caplog.text
