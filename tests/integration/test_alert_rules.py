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
from django.test import override_settings

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


def _metrics_text(client, **headers) -> str:
    """/metrics as served here (Redis up: the queue and heartbeat families too)."""
    health.heartbeat([], "cpu")  # one worker beat, as in production
    try:
        response = client.get("/metrics", **headers)
        assert response.status_code == 200, response.content[:500]
        return response.content.decode()
    finally:  # this process's beat only: another test run may share the Redis
        health._redis().delete(f"{health.HEARTBEAT_PREFIX}{socket.gethostname()}:{os.getpid()}")


def _served(client) -> set[str]:
    """Sample names /metrics serves here."""
    text = _metrics_text(client)
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def _config_env() -> dict[str, str]:
    path = Path(settings.BASE_DIR) / "platform" / "kubernetes" / "base" / "config.env"
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.startswith("#"))
    return dict(pairs)


def test_the_documented_scrape_config_loads(tmp_path):
    """scrape-config.yaml is a valid Prometheus configuration (its token file replaced by a
    temporary one: promtool checks that it exists)."""
    config = yaml.safe_load((PROMETHEUS / "scrape-config.yaml").read_text())
    token = tmp_path / "token"
    token.write_text("x" * 40)
    (job,) = config["scrape_configs"]
    assert job["authorization"]["type"] == "Bearer" and job["authorization"]["credentials_file"]
    job["authorization"]["credentials_file"] = str(token)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_adapter_rule_matches_the_series_the_documented_scrape_produces(client):
    """Every label the adapter's seriesQuery requires (label!="") is on the series Prometheus
    stores from the documented scrape: the target's static labels, job and instance, and the
    labels /metrics itself writes; the rule's namespace is the one the manifests deploy into; and
    the scrape's Host (the target's name) is one production's ALLOWED_HOSTS accepts."""
    (job,) = yaml.safe_load((PROMETHEUS / "scrape-config.yaml").read_text())["scrape_configs"]
    adapter = yaml.safe_load((PROMETHEUS / "adapter-rules.yaml").read_text())
    config = _config_env()
    allowed = config["ALLOWED_HOSTS"].split(",")
    (static,) = job["static_configs"]
    (target,) = static["targets"]
    host = target.rsplit(":", 1)[0]
    assert host in allowed
    with override_settings(ALLOWED_HOSTS=allowed):
        text = _metrics_text(client, HTTP_HOST=target)
    for rule in adapter["rules"]["external"]:
        metric, matchers = re.fullmatch(r"([a-z_0-9]+)\{(.*)\}", rule["seriesQuery"]).groups()
        required = set(re.findall(r'([a-z_]+)!=""', matchers))
        assert required, rule["seriesQuery"]
        samples = [line for line in text.splitlines() if line.startswith(metric + "{")]
        assert samples, f"/metrics serves no {metric}"
        for sample in samples:
            labels = set(re.findall(r'([a-z_]+)="', sample.split("}")[0]))
            labels |= set(static.get("labels", {})) | {"job", "instance"}
            assert required <= labels, (rule["seriesQuery"], sorted(labels))
        for label, resource in rule["resources"]["overrides"].items():
            if resource["resource"] == "namespace":  # the HPA lives in the manifests' namespace
                assert static["labels"][label] == "sightline"


def test_every_metric_the_rules_name_is_served(client):
    served = _served(client)
    named = {m for rule in _rules() for m in METRIC.findall(rule["expr"])}
    tests = (PROMETHEUS / "alerts.test.yml").read_text()
    named |= set(METRIC.findall(tests))
    adapter = yaml.safe_load((PROMETHEUS / "adapter-rules.yaml").read_text())
    named |= {m for rule in adapter["rules"]["external"] for m in METRIC.findall(rule["seriesQuery"])}
    assert {"sightline_workers", "sightline_deliveries", "sightline_audit_tampered_last_timestamp_seconds"} <= named
    assert named - served == set(), f"named in platform/prometheus but not served: {sorted(named - served)}"
