"""The migration machines without a socket: every rollback rule and in-doubt path.

A script answers each action the machine asks for; the tests check the actions asked
(in order), the outcome, and, over random answers, the exactly-once rule: the source
resumes only once the steering node has decided "aborted", and releases only once the
target holds the flow; the target serves only a flow the steering node gave it.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from pysteer.migration import source as src
from pysteer.migration import target as tgt
from pysteer.migration.events import (
    PEER,
    Action,
    Answered,
    Call,
    Do,
    Event,
    Finish,
    Refused,
    Sleep,
    Unreachable,
    Woke,
)
from pysteer.migration.source import AFTER_COMMIT, RETRY_MAX, Source
from pysteer.migration.target import Target

MID = bytes(range(16))
HELLO = {"accepting": True, "services": [443], "apps": [[443, "ticker", 1, True]]}


def name(action: Action) -> str:
    """A short name for an action: the call's cmd/op (revert split by kind), or the step."""
    if isinstance(action, Call):
        r = action.request
        if r.get("cmd") == "revert":
            return "revert-hold" if r.get("hold") else "unpark"
        return str(r.get("cmd") or r.get("op"))
    if isinstance(action, Do):
        return action.what
    if isinstance(action, Sleep):
        return "sleep"
    return "finish"


HAPPY: dict[str, Event] = {
    "hello": Answered(HELLO),
    src.CONNECT: Answered(),
    src.CHECK: Answered(),
    src.LOOKUP: Answered({"version": None}),
    src.RECORD: Answered({"how": "written"}),
    src.QUIESCE: Answered(),
    src.UNQUIESCE: Answered(),
    src.SLOT: Answered(),
    "park": Answered({"was": None}),
    src.FREEZE: Answered({"tcp_state": "ESTABLISHED", "tls": True, "pending": 0}),
    src.SEAL: Answered({"blob": b"s" * 100}),
    "move": Answered({"replayed": 2, "parked_ms": 0.8}),
    src.RELEASE: Answered(),
    src.RESUME: Answered(),
    src.DISCARD: Answered(),
    "revert-hold": Answered({"replayed": 0, "host": None}),
    "unpark": Answered({"replayed": 1, "host": "a"}),
    "decision": Answered({"decision": "pending"}),
    "outcome": Answered({"outcome": None}),
    "sleep": Woke(),
}

Script = dict[str, Event | list[Event]]


def run(
    machine: Any, script: Script | None = None, *, defaults: dict[str, Event] | None = None
) -> tuple[Finish, list[str]]:
    """Drive ``machine`` to its Finish; ``script`` overrides ``defaults`` (HAPPY; a list:
    in turn, the last one repeating). Time moves 1 ms per action, and a Sleep's length."""
    answers: dict[str, Any] = dict(defaults or HAPPY) | dict(script or {})
    now = 1000.0
    action = machine.start(now)
    asked: list[str] = []
    for _ in range(10_000):
        if isinstance(action, Finish):
            return action, asked
        n = name(action)
        asked.append(n)
        answer = answers[n]
        if isinstance(answer, list):
            event = answer.pop(0) if len(answer) > 1 else answer[0]
        else:
            event = answer
        now += action.seconds if isinstance(action, Sleep) else 0.001
        action = machine.on(event, now)
    raise AssertionError(f"no Finish after 10,000 actions: {asked[-20:]}")


def source(**kw: Any) -> Source:
    args = {"mid": MID, "flow": "10.0.0.1:5000-10.0.0.9:443", "dport": 443, "me": "a"}
    return Source(**(args | {"target": "b", "timeout": 5.0} | kw))


BEFORE_FREEZE = ["hello", "check", "lookup", "connect", "quiesce", "slot", "park"]


def test_a_move_asks_in_order_and_commits() -> None:
    m = source()
    finish, asked = run(m)
    assert asked == [*BEFORE_FREEZE, "freeze", "seal", "move", "release"]
    assert (finish.outcome, finish.reason) == ("moved", None)
    r = m.result
    assert (r.replayed, r.parked_ms, r.blob_bytes) == (2, 0.8, 100)
    assert r.freeze_ms is not None and r.freeze_ms >= 0
    steps = [s["step"] for s in m.tl.steps]
    assert steps == [
        "start",
        "peer-ready",
        "park",
        "parked",
        "frozen",
        "sealed",
        "move",
        "committed",
        "released",
    ]
    assert not m.moving


