"""The tally's rule on small hand-made cases: exact, duplicates explained by in-doubt requests, and each way
it must fail (lost, unexplained double, acks without answers, poison missing, valid events dead-lettered)."""

from __future__ import annotations

import json
from collections import Counter
from decimal import Decimal
from pathlib import Path

from allocd.journal import cell_digest

from .tally import Delivery, Evidence, JournalView, journal_view, tally

W1 = ("billing-usage", 1_000, "cust-01", (("custom:feature", ("billing",)),))
W2 = ("search-usage", 1_000, "é", ())
D1, D2 = cell_digest(W1), cell_digest(W2)


def evidence(
    deliveries: list[Delivery],
    acks: dict[str, int],
    doubt: dict[str, int] | None = None,
    truth: dict | None = None,
    poison: dict | None = None,
    dlq: Counter | None = None,
) -> Evidence:
    return Evidence(
        truth=truth if truth is not None else {W1: Decimal(10), W2: Decimal("2.5")},
        truth_events={W1: 3, W2: 1},
        deliveries=deliveries,
        journal=JournalView(acks=Counter(acks), unsettled=Counter(doubt or {})),
        digest=cell_digest,
        poison=poison or {},
        dlq=dlq if dlq is not None else Counter(),
        produced_valid=4,
    )


def test_exact_delivery_in_deltas_holds() -> None:
    deliveries = [
        Delivery(W1, Decimal(4), 1, True),
        Delivery(W1, Decimal(6), 2, True),
        Delivery(W2, Decimal("2.5"), 2, True),
    ]
    result = tally(evidence(deliveries, {D1: 2, D2: 1}))
    assert result.ok, result.problems
    assert (result.lost_cells, result.double_cells) == (0, 0)


def test_duplicate_of_an_unanswered_request_is_explained() -> None:
    deliveries = [
        Delivery(W1, Decimal(10), 1, False, "hang"),  # applied, never answered: the retry applies it again
        Delivery(W1, Decimal(10), 2, True),
        Delivery(W2, Decimal("2.5"), 2, True),
    ]
    result = tally(evidence(deliveries, {D1: 1, D2: 1}))
    assert result.ok, result.problems
    assert result.double_cells == 1
    assert "hang" in dict(result.rows)["in-doubt: unanswered"]


def test_answered_but_unjournaled_needs_the_journal_to_show_doubt() -> None:
    deliveries = [
        Delivery(W1, Decimal(10), 1, True),  # answered, then the daemon died before journaling the ack
        Delivery(W1, Decimal(10), 7, True),  # the recovering owner sent it again
        Delivery(W2, Decimal("2.5"), 2, True),
    ]
    assert tally(evidence(deliveries, {D1: 1, D2: 1}, doubt={D1: 1})).ok
    result = tally(evidence(deliveries, {D1: 1, D2: 1}, doubt={}))
    assert not result.ok and result.unexplained_cells == 1
    assert "journal shows only 0 unsettled" in result.problems[0]


def test_replayed_acknowledged_cell_is_an_unexplained_double() -> None:
    deliveries = [
        Delivery(W1, Decimal(10), 1, True),
        Delivery(W1, Decimal(3), 2, True),  # a replay sent 3 again and journaled it as a new ack
        Delivery(W2, Decimal("2.5"), 2, True),
    ]
    result = tally(evidence(deliveries, {D1: 2, D2: 1}, doubt={D1: 5}))
    assert not result.ok
    assert result.problems[0].startswith("DOUBLE-COUNTED 3")


def test_excess_must_be_exactly_the_in_doubt_applications() -> None:
    deliveries = [
        Delivery(W1, Decimal(10), 1, False, "link black hole"),
        Delivery(W1, Decimal(11), 2, True),  # one more than the truth besides the duplicate
        Delivery(W2, Decimal("2.5"), 2, True),
    ]
    result = tally(evidence(deliveries, {D1: 1, D2: 1}))
    assert not result.ok and result.unexplained_cells == 1


