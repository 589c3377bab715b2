"""``servekit``: register, scale, promote, roll back and compare model versions on TorchServe.

    servekit init NAME --model-file F --class C (--weights W | --train EPOCHS) --data DIR|CSV [--target COL]
                  [--spec models.yaml] [--torchvision NAME] [--kwargs JSON] [--mean M] [--std S] [--size N]
                                          # a checked spec entry for your own model and data
                                          # (servekit.build.scaffold; the one command that imports torch)
    servekit status [--json]
    servekit register NAME VERSION        # sha256 checked against model_store/manifest.json first;
                                          # workers and batching from the archive's model-config.yaml
    servekit scale NAME VERSION --min N --max M [--drain-timeout S]   # the default never to 0 workers
    servekit retire NAME VERSION [--drop-routes] [--drain-timeout S]  # never the default, the last
                                          # version, or one the proxy routes to (unless --drop-routes)
    servekit promote NAME VERSION         # golden set must pass, then set-default (blue-green)
    servekit rollback NAME                # undo the latest promotion not yet undone (golden set first)
    servekit compare NAME V1 V2 --inputs DIR
    servekit history [NAME]
    servekit state [NAME]                 # the deployment state: default, versions, canary, shadow,
                                          # promotion stack, last event (JSON)
    servekit proxy start|stop|status      # nginx in front of TorchServe (--proxy-port, default 8090)
    servekit proxy start [--otlp-endpoint URL]   # with spans of its own (default: config.properties'
                                          # servekit_otlp_endpoint; "" turns them off)
    servekit canary NAME VERSION --percent P   # P % of /predictions/NAME through the proxy; 0 aborts
    servekit shadow NAME VERSION [--off]  # mirror every request to VERSION, answers discarded
    servekit rollout NAME VERSION [--steps 10,25,50,100] [--step-seconds 30] [--max-error-rate 0.01]
                    [--max-p99-ratio 1.5] [--min-requests 50] [--max-wait-factor 4] [--max-drift D]
                    [--source auto|prometheus|metrics|proxy-log] [--spec models.yaml] [--json]
                                          # canary steps judged from the handler metrics or the proxy's
                                          # request log, then promote; any failure or Ctrl-C: canary 0,
                                          # default kept (servekit.deploy.rollout; lock per step, exit 1/130);
                                          # unset thresholds from the spec's rollout: section
    servekit rollout --status NAME [--json]   # the running or last rollout of NAME (its status file)
    servekit metadata NAME [VERSION]      # the Open Inference Protocol metadata of a built version
                                          # (inputs, outputs, datatypes, shapes), from the store
    servekit bundle [--models digits:1.0,2.0] [--default digits:2.0] [--image REPO:TAG] [--replicas N]
                    [--max-replicas M] [--cpu 2] [--memory 4Gi] [--namespace NS] [--public] [--out bundle]
                    [--otlp-endpoint http://COLLECTOR:4318/v1/traces] [--kserve-mode standard|knative]
                    [--autoscaler keda|hpa] [--prometheus-url URL]
                                          # image, Kubernetes and KServe manifests (servekit.deploy.bundle)
    servekit pod-routes --bundle DIR [--canary NAME:V:P]... [--shadow NAME:V]... --out FILE
                                          # the routing ConfigMap the bundle's pods follow (canary and shadow
                                          # on every protocol, no restart; servekit.deploy.pod)
    servekit kserve canary|promote|abort|rollout --current APPLIED.yaml --out FILE [--bundle NEW] [--percent P]
                    [--steps 10,25,50,100] [--name N]
                                          # a KServe canary as the next InferenceService and its merge patch
                                          # (servekit.deploy.kserve; nothing is applied)
    servekit top [--once] [--json] [--interval 2] [--window 15m] [--source auto|prometheus|metrics]
                                          # req/s, p50, p99, 5xx/4xx %, queue, READY workers, default,
                                          # drift verdict per version (servekit.observe.top)
    servekit drift NAME [VERSION] [--window 15m | --seconds N] [--json] [--source auto|prometheus|metrics]
                                          # live classes, confidence, brightness against the archive's
                                          # drift reference, PSI (servekit.observe.drift); exit 3 on drift

Connection settings default to this repository's config.properties and ``make serve``'s files;
override them with flags or SERVEKIT_MANAGEMENT_URL, SERVEKIT_INFERENCE_URL, SERVEKIT_KEY_FILE,
SERVEKIT_STORE, SERVEKIT_HISTORY, SERVEKIT_PROXY_DIR, SERVEKIT_PROXY_PORT, SERVEKIT_LOCK_TIMEOUT,
SERVEKIT_METRICS_URL (the OIP front's /metrics) and SERVEKIT_PROMETHEUS_URL. ``top`` and ``drift``
read Prometheus when it answers and holds servekit's series (``--source auto``), else the metrics page.
The deployment state is ``state.json`` in the proxy directory. Every command that changes
something (register, scale, retire, promote, rollback, canary, shadow, proxy start/stop) holds one
lock, ``servekit.lock`` beside the history, and waits at most ``--lock-timeout`` seconds for it.
Errors print one line and exit with status 1; ``drift`` prints its report and exits 3 when the
verdict is drift (0 otherwise). Nothing but ``init`` imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from servekit.deploy.history import History
from servekit.deploy.proxy import NginxProxy
from servekit.deploy.state import DeploymentStore
from servekit.deploy.state_lock import StateLock
from servekit.deploy.workflows import Deployer, DeployError, VersionState, status
from servekit.errors import ServekitError
from servekit.serving.client import TorchServeClient
from servekit.serving.oip import store_metadata
from servekit.serving.server import BASE_CONFIG, REPO_ROOT, read_properties
from servekit.serving.store import archive_name, read_manifest
from servekit.serving.tracing import CONFIG_KEY as OTLP_CONFIG_KEY

LOCK_NAME = "servekit.lock"


def _defaults() -> dict[str, str]:
    props = read_properties(BASE_CONFIG) if BASE_CONFIG.is_file() else {}
    return {
        "management_url": props.get("management_address", "http://127.0.0.1:8081"),
        "inference_url": props.get("inference_address", "http://127.0.0.1:8080"),
        "key_file": str(REPO_ROOT / "var" / "key_file.json"),
        "store": str(REPO_ROOT / "model_store"),
        "history": str(REPO_ROOT / "var" / "deployments.jsonl"),
        "proxy_dir": str(REPO_ROOT / "var" / "proxy"),
        "proxy_port": "8090",
        "lock_timeout": "60",
        "metrics_url": "http://127.0.0.1:8000/metrics",
        "prometheus_url": "http://127.0.0.1:9090",
    }


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes end like every other failure: one ``servekit: error:`` line and status 1."""

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"servekit: error: {message} (see {self.prog} --help)\n")


