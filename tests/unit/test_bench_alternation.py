"""The benchmark's comparison method (bench/alternation.py): one server loaded at a time,
alternated, median ratio with its spread, and noise read from /proc, on fake timings."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from bench import baselines, report
from bench.alternation import Window, alternate, quietness, ratio, spread, tree_ticks
from bench.targets import at_least, at_most, held, outcome

QUIET = quietness(0.05, 0.9, [0.01, 0.02], 2)


def test_median_ratio_and_its_spread_over_alternations():
    found = spread([700.0, 731.0, 760.0], [600.0, 585.0, 580.0])
    assert found == {"median": 1.25, "min": 1.167, "max": 1.31,
                     "ratios": [1.167, 1.25, 1.31]}
    # an alternation without a figure (theirs failed, or answered nothing): no ratio at all
    assert spread([700.0, 731.0], [600.0, 0.0]) is None
    assert spread([700.0, None], [600.0, 585.0]) is None
    assert spread([700.0], [600.0, 585.0]) is None


def test_one_side_loaded_at_a_time_and_each_level_alternated():
    events: list[str] = []
    running: set[str] = set()
    # fake timings: ours 100, 110, 120 q/s at c=16 in turn, theirs 80 each time
    qps = {"ours": iter([10.0, 100.0, 11.0, 110.0, 12.0, 120.0]),
           "theirs": iter([8.0, 80.0] * 3)}

    def side(name: str):
        @contextmanager
        def started():
            assert not running, f"{name} started beside {running}"
            running.add(name)
            events.append(f"start {name}")
            yield name
            running.discard(name)
            events.append(f"stop {name}")
        return started

    def measure(name: str, level: str) -> dict[str, dict[str, float]]:
        assert running == {name}
        events.append(f"{name} c={level}")
        return {name: {"throughput_qps": next(qps[name]), "latency_ms": {"p99": 5.0}}}

    series, quiet = alternate({"ours": side("ours"), "theirs": side("theirs")}, ["1", "16"],
                              3, measure, key="throughput_qps", settle_s=0)
    assert events == ["start ours", "ours c=1", "ours c=16", "stop ours",
                      "start theirs", "theirs c=1", "theirs c=16", "stop theirs"] * 3
    point = series["ours"]["16"]
    assert point["throughput_qps"] == 110.0  # the median alternation's figures
    assert [a["throughput_qps"] for a in point["alternations"]] == [100.0, 110.0, 120.0]
    assert all("other_cores" in a and "load_per_core" in a for a in point["alternations"])
    assert ratio(series, "ours", "theirs", "16", lambda f: f["throughput_qps"]) == {
        "median": 1.375, "min": 1.25, "max": 1.5, "ratios": [1.25, 1.375, 1.5]}
    assert quiet["alternations"] == 3 and quiet["cores"] == os.cpu_count()


def test_a_baseline_that_cannot_start_is_left_out_with_its_reason():
    @contextmanager
    def theirs():
        raise baselines.BaselineUnavailable("infinity_emb exited with 1")
        yield

    @contextmanager
    def ours():
        yield "ours"

    unavailable: dict[str, str] = {}
    series, _ = alternate({"ours": ours, "theirs": theirs}, ["4"], 2,
                          lambda name, level: {name: {"throughput_qps": 1.0}},
                          key="throughput_qps", settle_s=0, unavailable=unavailable)
    assert unavailable == {"theirs": "infinity_emb exited with 1"}
    assert list(series) == ["ours"] and len(series["ours"]["4"]["alternations"]) == 2


def test_noise_rules():
    assert QUIET["noisy"] is False and QUIET["why"] == []
    busy_start = quietness(1.9, 3.1, [0.0], 2)  # the page's run: 3.8 on 2 cores
    assert busy_start["noisy"] and "load average 1.90 per core" in busy_start["why"][0]
    taken = quietness(0.05, 0.9, [0.02, 0.35], 2)  # 0.1 core is the limit on 2 cores
    assert taken["noisy"] and taken["why"] == [
        "other processes took 0.35 cores in a measured window (limit 0.10)"]
    assert taken["other_cores_max"] == 0.35 and taken["limits"]["other_cores"] == 0.1


def test_cpu_of_a_process_outside_our_tree_counts_as_other():
    # a busy process reparented away from us (its shell exits at once): not ours
    shell = subprocess.run(
        ["sh", "-c", f"{sys.executable} -c 'import time\nt = time.time()\n"
         "while time.time() - t < 4: pass' >/dev/null 2>&1 & echo $!"],
        capture_output=True, text=True, check=True)
    burner = int(shell.stdout)
    tick = os.sysconf("SC_CLK_TCK")

    def burner_ticks() -> int:
        fields = Path(f"/proc/{burner}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    try:
        time.sleep(0.3)
        ours, before = tree_ticks(), burner_ticks()
        window = Window.open()
        started = time.monotonic()
        time.sleep(1.5)
        burned = (burner_ticks() - before) / tick
        noise = window.close()
        wall = time.monotonic() - started
        assert burned > 0.1  # it ran
        assert noise["other_cores"] * wall >= 0.8 * burned - 0.05
        assert tree_ticks() - ours < burned * tick / 4
        # our own CPU time is ours: a busy loop here does not count as other
        mine, spent = tree_ticks(), time.process_time()
        while time.process_time() - spent < 0.5:
            pass
        assert tree_ticks() - mine >= 0.8 * 0.5 * tick
    finally:
        os.kill(burner, 9)


def test_a_noisy_run_never_passes_and_the_page_shows_spread_and_load():
    noisy = quietness(1.2, 1.4, [0.0], 2)
    met = held(at_least, "S2.vs_infinity.c16", "ours / theirs", spread(
        [731.0, 740.0, 700.0], [585.0, 590.0, 600.0]), 1.0, noisy)
    assert met["value"] == 1.25 and met["met"] is True and outcome(met) == "noisy"
    missed = held(at_least, "S2.vs_infinity.c16", "ours / theirs", spread(
        [731.0, 740.0, 700.0], [585.0, 590.0, 600.0]), 1.5, noisy)
    assert outcome(missed) == "MISS"
    quiet = held(at_most, "S2.p99_vs_infinity.c16", "p99", spread([9.0], [10.0]), 1.0, QUIET)
    assert outcome(quiet) == "PASS"
    assert report.figure(met) == "1.25x (1.17-1.25; load 1.20/core, other CPU 0.00 cores)"
    # results from before alternations render as they did, with a note
    old = at_least("S2.vs_infinity.c16", "ours / theirs", 2.74, 1.5, "x")
    assert report.figure(old) == "2.74x (single run, no spread)"
    assert report.figure(at_least("S2.vs_floor", "floor", 0.8, 0.7)) == "0.8"
    assert outcome(old) == "PASS"