# --- the shared store ------------------------------------------------------------------------
def test_with_a_store_the_version_read_first_is_written_before_the_release() -> None:
    m = source()
    seen: list[Action] = []
    action = m.start(0.0)
    answers = HAPPY | {src.LOOKUP: Answered({"version": 7})}
    while not isinstance(action, Finish):
        seen.append(action)
        action = m.on(answers[name(action)], 0.001 * len(seen))
    names = [name(a) for a in seen]
    assert names == [*BEFORE_FREEZE, "freeze", "seal", "move", "record", "release"]
    move = next(a for a in seen if name(a) == "move")
    record = next(a for a in seen if name(a) == "record")
    assert isinstance(move, Call) and move.request["version"] == 7
    assert isinstance(record, Do) and record.args == {"host": "b", "version": 7}
    assert (action.outcome, m.result.stored) == ("moved", "written")
    assert "recorded" in [s["step"] for s in m.tl.steps]


def test_a_store_that_cannot_answer_refuses_the_move_before_anything() -> None:
    finish, asked = run(source(), {src.LOOKUP: Refused("the shared store cannot be read (x)")})
    assert asked == ["hello", "check", "lookup"]
    assert finish.outcome == "failed"
    assert finish.reason == "the shared store cannot be read (x); nothing was frozen"


def test_an_unanswered_record_still_releases_the_committed_move() -> None:
    m = source()
    script: Script = {src.LOOKUP: Answered({"version": 0}), src.RECORD: Unreachable("etcd: x")}
    finish, asked = run(m, script)
    assert asked[-2:] == ["record", "release"] and finish.outcome == "moved"
    assert m.result.stored == "unanswered"
    assert {"step": "unrecorded", "error": "etcd: x"}.items() <= next(
        s for s in m.tl.steps if s["step"] == "unrecorded"
    ).items()


def test_without_a_store_the_move_carries_no_version() -> None:
    m = source()
    seen: list[Action] = []
    action = m.start(0.0)
    while not isinstance(action, Finish):
        seen.append(action)
        action = m.on(HAPPY[name(action)], 0.001 * len(seen))
    move = next(a for a in seen if name(a) == "move")
    assert isinstance(move, Call) and "version" not in move.request
    assert m.result.stored is None


def test_the_park_is_the_only_steering_call_before_the_move() -> None:
    """Inside the freeze: park, then one message to B, whose answer comes after B's claim."""
    _, asked = run(source())
    inside = asked[asked.index("park") : asked.index("release")]
    assert inside == ["park", "freeze", "seal", "move"]


def test_a_drain_gives_the_hello_and_only_the_link_is_opened() -> None:
    finish, asked = run(source(hello=HELLO))
    assert asked[:4] == ["connect", "check", "lookup", "connect"] and finish.outcome == "moved"


@pytest.mark.parametrize(
    ("script", "why"),
    [
        ({"hello": Unreachable("agent b: no answer within 5 s")}, "node b is unreachable"),
        ({"hello": Answered({"accepting": False})}, "refuses imports (cordoned)"),
        ({"hello": Answered({"accepting": True, "services": [80]})}, "does not serve port 443"),
        ({src.CHECK: Refused("node b cannot continue the connection: x")}, "cannot continue"),
        ({src.CONNECT: [Unreachable("refused")]}, "nothing was frozen"),
        ({src.SLOT: Refused("flow closed before it could move")}, "closed before"),
        ({"park": Refused("flow is parked by an operator")}, "steering node refused"),
    ],
)
def test_a_failure_before_the_park_touches_nothing(script: Script, why: str) -> None:
    if src.CONNECT in script:  # only the steering link's connect fails
        script = {src.CONNECT: Unreachable("refused")}
        finish, asked = run(source(hello=HELLO), {src.CONNECT: [Answered(), Unreachable("x")]})
    else:
        finish, asked = run(source(), script)
    assert finish.outcome == "failed" and why in (finish.reason or ""), finish
    assert not {"freeze", "resume", "release", "unpark", "revert-hold"} & set(asked), asked


def test_an_unanswered_park_is_undone_all_the_same() -> None:
    finish, asked = run(source(), {"park": Unreachable("no answer")})
    assert asked[-2:] == ["park", "unpark"]
    assert finish.outcome == "failed" and "nothing was frozen" in (finish.reason or "")


def test_a_failed_freeze_gives_the_flow_back() -> None:
    finish, asked = run(source(), {src.FREEZE: Refused("export failed")})
    assert asked[-2:] == ["freeze", "unpark"]
    assert finish.outcome == "rolled-back" and "freeze failed here: export failed" in finish.reason


