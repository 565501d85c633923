"""The prometheus-adapter rule behind the autoscaler, evaluated by Prometheus's own
``promtool`` on series shaped like Sluice's: per pod, queue seconds per request."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.manifests import KUBERNETES
from tests.toolchains import missing

NAMESPACE = "serving"
METRIC = "sluice_queue_seconds_per_request"
#: Over each 15 s: (queue seconds added, requests added) per pod and model.
SERIES = {
    ("sluice-a", "mlp"): (0.3, 10),
    ("sluice-a", "simple"): (0.1, 10),
    ("sluice-b", "mlp"): (0.0, 30),
    ("sluice-c", "mlp"): (0.0, 0),  # idle
}
#: What the rule must give: sum over models of queue seconds / requests, per pod.
EXPECTED = {"sluice-a": 0.4 / 20, "sluice-b": 0.0, "sluice-c": 0.0}


def adapter_rule() -> dict[str, Any]:
    config = yaml.safe_load((KUBERNETES / "prometheus-adapter" / "config.yaml").read_text())
    (rule,) = [r for r in config["rules"] if r["name"]["as"] == METRIC]
    return dict(rule)


def as_the_adapter_asks(template: str) -> str:
    """The query the adapter sends for the pods of one namespace (its template filled)."""
    matchers = f'namespace="{NAMESPACE}",pod=~"sluice-a|sluice-b|sluice-c"'
    return template.replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", "pod")


def promtool_test(tmp_path: Path, expected: dict[str, float]) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        missing("needs promtool (Debian: apt-get install prometheus)")
    rule = adapter_rule()
    recorded = [
        {"record": METRIC, "expr": as_the_adapter_asks(rule["metricsQuery"])},
        {"record": "sluice_adapter_series", "expr": rule["seriesQuery"]},  # parses too
    ]
    rules = {"groups": [{"name": "adapter", "rules": recorded}]}
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    series = []
    for (pod, model), (seconds, requests) in SERIES.items():
        labels = f'namespace="{NAMESPACE}",pod="{pod}",model="{model}",version="1"'
        series.append(
            {
                "series": f"sluice_queue_duration_seconds_sum{{{labels}}}",
                "values": f"0+{seconds}x40",
            }
        )
        series.append(
            {
                "series": f"sluice_queue_duration_seconds_count{{{labels}}}",
                "values": f"0+{requests}x40",
            }
        )
    # Compared in whole microseconds: the rates are floating point.
    samples = [
        {"labels": f'{{pod="{pod}"}}', "value": round(value * 1e6)}
        for pod, value in expected.items()
    ]
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": series,
                "promql_expr_test": [
                    {"expr": f"round({METRIC} * 1e6)", "eval_time": "5m", "exp_samples": samples}
                ],
            }
        ],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(tests))
    return subprocess.run(
        [promtool, "test", "rules", "test.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_rule_gives_queue_seconds_per_request_for_each_pod(tmp_path: Path) -> None:
    done = promtool_test(tmp_path, EXPECTED)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_wrong_expectation_fails_the_check(tmp_path: Path) -> None:
    done = promtool_test(tmp_path, {**EXPECTED, "sluice-a": 0.03})  # mlp's alone
    assert done.returncode != 0
    assert "sluice-a" in done.stdout + done.stderr


@pytest.mark.parametrize("field", ["seriesQuery", "metricsQuery"])
def test_the_rule_reads_only_what_sluice_exports(field: str) -> None:
    assert "sluice_queue_duration_seconds" in adapter_rule()[field]
