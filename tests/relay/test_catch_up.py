"""CatchUp (relay/catch_up.py): a partition taken on waits until the relay has read up to its end
then; one gone to another relay waits no more. Through the relay: tests/relay/test_service.py's
test_a_relay_taking_partitions_on_does_not_refire_an_alert_closed_meanwhile."""

from stream_lstm.relay.catch_up import CatchUp


def test_a_partition_waits_until_read_to_its_end_and_an_unknown_position_keeps_it_waiting():
    c = CatchUp()
    c.start({0: 10, 1: 4, 2: 7})
    assert c.done({0: 9, 1: None, 2: 7}.get) == {2}
    assert c.holds(0) and c.holds(1) and not c.holds(2)
    c.drop([1])  # gone to another relay
    assert not c.holds(1) and c.done(lambda p: 10) == {0} and c.ends == {}


def test_taken_on_again_it_waits_for_its_new_end():
    c = CatchUp()
    c.start({0: 3})
    assert c.done(lambda p: 3) == {0}
    c.start({0: 8})  # a rebalance handed it back with more written
    assert c.holds(0) and c.done(lambda p: 5) == set() and c.done(lambda p: 8) == {0}