def accuracy_gate(record: dict | None) -> str:
    """What the build measured of a version against FP32 (its manifest record): ``gated``, ``UNGATED``
    (a reduced-precision version built with ``allow_ungated``), ``-`` (FP32) or ``?`` (not in the store)."""
    if record is None:
        return "?"
    if record.get("precision") == "fp32":
        return "-"
    # Archives built before the manifest said so: a reduced-precision version with no accuracy was not gated.
    return "UNGATED" if record.get("ungated", record.get("accuracy") is None) else "gated"


def store_gates(store: Path, states: list[VersionState]) -> dict[tuple[str, str], str]:
    """``accuracy_gate`` of every registered version, from the store's manifest."""
    try:
        archives = read_manifest(store)["archives"]
    except ServekitError:
        archives = {}
    return {(s.model, s.version): accuracy_gate(archives.get(archive_name(s.model, s.version))) for s in states}


def format_status(states: list[VersionState], gates: dict[tuple[str, str], str] | None = None) -> str:
    gates = gates or {}
    header = ("MODEL", "VERSION", "DEFAULT", "WORKERS", "READY", "MIN-MAX", "BATCH", "QUEUED", "GATE")
    rows = [header] + [
        (
            s.model,
            s.version,
            "*" if s.default else "",
            str(len(s.workers)),
            str(sum(1 for w in s.workers if w.get("status") == "READY")),
            f"{s.min_workers}-{s.max_workers}",
            str(s.batch_size),
            str(s.pending),
            gates.get((s.model, s.version), "?"),
        )
        for s in states
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows)


