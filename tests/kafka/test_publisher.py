"""The kafka-python internals that kafka/publisher.py relies on.

kafka-python's ``commit_transaction()`` waits without a deadline, so the publisher does what it
does (``_transaction_manager.begin_commit()``, ``_sender.wakeup()``, ``result.wait()``) with a
deadline. These are private names; pyproject allows any kafka-python 3.x, so an upgrade that
renames them must fail here, by name, rather than in production the first time a commit hangs.
"""

import inspect

from kafka.producer.kafka import KafkaProducer
from kafka.producer.sender import Sender
from kafka.producer.transaction_manager import TransactionalRequestResult, TransactionManager


def test_commit_and_abort_are_still_begin_then_wake_then_wait():
    commit = inspect.getsource(KafkaProducer.commit_transaction)
    abort = inspect.getsource(KafkaProducer.abort_transaction)
    assert "self._transaction_manager.begin_commit()" in commit
    assert "self._transaction_manager.begin_abort()" in abort
    for source in (commit, abort):
        assert "self._sender.wakeup()" in source
        assert "result.wait()" in source


def test_the_private_pieces_have_the_shapes_the_publisher_calls():
    for name in ("begin_commit", "begin_abort", "send_offsets_to_transaction"):
        assert callable(getattr(TransactionManager, name))
    assert list(inspect.signature(TransactionManager.send_offsets_to_transaction).parameters) == [
        "self", "offsets", "group_metadata"]
    assert "timeout_ms" in inspect.signature(TransactionalRequestResult.wait).parameters
    assert callable(Sender.wakeup)
    init = inspect.getsource(KafkaProducer.__init__)
    assert "self._transaction_manager" in init and "self._sender" in init
