"""The failure and scheduling policy, driven directly: no broker, no threads.

:class:`~clustersearch.Policy`, :class:`~clustersearch.client.membership.Membership`,
the plain functions of :mod:`clustersearch.client.recovery` and a
:class:`~clustersearch.client.session.Session` that is built but never
started: what the dispatcher would decide, fed by hand with fake node
descriptions, fake clocks and synthetic copies in flight.
"""

import dataclasses
import re
import threading
import time

import numpy as np
import pytest
from amqp.exceptions import RecoverableConnectionError
from billiard.exceptions import WorkerLostError
from joblib.parallel import BatchedCalls
from kombu.exceptions import OperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import check_scoring
from sklearn.model_selection._validation import _fit_and_score

from clustersearch import Cluster, NodeInfo, Policy
from clustersearch.client.membership import BeatOutcome, Membership
from clustersearch.client.recovery import (
    backups,
    deadline_error,
    failed_outputs,
    is_connection_error,
    is_worker_lost,
    split_batch,
    straggler_threshold,
)
from clustersearch.client.session import Session
from clustersearch.client.work import Copy, Part, Work
from clustersearch.exceptions import (
    BrokerUnreachableError,
    ConfigurationError,
    NodeFailureError,
    NoWorkersError,
)
from clustersearch.wire.config import create_app
from clustersearch.wire.serialization import loads

RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"


def node(name, concurrency=2, stalled_s=0.0, consuming=True):
    return NodeInfo(
        name=name,
        queue=f"clustersearch.{name}",
        concurrency=concurrency,
        hostname=f"{name}@host",
        host="host",
        cpu_count=8,
        pid=1000,
        stalled_s=stalled_s,
        consuming=consuming,
    )


def batch(*values):
    """A real joblib batch of ``abs`` calls."""
    return BatchedCalls([(abs, (v,), {}) for v in values], ("sequential", 1))


# -- Policy -------------------------------------------------------------------


DOCUMENTED = {
    "discovery_timeout": 1.0,
    "connect_timeout": 5.0,
    "queued_per_node": 1,
    "heartbeat_interval": 5.0,
    "missed_heartbeats": 3,
    "max_retries": 2,
    "no_node_timeout": 30.0,
    "straggler_factor": 3.0,
    "reconnect_grace": 10.0,
    "longest_first": True,
}


def test_policy_defaults_are_the_documented_ones():
    assert dataclasses.asdict(Policy()) == DOCUMENTED
    assert Policy.field_names() == tuple(DOCUMENTED)
    # The docstring says the same ("name : type, default=value").
    documented = dict(re.findall(r"^    (\w+) : [^\n]*?default=([^\s,]+)$", Policy.__doc__, re.M))
    values = {k: v == "True" if v in ("True", "False") else float(v) for k, v in documented.items()}
    assert values == DOCUMENTED
    assert isinstance(values["longest_first"], bool)


@pytest.mark.parametrize(
    "field, value, says",
    [
        ("discovery_timeout", -0.5, "must be >= 0"),
        ("connect_timeout", -1, "must be >= 0"),
        ("queued_per_node", -1, "must be >= 0"),
        ("no_node_timeout", -1.0, "must be >= 0"),
        ("reconnect_grace", -0.1, "must be >= 0"),
        ("max_retries", -1, "must be >= 0"),
        ("missed_heartbeats", 0, "must be >= 1"),
        ("heartbeat_interval", 0, "must be > 0"),
        ("heartbeat_interval", -2.0, "must be > 0"),
        ("straggler_factor", 0.0, "must be > 0"),
        ("straggler_factor", -3, "must be > 0"),
        ("max_retries", True, "must be an int"),
        ("missed_heartbeats", False, "must be an int"),
        ("heartbeat_interval", True, "must be a number"),
        ("queued_per_node", 1.0, "must be an int"),
        ("max_retries", "2", "must be an int"),
        ("connect_timeout", "5", "must be a number"),
        ("discovery_timeout", None, "must be a number"),
        ("missed_heartbeats", None, "must be an int"),
        ("heartbeat_interval", float("nan"), "must be > 0"),
        ("no_node_timeout", float("nan"), "must be >= 0"),
        ("reconnect_grace", float("nan"), "must be >= 0"),
    ],
)
def test_policy_rejects_a_bad_value_naming_the_field(field, value, says):
    with pytest.raises(ConfigurationError) as info:
        Policy(**{field: value})
    assert str(info.value) == f"Policy: {field} {says}, got {value!r}"


