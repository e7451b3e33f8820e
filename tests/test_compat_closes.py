"""fastfib.server.closes: closes classified by cause, the backoff policy, refused replies (issue 14)."""

import pytest

from fastfib.server.closes import Backoff, Cause, RefusalMemory, classify


@pytest.mark.parametrize(("code", "text", "doing", "cause"), [
    # RabbitMQ 3.x with max_message_size lowered (configured) and 4.x at its default (the ?MAX_MSG_SIZE branch)
    (406, "PRECONDITION_FAILED - message size 1250000 is larger than configured max size 1048576", "serving",
     Cause.REPLY_TOO_LARGE),
    (406, "PRECONDITION_FAILED - message size 20000000 is larger than max size 16777216", "serving",
     Cause.REPLY_TOO_LARGE),
    (406, "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'rpc_queue' in vhost '/': received "
          "'true' but current is 'false'", "declaring", Cause.QUEUE_ATTRIBUTES),
    (406, "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q'", "serving", Cause.REPLY_REFUSED),
    (406, "PRECONDITION_FAILED - invalid expiration", "serving", Cause.REPLY_REFUSED),
    (406, "PRECONDITION_FAILED - unknown delivery tag 7", "serving", Cause.OTHER),
    (406, "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out. Timeout value used: 1800000 ms",
     "serving", Cause.CONSUMER_TIMEOUT),
    (406, "PRECONDITION_FAILED - cannot declare queue 'q': queue limit in virtual host '/' (10) is reached",
     "declaring", Cause.RESOURCE_LIMIT),
    (403, "ACCESS_REFUSED - access to queue 'q' in vhost '/' refused for user 'u'", "declaring",
     Cause.ACCESS_REFUSED),
    (403, "ACCESS_REFUSED - write access to exchange 'amq.default' refused", "serving", Cause.ACCESS_REFUSED),
    (404, "NOT_FOUND - no queue 'q' in vhost '/'", "declaring-passive", Cause.QUEUE_GONE),
    (404, "NOT_FOUND - no exchange 'x'", "serving", Cause.OTHER),
    # RabbitMQ 4.3: transient non-exclusive queues denied (rabbit_amqqueue: protocol_error internal_error)
    (541, "INTERNAL_ERROR - Feature `transient_nonexcl_queues` is deprecated.\nBy default, this feature is not "
          "permitted anymore.", "declaring", Cause.DECLARATION_REFUSED),
    (541, "INTERNAL_ERROR - Cannot declare a queue 'queue 'q' in vhost '/'' of type 'rabbit_quorum_queue' on node "
          "'n': the corresponding feature flag is disabled", "declaring", Cause.DECLARATION_REFUSED),
    (541, "INTERNAL_ERROR", "serving", Cause.REPLY_TO_CRASH),
    (530, "NOT_ALLOWED - access to vhost '/' refused for user 'guest': connection limit (5) is reached",
     "connecting", Cause.RESOURCE_LIMIT),
    (320, "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'", "serving", Cause.OTHER),
    (None, "", "serving", Cause.OTHER),
])
def test_classify(code, text, doing, cause):
    close = classify(code, text, doing)
    assert close.cause is cause
    assert close.passive == (cause is Cause.QUEUE_ATTRIBUTES)
    assert close.fatal == (cause in (Cause.ACCESS_REFUSED, Cause.DECLARATION_REFUSED))


def test_only_inequivalent_arg_on_declare_switches_to_passive():
    assert classify(406, "PRECONDITION_FAILED - inequivalent arg 'durable'", "declaring").passive
    for doing in ("declaring-passive", "consuming", "serving"):
        assert not classify(406, "PRECONDITION_FAILED - inequivalent arg 'durable'", doing).passive
    assert not classify(406, "PRECONDITION_FAILED - message size 9 is larger than max size 8", "declaring").passive


def test_refused_size_is_read_from_the_text():
    close = classify(406, b"PRECONDITION_FAILED - message size 1250000 is larger than configured max size 1048576",
                     "serving")
    assert (close.refused_size, close.max_size) == (1250000, 1048576)


def test_classify_rejects_an_unknown_activity():
    with pytest.raises(ValueError):
        classify(406, "", "dancing")


def test_backoff_grows_for_one_cause_and_restarts_for_another():
    b = Backoff(base=0.5, cap=4.0, jitter=lambda: 1.0)
    assert [b.next_delay(Cause.OTHER) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert b.next_delay(Cause.RESOURCE_LIMIT) == 0.5  # a new cause starts over
    assert b.next_delay(Cause.RESOURCE_LIMIT) == 1.0
    b.reset()
    assert b.next_delay(Cause.RESOURCE_LIMIT) == 0.5


def test_backoff_keeps_growing_when_each_connection_fails_soon_after_consuming():
    now = [0.0]
    b = Backoff(base=0.5, cap=60.0, healthy_after=30.0, jitter=lambda: 1.0, clock=lambda: now[0])
    delays = []
    for _ in range(4):  # consuming, then lost 1 s later for the same reason (e.g. a 541 loop)
        b.healthy()
        now[0] += 1.0
        delays.append(b.next_delay(Cause.REPLY_TO_CRASH))
    assert delays == [0.5, 1.0, 2.0, 4.0]
    b.healthy()
    now[0] += 31.0  # a long healthy stretch: the next loss starts over
    assert b.next_delay(Cause.REPLY_TO_CRASH) == 0.5


def test_backoff_fails_over_at_once_within_a_round_of_urls():
    b = Backoff(base=1.0, cap=60.0, jitter=lambda: 1.0)
    assert [b.next_delay("lost", urls=3) for _ in range(9)] == [0.0, 0.0, 1.0, 0.0, 0.0, 2.0, 0.0, 0.0, 4.0]


def test_refusal_memory_needs_two_strikes():
    memory = RefusalMemory()
    memory.record([(10, "decimal"), (11, "decimal")], "invalid expiration")
    assert memory.refused(10, "decimal") is None  # merely in flight once: recomputed
    memory.record([(10, "decimal")], "invalid expiration")
    assert memory.refused(10, "decimal") == "invalid expiration"
    assert memory.refused(11, "decimal") is None and memory.refused(10, "binary") is None
