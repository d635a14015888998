"""The benchmark at its tiny size: every implemented scenario runs and reports sane figures.

Benchmarks are never assertions: this checks that the harness works and that its
results file has the shape the report reads, not that any target is met.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.triton import seed_export

pytestmark = pytest.mark.triton

pytest.importorskip("fastapi", reason="the bench extra is not installed")
pytest.importorskip("uvicorn", reason="the bench extra is not installed")
pytest.importorskip("matplotlib", reason="the bench extra is not installed")

LEVELS_OK = ("p50", "p90", "p99", "mean", "max")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, exported) -> tuple[dict, Path]:
    from bench import run
    from bench.servers import bench_resource

    root = tmp_path_factory.mktemp("bench")
    artifacts = root / "artifacts"
    seed_export(bench_resource(run.DEFAULT_EXAMPLE), artifacts, exported)
    code = run.main(["--quick", "--artifacts-root", str(artifacts), "--results-dir",
                     str(root / "results"), "--docs-dir", str(root / "docs"),
                     "--workdir", str(root / "work")])
    (path,) = (root / "results").glob("*.json")
    body = json.loads(path.read_text())
    errors = {k: r["error"] for k, r in body["scenarios"].items() if "error" in r}
    assert code == 0 and not errors, errors
    return body, root / "docs"


def check_latency(latency: dict) -> None:
    values = [latency[k] for k in LEVELS_OK]
    assert all(v > 0 for v in values), latency
    assert latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]


def test_results_file_describes_the_machine_and_run(quick_run):
    body, _ = quick_run
    assert body["quick"] is True
    machine = body["machine"]
    assert machine["cpu_count"] >= 1 and machine["python"]
    assert machine["packages"]["torch"] and machine["packages"]["numpy"]
    assert "commit" in machine["git"]
    assert body["settings"]["cache"]["enabled"] is False
    assert set(body["scenarios"]) == {"S1", "S2", "S3", "S4", "S5"}
    assert "not yet available" in body["scenarios"]["S4"]["skipped"]


def test_every_target_has_a_figure_and_a_verdict(quick_run):
    body, _ = quick_run
    for key in ("S1", "S2", "S3", "S5"):
        targets = body["scenarios"][key]["targets"]
        assert targets, key
        for target in targets:
            assert target["value"] is not None, target
            assert target["met"] in (True, False, None)


def test_s1_measures_three_protocols(quick_run):
    s1 = quick_run[0]["scenarios"]["S1"]
    assert set(s1["protocols"]) == {"http-generate", "http-infer", "grpc-infer"}
    for summary in s1["protocols"].values():
        assert summary["statuses"] == {"200": s1["queries"]}
        check_latency(summary["latency_ms"])


def test_s2_measures_tritonop_the_baseline_and_the_floor(quick_run):
    s2 = quick_run[0]["scenarios"]["S2"]
    assert set(s2["series"]) == {"tritonop", "fastapi-1w", "fastapi-2w"}
    for points in s2["series"].values():
        for summary in points.values():
            assert summary["throughput_qps"] > 0
            assert set(summary["statuses"]) == {"200"}
            check_latency(summary["latency_ms"])
    assert s2["floor"]["throughput_qps"] > 0


def test_s3_search_agrees_with_numpy_and_reports_memory(quick_run):
    s3 = quick_run[0]["scenarios"]["S3"]
    for size in s3["sizes"].values():
        assert size["same_ids"] == 1.0
        check_latency(size["triton_ms"])
        check_latency(size["numpy_ms"])
        assert size["memory_mb"]["search_model_rss"] > size["memory_mb"]["matrix"] > 0


def test_s5_accounts_for_every_request(quick_run):
    s5 = quick_run[0]["scenarios"]["S5"]
    overload = s5["phases"]["overload"]
    assert s5["accepted"] + s5["rejected"] + s5["lost"] == overload["requests"]
    assert s5["accepted"] > 0
    assert overload["offered_rate_qps"] > 0


def test_report_page_and_plots_are_written(quick_run):
    _, docs = quick_run
    page = (docs / "benchmarks.md").read_text()
    for key in ("S1", "S2", "S3", "S4", "S5"):
        assert f"## {key}:" in page
    assert "PASS" in page or "MISS" in page
    for image in ("s1_latency.png", "s2_throughput.png", "s2_latency.png", "s3_search.png"):
        assert (docs / "img" / image).stat().st_size > 1000
        assert f"img/{image}" in page