def test_policy_accepts_edge_values():
    policy = Policy(
        discovery_timeout=0,
        queued_per_node=0,
        missed_heartbeats=1,
        max_retries=0,
        no_node_timeout=float("inf"),
        straggler_factor=None,
        reconnect_grace=0.0,
        heartbeat_interval=np.float64(0.25),
    )
    assert policy.straggler_factor is None
    assert policy.queued_per_node == 0 and policy.max_retries == 0
    assert policy.heartbeat_interval == 0.25


def test_policy_replace_derives_and_validates():
    base = Policy(max_retries=5)
    derived = base.replace(heartbeat_interval=2, straggler_factor=None)
    assert derived == Policy(max_retries=5, heartbeat_interval=2, straggler_factor=None)
    assert base == Policy(max_retries=5)  # untouched
    assert base.replace() == base and base.replace() is not base
    with pytest.raises(ConfigurationError, match="missed_heartbeats must be >= 1"):
        base.replace(missed_heartbeats=0)
    with pytest.raises(TypeError):
        base.replace(no_such_field=1)


def test_policy_is_frozen():
    policy = Policy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_retries = 7
    assert policy.max_retries == 2


def test_policy_stall_limit_has_a_floor_of_ten_seconds():
    assert Policy(heartbeat_interval=1, missed_heartbeats=3).silent_limit_s == 3
    assert Policy(heartbeat_interval=1, missed_heartbeats=3).stall_limit_s == 10.0
    assert Policy(heartbeat_interval=5, missed_heartbeats=3).stall_limit_s == 15.0
    assert Policy(heartbeat_interval=2.5, missed_heartbeats=4).stall_limit_s == 10.0
    assert Policy(heartbeat_interval=2.5, missed_heartbeats=5).stall_limit_s == 12.5


def test_policy_reply_timeout_is_at_most_a_second():
    assert Policy(heartbeat_interval=5).reply_timeout == 1.0
    assert Policy(heartbeat_interval=1).reply_timeout == 1.0
    assert Policy(heartbeat_interval=0.25).reply_timeout == 0.25


def test_cluster_builds_its_policy_without_connecting(monkeypatch):
    monkeypatch.delenv("CLUSTERSEARCH_SECRET", raising=False)
    monkeypatch.delenv("CLUSTERSEARCH_SECRET_FILE", raising=False)
    cluster = Cluster(RABBITMQ, heartbeat_interval=2)
    assert cluster.policy == Policy(heartbeat_interval=2)
    assert cluster.heartbeat_interval == 2 and cluster.max_retries == 2
    assert cluster._app is None  # no Celery app, no connection yet

    given = Policy(missed_heartbeats=5, straggler_factor=None)
    cluster = Cluster(RABBITMQ, policy=given, max_retries=0)
    assert cluster.policy == Policy(missed_heartbeats=5, straggler_factor=None, max_retries=0)
    assert cluster.max_retries == 0
    assert given.max_retries == 2  # the given policy is not changed
    assert Cluster(RABBITMQ, policy=given).policy == given
    assert cluster._app is None


def test_cluster_rejects_unknown_and_bad_settings():
    with pytest.raises(ConfigurationError) as info:
        Cluster(RABBITMQ, heartbeat=2, retries=1)
    message = str(info.value)
    assert "['heartbeat', 'retries']" in message
    assert str(list(DOCUMENTED)) in message
    with pytest.raises(ConfigurationError, match="Policy: max_retries must be >= 0, got -1"):
        Cluster(RABBITMQ, max_retries=-1)
    with pytest.raises(AttributeError):
        Cluster(RABBITMQ).no_such_setting  # noqa: B018


# -- Membership -----------------------------------------------------------------


def fill(members):
    """Pick and take until no node has room: the order of the picks."""
    order = []
    while (name := members.pick()) is not None:
        members.took(name)
        order.append(name)
        assert len(order) < 100, "pick() never runs out of room"
    return order


