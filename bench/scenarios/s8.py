"""S8: scale-out: a new replica's start to Ready, prepared artifacts against per-pod prepare.

Each pod is the rendered Deployment's pod run the way a kubelet would run it, by the pod
tier's runner (``tests/support/podrunner.py``: namespaces, volumes, probes at their
rendered periods, uid 1000), so the figures include everything a kubelet adds after the
image is pulled. Start to Ready is from the runner's start (volumes laid out, then the
containers' processes) to the moment every container's readiness probe has passed.

* ``prepared, warm``: ``prepare: job``, the artifacts version already on the claim and in
  the page cache (a replica added to a running resource on the same node);
* ``prepared, cold``: the same after ``echo 3 > /proc/sys/vm/drop_caches`` (a new node);
* ``prepared, probes before``: the warm pod with the probe periods rendered before
  issue 13 (startup 10 s, readiness 10 s, the gateway's readiness 10 s, no gateway
  startup probe), to show what the periods cost;
* ``per-pod prepare, cold``: the previous default, an init container that exports the
  encoder and embeds the corpus into an empty volume before Triton starts.

Needs root (the runner's namespaces and mounts); without it the scenario says so. The
quick size (the smoke test) starts only the warm pods: the pod tier tests the others.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from bench.context import Context, log
from bench.targets import at_most
from tritonop.artifacts.prepare import link_tree
from tritonop.render.kubernetes import render_children
from tritonop.render.repository import artifact_dirs
from tritonop.resources import Resource, parse_resource

READY_TARGET_S = 10.0
"""Issue 13's goal: a new news replica Ready in under 10 s with prepared artifacts."""
CORPUS_ON_VOLUME = "/artifacts/corpus/texts.jsonl"


def _runner() -> tuple[Any, str | None]:
    from tests.support.podrunner import PodRunner, can_run_pods

    return PodRunner, can_run_pods()


def _with_artifacts(resource: Resource, artifacts: dict[str, Any],
                    corpus: str | None = None) -> Resource:
    body: dict[str, Any] = {
        "apiVersion": "serving.tritonop.dev/v1alpha1", "kind": resource.kind,
        "metadata": {"name": resource.name},
        "spec": resource.spec.model_dump(by_alias=True, exclude_none=True)}
    body["spec"]["artifacts"] = artifacts
    if corpus:
        body["spec"]["corpus"]["source"] = corpus
    return parse_resource(body, resource.base_dir)


def _old_probes(deployment: dict[str, Any]) -> dict[str, Any]:
    """The pod as rendered before issue 13: 10 s probe periods, no gateway startup probe."""
    patched = copy.deepcopy(deployment)
    for container in patched["spec"]["template"]["spec"]["containers"]:
        container["readinessProbe"].update(periodSeconds=10, failureThreshold=3)
        if container["name"] == "triton":
            container["startupProbe"].update(periodSeconds=10, failureThreshold=60)
        else:
            container.pop("startupProbe", None)
    return patched


def _start_to_ready(resource: Resource, workdir: Path, claims: dict[str, Path],
                    name: str, patch: Any = None) -> float:
    runner, _ = _runner()
    children = render_children(resource)
    deployment = next(c for c in children if c["kind"] == "Deployment")
    if patch is not None:
        deployment = patch(deployment)
    config_maps = {c["metadata"]["name"]: c["data"] for c in children
                   if c["kind"] == "ConfigMap"}
    pod = runner(deployment, config_maps, workdir / name, claims=claims, name=name)
    try:
        pod.start()
        seconds = pod.wait_ready(1800)
    finally:
        pod.stop()
    log.info("S8: %s Ready in %.1f s", name, seconds)
    return round(seconds, 2)


def _drop_caches() -> bool:
    """Empty the page cache (root, and a writable /proc/sys: not in every container)."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as err:
        log.warning("S8: cannot drop the page cache (%s): no cold figure", err)
        return False
    return True


def _readable(folder: Path) -> None:
    """Let the pods' uid read a version that an older prepare left 0700."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o044 | (0o011 if path.is_dir() else 0))


def run(ctx: Context) -> dict[str, Any]:
    _, reason = _runner()
    if reason:
        return {"skipped": reason}
    prepared = ctx.prepared_resource()
    work = ctx.scratch("s8")
    # The claim: the prepared version hard-linked into a folder the runner can mount
    # (it cannot bind-mount from under /root).
    version = Path(artifact_dirs(prepared, str(ctx.artifacts_root))[0]).parent
    claim = work / "claim"
    shutil.rmtree(claim, ignore_errors=True)
    link_tree(version, claim / prepared.name / version.name)
    _readable(claim)
    job = _with_artifacts(prepared, {"prepare": "job"})
    claims = {f"{job.name}-artifacts": claim}
    times: dict[str, float] = {}
    _start_to_ready(job, work, claims, "warm-up")  # fill the page cache: "warm" means warm
    times["prepared, warm"] = _start_to_ready(job, work, claims, "prepared-warm")
    if not ctx.sizes.s8_every_pod:  # the smoke: no page cache dropped under other tests
        return _result(ctx, times, None)
    times["prepared, probes before"] = _start_to_ready(job, work, claims, "probes-before",
                                                       _old_probes)
    cold: float | None = None
    if _drop_caches():
        cold = times["prepared, cold page cache"] = _start_to_ready(job, work, claims,
                                                                    "prepared-cold")

    # The previous default: the init container prepares into an empty volume.
    volume = work / "empty-volume"
    shutil.rmtree(volume, ignore_errors=True)
    (volume / "corpus").mkdir(parents=True)
    corpus = prepared.resolve_path(prepared.spec.corpus.source)  # type: ignore[union-attr]
    shutil.copyfile(corpus, volume / "corpus" / "texts.jsonl")
    for path in [volume, *volume.rglob("*")]:
        os.chown(path, 1000, 1000)
    per_pod = _with_artifacts(prepared, {"prepare": "perPod",
                                         "persistentVolumeClaim": {"claimName": "cold"}},
                              corpus=CORPUS_ON_VOLUME)
    times["per-pod prepare, cold"] = _start_to_ready(per_pod, work, {"cold": volume},
                                                     "per-pod-cold")
    shutil.rmtree(volume, ignore_errors=True)
    return _result(ctx, times, cold)


def _result(ctx: Context, times: dict[str, float], cold: float | None) -> dict[str, Any]:
    warm = times["prepared, warm"]
    per_pod = times.get("per-pod prepare, cold")
    return {
        "start_to_ready_s": times,
        "speed_up_over_per_pod": round(per_pod / (cold or warm), 1) if per_pod else None,
        "corpus_texts": ctx.corpus_size(),
        "targets": [
            at_most("S8.warm", "new replica with prepared artifacts, warm page cache, start "
                    "to Ready", warm, READY_TARGET_S, "s"),
            at_most("S8.cold", "new replica with prepared artifacts, cold page cache, start "
                    "to Ready", cold, READY_TARGET_S, "s"),
        ],
    }
