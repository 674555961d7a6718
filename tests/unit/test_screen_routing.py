"""The routing policy of the browser's screen (recognition/services/screening.py): pure functions,
no database. The contract (CONTRACT17.md): FIRST when the screen's top label is not the negative
label; BULK when the hospital routes negatives, p(negative) reaches its threshold and no quality
flag fired; NORMAL otherwise. And the untrusted field's shape is refused in words."""

import json

import pytest

from core.errors import Unprocessable
from recognition.services.screening import SCREEN_MAX_BYTES, Route, screen_parse, screen_route, screen_top

NEG, POS = "no_finding", "round_opacity"


def route(p_negative, *, flags=(), route_negatives=True, threshold=0.95):
    return screen_route(
        probabilities={NEG: p_negative, POS: round(1 - p_negative, 6)},
        negative_label=NEG,
        quality_flags=flags,
        route_negatives=route_negatives,
        negative_threshold=threshold,
    )


def test_a_suspicious_screen_goes_first_whatever_the_hospital_routes():
    assert route(0.2) == Route.FIRST
    assert route(0.2, route_negatives=False) == Route.FIRST
    assert route(0.2, flags=("blank",)) == Route.FIRST


def test_a_confident_negative_goes_to_the_bulk_lane_only_when_the_hospital_asks():
    assert route(0.97) == Route.BULK
    assert route(0.97, route_negatives=False) == Route.NORMAL


def test_the_threshold_is_inclusive_and_below_it_the_read_stays_in_order():
    assert route(0.95) == Route.BULK
    assert route(0.9499) == Route.NORMAL
    assert route(0.6) == Route.NORMAL
    assert route(0.8, threshold=0.8) == Route.BULK


@pytest.mark.parametrize("flag", ["blank", "saturated", "unfamiliar"])
def test_any_quality_flag_keeps_a_confident_negative_out_of_the_bulk_lane(flag):
    assert route(0.999, flags=(flag,)) == Route.NORMAL


def test_a_tie_counts_as_negative_so_an_undecided_screen_never_jumps_the_queue():
    assert screen_top({NEG: 0.5, POS: 0.5}, NEG) == (NEG, 0.5)
    assert route(0.5) == Route.NORMAL


def test_the_top_label_is_computed_from_the_probabilities_not_taken_from_the_client():
    assert screen_top({POS: 0.7, NEG: 0.3}, NEG) == (POS, 0.7)


def screen(**overrides):
    data = {
        "version_id": 12,
        "probabilities": {NEG: 0.97, POS: 0.03},
        "latency_ms": 41,
        "quality": {"flags": ["blank"], "ood_score": 0.12},
    }
    data.update(overrides)
    return json.dumps(data)


def test_the_contracts_example_parses():
    parsed = screen_parse(screen())
    assert parsed.version_id == 12
    assert parsed.probabilities == {NEG: 0.97, POS: 0.03}
    assert parsed.latency_ms == 41
    assert parsed.quality_flags == ("blank",)
    assert parsed.ood_score == 0.12


def test_no_screen_is_none():
    assert screen_parse(None) is None
    assert screen_parse("") is None


WIDE = json.dumps({"version_id": 1, "pad": "\U0001f600" * (SCREEN_MAX_BYTES // 4)}, ensure_ascii=False)
HUGE_PROBABILITY = '{"version_id": 1, "probabilities": {"' + NEG + '": 1' + "0" * 4000 + "}}"
HUGE_VERSION = '{"version_id": 1' + "0" * 30 + ', "probabilities": {}}'


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        (screen(version_id="12"), "version_id"),
        (screen(version_id=True), "version_id"),
        (screen(probabilities={NEG: 1.2, POS: -0.2}), "between 0 and 1"),
        (screen(probabilities={NEG: "0.9", POS: 0.1}), "must be a number"),
        (screen(probabilities={NEG: 0.5, POS: 0.2}), "add up to 1"),
        (screen(probabilities={}), "probabilities"),
        (screen(quality={"flags": ["sparkly"]}), "unknown quality flag"),
        (screen(quality={"flags": "blank"}), "list of names"),
        (screen(quality={"ood_score": 3}), "between 0 and 1"),
        (screen(latency_ms=-1), "latency_ms"),
        (screen(tenant=2), "unknown field"),
        (json.dumps({"version_id": 1, "probabilities": {NEG: 1.0}, "pad": "x" * SCREEN_MAX_BYTES}), "larger than"),
        (WIDE, "larger than"),  # four-byte characters: the cap counts bytes, not characters
        ("[" * 4000, "not JSON"),  # nested past the JSON parser's recursion limit
        (HUGE_PROBABILITY, "must be a number"),  # an integer that overflows a float
        (HUGE_VERSION, "version_id"),  # past any database key
        (screen(latency_ms=int("9" * 400)), "latency_ms"),
    ],
)
def test_a_malformed_screen_is_refused_in_words(raw, says):
    with pytest.raises(Unprocessable) as refused:
        screen_parse(raw)
    assert says in refused.value.message
    assert refused.value.status == 422
    assert refused.value.code == "bad_screen"


def test_not_a_number_is_refused():
    with pytest.raises(Unprocessable):
        screen_parse('{"version_id": 1, "probabilities": {"no_finding": NaN, "round_opacity": 0.1}}')