def test_pick_prefers_the_most_free_room_relative_to_concurrency():
    members = Membership([node("big", 4), node("small", 1)], Policy(queued_per_node=1), 0.0)
    assert members.window == {"big": 5, "small": 2}
    # big: 5/4, small: 2/1 -> small; 5/4 vs 1/1 -> big; 4/4 vs 1/1: the first
    # in order wins a tie -> big; 3/4 vs 1/1 -> small; then only big has room.
    assert fill(members) == ["small", "big", "big", "small", "big", "big", "big"]
    assert members.busy == {"big": 5, "small": 2}


def test_pick_respects_the_windows():
    members = Membership([node("a", 3), node("b", 1)], Policy(queued_per_node=0), 0.0)
    assert members.window == {"a": 3, "b": 1}
    assert sorted(fill(members)) == ["a", "a", "a", "b"]
    members = Membership([node("a", 3), node("b", 1)], Policy(queued_per_node=2), 0.0)
    assert members.window == {"a": 5, "b": 3}
    assert len(fill(members)) == 8


def test_pick_puts_avoided_nodes_last_but_uses_them():
    members = Membership([node("a", 2), node("b", 2)], Policy(queued_per_node=1), 0.0)
    assert members.pick() == "a"
    assert members.pick(avoid=["a"]) == "b"
    for _ in range(3):
        members.took("b")
    # b is full: a is the only node left, avoided or not.
    assert members.pick(avoid=["a"]) == "a"
    # Both avoided: the one with more room still wins.
    members.released("b")
    assert members.pick(avoid={"a", "b"}) == "a"
    for _ in range(3):
        members.took("a")
    assert members.pick(avoid={"a", "b"}) == "b"
    members.took("b")
    assert members.pick(avoid={"a"}) is None  # no room anywhere


def test_took_and_released():
    members = Membership([node("a", 1), node("b", 1)], Policy(queued_per_node=0), 0.0)
    members.took("a")
    members.took("b")
    assert members.pick() is None
    assert members.idle_slots() == {}
    members.released("b")
    assert members.busy == {"a": 1, "b": 0}
    assert members.idle_slots() == {"b": 1}
    assert members.pick() == "b"
    # A node out of the rotation, or none: nothing to release.
    members.remove("a", 1.0)
    members.released("a")
    members.released(None)
    members.released("never-seen")
    assert members.busy["a"] == 0 and members.busy["b"] == 0


def test_idle_slots_count_free_processes_not_queue_room():
    members = Membership([node("a", 2), node("b", 3)], Policy(queued_per_node=1), 0.0)
    assert members.idle_slots() == {"a": 2, "b": 3}
    members.took("a")
    assert members.idle_slots() == {"a": 1, "b": 3}
    members.took("a")
    members.took("a")  # queued behind the two that run
    assert members.idle_slots() == {"b": 3}


def test_a_session_needs_a_node():
    with pytest.raises(ValueError, match="at least one node"):
        Membership([], Policy(), 0.0)


def test_beat_counts_missed_heartbeats_and_resets_on_an_answer():
    a, b = node("a"), node("b")
    members = Membership([a, b], Policy(heartbeat_interval=1, missed_heartbeats=3), 0.0)
    assert members.beat(1.0, [a]) == BeatOutcome()
    assert members.missed == {"a": 0, "b": 1}
    assert members.beat(2.0, [a]) == BeatOutcome()
    assert members.missed["b"] == 2
    assert members.beat(3.0, [a, b]) == BeatOutcome()  # b answers: counted from 0 again
    assert members.missed["b"] == 0
    assert members.last_seen == {"a": 3.0, "b": 3.0}
    assert members.beat(4.0, [a]) == BeatOutcome()
    assert members.beat(5.0, [a]) == BeatOutcome()
    outcome = members.beat(6.0, [a])
    assert outcome.lost == [("b", "it missed 3 heartbeats in a row", {})]
    assert outcome.joining == []
    assert members.last_seen == {"a": 6.0, "b": 3.0}
    # beat() decides; remove() acts.
    assert "b" in members.window
    assert members.remove("b", 6.0) is True
    assert members.beat(7.0, [a]) == BeatOutcome()