def test_a_failed_seal_resumes_then_unparks() -> None:
    m = source()
    finish, asked = run(m, {src.SEAL: Refused("queues too big")})
    assert asked[-3:] == ["seal", "resume", "unpark"]
    assert finish.outcome == "rolled-back"
    assert [s["step"] for s in m.tl.steps][-3:] == ["decided", "resumed", "unparked"]


def test_a_refused_move_decides_at_the_steering_node_first() -> None:
    """B said no, but the move was sent: A makes the steering node decide "aborted" before
    it resumes, so that no claim can win after the resume."""
    finish, asked = run(source(), {"move": Refused("b: restore failed on b: x", "aborted")})
    assert asked[-4:] == ["move", "revert-hold", "resume", "unpark"]
    assert finish.outcome == "rolled-back" and "node b: b: restore failed" in finish.reason


def test_a_refused_move_that_b_claimed_all_the_same_is_moved() -> None:
    script: Script = {"move": Refused("?"), "revert-hold": Refused("committed", "committed")}
    m = source()
    finish, asked = run(m, script)
    assert asked[-2:] == ["revert-hold", "release"] and finish.outcome == "moved"
    assert m.tl.steps[-2]["how"] == "the target claimed it first"


@pytest.mark.parametrize("lost", [Unreachable("connection lost"), Refused("pending", "pending")])
def test_a_lost_answer_asks_the_steering_node(lost: Event) -> None:
    m = source()
    finish, asked = run(m, {"move": lost, "decision": Answered({"decision": "pending"})})
    assert asked[-5:] == ["move", "decision", "revert-hold", "resume", "unpark"]
    assert finish.outcome == "rolled-back"
    assert [s["step"] for s in m.tl.steps][-4:] == ["resolving", "decided", "resumed", "unparked"]


def test_a_lost_answer_of_a_committed_move_releases() -> None:
    script: Script = {
        "move": Unreachable("lost"),
        "decision": Answered({"decision": "committed", "host": "b"}),
    }
    m = source()
    finish, asked = run(m, script)
    assert asked[-2:] == ["decision", "release"] and finish.outcome == "moved"
    assert m.result.freeze_ms is not None


def test_an_aborted_decision_resumes_without_deciding_again() -> None:
    script: Script = {"move": Unreachable("lost"), "decision": Answered({"decision": "aborted"})}
    _, asked = run(source(), script)
    assert asked[-3:] == ["decision", "resume", "unpark"]


@pytest.mark.parametrize(
    ("outcome", "tail", "result"),
    [
        ("committed", ["outcome", "release"], "moved"),
        ("aborted", ["outcome", "resume", "unpark"], "rolled-back"),
    ],
)
def test_without_the_steering_node_b_is_asked(outcome: str, tail: list[str], result: str) -> None:
    script: Script = {
        "move": Unreachable("lost"),
        "decision": Unreachable("steering node down"),
        "outcome": Answered({"outcome": outcome}),
    }
    finish, asked = run(source(), script)
    assert asked[-len(tail) :] == tail and finish.outcome == result


def test_nobody_answers_in_doubt_then_settled() -> None:
    """Neither the steering node nor B answers: back-off up to AFTER_COMMIT, then in-doubt
    with the socket still frozen; settle asks on (back-off up to RETRY_MAX) until known."""
    script: Script = {
        "move": Unreachable("lost"),
        "decision": Unreachable("down"),
        "outcome": Unreachable("down"),
    }
    m = source()
    finish, asked = run(m, script)
    assert finish.outcome == "in-doubt" and "asked again until known" in finish.reason
    assert not {"resume", "release", "unpark", "revert-hold"} & set(asked)
    assert m.moving  # still frozen and parked: only the outcome can end it
    sleeps = asked.count("sleep")
    assert 3 <= sleeps <= 10, asked

    decisions = [Unreachable("down")] * 8 + [Answered({"decision": "committed", "host": "b"})]
    now = 2000.0
    action = m.settle(now)
    waits = []
    while not isinstance(action, Finish):
        if isinstance(action, Sleep):
            waits.append(action.seconds)
            event: Event = Woke()
        elif name(action) == "decision":
            event = decisions.pop(0)
        elif name(action) == "outcome":
            event = Unreachable("down")
        else:
            assert name(action) == "release", action
            event = Answered()
        now += 0.01
        action = m.on(event, now)
    assert action.outcome == "moved"
    assert waits == sorted(waits) and max(waits) == RETRY_MAX and waits[0] == 0.2


