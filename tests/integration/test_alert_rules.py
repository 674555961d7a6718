"""The alert rules (platform/prometheus/alerts.yml) with the real promtool: they load, each alert
fires and clears in alerts.test.yml, and every metric the rules, their unit tests and the
autoscaler's adapter rule name is one /metrics actually serves (a renamed metric would otherwise
leave an alert that can never fire)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml
from django.conf import settings

from recognition import health

pytestmark = pytest.mark.django_db

PROMETHEUS = Path(settings.BASE_DIR) / "platform" / "prometheus"
METRIC = re.compile(r"\b(sightline_[a-z0-9_]+)")


def promtool(*args: str) -> subprocess.CompletedProcess:
    path = shutil.which("promtool")
    assert path, "promtool is not installed: make deploy-deps (Debian's prometheus package; .ci/run does)"
    return subprocess.run([path, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60, check=False)


def _rules() -> list[dict]:
    return [
        rule for group in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"] for rule in group["rules"]
    ]


def test_the_rules_load():
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


def test_each_alert_fires_and_clears_in_the_unit_tests():
    result = promtool("test", "rules", "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    tests = yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    for rule in _rules():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']} never fires in a test"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']} never stays quiet or clears"
    expected = {rule["alert"]: (rule["labels"], rule["annotations"]) for rule in _rules()}
    for case in cases:  # the unit tests expect what the rules say, not a copy gone stale
        for alert in case["exp_alerts"]:
            assert (alert["exp_labels"], alert["exp_annotations"]) == expected[case["alertname"]]


def _served(client) -> set[str]:
    """Sample names /metrics serves here (Redis up: the queue and heartbeat families too)."""
    health.heartbeat([], "cpu")  # one worker beat, as in production
    try:
        text = client.get("/metrics").content.decode()
    finally:  # this process's beat only: another test run may share the Redis
        health._redis().delete(f"{health.HEARTBEAT_PREFIX}{socket.gethostname()}:{os.getpid()}")
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_every_metric_the_rules_name_is_served(client):
    served = _served(client)
    named = {m for rule in _rules() for m in METRIC.findall(rule["expr"])}
    tests = (PROMETHEUS / "alerts.test.yml").read_text()
    named |= set(METRIC.findall(tests))
    adapter = yaml.safe_load((PROMETHEUS / "adapter-rules.yaml").read_text())
    named |= {m for rule in adapter["rules"]["external"] for m in METRIC.findall(rule["seriesQuery"])}
    assert {"sightline_workers", "sightline_deliveries", "sightline_audit_tampered_last_timestamp_seconds"} <= named
    assert named - served == set(), f"named in platform/prometheus but not served: {sorted(named - served)}"