def test_one_missed_heartbeat_can_be_enough():
    a, b = node("a"), node("b")
    members = Membership([a, b], Policy(missed_heartbeats=1), 0.0)
    assert members.beat(1.0, [b]).lost == [("a", "it missed 1 heartbeats in a row", {})]


def test_no_heartbeat_counts_during_the_reconnect_grace():
    a, b = node("a"), node("b")
    policy = Policy(heartbeat_interval=1, missed_heartbeats=2, reconnect_grace=10)
    members = Membership([a, b], policy, 0.0)
    members.beat(1.0, [a])
    assert members.missed["b"] == 1
    members.broker_back(5.0)  # the broker is back: counts start over
    assert members.missed["b"] == 0
    assert members.grace_until == 15.0
    for t in range(6, 15):
        assert members.beat(float(t), []) == BeatOutcome()
    assert (members.missed["a"], members.missed["b"]) == (0, 0)
    assert members.beat(15.0, [a]) == BeatOutcome()
    assert members.missed["b"] == 1
    assert members.beat(16.0, [a]).lost == [("b", "it missed 2 heartbeats in a row", {})]


def test_a_stalled_node_is_lost_after_the_stall_limit():
    policy = Policy(heartbeat_interval=1, missed_heartbeats=3)
    assert policy.stall_limit_s == 10.0
    members = Membership([node("a"), node("b")], policy, 0.0)
    assert members.beat(1.0, [node("a", stalled_s=9.9), node("b")]) == BeatOutcome()
    outcome = members.beat(2.0, [node("a", stalled_s=10.0), node("b")])
    assert outcome.joining == []
    assert outcome.lost == [
        (
            "a",
            "its pool started no task for 10.0 s while a process was free; restart the node",
            {"stalled_s": 10.0},
        )
    ]
    # It answered: not a missed heartbeat.
    assert members.missed["a"] == 0
    members.remove("a", 2.0)
    # Still stalled: neither lost again nor joining.
    assert members.beat(3.0, [node("a", stalled_s=11.0), node("b")]) == BeatOutcome()
    # Healthy again: it joins.
    assert members.beat(4.0, [node("a"), node("b")]).joining == [node("a")]


def test_a_node_that_stopped_consuming_its_queue_is_lost_and_not_admitted():
    # It answers heartbeats (a remote cancel_consumer leaves it so), but
    # takes no work: as good as lost, and not a joining node while so.
    members = Membership([node("a"), node("b")], Policy(), 0.0)
    outcome = members.beat(1.0, [node("a", consuming=False), node("b")])
    assert outcome.joining == []
    ((name, why, info),) = outcome.lost
    assert (name, info) == ("a", {"consuming": False})
    assert "no longer consumes its queue clustersearch.a" in why
    members.remove("a", 1.0)
    assert members.beat(2.0, [node("a", consuming=False), node("b")]) == BeatOutcome()
    assert members.beat(3.0, [node("a"), node("b")]).joining == [node("a")]
    assert NodeInfo.from_reply({"node": "a", "concurrency": 1, "consuming": False}).consuming is False
    assert NodeInfo.from_reply({"node": "a", "concurrency": 1}).consuming is True


def test_a_new_node_joins_and_a_lost_node_answering_rejoins():
    a, b, c = node("a", 2), node("b", 1), node("c", 4)
    members = Membership([a, b], Policy(), 0.0)
    outcome = members.beat(1.0, [a, b, c])
    assert outcome.lost == [] and outcome.joining == [c]
    assert "c" not in members.window  # beat() decides; add() acts
    members.add(c, 1.0)
    assert members.window == {"a": 3, "b": 2, "c": 5}
    assert members.beat(2.0, [a, b, c]) == BeatOutcome()

    members.remove("b", 3.0)
    assert members.lost == ["b"]
    outcome = members.beat(4.0, [a, b, c])
    assert outcome.joining == [b] and outcome.lost == []
    members.add(b, 4.0)
    assert members.window == {"a": 3, "b": 2, "c": 5}
    assert members.busy["b"] == 0 and members.missed["b"] == 0
    assert members.lost == ["b"]  # the record of what happened stays