def test_the_in_doubt_wait_is_bounded_by_after_commit() -> None:
    script: Script = {"move": Unreachable("x"), "decision": Unreachable("x")}
    m = source()
    now = 1000.0
    action = m.start(now)
    while not isinstance(action, Finish):
        n = name(action)
        event = script.get(n, HAPPY[n])
        if n == "move":
            moved_at = now
        now += action.seconds if isinstance(action, Sleep) else 0.001
        action = m.on(event if not isinstance(event, list) else event[0], now)
    assert action.outcome == "in-doubt"
    assert now - moved_at <= AFTER_COMMIT + 0.1


def test_a_socket_that_cannot_be_thawed_is_lost_and_the_flow_unparked() -> None:
    m = source()
    finish, asked = run(m, {"move": Refused("no"), src.RESUME: Refused("EIO")})
    assert asked[-4:] == ["revert-hold", "resume", "discard", "unpark"]
    assert finish.outcome == "lost" and "could not be thawed: EIO" in finish.reason


def test_an_unreachable_steering_node_leaves_the_unpark_to_the_lease() -> None:
    m = source()
    finish, asked = run(m, {src.FREEZE: Refused("x"), "unpark": Unreachable("down")})
    assert finish.outcome == "rolled-back"
    tries = asked.count("unpark")
    assert 10 <= tries <= 60, tries  # 0.1 s apart for AFTER_COMMIT, then it gives up
    assert m.tl.steps[-1]["step"] == "unpark-failed"


def test_a_refused_unpark_is_not_asked_again() -> None:
    m = source()
    finish, asked = run(m, {src.FREEZE: Refused("x"), "unpark": Refused("gone")})
    assert asked.count("unpark") == 1 and m.tl.steps[-1]["step"] == "unpark-failed"
    assert finish.outcome == "rolled-back"


def test_a_rollback_the_steering_node_cannot_decide_is_resolved() -> None:
    script: Script = {
        "move": Refused("no"),
        "revert-hold": [Unreachable("down"), Answered()],
        "decision": Answered({"decision": "pending"}),
    }
    finish, asked = run(source(), script)
    assert asked[asked.index("move") :] == [
        "move",
        "revert-hold",
        "decision",
        "revert-hold",
        "resume",
        "unpark",
    ]
    assert finish.outcome == "rolled-back"


@pytest.mark.parametrize(
    ("after", "tail", "outcome"),
    [
        ("parked", ["unpark"], "failed"),
        ("frozen", ["resume", "unpark"], "failed"),
        ("moving", ["decision", "revert-hold", "resume", "unpark"], "rolled-back"),
    ],
)
def test_a_crash_in_the_adapter_undoes_what_was_done(
    after: str, tail: list[str], outcome: str
) -> None:
    stop_at = {"parked": src.FREEZE, "frozen": src.SEAL, "moving": "move"}[after]
    m = source()
    now = 1000.0
    action = m.start(now)
    while name(action) != stop_at:
        action = m.on(HAPPY[name(action)], now)
    action = m.crashed("internal error: boom", now)
    asked = []
    while not isinstance(action, Finish):
        asked.append(name(action))
        now += 0.001
        action = m.on(HAPPY[name(action)], now)
    assert asked == tail and action.outcome == outcome and "boom" in action.reason


def test_the_operator_decides_an_in_doubt_move() -> None:
    for keep, what, outcome in (
        ("target", "release", "moved"),
        ("source", "resume", "rolled-back"),
    ):
        action, got, why = source().force(keep)
        assert (name(action), got) == (what, outcome) and "operator" in why


def test_a_finished_machine_takes_no_more_events() -> None:
    m = source()
    run(m)
    with pytest.raises(RuntimeError):
        m.on(Answered(), 0.0)


def test_the_lease_covers_the_timeout() -> None:
    m = source(timeout=3.0)
    action = m.start(0.0)
    while name(action) != "park":
        action = m.on(HAPPY[name(action)], 0.0)
    assert isinstance(action, Call) and action.request["lease"] == 3.0 + src.LEASE_MARGIN
    assert action.request["token"] == src.token_of(MID) and action.to != PEER