def test_short_cell_is_lost() -> None:
    deliveries = [Delivery(W1, Decimal(9), 1, True), Delivery(W2, Decimal("2.5"), 1, True)]
    result = tally(evidence(deliveries, {D1: 1, D2: 1}))
    assert not result.ok
    assert (result.lost_cells, result.lost_events) == (1, 3)
    assert result.problems[0].startswith("LOST 1 of 10")


def test_short_behind_a_duplicate_is_not_hidden() -> None:
    deliveries = [
        Delivery(W1, Decimal(10), 1, False, "hang"),  # never resent: the acknowledged ones miss 10
        Delivery(W2, Decimal("2.5"), 2, True),
    ]
    result = tally(evidence(deliveries, {D1: 0, D2: 1}))
    assert not result.ok and "SHORT BEHIND A DUPLICATE" in result.problems[0]


def test_more_acks_than_answered_applications_is_a_problem() -> None:
    deliveries = [Delivery(W1, Decimal(10), 1, True), Delivery(W2, Decimal("2.5"), 1, True)]
    result = tally(evidence(deliveries, {D1: 2, D2: 1}))
    assert not result.ok and "ACKED WITHOUT ANSWER" in result.problems[0]


def test_poison_must_be_in_the_dlq_and_only_poison() -> None:
    deliveries = [Delivery(W1, Decimal(10), 1, True), Delivery(W2, Decimal("2.5"), 1, True)]
    poison = {(0, 5): "values_21", (1, 9): "huge"}
    ok = tally(evidence(deliveries, {D1: 1, D2: 1}, poison=poison, dlq=Counter({(0, 5): 2, (1, 9): 1})))
    assert ok.ok, ok.problems
    bad = tally(evidence(deliveries, {D1: 1, D2: 1}, poison=poison, dlq=Counter({(0, 5): 1, (2, 2): 1})))
    assert (bad.missing_dlq, bad.unexpected_dlq) == (1, 1)
    assert any("POISON NOT IN THE DLQ: partition 1 offset 9 (huge)" in p for p in bad.problems)


def test_journal_view_counts_acks_and_doubt_per_cell() -> None:
    entries = [
        {"t": "cycle", "c": "x", "b": [], "w": []},
        {"t": "sent", "c": "x", "r": 0, "cells": [D1, D2]},
        {"t": "ack", "c": "x", "r": 0, "cells": [D1]},  # D2 sent, never acknowledged: in doubt
        {"t": "sent", "c": "x", "r": 1, "cells": [D1]},
        {"t": "fail", "c": "x", "r": 1},  # not applied: not in doubt
        {"t": "sent", "c": "y", "r": 0, "cells": [D1]},
        {"t": "ack", "c": "y", "r": 0, "cells": [D1]},
        {"t": "ckpt", "tp": ["t", 0], "pos": 3, "marks": [], "skips": []},
    ]
    view = journal_view(entries)
    assert view.acks == Counter({D1: 2})
    assert view.unsettled == Counter({D2: 1})
    assert (view.requests, view.requests_in_doubt, view.cycles, view.checkpoints) == (3, 1, 1, 1)


def test_ack_journaled_after_a_recovery_read_counts_as_in_doubt() -> None:
    entries = [
        {"t": "sent", "c": "x", "r": 0, "cells": [D1]},
        {"t": "barrier", "id": "new owner reads"},  # it sees request 0 in doubt and sends D1 again
        {"t": "ack", "c": "x", "r": 0, "cells": [D1]},  # the old owner's ack lands late
        {"t": "sent", "c": "y", "r": 0, "cells": [D1]},
        {"t": "ack", "c": "y", "r": 0, "cells": [D1]},
        {"t": "sent", "c": "z", "r": 0, "cells": [D2]},
        {"t": "ack", "c": "z", "r": 0, "cells": [D2]},
        {"t": "barrier", "id": "a read after everything settled"},
    ]
    view = journal_view(entries)
    assert (view.acks[D1], view.late_acks[D1], view.unsettled[D1], view.late_acks[D2]) == (2, 1, 0, 0)
    deliveries = [
        Delivery(W1, Decimal(10), 1, True),
        Delivery(W1, Decimal(10), 2, True),
        Delivery(W2, Decimal("2.5"), 3, True),
    ]
    ev = evidence(deliveries, {})
    ev.journal = view
    result = tally(ev)
    assert result.ok, result.problems
    assert dict(result.rows)["journal: acks after a recovery read"].startswith("1 ")
    # ... and permits it only: a reader that did not own the cell's partitions sent nothing again.
    ev.journal = journal_view([*entries[:3], *entries[5:]])
    ev.deliveries = [deliveries[0], deliveries[2]]
    assert tally(ev).ok, tally(ev).problems
    # A request first journaled after the read is no excuse: the recovering owner could not count it.
    late_sent = [entries[1], *entries[0:1], *entries[2:]]
    ev.journal = journal_view(late_sent)
    assert not tally(ev).ok