def test_remove_and_capacity():
    members = Membership([node("a", 4), node("b", 1)], Policy(), 0.0)
    assert members.capacity == 5
    members.add(node("c", 3), 1.0)
    assert members.capacity == 8
    assert members.remove("a", 2.0) is True
    assert members.capacity == 4
    assert members.remove("a", 2.5) is False  # not in the rotation any more
    assert members.capacity == 4
    assert members.remove("b", 3.0) is True
    assert members.no_nodes_since is None
    assert members.remove("c", 4.0) is True
    assert members.capacity == 0
    assert members.no_nodes_since == 4.0
    assert members.lost == ["a", "b", "c"]
    assert members.pick() is None
    members.add(node("a", 4), 9.0)
    assert members.no_nodes_since is None
    assert members.capacity == 4
    assert members.pick() == "a"


def test_remove_forgets_what_the_node_held():
    members = Membership([node("a", 1), node("b", 1)], Policy(), 0.0)
    members.took("a")
    members.took("a")
    members.remove("a", 1.0)
    assert members.busy["a"] == 0
    assert "a" not in members.idle_slots()
    members.add(node("a", 1), 2.0)
    assert members.idle_slots() == {"a": 1, "b": 1}


# -- recovery: stragglers, deadlines, failed batches ---------------------------


def test_straggler_threshold():
    policy = Policy()  # straggler_factor=3
    assert straggler_threshold([], policy) is None
    assert straggler_threshold([2.0, 2.0, 2.0], policy) is None  # too few to judge
    assert straggler_threshold([1.0, 2.0, 3.0, 10.0], policy) == 7.5  # 3 x median 2.5
    assert straggler_threshold([4.0, 1.0, 100.0, 2.0, 3.0], policy) == 9.0  # 3 x median 3
    assert straggler_threshold([0.1, 0.1, 0.2, 0.1], policy) == 1.0  # the floor
    assert straggler_threshold([2.0, 4.0, 6.0, 8.0], Policy(straggler_factor=2)) == 10.0
    assert straggler_threshold([5.0] * 10, Policy(straggler_factor=None)) is None


def test_backups_pick_the_oldest_late_batches_for_other_idle_nodes():
    in_flight = [("w1", "A", 0.0), ("w2", "B", 1.0), ("w3", "A", 2.0), ("w4", "B", 9.0)]
    idle = {"A": 1, "C": 1}
    chosen = backups(in_flight, idle, late=5.0, now=10.0, skip=lambda w: False)
    # w1 (on A) cannot go to A: C; w2 (on B) takes A's slot; then none is left.
    assert chosen == [("w1", "A", "C", 10.0), ("w2", "B", "A", 9.0)]
    assert idle == {"A": 0, "C": 0}  # consumed


def test_backups_skip_what_is_skipped():
    in_flight = [("w1", "A", 0.0), ("w2", "B", 1.0), ("w3", "A", 2.0)]
    idle = {"A": 1, "C": 1}
    chosen = backups(in_flight, idle, late=5.0, now=10.0, skip=lambda w: w == "w1")
    assert chosen == [("w2", "B", "A", 9.0), ("w3", "A", "C", 8.0)]
    assert idle == {"A": 0, "C": 0}


def test_backups_never_go_to_the_stragglers_own_node():
    idle = {"A": 2}
    assert backups([("w1", "A", 0.0)], idle, late=1.0, now=10.0, skip=lambda w: False) == []
    assert idle == {"A": 2}


def test_backups_use_a_stragglers_node_for_other_stragglers():
    # A's free process cannot back up w1 (running on A) but can back up w2.
    in_flight = [("w1", "A", 0.0), ("w2", "B", 1.0)]
    idle = {"A": 1}
    chosen = backups(in_flight, idle, late=5.0, now=10.0, skip=lambda w: False)
    assert chosen == [("w2", "B", "A", 9.0)]
    assert idle == {"A": 0}


def test_backups_stop_when_no_slot_is_left():
    in_flight = [("w1", "A", 0.0), ("w2", "A", 1.0), ("w3", "A", 2.0)]
    idle = {"B": 2, "C": 0}
    chosen = backups(in_flight, idle, late=1.0, now=10.0, skip=lambda w: False)
    assert chosen == [("w1", "A", "B", 10.0), ("w2", "A", "B", 9.0)]
    assert idle == {"B": 0, "C": 0}
    assert backups(in_flight, {}, late=1.0, now=10.0, skip=lambda w: False) == []