# --- exactly once, over random answers ------------------------------------------------------
def random_event(rng: random.Random, action: Action, down: float) -> Event:
    """Mostly yes before the freeze (so that most runs get that far), anything after;
    ``down``: how often the steering node and B are silent when asked who won."""
    n = name(action)
    roll = rng.random()
    if isinstance(action, Sleep):
        event: Event = Woke()
    elif n == "decision":
        choice = rng.choice(["committed", "aborted", "pending", "unknown"])
        event = Unreachable("down") if roll < down else Answered({"decision": choice, "host": "b"})
    elif n == "outcome":
        choice = rng.choice(["committed", "aborted", "claiming", None])
        event = Unreachable("down") if roll < down else Answered({"outcome": choice})
    elif n == src.LOOKUP:  # with a store, sometimes: a version, or no answer
        event = rng.choice([HAPPY[n], Answered({"version": 3}), Refused("no store")])
    elif roll < (0.95 if n in ("hello", "check", "connect", "slot") else 0.6):
        event = HAPPY[n]
    elif roll < 0.8:
        event = Refused("no", rng.choice([None, "pending", "committed", "aborted"]))
    else:
        event = Unreachable("lost")
    return event


def learned(n: str, event: Event, decided: str | None) -> str | None:
    """What the steering node decided, as far as this answer tells A."""
    if isinstance(event, Answered):
        said = {
            "move": "committed",
            "revert-hold": "aborted",
            "decision": event.value.get("decision"),
            "outcome": event.value.get("outcome"),
        }.get(n)
        if said in ("committed", "aborted"):
            return said
    if n == "revert-hold" and isinstance(event, Refused) and event.code == "committed":
        return "committed"
    return decided


def one_random_move(rng: random.Random) -> str:
    m = source()
    now = 0.0
    action = m.start(now)
    decided: str | None = None
    released = resumed = False
    down = rng.choice([0.3, 0.9, 1.0])
    while not isinstance(action, Finish):
        assert len(m.tl.steps) < 500, m.tl.steps[-10:]
        event = random_event(rng, action, down)
        n = name(action)
        decided = learned(n, event, decided)
        if n == src.RELEASE:
            assert decided == "committed", m.tl.steps
            released = True
        if n == src.RESUME:
            if m.result.blob_bytes is not None:  # the move was sent: B may have claimed
                assert decided == "aborted", m.tl.steps
            resumed = True
        now += action.seconds if isinstance(action, Sleep) else 0.001
        action = m.on(event, now)
    assert not (released and resumed)
    assert released == (action.outcome == "moved")
    if action.outcome == "in-doubt":
        assert not resumed and m.moving
    return action.outcome


def test_exactly_once_over_random_answers() -> None:
    """A resumes only after "aborted" was decided at the steering node (or nothing was
    sent), releases only once B holds the flow, never both, and always finishes."""
    rng = random.Random(1)  # noqa: S311 - reproducible, not secret
    outcomes = [one_random_move(rng) for _ in range(3000)]
    assert set(outcomes) == {"moved", "rolled-back", "failed", "in-doubt", "lost"}


# --- the target ---------------------------------------------------------------------------
T_HAPPY: dict[str, Event] = {
    tgt.OPEN: Answered({"flow": "10.0.0.1:5000-10.0.0.9:443", "dport": 443}),
    tgt.RESTORE: Answered(),
    tgt.BUILD: Answered(),
    tgt.THAW: Answered(),
    "claim": Answered({"replayed": 3, "parked_ms": 1.25}),
    tgt.SERVE: Answered(),
    tgt.ABORTED: Answered(),
    tgt.DISCARD: Answered(),
    "sleep": Woke(),
}


def target_run(script: Script | None = None) -> tuple[Finish, list[str], Target]:
    t = Target(mid=MID, source="a", me="b")
    finish, asked = run(t, script, defaults=T_HAPPY)
    return finish, asked, t


def test_the_target_restores_thaws_claims_then_serves() -> None:
    finish, asked, t = target_run()
    assert asked == ["open", "restore", "build", "thaw", "claim", "serve"]
    assert finish.answer == {"ok": True, "replayed": 3, "parked_ms": 1.25}
    assert t.state == "committed"


@pytest.mark.parametrize(
    ("fails", "undo", "error", "code"),
    [
        (tgt.OPEN, [], "tampered", None),
        (tgt.RESTORE, ["aborted"], "restore failed on b: tampered", None),
        (tgt.BUILD, ["discard", "aborted"], "b cannot continue the connection: tampered", None),
        (tgt.THAW, ["discard", "aborted"], "thaw failed on b: tampered", "aborted"),
        ("claim", ["discard", "aborted"], "steering node: tampered", "aborted"),
    ],
)
def test_a_target_refusal_undoes_newest_first(
    fails: str, undo: list[str], error: str, code: str | None
) -> None:
    finish, asked, _ = target_run({fails: Refused("tampered")})
    assert asked[asked.index(fails) + 1 :] == undo
    assert "serve" not in asked and finish.answer is not None
    assert finish.answer["ok"] is False and finish.answer["error"] == error
    assert finish.answer.get("code") == code