class Output(str):
    """A command's text with an exit status that is not a failure (``drift``: 3 when the verdict is drift)."""

    exit_code: int

    def __new__(cls, text: str, exit_code: int = 0) -> Output:
        output = super().__new__(cls, text)
        output.exit_code = exit_code
        return output


DRIFT_EXIT = 3


class Interrupted(ServekitError):
    """Ctrl-C before a command had its answer."""

    exit_code = 130


@dataclass
class Context:
    """What every subcommand works with, built once from the global flags."""

    args: argparse.Namespace
    client: TorchServeClient
    proxy: NginxProxy
    deployments: DeploymentStore
    deployer: Deployer

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Context:
        client = TorchServeClient(args.management_url, args.inference_url, Path(args.key_file))
        upstream = client.inference_url.split("//", 1)[-1]
        proxy = NginxProxy(Path(args.proxy_dir), int(args.proxy_port), upstream)
        deployments = DeploymentStore(proxy.state_file, History(Path(args.history)))
        return cls(args, client, proxy, deployments, Deployer(client, Path(args.store), deployments, proxy))


# ------------------------------------------------------------------------------------------ subcommands
def cmd_status(ctx: Context) -> str:
    states = status(ctx.client)
    gates = store_gates(Path(ctx.args.store), states)
    if ctx.args.json:
        return json.dumps([{**s.as_dict(), "gate": gates[(s.model, s.version)]} for s in states], indent=2)
    return format_status(states, gates)


def cmd_register(ctx: Context) -> str:
    ctx.deployer.register(ctx.args.name, ctx.args.version)
    return f"registered {ctx.args.name} {ctx.args.version}"


def cmd_scale(ctx: Context) -> str:
    a = ctx.args
    ctx.deployer.scale(a.name, a.version, a.min_workers, a.max_workers, a.drain_timeout)
    return f"scaled {a.name} {a.version} to {a.min_workers}-{a.max_workers} workers"


def cmd_retire(ctx: Context) -> str:
    a = ctx.args
    ctx.deployer.retire(a.name, a.version, drop_routes=a.drop_routes, drain_timeout=a.drain_timeout)
    return f"retired {a.name} {a.version}"


def cmd_promote(ctx: Context) -> str:
    event = ctx.deployer.promote(ctx.args.name, ctx.args.version)
    return (
        f"promoted {ctx.args.name} {ctx.args.version} (golden set {event['golden']}/{event['golden']} correct); "
        f"previous default {event['previous_default']} keeps serving until retired"
    )


def cmd_rollback(ctx: Context) -> str:
    event = ctx.deployer.rollback(ctx.args.name)
    return (
        f"rolled back {ctx.args.name}: default is {event['version']} again (was {event['previous_default']}; "
        f"golden set {event['golden']}/{event['golden']} correct)"
    )


def cmd_compare(ctx: Context) -> str:
    a = ctx.args
    report = ctx.deployer.compare(a.name, a.v1, a.v2, a.inputs)
    if a.json:
        return json.dumps(report, indent=2)
    lat = report["latency_ms"]
    return (
        f"{report['inputs']} inputs: top-1 agreement {report['agreement']:.1%}, probability difference "
        f"mean {report['mean_probability_diff']} max {report['max_probability_diff']}; latency p50 "
        f"{a.v1} {lat[a.v1]['p50']} ms, {a.v2} {lat[a.v2]['p50']} ms"
    )


def cmd_history(ctx: Context) -> str:
    return "\n".join(json.dumps(e, sort_keys=True) for e in ctx.deployments.events(ctx.args.name))


def cmd_state(ctx: Context) -> str:
    return json.dumps(ctx.deployments.describe(ctx.args.name), indent=2, sort_keys=True)


def cmd_proxy_start(ctx: Context) -> str:
    ctx.proxy.otlp_endpoint = ctx.args.otlp_endpoint.strip() or None
    ctx.proxy.start()
    spans = f"; its spans go to {ctx.proxy.otlp_endpoint}" if ctx.proxy.otlp_endpoint else ""
    return f"proxy listening on {ctx.proxy.url()} in front of {ctx.proxy.current().upstream}{spans}"


def cmd_proxy_stop(ctx: Context) -> str:
    ctx.proxy.stop()
    return "proxy stopped"


def cmd_proxy_status(ctx: Context) -> str:
    state = ctx.proxy.state()
    pid = ctx.proxy.running_pid()
    return json.dumps({"running": pid is not None, "pid": pid, **state}, indent=2)