def test_backups_only_for_late_batches():
    in_flight = [("w1", "A", 4.0), ("w2", "A", 6.0)]
    idle = {"B": 2}
    chosen = backups(in_flight, idle, late=5.0, now=10.0, skip=lambda w: False)
    assert chosen == [("w1", "A", "B", 6.0)]  # w2 waited 4 s < 5 s
    assert idle == {"B": 1}
    assert backups(in_flight, idle, late=7.0, now=10.0, skip=lambda w: False) == []


def deadline(now, no_nodes_since=None, broker_down_since=None, lost=()):
    return deadline_error(
        now,
        no_nodes_since=no_nodes_since,
        broker_down_since=broker_down_since,
        lost=list(lost),
        broker="amqp://guest:**@pine0//",
        timeout=30.0,
    )


def test_deadline_error_without_nodes_only_after_the_timeout():
    assert deadline(1000.0) is None
    assert deadline(130.0, no_nodes_since=100.0, lost=["a"]) is None
    error = deadline(130.5, no_nodes_since=100.0, lost=["a", "b", "a"])
    assert type(error) is NoWorkersError
    assert str(error) == (
        "every node on 'amqp://guest:**@pine0//' stopped answering (a, b) and none "
        "came back within no_node_timeout=30.0 s; the search cannot finish. Check "
        "the nodes (their logs, their network)"
    )


def test_deadline_error_without_the_broker_only_after_the_timeout():
    assert deadline(129.0, broker_down_since=100.0) is None
    error = deadline(131.0, broker_down_since=100.0)
    assert type(error) is BrokerUnreachableError
    assert str(error) == (
        "lost the broker 'amqp://guest:**@pine0//' for more than no_node_timeout=30.0 s; "
        "the search cannot finish"
    )
    # Both: the nodes are named.
    error = deadline(200.0, no_nodes_since=100.0, broker_down_since=100.0, lost=["a"])
    assert type(error) is NoWorkersError and "(a)" in str(error)


def test_split_batch_makes_one_batch_per_call():
    parts = split_batch(batch(-1, -2, -3))
    assert [part() for part in parts] == [[1], [2], [3]]
    assert [len(part) for part in parts] == [1, 1, 1]
    assert split_batch(batch(-1)) is None
    assert split_batch(abs) is None


def test_failed_outputs_raise_the_error_unless_fit_and_score():
    error = NodeFailureError("lost")
    with pytest.raises(NodeFailureError) as info:
        failed_outputs(batch(-1, -2), error)
    assert info.value is error
    with pytest.raises(NodeFailureError) as info:
        failed_outputs(abs, error)
    assert info.value is error


def fit_and_score_batch(n_calls, error_score):
    X, y = make_classification(n_samples=40, random_state=0)
    estimator = LogisticRegression()
    train, test = np.arange(30), np.arange(30, 40)
    kwargs = dict(
        scorer=check_scoring(estimator), train=train, test=test, verbose=0,
        parameters={"C": 1.0}, fit_params=None, score_params=None, error_score=error_score,
    )  # fmt: skip
    return BatchedCalls([(_fit_and_score, (estimator, X, y), kwargs)] * n_calls, ("sequential", 1))


def test_failed_outputs_of_fit_and_score_are_error_score_entries():
    error = NodeFailureError("the node died twice")
    outputs = failed_outputs(fit_and_score_batch(2, error_score=-1.0), error)
    assert len(outputs) == 2
    for output in outputs:
        assert output["test_scores"] == -1.0
        assert "NodeFailureError: the node died twice" in output["fit_error"]
    with pytest.raises(NodeFailureError) as info:
        failed_outputs(fit_and_score_batch(1, error_score="raise"), error)
    assert info.value is error


def test_is_worker_lost():
    assert is_worker_lost(WorkerLostError("signal 9"))
    assert not is_worker_lost(RuntimeError("signal 9"))
    assert not is_worker_lost(None)