def test_silence_from_the_steering_node_is_never_a_no() -> None:
    claims = [Unreachable("down")] * 12 + [Answered({"replayed": 0})]
    finish, asked, _ = target_run({"claim": claims})
    assert asked.count("claim") == 13 and asked[-1] == "serve"
    assert "discard" not in asked and finish.answer == {"ok": True, "replayed": 0}


def test_the_target_backs_off_up_to_its_cap() -> None:
    t = Target(mid=MID, source="a", me="b")
    action = t.start(0.0)
    waits = []
    while len(waits) < 10:
        if isinstance(action, Sleep):
            waits.append(action.seconds)
            action = t.on(Woke(), 0.0)
        elif name(action) == "claim":
            action = t.on(Unreachable("down"), 0.0)
        else:
            action = t.on(T_HAPPY[name(action)], 0.0)
    assert waits[0] == 0.05 and max(waits) == tgt.CLAIM_RETRY_MAX and waits == sorted(waits)


def test_a_target_crash_drops_its_copy_unless_claimed() -> None:
    t = Target(mid=MID, source="a", me="b")
    action = t.start(0.0)
    while name(action) != "thaw":
        action = t.on(T_HAPPY[name(action)], 0.0)
    action = t.crashed("bug", 0.0)
    assert [name(action), name(t.on(Answered(), 0.0))] == ["discard", "aborted"]
    t2 = Target(mid=MID, source="a", me="b")
    action = t2.start(0.0)
    while name(action) != "serve":
        action = t2.on(T_HAPPY[name(action)], 0.0)
    assert isinstance(t2.crashed("bug", 0.0), Finish)  # the flow is ours: nothing dropped


def test_the_operator_decides_a_claiming_import() -> None:
    actions, outcome = Target(mid=MID, source="a", me="b").force("target")
    assert [name(a) for a in actions] == ["serve"] and outcome == "moved"
    actions, outcome = Target(mid=MID, source="a", me="b").force("source")
    assert [name(a) for a in actions] == ["discard", "aborted"] and outcome == "rolled-back"


def test_the_move_waits_no_longer_than_the_timeout_left() -> None:
    """Past the timeout the steering node decides: A asks it rather than wait on B."""
    m = source(timeout=1.0)
    now = 0.0
    action = m.start(now)
    while name(action) != "move":
        now += 0.1
        action = m.on(HAPPY[name(action)], now)
    assert isinstance(action, Call) and 0 < action.timeout <= 1.0 - 0.1 * 6 + 1e-9


# --- a proxy connection: the wait for its request boundary -------------------------------------
def test_a_boundary_not_reached_in_time_rolls_back_with_nothing_frozen() -> None:
    finish, asked = run(source(), {src.QUIESCE: Refused("a request was still in flight", "busy")})
    assert asked == ["hello", "check", "lookup", "connect", "quiesce"]
    assert finish.outcome == "rolled-back"
    assert finish.reason == "a request was still in flight; nothing was frozen"


def test_a_tunnel_is_not_movable() -> None:
    finish, asked = run(source(), {src.QUIESCE: Refused("not movable: a tunnel", "not-movable")})
    assert (finish.outcome, finish.reason, asked[-1]) == (
        "not-movable",
        "not movable: a tunnel",
        "quiesce",
    )


def test_a_held_connection_is_let_go_last_when_a_move_rolls_back() -> None:
    m = source()
    held = {src.QUIESCE: Answered({"waited_ms": 1500.0}), "move": Refused("no")}
    finish, asked = run(m, held)
    assert finish.outcome == "rolled-back"
    assert asked[-4:] == ["revert-hold", "resume", "unpark", "unquiesce"]
    assert {"step": "quiesced", "waited_ms": 1500.0} in [
        {k: v for k, v in s.items() if k in ("step", "waited_ms")} for s in m.tl.steps
    ]
    finish, asked = run(source(), {src.QUIESCE: Answered({"waited_ms": 0.0})})
    assert finish.outcome == "moved" and "unquiesce" not in asked  # it left, held
