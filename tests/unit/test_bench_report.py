"""The benchmark's verdicts: ratios at the worker's batch size, the budget arithmetic, the linearity
check and the goal table (pure functions of a report; no stack runs here)."""

import pytest

from bench.report import (
    batch_median,
    budget,
    cpu_figures,
    full_ratio,
    goal_checks,
    linearity,
    rate_at,
    report_lines,
)

QUIET = {"others_cores": 0.0}
BUSY = {"others_cores": 1.2}


def rate(images_per_s, cpu=50.0, batch=8, noisy=False):
    return {"images_per_s": images_per_s, "cpu_ms_per_image": cpu, "batch_size": batch, "noisy": noisy}


def phase(images_per_s, *, batch, p50=100.0, p99=150.0, web=10.0, worker=60.0, noise=QUIET):
    return {
        "images_per_s": images_per_s,
        "median_batch": batch,
        "mean_batch_per_image": float(batch),
        "p50_ms": p50,
        "p99_ms": p99,
        "cpu_ms_per_image": {"web": web, "worker": worker, "client": 4.0, "redis": 1.0, "total": web + worker + 5},
        "noise": noise,
    }


def section(**overrides):
    base = {
        "architecture": "resnet50 @ 224 px",
        "raw": {"1": rate(20.0, batch=1), "8": rate(30.0), "16": rate(32.0, batch=16)},
        "engine": {"1": rate(25.0, cpu=40.0, batch=1), "8": rate(40.0, cpu=48.0), "16": rate(42.0, cpu=46.0, batch=16)},
        "raw_single": {"p50_ms": 50.0, "p99_ms": 60.0, "noisy": False},
        "full": {
            "c1": phase(15.0, batch=1, p50=60.0, p99=80.0),
            "c8": phase(40.0, batch=8, p99=300.0),
            "c32": phase(44.0, batch=16, p99=900.0),
        },
        "during_bulk": {"c1": phase(14.0, batch=1, p99=100.0), "c8": phase(30.0, batch=8, p99=600.0)},
        "linear": {
            "path": "bulk",
            "runs": [
                {
                    "images": 100,
                    "images_per_s": 40.0,
                    "ms_per_image": 25.0,
                    "core_ms_per_image": 50.0,
                    "median_batch": 16,
                },
                {
                    "images": 1000,
                    "images_per_s": 45.0,
                    "ms_per_image": 22.2,
                    "core_ms_per_image": 49.0,
                    "median_batch": 16,
                },
            ],
        },
        "queries": {"upload": 9, "batch_1": 12, "batch_8": 12, "batch_8_size": 8},
    }
    base.update(overrides)
    return base


def by_goal(checks, model, words):
    found = [c for c in checks if c["model"] == model and words in c["goal"]]
    assert len(found) == 1, (words, [c["goal"] for c in checks])
    return found[0]


def test_the_ratio_compares_with_the_raw_rate_at_the_batch_size_the_worker_ran():
    value, batch, raw = full_ratio(section(), "c32")
    assert (batch, raw["images_per_s"], value) == (16, 32.0, round(44.0 / 32.0, 3))
    value, batch, _ = full_ratio(section(), "c8")
    assert (batch, value) == (8, round(40.0 / 30.0, 3))


def test_a_batch_size_never_measured_raw_uses_the_nearest_measured_one():
    rates = {"1": rate(1.0), "8": rate(8.0), "16": rate(16.0)}
    assert rate_at(rates, 6)["images_per_s"] == 8.0
    assert rate_at(rates, 12)["images_per_s"] == 8.0  # a tie goes to the smaller batch
    assert rate_at(rates, None) is None


def test_the_worker_batch_is_the_median_per_image():
    assert batch_median([1, 16, 16, 16]) == 16
    assert batch_median([]) is None


def test_the_worker_cost_beyond_the_engine_subtracts_the_engine_at_the_same_batch():
    cpu = cpu_figures(section(), "c8")
    assert (cpu["web"], cpu["worker"], cpu["engine"], cpu["worker_beyond_engine"]) == (10.0, 60.0, 48.0, 12.0)