def cmd_canary(ctx: Context) -> str:
    a = ctx.args
    ctx.deployer.canary(a.name, a.version, a.percent)
    if a.percent == 0:
        return f"canary of {a.name} {a.version} aborted: all traffic to the default"
    return f"canary: {a.percent}% of {a.name} traffic through {ctx.proxy.url()} goes to {a.version}"


def cmd_shadow(ctx: Context) -> str:
    a = ctx.args
    ctx.deployer.shadow(a.name, a.version, on=not a.off)
    if a.off:
        return f"shadow of {a.name} {a.version} stopped"
    return f"shadow: every {a.name} request through {ctx.proxy.url()} is mirrored to {a.version}"


def cmd_rollout(ctx: Context) -> str:
    from servekit.deploy import rollout as ro
    from servekit.deploy.state import check_name

    a = ctx.args
    if a.status:
        return _rollout_status(ctx)
    if a.name is None or a.version is None:
        raise DeployError("rollout needs NAME and VERSION (servekit rollout NAME VERSION), or --status NAME")
    check_name(a.name)  # it names the status file
    flags = {
        "steps": ro.parse_steps(a.steps) if a.steps is not None else None,
        "step_seconds": a.step_seconds, "max_error_rate": a.max_error_rate, "max_p99_ratio": a.max_p99_ratio,
        "min_requests": a.min_requests, "max_wait_factor": a.max_wait_factor, "max_drift": a.max_drift,
    }  # fmt: skip
    settings = ro.Settings.resolve(flags, _spec_rollout(a.spec, a.name))
    if ctx.proxy.running_pid() is None:
        raise DeployError(f"the proxy is not running (servekit proxy start): no traffic through it to judge {a.name}")
    page, prometheus = _metric_sources(ctx)
    source, note = ro.select_source(a.source, page=page, prometheus=prometheus,
                                    request_log=ro.RequestLog(ctx.proxy.request_log))  # fmt: skip
    if note:
        print(f"servekit: {note}", file=sys.stderr, flush=True)

    def emit(event: dict) -> None:
        print(json.dumps(event, sort_keys=True) if a.json else ro.format_event(event), flush=True)

    def lock(holder: str) -> StateLock:
        return StateLock(Path(a.history).parent / LOCK_NAME, timeout=a.lock_timeout, holder=holder)

    rollout = ro.Rollout(
        ctx.deployer, source, lock=lock, emit=emit, status=ro.StatusFile(ro.status_path(ctx.proxy.prefix, a.name)),
        source_note=note, **settings.rollout_arguments(),
    )  # fmt: skip
    rollout.run(a.name, a.version)  # every line is already out; a failure raises RolloutAborted
    return ""


def _spec_rollout(spec: str | None, model: str) -> dict:
    """The model's ``rollout:`` settings in the spec (the repo's models.yaml unless --spec; absent: none)."""
    path = Path(spec) if spec is not None else REPO_ROOT / "models.yaml"
    if spec is None and not path.is_file():
        return {}
    from servekit.deploy.rollout import rollout_settings  # the rollout: section only (PyYAML, no build side)

    return rollout_settings(path, model).given()


def _rollout_status(ctx: Context) -> str:
    from servekit.deploy.rollout import RolloutProcess, format_status, read_status, status_path
    from servekit.deploy.state import check_name

    a = ctx.args
    if a.name is None:
        raise DeployError("rollout --status needs the model: servekit rollout --status NAME")
    if a.version is not None:
        raise DeployError(f"rollout --status takes the model only, not a version: servekit rollout --status {a.name}")
    check_name(a.name)
    status = read_status(status_path(ctx.proxy.prefix, a.name))
    process = RolloutProcess.of(status) if status is not None else None
    alive = process is not None and process.alive()
    if a.json:
        document = status if status is not None else {"model": a.name, "state": "none"}
        return json.dumps({**document, "alive": alive}, indent=2, sort_keys=True)
    return format_status(status, a.name, alive)