def test_is_connection_error():
    assert is_connection_error(ConnectionRefusedError())
    assert is_connection_error(OSError("no route"))
    assert is_connection_error(OperationalError("broker"))
    assert is_connection_error(RecoverableConnectionError("amqp"))
    assert is_connection_error(RedisConnectionError("redis"))
    assert not is_connection_error(ValueError("bad fit"))
    assert not is_connection_error(RuntimeError("bad fit"))
    wrapped = RuntimeError("could not reconnect the result consumer")
    wrapped.__cause__ = ConnectionResetError()
    assert is_connection_error(wrapped)
    other = RuntimeError("a fit failed")
    other.__cause__ = KeyError("x")
    assert not is_connection_error(other)


# -- a Session that is never started --------------------------------------------


def ours():
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("clustersearch-"))


@pytest.fixture
def session_for():
    def make(nodes, **settings):
        app = create_app("memory://")
        return Session(app, nodes, policy=Policy(**settings), broker="memory://")

    return make


def test_a_session_starts_no_thread_until_started(session_for):
    before = threading.active_count()
    names = ours()
    session = session_for([node("a"), node("b", 3)], max_retries=1)
    assert threading.active_count() == before
    assert ours() == names
    assert not session.dispatcher._thread.is_alive()
    assert session._watcher is None and session.blob_server is None
    assert session.capacity == 5
    assert session.policy == Policy(max_retries=1)


def test_submit_queues_the_batch_with_its_payload(session_for):
    session = session_for([node("a")])
    before = threading.active_count()
    future = session.submit(batch(-1, -2))
    assert threading.active_count() == before
    assert len(session.pending) == 1 and not session.finished
    work = session.pending[0]
    assert work.future is future and not future.done()
    assert work.n_calls == 2 and work.error is None
    assert isinstance(work.payload, bytes)
    assert loads(work.payload)() == [1, 2]
    assert work.tries is None and work.avoid == set()
    assert session.wake.is_set()


def send(session, work, node_name):
    """What the dispatcher does when it sends ``work``: out of pending."""
    assert session.pending.popleft() is work
    work.node = node_name
    session.members.took(node_name)


def test_a_failed_try_is_retried_elsewhere_then_given_up(session_for):
    session = session_for([node("a"), node("b")], max_retries=1)
    failures = session.dispatcher.failures
    session.submit(batch(-7))
    work = session.pending[0]
    send(session, work, "a")
    failures.failed_try(work, "a", "its worker process died (signal 9)")
    assert work.tries == [("a", "its worker process died (signal 9)")]
    assert work.avoid == {"a"}
    assert list(session.pending) == [work] and not session.finished
    assert session.members.pick(work.avoid) == "b"
    send(session, work, "b")

    failures.failed_try(work, "b", "the node stopped answering")
    assert not session.pending and list(session.finished) == [work]
    assert type(work.error) is NodeFailureError
    assert str(work.error) == (
        "a batch of 1 fit(s) was lost 2 times (on node 'a': its worker process died "
        "(signal 9); on node 'b': the node stopped answering); it is not sent again "
        "(max_retries=1). A fit that kills its worker every time usually runs out of memory"
    )
    assert [(e["event"], e["node"], e.get("tries")) for e in session.events] == [
        ("worker-lost", "a", 1),
        ("worker-lost", "b", 2),
        ("gave-up", "b", 2),
    ]


def test_no_retry_with_max_retries_zero(session_for):
    session = session_for([node("a"), node("b")], max_retries=0)
    session.submit(batch(-7))
    work = session.pending[0]
    send(session, work, "a")
    session.dispatcher.failures.failed_try(work, "a", "its worker process died")
    assert not session.pending and list(session.finished) == [work]
    assert "lost 1 times" in str(work.error)


def test_retries_avoid_every_node_tried(session_for):
    session = session_for([node("a"), node("b"), node("c")], max_retries=3)
    session.submit(batch(-7))
    work = session.pending[0]
    for name in ("a", "b"):
        send(session, work, name)
        session.dispatcher.failures.failed_try(work, name, "died")
    assert work.avoid == {"a", "b"}
    assert session.members.pick(work.avoid) == "c"


