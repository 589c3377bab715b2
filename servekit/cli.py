"""``servekit``: register, scale, promote, roll back and compare model versions on TorchServe.

    servekit status [--json]
    servekit register NAME VERSION        # sha256 checked against model_store/manifest.json first
    servekit scale NAME VERSION --min N --max M
    servekit retire NAME VERSION          # never the default or the last version
    servekit promote NAME VERSION         # golden set must pass, then set-default (blue-green)
    servekit rollback NAME                # previous default again, from the deployment history
    servekit compare NAME V1 V2 --inputs DIR
    servekit history [NAME]
    servekit proxy start|stop|status      # nginx in front of TorchServe (--proxy-port, default 8090)
    servekit canary NAME VERSION --percent P   # P % of /predictions/NAME through the proxy; 0 aborts
    servekit shadow NAME VERSION [--off]  # mirror every request to VERSION, answers discarded

Connection settings default to this repository's config.properties and ``make serve``'s files;
override them with flags or SERVEKIT_MANAGEMENT_URL, SERVEKIT_INFERENCE_URL, SERVEKIT_KEY_FILE,
SERVEKIT_STORE, SERVEKIT_SPEC, SERVEKIT_HISTORY. Errors print one line and exit with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from servekit.deploy import Deployer, DeployError, History, TorchServeClient, require_version, status
from servekit.proxy import NginxProxy, ProxyError
from servekit.server import BASE_CONFIG, REPO_ROOT, read_properties


def _defaults() -> dict[str, str]:
    props = read_properties(BASE_CONFIG) if BASE_CONFIG.is_file() else {}
    return {
        "management_url": props.get("management_address", "http://127.0.0.1:8081"),
        "inference_url": props.get("inference_address", "http://127.0.0.1:8080"),
        "key_file": str(REPO_ROOT / "var" / "key_file.json"),
        "store": str(REPO_ROOT / "model_store"),
        "spec": str(REPO_ROOT / "models.yaml"),
        "history": str(REPO_ROOT / "var" / "deployments.jsonl"),
        "proxy_dir": str(REPO_ROOT / "var" / "proxy"),
        "proxy_port": "8090",
    }


def build_parser() -> argparse.ArgumentParser:
    defaults = _defaults()
    parser = argparse.ArgumentParser(prog="servekit", description=__doc__.splitlines()[0])
    for name, value in defaults.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, default=os.environ.get(f"SERVEKIT_{name.upper()}", value), help=f"(default {value})")
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("status", help="models, versions, default, workers, queue")
    show.add_argument("--json", action="store_true")
    for name, text in (("register", "register a built version"), ("retire", "unregister a version"),
                       ("promote", "golden set, then make it the default")):  # fmt: skip
        command = commands.add_parser(name, help=text)
        command.add_argument("name")
        command.add_argument("version")
    scale = commands.add_parser("scale", help="set a version's worker range")
    scale.add_argument("name")
    scale.add_argument("version")
    scale.add_argument("--min", type=int, required=True, dest="min_workers")
    scale.add_argument("--max", type=int, required=True, dest="max_workers")
    rollback = commands.add_parser("rollback", help="make the previous default the default again")
    rollback.add_argument("name")
    compare = commands.add_parser("compare", help="send the same inputs to two versions")
    compare.add_argument("name")
    compare.add_argument("v1")
    compare.add_argument("v2")
    compare.add_argument("--inputs", required=True, type=Path)
    compare.add_argument("--json", action="store_true")
    history = commands.add_parser("history", help="print the deployment history")
    history.add_argument("name", nargs="?")
    proxy = commands.add_parser("proxy", help="start, stop or show the nginx proxy")
    proxy.add_argument("action", choices=["start", "stop", "status"])
    canary = commands.add_parser("canary", help="send a share of traffic to a version through the proxy")
    canary.add_argument("name")
    canary.add_argument("version")
    canary.add_argument("--percent", type=int, required=True)
    shadow = commands.add_parser("shadow", help="mirror traffic to a version through the proxy")
    shadow.add_argument("name")
    shadow.add_argument("version")
    shadow.add_argument("--off", action="store_true", help="stop mirroring")
    return parser


def format_status(states) -> str:
    header = ("MODEL", "VERSION", "DEFAULT", "WORKERS", "READY", "MIN-MAX", "BATCH", "QUEUED")
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
        )
        for s in states
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows)


def run(args: argparse.Namespace) -> str:
    client = TorchServeClient(args.management_url.rstrip("/"), args.inference_url.rstrip("/"), Path(args.key_file))
    history = History(Path(args.history))
    deployer = Deployer(client, Path(args.store), Path(args.spec), history)
    upstream = args.inference_url.rstrip("/").split("//", 1)[-1]
    proxy = NginxProxy(Path(args.proxy_dir), int(args.proxy_port), upstream)
    if args.command == "status":
        states = status(client)
        return json.dumps([s.as_dict() for s in states], indent=2) if args.json else format_status(states)
    if args.command == "register":
        deployer.register(args.name, args.version)
        return f"registered {args.name} {args.version}"
    if args.command == "scale":
        deployer.scale(args.name, args.version, args.min_workers, args.max_workers)
        return f"scaled {args.name} {args.version} to {args.min_workers}-{args.max_workers} workers"
    if args.command == "retire":
        deployer.retire(args.name, args.version)
        return f"retired {args.name} {args.version}"
    if args.command == "promote":
        event = deployer.promote(args.name, args.version)
        if proxy.state_file.is_file():
            proxy.promoted(args.name, args.version)
        return (
            f"promoted {args.name} {args.version} (golden set {event['golden']}/{event['golden']} correct); "
            f"previous default {event['previous_default']} keeps serving until retired"
        )
    if args.command == "rollback":
        event = deployer.rollback(args.name)
        return f"rolled back {args.name}: default is {event['version']} again (was {event['previous_default']})"
    if args.command == "compare":
        report = deployer.compare(args.name, args.v1, args.v2, args.inputs)
        if args.json:
            return json.dumps(report, indent=2)
        lat = report["latency_ms"]
        return (
            f"{report['inputs']} inputs: top-1 agreement {report['agreement']:.1%}, probability difference "
            f"mean {report['mean_probability_diff']} max {report['max_probability_diff']}; latency p50 "
            f"{args.v1} {lat[args.v1]['p50']} ms, {args.v2} {lat[args.v2]['p50']} ms"
        )
    if args.command == "proxy":
        if args.action == "start":
            proxy.start()
            return f"proxy listening on {proxy.url()} in front of {upstream}"
        if args.action == "stop":
            proxy.stop()
            return "proxy stopped"
        pid = proxy.running_pid()
        return json.dumps({"running": pid is not None, "pid": pid, **proxy.state()}, indent=2)
    if args.command == "canary":
        if args.percent > 0:
            require_version(client, args.name, args.version)
        proxy.set_canary(args.name, args.version, args.percent)
        history.append("canary", args.name, version=args.version, percent=args.percent)
        if args.percent == 0:
            return f"canary of {args.name} {args.version} aborted: all traffic to the default"
        return f"canary: {args.percent}% of {args.name} traffic through {proxy.url()} goes to {args.version}"
    if args.command == "shadow":
        if not args.off:
            require_version(client, args.name, args.version)
        proxy.set_shadow(args.name, None if args.off else args.version)
        history.append("shadow-off" if args.off else "shadow", args.name, version=args.version)
        if args.off:
            return f"shadow of {args.name} {args.version} stopped"
        return f"shadow: every {args.name} request through {proxy.url()} is mirrored to {args.version}"
    if args.command == "history":
        return "\n".join(json.dumps(e, sort_keys=True) for e in history.events(args.name))
    raise DeployError(f"unknown command {args.command}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        output = run(args)
    except (DeployError, ProxyError) as exc:
        print(f"servekit: error: {exc}", file=sys.stderr)
        return 1
    if output:
        print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