def cmd_init(ctx: Context) -> str:
    from servekit.build.scaffold import InitRequest, init

    a = ctx.args

    def numbers(text: str | None, flag: str) -> list[float] | None:
        if text is None:
            return None
        try:
            return [float(v) for v in text.split(",")]
        except ValueError:
            raise ServekitError(f"init: {flag} takes numbers separated by commas, got {text!r}") from None

    return init(InitRequest(
        name=a.name, spec=Path(a.spec), data=Path(a.data),
        model_file=Path(a.model_file) if a.model_file else None, class_name=a.class_name, kwargs=a.kwargs,
        torchvision=a.torchvision, weights=Path(a.weights) if a.weights else None, train_epochs=a.train,
        target=a.target, mean=numbers(a.mean, "--mean"), std=numbers(a.std, "--std"), size=a.size,
        precisions=tuple(p.strip() for p in a.precisions.split(",")),
    ))  # fmt: skip


def cmd_metadata(ctx: Context) -> str:
    return json.dumps(store_metadata(Path(ctx.args.store), ctx.args.name, ctx.args.version), indent=2)


def cmd_bundle(ctx: Context) -> str:
    from servekit.deploy.bundle import BundleOptions, write_bundle  # yaml and the generator only when asked

    a = ctx.args
    options = BundleOptions.from_cli(
        models=a.models, defaults=a.default, replicas=a.replicas, max_replicas=a.max_replicas, cpu=a.cpu,
        memory=a.memory, image=a.image, namespace=a.namespace, out=a.out, public=a.public,
        otlp_endpoint=a.otlp_endpoint, kserve_mode=a.kserve_mode, autoscaler=a.autoscaler,
        prometheus_url=a.prometheus_url,
    )  # fmt: skip
    store = Path(a.bundle_store or a.store)
    return write_bundle(options, spec=a.spec, store=store, state_file=ctx.proxy.state_file).summary()


def cmd_kserve(ctx: Context) -> str:
    from servekit.deploy.kserve_cli import run_kserve  # yaml and the generator only when asked

    a = ctx.args
    return run_kserve(a.action, a.current, a.out, candidate=a.candidate, percent=a.percent, name=a.name,
                      steps=a.steps)  # fmt: skip


def cmd_pod_routes(ctx: Context) -> str:
    import yaml

    from servekit.deploy.bundle import changed_routes, dump_documents

    a = ctx.args
    configmap = changed_routes(a.bundle, a.canary or [], a.shadow or [])
    header = "# Generated by `servekit pod-routes`: the pods' routes (servekit.deploy.pod), no restart needed.\n"
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(dump_documents([configmap], header))
    routes = yaml.safe_load(next(iter(configmap["data"].values())))["routes"] or "none"
    meta = configmap["metadata"]
    return (
        f"{a.out}: routes {json.dumps(routes, sort_keys=True)}; apply with kubectl apply -f {a.out} "
        f"(the pods of {meta['namespace']} follow within the kubelet's ConfigMap sync, about a minute)"
    )


def _metric_sources(ctx: Context):
    from servekit.observe.metrics_source import MetricsPage, PrometheusAPI

    page = MetricsPage(ctx.args.metrics_url, auth=lambda: ctx.client.headers("inference"))
    return page, PrometheusAPI(ctx.args.prometheus_url)


def cmd_drift(ctx: Context) -> str:
    from servekit.observe.drift import format_report, run_drift

    a = ctx.args
    page, prometheus = _metric_sources(ctx)
    try:
        report = run_drift(
            a.name, a.version, store=Path(a.store), page=page, prometheus=prometheus, source=a.source,
            window=a.window, seconds=a.seconds, management_default=ctx.client.default_version,
        )  # fmt: skip
    except KeyboardInterrupt:
        raise Interrupted(f"drift of {a.name} interrupted: no report") from None
    text = json.dumps(report, indent=2) if a.json else format_report(report)
    return Output(text, DRIFT_EXIT if report["verdict"] == "drift" else 0)


