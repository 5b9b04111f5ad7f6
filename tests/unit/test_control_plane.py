"""The control plane's parts on their own: registry, pairing and scheduling, statistics."""

from __future__ import annotations

import pytest

from coordinator.control_plane.registry import Registry, Worker
from coordinator.control_plane.scheduling import choose_pair, pairs
from coordinator.control_plane.statistics import SessionRecord, Statistics
from specd.core.compat import check_pair, pair_id, pair_problem
from specd.core.errors import IncompatiblePair, InvalidArgument, NotFound
from specd.v1 import common_pb2

ORACLE, DRAFT = common_pb2.WORKER_ROLE_ORACLE, common_pb2.WORKER_ROLE_DRAFT


def ready(worker: Worker, fingerprint: str = "abc", vocab: int = 100, feature_dim: int = 0, max_sessions: int = 4) -> Worker:
    """What a passing health check records."""
    worker.healthy, worker.vocab_fingerprint, worker.vocab_size = True, fingerprint, vocab
    worker.feature_dim, worker.max_sessions, worker.max_depth = feature_dim, max_sessions, 8
    return worker


def test_registry_names_workers_and_refuses_bad_registrations():
    registry = Registry()
    first, new = registry.add(ORACLE, "127.0.0.1:1")
    assert new and first.name == "oracle-1"
    again, new = registry.add(ORACLE, "127.0.0.1:1", "other-name")
    assert again is first and not new  # an address registered before is the worker already there
    named, _ = registry.add(DRAFT, "127.0.0.1:2", "small")
    assert registry.get("small") is named and [w.name for w in registry.drafts()] == ["small"]
    for role, address, name, fragment in [
        (0, "127.0.0.1:3", "", "role"),
        (DRAFT, "no-port", "", "host:port"),
        (DRAFT, "127.0.0.1:4", "small", "already registered"),
        (DRAFT, "127.0.0.1:5", "a+b", "may not contain"),
    ]:
        with pytest.raises(InvalidArgument, match=fragment):
            registry.add(role, address, name)
    registry.remove("small")
    with pytest.raises(NotFound, match="small"):
        registry.get("small")


def test_pairs_are_compatible_workers_only():
    oracle = ready(Worker("o", ORACLE, "a:1"), feature_dim=64)
    draft = ready(Worker("d", DRAFT, "a:2"))
    feature = ready(Worker("f", DRAFT, "a:3"), feature_dim=64)
    narrow = ready(Worker("n", DRAFT, "a:4"), feature_dim=32)
    other = ready(Worker("x", DRAFT, "a:5"), fingerprint="zzz")
    assert pair_problem(draft, oracle) is None and pair_problem(feature, oracle) is None
    assert "width 32" in pair_problem(narrow, oracle)
    assert "vocabulary" in pair_problem(other, oracle)
    with pytest.raises(IncompatiblePair):
        check_pair(other, oracle)
    registry = Registry()
    for w in (oracle, draft, feature, narrow, other):
        registry.workers[w.name] = w
    assert [pid for pid, _, _ in pairs(registry)] == ["o", "d+o", "f+o"]
    assert pair_id("", "o") == "o" and pair_id("d", "o") == "d+o"


def test_a_draft_that_reads_several_hidden_states_pairs_only_with_an_oracle_that_has_them():
    """ModelInfo.feature_layers against ModelInfo.num_layers: the oracle must report its layers and have each
    hidden state the draft reads; drafts of the final state alone pair as before."""
    deep = ready(Worker("deep", ORACLE, "a:1"), feature_dim=64)
    deep.num_layers = 30
    shallow = ready(Worker("shallow", ORACLE, "a:2"), feature_dim=64)
    shallow.num_layers = 12
    unknown = ready(Worker("old", ORACLE, "a:3"), feature_dim=64)  # num_layers 0: an oracle from before layers
    eagle3 = ready(Worker("e3", DRAFT, "a:4"), feature_dim=64)
    eagle3.feature_layers = [2, 15, 30]
    plain = ready(Worker("f", DRAFT, "a:5"), feature_dim=64)
    assert pair_problem(eagle3, deep) is None
    assert pair_problem(eagle3, shallow) == (
        "the draft reads hidden states 2, 15, 30 of its oracle, but this oracle has 12 layers (hidden states 0..12); "
        "a feature draft pairs only with the oracle it was distilled from"
    )
    assert "does not report its layers" in pair_problem(eagle3, unknown)
    assert all(pair_problem(plain, oracle) is None for oracle in (deep, shallow, unknown))
    narrow = ready(Worker("n", DRAFT, "a:6"), feature_dim=32)
    narrow.feature_layers = [1, 2]
    assert "width 32" in pair_problem(narrow, deep)
    registry = Registry()
    for w in (deep, shallow, unknown, eagle3, plain):
        registry.workers[w.name] = w
    assert {pid for pid, _, _ in pairs(registry)} == {
        "deep", "shallow", "old", "e3+deep", "f+deep", "f+shallow", "f+old",
    }


def test_new_sessions_go_to_the_least_loaded_usable_workers():
    registry = Registry()
    busy = ready(Worker("o1", ORACLE, "a:1"))
    idle = ready(Worker("o2", ORACLE, "a:2"))
    busy.assigned = 3
    drained = ready(Worker("d1", DRAFT, "a:3"))
    drained.draining = True
    free = ready(Worker("d2", DRAFT, "a:4"))
    for w in (busy, idle, drained, free):
        registry.workers[w.name] = w
    assert choose_pair(registry, use_draft=True) == (idle, free)
    assert choose_pair(registry, use_draft=False) == (idle, None)
    idle.healthy = busy.healthy = False
    assert choose_pair(registry, use_draft=True) is None


def test_statistics_follow_a_session_from_start_to_its_pair_totals():
    stats = Statistics()
    stats.started(SessionRecord("s1", "r1", "d+o", "o", "d"))
    stats.progress("s1", depth=4, generated=10, drafted=8, accepted=6)
    (live,) = stats.live()
    assert live["generated_tokens"] == 10 and live["acceptance_rate"] == 0.75
    summary = {"rounds": 5, "rounds_with_draft": 4, "drafted": 12, "accepted": 6,
               "accepted_per_position": [4, 2], "drafted_per_position": [4, 4], "depth_per_round": [3, 3, 3, 3, 0]}
    assert stats.finished("s1", summary).pair_id == "d+o"
    assert stats.finished("s1", summary) is None  # once only
    totals = stats.pairs["d+o"].to_dict("d+o", "goodput", [])
    assert totals["sessions"] == 1 and totals["mean_acceptance_length"] == 1 + 6 / 4
    assert totals["accepted_per_position"] == [4, 2] and stats.live() == []
    empty = Statistics().pair("o").to_dict("o", "fixed:0", [])
    assert empty["mean_acceptance_length"] == 1.0 and empty["acceptance_rate"] == 0.0


def test_specctl_shows_a_workers_load():
    from specd.cli.specctl import show_load

    assert show_load(common_pb2.WorkerLoad()) == "-"
    assert show_load(common_pb2.WorkerLoad(queued=2, rows_per_step=12.0, busy_fraction=0.35)) == "35% 12.0r q2"
