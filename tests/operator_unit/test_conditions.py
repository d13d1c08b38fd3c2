"""conditions: metav1.Condition setters are pure and keep lastTransitionTime on unchanged status."""

from __future__ import annotations

import datetime as dt

import pytest

from darwinlm_operator import conditions as C

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
T1 = T0 + dt.timedelta(minutes=5)


def test_new_condition_has_every_metav1_field():
    out = C.set_condition([], C.RUNNING, True, C.SEARCHING, "generation-3", now=T0, observed_generation=4)
    assert out == [{"type": "Running", "status": "True", "reason": "Searching", "message": "generation-3",
                    "lastTransitionTime": "2026-01-01T12:00:00Z", "observedGeneration": 4}]


def test_same_status_keeps_transition_time_but_refreshes_the_rest():
    first = C.set_condition([], C.RUNNING, True, C.BUILDING_DATABASE, "db", now=T0, observed_generation=1)
    second = C.set_condition(first, C.RUNNING, True, C.SEARCHING, "gen 0", now=T1, observed_generation=2)
    assert second[0]["lastTransitionTime"] == "2026-01-01T12:00:00Z"
    assert (second[0]["reason"], second[0]["message"], second[0]["observedGeneration"]) == ("Searching", "gen 0", 2)
    assert first[0]["reason"] == "BuildingDatabase"  # the input is not mutated


def test_status_change_moves_transition_time_and_order_is_stable():
    conds = C.set_condition([], C.RUNNING, True, C.SEARCHING, "", now=T0, observed_generation=1)
    conds = C.set_condition(conds, C.SUSPENDED, False, C.NOT_SUSPENDED, "", now=T0, observed_generation=1)
    conds = C.set_condition(conds, C.RUNNING, False, C.SUSPENDED_BY_USER, "", now=T1, observed_generation=1)
    assert [c["type"] for c in conds] == ["Running", "Suspended"]
    assert conds[0]["status"] == "False" and conds[0]["lastTransitionTime"] == "2026-01-01T12:05:00Z"
    assert C.is_true(conds, C.RUNNING) is False and C.get_condition(conds, C.SUSPENDED)["status"] == "False"
    assert C.get_condition(conds, C.FAILED) is None and not C.is_true(None, C.FAILED)


def test_set_many_and_unknown():
    conds = C.set_many(None, [(C.SUCCEEDED, False, C.IN_PROGRESS, "x"), (C.FAILED, "Unknown", C.WAITING, "y")],
                       now=T0, observed_generation=None)
    assert [c["status"] for c in conds] == ["False", "Unknown"]
    assert "observedGeneration" not in conds[0]


@pytest.mark.parametrize("reason", ["", "notCamel", "Has Space", "Dash-ed"])
def test_reasons_must_be_camel_case(reason):
    with pytest.raises(ValueError):
        C.set_condition([], C.FAILED, True, reason, "", now=T0, observed_generation=1)


def test_status_must_be_valid():
    with pytest.raises(ValueError):
        C.set_condition([], C.FAILED, "Maybe", C.DEADLINE_EXCEEDED, "", now=T0, observed_generation=1)


def test_timestamps_round_trip():
    assert C.timestamp(dt.datetime(2026, 1, 1, 12)) == "2026-01-01T12:00:00Z"  # naive = UTC
    assert C.parse_timestamp("2026-01-01T12:00:00Z") == T0
    assert C.parse_timestamp("2026-01-01T13:00:00.123+01:00").replace(microsecond=0) == T0
    assert C.parse_timestamp(None) is None and C.parse_timestamp("garbage") is None


def test_reason_constants_are_camel_case():
    names = [v for k, v in vars(C).items() if k.isupper() and isinstance(v, str)]
    assert len(names) > 20
    for value in names:
        assert value[0].isupper() and value.isalnum(), value