def cmd_top(ctx: Context) -> str:
    from servekit.observe.drift import DEFAULT_WINDOW, ReferenceCache
    from servekit.observe.metrics_source import choose_source, parse_window
    from servekit.observe.top import MetricsView, PrometheusView, run_top

    a = ctx.args
    if not a.interval > 0:
        raise ServekitError(f"--interval must be positive, got {a.interval:g}")
    window = a.window or DEFAULT_WINDOW
    parse_window(window)
    page, prometheus = _metric_sources(ctx)
    source, note = choose_source(a.source, prometheus, page)
    references = ReferenceCache(Path(a.store))
    if source == "prometheus":
        view = PrometheusView(prometheus, references, window)
    else:
        if a.window:
            raise ServekitError("--window is a Prometheus range; from the metrics page drift counts since the start")
        view = MetricsView(page, references, a.interval)
    if note:
        print(f"servekit: {note}", file=sys.stderr)
    try:
        run_top(view, once=a.once, as_json=a.json, interval=a.interval)
    except KeyboardInterrupt:  # Ctrl-C is how a live view ends (the loop itself catches it between frames)
        print()
    return ""


# ------------------------------------------------------------------------------------------ parser
Handler = Callable[[Context], str]


def build_parser() -> argparse.ArgumentParser:
    defaults = _defaults()
    parser = OneLineParser(prog="servekit", description=__doc__.splitlines()[0])
    for name, value in defaults.items():
        parser.add_argument(
            "--" + name.replace("_", "-"),
            default=os.environ.get(f"SERVEKIT_{name.upper()}", value),
            type=float if name == "lock_timeout" else str,
            help=f"(default {value})",
        )
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler: Handler, text: str, *positionals: str, changes: bool = True, into=commands):
        sub = into.add_parser(name, help=text)
        sub.set_defaults(handler=handler, changes_state=changes)
        for positional in positionals:
            sub.add_argument(positional.rstrip("?"), nargs="?" if positional.endswith("?") else None)
        return sub

    init = command("init", cmd_init, "write a checked spec entry for your own model and data", "name", changes=False)
    init.add_argument("--data", required=True, help="an image folder (train/<label>/*, val/<label>/*) or a .csv")
    init.add_argument("--model-file", help="the Python file of your nn.Module")
    init.add_argument("--class", dest="class_name", help="the nn.Module class in --model-file")
    init.add_argument("--torchvision", help="a torchvision classification builder instead (efficientnet_b0, ...)")
    init.add_argument("--kwargs", help="constructor arguments as JSON, e.g. '{\"num_classes\": 3}'")
    init.add_argument("--weights", help="a state_dict of the model (torch.save(model.state_dict(), F))")
    init.add_argument("--train", type=int, metavar="EPOCHS", help="train on the data's train split instead")
    init.add_argument("--target", help="the CSV column that holds the class")
    init.add_argument("--mean", help="per-channel mean(s) your model was trained with (default ImageNet's)")
    init.add_argument("--std", help="per-channel std(s) your model was trained with (default ImageNet's)")
    init.add_argument("--size", type=int, help="the model's input side in pixels (default: the images', <= 224)")
    init.add_argument("--precisions", default="fp32,int8", help="versions 1.0, 2.0, ... in these precisions")
    init.add_argument("--spec", default="models.yaml", help="the spec to add the entry to (default: ./models.yaml)")
    command("status", cmd_status, "models, versions, default, workers, queue", changes=False).add_argument(
        "--json", action="store_true"
    )
    command("register", cmd_register, "register a built version", "name", "version")
    command("promote", cmd_promote, "golden set, then make it the default", "name", "version")
    retire = command("retire", cmd_retire, "unregister a version (never the default, the last, or a routed one)",
                     "name", "version")  # fmt: skip
    retire.add_argument(
        "--drop-routes", action="store_true", help="remove the proxy's canary/shadow routes to it first"
    )
    scale = command("scale", cmd_scale, "set a version's worker range", "name", "version")
    scale.add_argument("--min", type=int, required=True, dest="min_workers")
    scale.add_argument("--max", type=int, required=True, dest="max_workers")
    for sub in (retire, scale):
        sub.add_argument(
            "--drain-timeout", type=float, default=30.0, help="seconds to wait for its queue to empty (0: do not wait)"
        )
    command("rollback", cmd_rollback, "undo the latest promotion not yet undone (golden set first)", "name")
    compare = command("compare", cmd_compare, "send the same inputs to two versions", "name", "v1", "v2", changes=False)
    compare.add_argument("--inputs", required=True, type=Path)
    compare.add_argument("--json", action="store_true")
    command("history", cmd_history, "print the deployment history", "name?", changes=False)
    command("state", cmd_state, "print the deployment state (JSON)", "name?", changes=False)
    command("metadata", cmd_metadata, "OIP metadata of a built version (JSON)", "name", "version?", changes=False)
    proxy = commands.add_parser("proxy", help="start, stop or show the nginx proxy")
    actions = proxy.add_subparsers(dest="action", required=True)
    start = command("start", cmd_proxy_start, "start nginx in front of TorchServe", into=actions)
    configured = (read_properties(BASE_CONFIG) if BASE_CONFIG.is_file() else {}).get(OTLP_CONFIG_KEY, "").strip()
    start.add_argument(
        "--otlp-endpoint", default=configured,
        help="export the proxy's own spans there (an OTLP/HTTP traces URL; default: config.properties' "
             f"{OTLP_CONFIG_KEY}, {configured or 'unset there: no spans'}; \"\" turns them off)",
    )  # fmt: skip
    command("stop", cmd_proxy_stop, "stop it (requests in flight finish)", into=actions)
    command("status", cmd_proxy_status, "whether it runs, and the deployment state", changes=False, into=actions)
    canary = command("canary", cmd_canary, "send a share of traffic to a version through the proxy", "name", "version")
    canary.add_argument("--percent", type=int, required=True)
    shadow = command("shadow", cmd_shadow, "mirror traffic to a version through the proxy", "name", "version")
    shadow.add_argument("--off", action="store_true", help="stop mirroring")
    # The rollout takes the state lock per change itself (changes=False): status and history stay usable.
    rollout = command("rollout", cmd_rollout, "walk a canary through steps, then promote or roll back",
                      "name?", "version?", changes=False)  # fmt: skip
    rollout.add_argument("--status", action="store_true", help="show the running or last rollout of NAME and exit")
    unset = "default: the spec's rollout: section, else"
    rollout.add_argument("--steps", help=f"canary percentages ({unset} 10,25,50,100)")
    rollout.add_argument("--step-seconds", type=float, help=f"minimum length of a step ({unset} 30)")
    rollout.add_argument("--max-error-rate", type=float, help=f"error budget ({unset} 0.01)")
    rollout.add_argument("--max-p99-ratio", type=float, help=f"canary/default p99 limit ({unset} 1.5)")
    rollout.add_argument("--min-requests", type=int, help=f"canary requests per step ({unset} 50)")
    rollout.add_argument("--max-wait-factor", type=float, help=f"abort a step after this x step-seconds ({unset} 4)")
    rollout.add_argument(
        "--max-drift", type=float, help=f"canary class-mix PSI limit against its archive's reference ({unset} off)"
    )
    rollout.add_argument(
        "--source", choices=("auto", "prometheus", "metrics", "proxy-log"), default="auto",
        help="where the figures come from (auto: Prometheus with servekit's series, else the metrics page, "
             "else the proxy's request log)",
    )  # fmt: skip
    rollout.add_argument("--spec", help="the model spec with the rollout: sections (default: the repo's models.yaml)")
    rollout.add_argument("--json", action="store_true", help="print JSON lines (with --status: the status document)")
    bundle = command("bundle", cmd_bundle, "write the image, Kubernetes and KServe manifests to --out", changes=False)
    bundle.add_argument(
        "--models", "--model", action="append", help="NAME, NAME:V or NAME:V1,V2 (repeatable; default: all)"
    )
    bundle.add_argument("--default", action="append", help="NAME:VERSION (default: the highest bundled version)")
    for flag, default in (("--replicas", None), ("--max-replicas", None), ("--cpu", None), ("--memory", None),
                          ("--image", None), ("--namespace", None)):  # fmt: skip
        bundle.add_argument(flag, default=default, help="(see servekit.deploy.bundle.BundleOptions)")
    bundle.add_argument(
        "--public", action="store_true",
        help="expose the KServe InferenceService through the ingress gateway (default: cluster-local)",
    )  # fmt: skip
    bundle.add_argument("--otlp-endpoint", help="the pods export traces there (OTLP/HTTP URL; default: no tracing)")
    bundle.add_argument("--kserve-mode", choices=("standard", "knative"), help="the InferenceService's mode "
                        "(default standard: raw Deployments, KServe's default; knative: revisions)")  # fmt: skip
    bundle.add_argument("--autoscaler", choices=("keda", "hpa"), help="keda (default): a ScaledObject on the "
                        "queue and CPU; hpa: a CPU HorizontalPodAutoscaler, for clusters without KEDA")  # fmt: skip
    bundle.add_argument("--prometheus-url", help="where KEDA reads the queue (default the monitoring "
                        "namespace's prometheus-operated:9090)")  # fmt: skip
    kserve = command("kserve", cmd_kserve, "write the next InferenceService of a KServe canary, and its patch",
                     "action", changes=False)  # fmt: skip
    kserve.add_argument("--current", type=Path, required=True,
                        help="the applied InferenceService (its bundle's kserve/inferenceservice.yaml, or "
                        "kubectl get -o yaml)")  # fmt: skip
    kserve.add_argument("--bundle", dest="candidate", type=Path, help="canary, rollout: the new version's bundle")
    kserve.add_argument("--percent", type=int, help="canary: the candidate's share (0: deployed, no traffic)")
    kserve.add_argument("--steps", help="rollout: canary percentages (default 10,25,50,100)")
    kserve.add_argument("--name", help="canary: the canary predictor's name (default from the bundle's defaults)")
    kserve.add_argument("--out", type=Path, required=True, help="where to write (rollout: a folder)")
    routes = command("pod-routes", cmd_pod_routes, "write the routing ConfigMap of a bundle's pods (canary, shadow)",
                     changes=False)  # fmt: skip
    routes.add_argument("--bundle", type=Path, required=True, help="the bundle the pods run")
    routes.add_argument("--canary", action="append", help="NAME:VERSION:PERCENT (repeatable; none: no canary)")
    routes.add_argument("--shadow", action="append", help="NAME:VERSION (repeatable; none: no shadow)")
    routes.add_argument("--out", type=Path, required=True, help="the ConfigMap's YAML file to write")
    bundle.add_argument("--out", type=Path, default=REPO_ROOT / "bundle")
    bundle.add_argument("--spec", type=Path, default=REPO_ROOT / "models.yaml")
    bundle.add_argument("--store", dest="bundle_store", help="the model store (default: the global --store)")
    sources = ("auto", "prometheus", "metrics")
    source_help = "auto: Prometheus when it answers and holds servekit's series, else the metrics page"
    top = command("top", cmd_top, "live req/s, latency, errors, queue, workers and drift per version", changes=False)
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.add_argument("--json", action="store_true", help="print one JSON document and exit (implies --once)")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between frames and scrapes (default 2)")
    top.add_argument("--window", help="Prometheus range of the drift verdict (default 15m)")
    top.add_argument("--source", choices=sources, default="auto", help=source_help)
    drift = command("drift", cmd_drift, "live distributions against the archive's drift reference (PSI)",
                    "name", "version?", changes=False)  # fmt: skip
    drift.add_argument("--window", help="Prometheus range of increase() (default 15m)")
    drift.add_argument("--seconds", type=float, help="the metrics page scraped twice, N seconds apart")
    drift.add_argument("--json", action="store_true")
    drift.add_argument("--source", choices=sources, default="auto", help=source_help)
    return parser


def run(args: argparse.Namespace, description: str = "servekit") -> str:
    ctx = Context.from_args(args)
    if not args.changes_state:
        return args.handler(ctx)
    # One lock for every state-changing command, next to the history it appends to.
    with StateLock(Path(args.history).parent / LOCK_NAME, timeout=args.lock_timeout, holder=description):
        return args.handler(ctx)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        output = run(args, description=_describe(argv, args))
    except (ServekitError, OSError) as exc:
        return _fail(str(exc), getattr(exc, "exit_code", 1))
    except Exception as exc:  # a bug: still one line, with the traceback on request
        if os.environ.get("SERVEKIT_DEBUG"):
            raise
        return _fail(f"internal error: {type(exc).__name__}: {exc} (SERVEKIT_DEBUG=1 shows the traceback)")
    if output:
        print(output)
    return getattr(output, "exit_code", 0)


def _describe(argv: list[str], args: argparse.Namespace) -> str:
    """The command as the lock's holder line shows it: from the subcommand on, without global flags."""
    start = argv.index(args.command) if args.command in argv else 0
    return " ".join(["servekit", *argv[start:]])


def _fail(message: str, code: int = 1) -> int:
    print(f"servekit: error: {' '.join(message.split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