def test_the_budget_arithmetic_of_the_issue():
    # raw 35 img/s on two cores at 1.3×: 45.5 img/s, so 2,000 / 45.5 ≈ 44 core-ms per image in all
    b = budget(raw_images_per_s=35.0, goal_ratio=1.3, engine_core_ms=24.0, client_core_ms=4.0)
    assert b["target_images_per_s"] == 45.5
    assert b["whole_image_core_ms"] == 44.0
    assert b["left_for_platform_core_ms"] == 16.0


def test_linear_cost_is_flat_unless_the_largest_run_costs_more_per_image():
    runs = section()["linear"]["runs"]
    assert linearity(runs)["verdict"] == "flat"
    rising = [runs[0], {**runs[1], "ms_per_image": 40.0, "core_ms_per_image": 70.0}]
    assert linearity(rising)["verdict"] == "rising"
    # wall time rose but the core-ms did not: a busier machine, not a costlier image
    assert linearity([runs[0], {**runs[1], "ms_per_image": 40.0}])["verdict"] == "flat"
    assert linearity(runs[:1])["verdict"] is None


def test_the_goals_pass_and_fail_on_their_thresholds():
    checks = goal_checks({"models": {"resnet50": section(), "resnet18": section()}})
    assert by_goal(checks, "resnet50", "full path c8")["passed"] is True  # 1.33 ≥ 1.3
    assert by_goal(checks, "resnet50", "full path c32")["passed"] is True  # 1.375
    assert by_goal(checks, "resnet18", "full path c8")["passed"] is True  # ≥ 1.1
    assert by_goal(checks, "resnet50", "bulk path")["passed"] is True  # 45 / 32 = 1.41
    assert by_goal(checks, "resnet50", "c1 p50 within")["measured"] == 10.0
    assert by_goal(checks, "resnet50", "c1 p99 during bulk")["passed"] is True  # 100 / 80 = 1.25
    assert by_goal(checks, "resnet50", "c8 p99 during bulk")["passed"] is False  # 600 / 300 = 2
    assert by_goal(checks, "resnet50", "web core-ms")["passed"] is True
    assert by_goal(checks, "resnet50", "beyond the engine")["passed"] is False  # 12 > 8
    assert by_goal(checks, "resnet50", "queries per batch")["passed"] is True
    assert by_goal(checks, "resnet50", "per-image cost flat")["passed"] is True


def test_the_demo_model_has_no_full_path_ratio_goal_but_the_latency_goals():
    checks = goal_checks({"models": {"demo": section()}})
    assert not [c for c in checks if "full path c" in c["goal"]]
    assert by_goal(checks, "demo", "c1 p50 within")


def test_a_verdict_resting_on_a_noisy_phase_is_starred_and_cpu_goals_never_are():
    noisy = section()
    noisy["full"]["c8"] = phase(40.0, batch=8, noise=BUSY)
    checks = goal_checks({"models": {"resnet50": noisy}})
    assert by_goal(checks, "resnet50", "full path c8")["noisy"] is True
    assert by_goal(checks, "resnet50", "full path c32")["noisy"] is False
    assert by_goal(checks, "resnet50", "web core-ms")["noisy"] is False


def test_a_batch_8_that_needs_more_queries_than_a_batch_1_fails():
    checks = goal_checks({"models": {"resnet50": section(queries={"upload": 9, "batch_1": 12, "batch_8": 40})}})
    assert by_goal(checks, "resnet50", "queries per batch")["passed"] is False


@pytest.mark.parametrize("key", ["resnet18", "resnet50"])
def test_the_printed_report_has_the_issue_table_goals_and_the_budget(key):
    report = {
        "meta": {"started": "now", "git_commit": "abc", "cpu_affinity": 2, "torch": "2", "load_average_at_start": []},
        "settings": {"torch_threads": 2, "SIGHTLINE_MAX_BATCH_SIZE": 16, "image": "224² JPEG", "quick": True},
        "models": {key: section()},
    }
    report["goal_checks"] = goal_checks(report)
    text = "\n".join(report_lines(report))
    assert "| concurrency | full path img/s | p50 / p99 ms" in text
    assert "| 32          | 44.0            | 100 / 900" in text
    assert "PASS" in text and "FAIL" in text
    assert ("budget arithmetic" in text) == (key == "resnet18")