def test_a_late_ack_permits_a_partial_duplicate_and_no_more() -> None:
    entries = [
        {"t": "sent", "c": "x", "r": 0, "cells": [D1, D2]},
        {"t": "barrier", "id": "new owner of one partition reads"},
        {"t": "ack", "c": "x", "r": 0, "cells": [D1, D2]},
        {"t": "sent", "c": "y", "r": 0, "cells": [D1]},
        {"t": "ack", "c": "y", "r": 0, "cells": [D1]},
    ]
    # A range check: more than the largest application can never be a share of one.
    for resent, ok in ((Decimal(4), True), (Decimal(10), True), (Decimal(25), False)):
        deliveries = [
            Delivery(W1, Decimal(10), 1, True),  # the old owner's record: events of three partitions
            Delivery(W1, resent, 2, True),  # the new owner's share of one of them, sent again
            Delivery(W2, Decimal("2.5"), 1, True),
        ]
        ev = evidence(deliveries, {})
        ev.journal = journal_view(entries)
        assert tally(ev).ok is ok, (resent, tally(ev).problems)


def test_only_a_claim_on_the_cycles_partitions_makes_an_ack_late() -> None:
    entries = [
        {"t": "cycle", "c": "x", "b": [["usage", 0, 10], ["usage", 2, 7]], "w": []},
        {"t": "sent", "c": "x", "r": 0, "cells": [D1]},
        {"t": "barrier", "id": "b1", "member": "m2", "claim": [["usage", 1]]},  # another partition
        {"t": "ack", "c": "x", "r": 0, "cells": [D1]},
    ]
    assert journal_view(entries).late_acks[D1] == 0
    entries[2]["claim"] = [["usage", 1], ["usage", 2]]
    assert journal_view(entries).late_acks[D1] == 1


def test_diagnosis_dumps_replay_into_the_same_tally(tmp_path: Path) -> None:
    from .diagnose import retally, write_diagnosis

    journal = [
        (0, 1_000, {"t": "cycle", "c": "x", "b": [["usage", 0, 9]], "w": [], "trigger": "closed"}),
        (1, 1_001, {"t": "sent", "c": "x", "r": 0, "cells": [D1, D2]}),
        (2, 1_002, {"t": "ack", "c": "x", "r": 0, "cells": [D1, D2]}),
    ]
    apps = [
        {
            "seq": 1,
            "label": "a#1",
            "wall": 1.0015,
            "stream": "s",
            "answered": False,
            "why": "hang",
            "cells": [[W1, "10"]],
        },
        {
            "seq": 2,
            "label": "a#1",
            "wall": 1.0016,
            "stream": "s",
            "answered": True,
            "why": "",
            "cells": [[W1, "10"], [W2, "2.5"]],
        },
    ]
    path = write_diagnosis(tmp_path, [W1], apps, journal, cell_digest)
    text = path.read_text()
    assert "UNANSWERED (hang)" in text and "ack  cycle x request 0 (closed, boundary p0<9)" in text
    (tmp_path / "truth.jsonl").write_text(f"{json.dumps([W1, '10', 3])}\n{json.dumps([W2, '2.5', 1])}\n")
    again = retally(tmp_path)
    assert again.ok and again.double_cells == 1, again.problems
