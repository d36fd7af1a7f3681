"""The monitoring files that ship with the compose deployment (deploy/prometheus, deploy/grafana): Prometheus's
own tool accepts the rules and the config and fires each alert on the series it is about (promtool, Debian's
`prometheus` package: skipped without it, failed in CI, which installs it), every metric their PromQL names is one
the service exports (renaming a metric fails here), and the `monitoring` profile scrapes the api replicas."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from app import metrics
from conftest import REPO

PROMETHEUS = REPO / "deploy" / "prometheus"
RULES = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())
DASHBOARD = json.loads((REPO / "deploy" / "grafana" / "cmn.json").read_text())
# series Prometheus makes itself, not the service
PROMETHEUS_SERIES = {"up", "ALERTS"}
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created")}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
            "inf", "nan"}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI must check the monitoring files, but promtool is not installed (apt-get install prometheus)")
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus; .ci/run installs it)")
    return found


def exported() -> dict[str, str]:
    """Every sample name the service's registry can export → its metric family."""
    names = {}
    for collector in vars(metrics).values():
        if isinstance(collector, MetricWrapperBase):
            for family in collector.describe():
                names.update({family.name + s: family.name for s in SUFFIXES[family.type]})
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions, keywords, label names
    (inside {} or a by/without/on/ignoring list), durations or Grafana variables."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                                   # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)                                            # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)                                           # ranges, $__rate_interval
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\w+", "", expr)
    return {name for name in re.findall(r"(?<![\w.])([A-Za-z_:][\w:]*)\b(?!\s*\()", expr)
            if name.lower() not in KEYWORDS}


def rule_expressions() -> list[tuple[str, str]]:
    return [(r["alert"], r["expr"]) for group in RULES["groups"] for r in group["rules"]]


def dashboard_expressions() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in DASHBOARD["panels"] for t in p.get("targets", ())]


def test_the_name_parser_finds_metrics_and_nothing_else():
    expr = ('histogram_quantile(0.99, sum by (le, route) (rate(cmn_request_seconds_bucket{route=~"/a|b"}[5m]))) '
            '/ on (instance) group_left max(cmn_renamed_total offset 5m) > 0.25 and up{job="x"} == bool 0 '
            'and rate(x_total[$__rate_interval])')
    assert metric_names(expr) == {"cmn_request_seconds_bucket", "cmn_renamed_total", "up", "x_total"}
    assert "cmn_renamed_total" not in exported()   # what a renamed metric looks like to the tests below


@pytest.mark.parametrize("where, expressions", [("rules.yml", rule_expressions()),
                                                ("cmn.json", dashboard_expressions())])
def test_every_metric_named_is_one_the_service_exports(where, expressions):
    known = exported()
    assert len(expressions) >= 10
    for title, expr in expressions:
        names = metric_names(expr)
        assert names, (title, expr)
        unknown = names - set(known) - PROMETHEUS_SERIES
        assert not unknown, f"{where}: {title!r} names {sorted(unknown)}, which app/metrics.py does not export"


def test_the_dashboard_shows_every_metric_the_service_exports():
    shown = {exported()[n] for _, e in dashboard_expressions() for n in metric_names(e) if n in exported()}
    assert shown == set(exported().values())


def test_every_alert_explains_itself():
    for group in RULES["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("page", "warn", "info"), rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]
    text = (PROMETHEUS / "rules.yml").read_text()
    # comment lines right above each alert say where its threshold comes from
    blocks = re.findall(r"((?:^ *#[^\n]*\n)*)^ *- alert: (\w+)", text, flags=re.M)
    assert [name for comment, name in blocks if comment.strip()] == [a for a, _ in rule_expressions()]


def test_promtool_accepts_the_rules_and_each_alert_fires_on_its_series():
    tool = promtool()
    check = subprocess.run([tool, "check", "rules", str(PROMETHEUS / "rules.yml")], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0 and f"SUCCESS: {len(rule_expressions())} rules found" in check.stdout, check.stderr
    unit = subprocess.run([tool, "test", "rules", "rules_test.yml"], cwd=PROMETHEUS, capture_output=True, text=True,
                          timeout=60)
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout, unit.stdout + unit.stderr


def test_promtool_accepts_the_scrape_config(tmp_path):
    """As the container reads it: next to its rules, the metrics key at the secret's path (here a scratch file)."""
    tool = promtool()
    key = tmp_path / "metrics-key"
    key.write_text("a-key\n")
    text = (PROMETHEUS / "prometheus.yml").read_text().replace("/run/secrets/cmn_metrics_key", str(key))
    (tmp_path / "prometheus.yml").write_text(text)
    shutil.copy(PROMETHEUS / "rules.yml", tmp_path)
    proc = subprocess.run([tool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_the_monitoring_profile_scrapes_every_replica_with_the_rules_loaded():
    services = COMPOSE["services"]
    prom = services["prometheus"]
    # the image is a variable to pin by digest (docs/deploy.md), with the tag as its default
    assert prom["profiles"] == ["monitoring"] and prom["image"] == "${CMN_PROMETHEUS_IMAGE:-prom/prometheus:v2.53.0}"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prom["volumes"]}
    config = yaml.safe_load((REPO / mounts["/etc/prometheus/prometheus.yml"]).read_text())
    for rule_file in config["rule_files"]:   # relative to the config's directory, as Prometheus resolves them
        assert (REPO / mounts[f"/etc/prometheus/{rule_file}"]).resolve() == (PROMETHEUS / rule_file).resolve()
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "cmn-api"   # the rules' `up{job="cmn-api"}`
    scraped = {name for sd in job["dns_sd_configs"] for name in sd["names"]}
    # every service that serves the api image (not `init`, which runs it once to make the secrets)
    assert scraped == {n for n, s in services.items() if s.get("image", "").startswith("cmn-service:api")
                       and "CMN_PORT" in s.get("environment", {})}
    for sd in job["dns_sd_configs"]:
        assert sd["port"] == int(services["api"]["environment"]["CMN_PORT"])
    assert set(services["api"]["networks"]) & set(prom["networks"])
    secret = job["authorization"]["credentials_file"]
    assert secret == "/run/secrets/" + prom["secrets"][0] and prom["secrets"][0] in COMPOSE["secrets"]
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_compose_accepts_the_monitoring_profile(tmp_path):
    commands = [c for c in (["docker-compose"], ["docker", "compose"]) if shutil.which(c[0]) and subprocess.run(
        [*c, "version"], capture_output=True).returncode == 0]
    if not commands:
        pytest.skip("neither docker-compose nor docker compose is installed")
    env = {**os.environ, "CMN_AUTH_KEYS": str(tmp_path / "keys"), "CMN_POSTGRES_PASSWORD_FILE": str(tmp_path / "pw"),
           "CMN_METRICS_KEY_FILE": str(tmp_path / "metrics-key")}
    for command in commands:
        proc = subprocess.run([*command, "-f", str(REPO / "docker-compose.yml"), "--profile", "monitoring", "config"],
                              env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "prometheus" in yaml.safe_load(proc.stdout)["services"]