def test_a_failed_batch_is_retried_call_by_call_and_its_calls_inherit_its_tries(session_for):
    session = session_for([node("a"), node("b")], max_retries=1)
    failures = session.dispatcher.failures
    parent_future = session.submit(batch(-1, -2))
    work = session.pending[0]
    send(session, work, "a")
    failures.failed_try(work, "a", "died")
    parts = list(session.pending)
    assert len(parts) == 2 and work not in parts
    assert [loads(p.payload)() for p in parts] == [[1], [2]]
    assert all(isinstance(p.callback, Part) and p.callback.parent is work for p in parts)
    assert [p.callback.index for p in parts] == [0, 1]
    assert not parent_future.done()
    # One call dies again: with the batch's try, that makes two.
    send(session, parts[0], "b")
    failures.failed_try(parts[0], "b", "died again")
    assert parts[0].tries == [("a", "died"), ("b", "died again")]
    assert type(parts[0].error) is NodeFailureError
    assert list(session.finished) == [parts[0]]


def copies(session, entries):
    """Synthetic copies in flight: (work, node, seconds ago)."""
    now = time.monotonic()
    for i, (work, name, ago) in enumerate(entries):
        session.copies[f"t{i}"] = Copy(work, name, now - ago, None)
        session.members.took(name)


def test_back_up_stragglers_sends_the_oldest_late_batch_to_an_idle_node(session_for):
    session = session_for([node("a", 1), node("b", 1)])  # straggler_factor=3
    failures = session.dispatcher.failures
    w1, w2 = Work(b"1", None, 1), Work(b"2", None, 1)
    # Sent 100 and 50 s ago; the usual batch takes 1 s: late after 3 s.
    copies(session, [(w2, "a", 50.0), (w1, "a", 100.0)])
    assert session.members.idle_slots() == {"b": 1}

    failures.durations.extend([1.0, 1.0, 1.0])
    failures.back_up_stragglers()
    assert not session.pending  # three durations are too few to judge

    failures.durations.append(1.0)
    failures.back_up_stragglers()
    assert list(session.pending) == [w1]  # the oldest; b has one free process
    assert w1.backed_up and w1.avoid == {"a"}
    assert not w2.backed_up and w2.avoid == set()
    [event] = session.events
    assert (event["event"], event["node"], event["backup"], event["late_s"]) == (
        "straggler", "a", "b", 3.0,
    )  # fmt: skip
    assert event["waited_s"] >= 100.0

    # Something waits to be sent: no backups.
    failures.back_up_stragglers()
    assert list(session.pending) == [w1]
    # w1's backup is sent to b (b is full now); a node joins: the next
    # straggler goes there, and w1 gets no second backup.
    send(session, w1, "b")
    session.copies["t-backup"] = Copy(w1, "b", time.monotonic(), None)
    failures.back_up_stragglers()
    assert not session.pending
    session.members.add(node("c", 1), time.monotonic())
    failures.back_up_stragglers()
    assert list(session.pending) == [w2]
    assert w2.backed_up and w2.avoid == {"a"}
    assert [(e["node"], e["backup"]) for e in session.events] == [("a", "b"), ("a", "c")]


def test_back_up_stragglers_leaves_batches_that_are_not_late(session_for):
    session = session_for([node("a", 1), node("b", 1)])
    failures = session.dispatcher.failures
    work = Work(b"1", None, 1)
    copies(session, [(work, "a", 0.0)])
    failures.durations.extend([100.0] * 4)  # late after 300 s
    failures.back_up_stragglers()
    assert not session.pending and not work.backed_up


def test_back_up_stragglers_needs_an_idle_node_and_the_factor(session_for):
    session = session_for([node("a", 1), node("b", 1)])
    failures = session.dispatcher.failures
    w1, w2 = Work(b"1", None, 1), Work(b"2", None, 1)
    copies(session, [(w1, "a", 100.0), (w2, "b", 100.0)])
    failures.durations.extend([1.0] * 4)
    failures.back_up_stragglers()  # every process busy
    assert not session.pending

    session = session_for([node("a", 1), node("b", 1)], straggler_factor=None)
    failures = session.dispatcher.failures
    work = Work(b"1", None, 1)
    copies(session, [(work, "a", 100.0)])
    failures.durations.extend([1.0] * 10)
    failures.back_up_stragglers()
    assert not session.pending and not work.backed_up
