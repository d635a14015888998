"""bench/quickstart.py: the quickstart tests' times, from JUnit XML to docs/benchmarks.md."""

from __future__ import annotations

import json

from bench import quickstart, report

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4"><properties>
<property name="quickstart_namespaced_news_first_answer_seconds" value="231.4" />
<property name="quickstart_namespaced_news_first_answer_load_average" value="5.2 7.9" />
<property name="quickstart_namespaced_news_prepared_first_answer_seconds" value="14.2" />
<property name="quickstart_namespaced_news_prepared_first_answer_load_average" value="3 2.5" />
<property name="quickstart_news_first_answer_seconds" value="300" />
<property name="something_else" value="1" />
<property name="no_drop_pod_deleted_sent" value="811" />
<property name="no_drop_pod_deleted_answered" value="811" />
<property name="no_drop_pod_deleted_failed" value="0" />
<property name="no_drop_pod_deleted_to_stopping" value="35" />
<property name="no_drop_scale_down_sent" value="903" />
</properties><testcase classname="x" name="y" time="1" /></testsuite></testsuites>
"""


def test_the_figures_and_their_load_go_to_a_results_file_and_onto_the_page(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(JUNIT)
    out = tmp_path / "quickstart-20261206T170000Z.json"
    assert quickstart.main([str(junit), "--out", str(out)]) == 0
    body = json.loads(out.read_text())
    assert body["figures"] == {
        "quickstart_namespaced_news_first_answer": {"seconds": 231.4,
                                                    "load_average": [5.2, 7.9]},
        "quickstart_namespaced_news_prepared_first_answer": {"seconds": 14.2,
                                                             "load_average": [3.0, 2.5]},
        "quickstart_news_first_answer": {"seconds": 300.0, "load_average": None}}
    assert body["machine"]["cpu_count"]
    # Only complete counts: scale_down's run recorded one of four.
    assert body["no_drop"] == {"pod_deleted": {"sent": 811, "answered": 811, "failed": 0,
                                               "to_stopping": 35}}
    counts, file = report.no_drop_results(tmp_path)
    assert file == out.name
    assert "| a pod deleted (`kubectl delete pod`) | 811 | 811 | 0 | 35 |" in \
        report.section_no_drop(counts, file)
    assert "Not run yet" in "\n".join(report.section_no_drop({}, ""))

    # A newer file wins for the figures it has; the others stay from the older one.
    newer = {**body, "figures": {"quickstart_news_first_answer": {"seconds": 250.0,
                                                                  "load_average": [1, 2]}}}
    (tmp_path / "quickstart-20261207T000000Z.json").write_text(json.dumps(newer))
    found = report.quickstart_results(tmp_path)
    assert found["quickstart_news_first_answer"]["seconds"] == 250.0
    assert found["quickstart_namespaced_news_first_answer"]["_file"] == out.name
    section = report.section_quickstart(found)
    rows = [line for line in section if line.startswith("| `kubectl")]
    assert [row.split(" | ")[1:3] for row in rows] == [
        ["250", "1.0 / 2.0"], ["231", "5.2 / 7.9"], ["14.2", "3.0 / 2.5"]]
    assert "Not run yet" in "\n".join(report.section_quickstart({}))


def test_a_run_without_quickstart_figures_writes_nothing(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite name="p"><properties /></testsuite></testsuites>')
    out = tmp_path / "out.json"
    assert quickstart.main([str(junit), "--out", str(out)]) == 1
    assert not out.exists()
