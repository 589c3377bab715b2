"""``servekit``: register, scale, promote, roll back and compare model versions on TorchServe.

    servekit status [--json]
    servekit register NAME VERSION        # sha256 checked against model_store/manifest.json first
    servekit scale NAME VERSION --min N --max M [--drain-timeout S]   # the default never to 0 workers
    servekit retire NAME VERSION [--drop-routes] [--drain-timeout S]  # never the default, the last
                                          # version, or one the proxy routes to (unless --drop-routes)
    servekit promote NAME VERSION         # golden set must pass, then set-default (blue-green)
    servekit rollback NAME                # undo the latest promotion not yet undone (golden set first)
    servekit compare NAME V1 V2 --inputs DIR
    servekit history [NAME]
    servekit proxy start|stop|status      # nginx in front of TorchServe (--proxy-port, default 8090)
    servekit canary NAME VERSION --percent P   # P % of /predictions/NAME through the proxy; 0 aborts
    servekit shadow NAME VERSION [--off]  # mirror every request to VERSION, answers discarded

Connection settings default to this repository's config.properties and ``make serve``'s files;
override them with flags or SERVEKIT_MANAGEMENT_URL, SERVEKIT_INFERENCE_URL, SERVEKIT_KEY_FILE,
SERVEKIT_STORE, SERVEKIT_SPEC, SERVEKIT_HISTORY, SERVEKIT_PROXY_DIR, SERVEKIT_LOCK_TIMEOUT. Every
command that changes something (register, scale, retire, promote, rollback, canary, shadow, proxy
start/stop) holds one lock, ``servekit.lock`` beside the history, and waits at most
``--lock-timeout`` seconds for it. Errors print one line and exit with status 1.
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

from servekit.ops.proxy import NginxProxy, ProxyError
from servekit.ops.server import BASE_CONFIG, REPO_ROOT, read_properties
from servekit.ops.state_lock import StateLock, StateLockError
from servekit.ops.workflows import Deployer, DeployError, History, TorchServeClient, require_version, status

LOCK_NAME = "servekit.lock"


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
        "lock_timeout": "60",
    }


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes end like every other failure: one ``servekit: error:`` line and status 1."""

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"servekit: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    defaults = _defaults()
    parser = OneLineParser(prog="servekit", description=__doc__.splitlines()[0])
    for name, value in defaults.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(
            flag,
            default=os.environ.get(f"SERVEKIT_{name.upper()}", value),
            type=float if name == "lock_timeout" else str,
            help=f"(default {value})",
        )
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("status", help="models, versions, default, workers, queue")
    show.add_argument("--json", action="store_true")
    for name, text in (("register", "register a built version"), ("promote", "golden set, then make it the default")):
        command = commands.add_parser(name, help=text)
        command.add_argument("name")
        command.add_argument("version")
    retire = commands.add_parser("retire", help="unregister a version (never the default, the last, or a routed one)")
    retire.add_argument("name")
    retire.add_argument("version")
    retire.add_argument(
        "--drop-routes", action="store_true", help="remove the proxy's canary/shadow routes to it first"
    )
    scale = commands.add_parser("scale", help="set a version's worker range")
    scale.add_argument("name")
    scale.add_argument("version")
    scale.add_argument("--min", type=int, required=True, dest="min_workers")
    scale.add_argument("--max", type=int, required=True, dest="max_workers")
    for command in (retire, scale):
        command.add_argument(
            "--drain-timeout", type=float, default=30.0, help="seconds to wait for its queue to empty (0: do not wait)"
        )
    rollback = commands.add_parser("rollback", help="undo the latest promotion not yet undone (golden set first)")
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


@dataclass
class Context:
    """What every subcommand works with, built once from the global flags."""

    args: argparse.Namespace
    client: TorchServeClient
    history: History
    proxy: NginxProxy
    deployer: Deployer

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Context:
        client = TorchServeClient(args.management_url.rstrip("/"), args.inference_url.rstrip("/"), Path(args.key_file))
        history = History(Path(args.history))
        upstream = args.inference_url.rstrip("/").split("//", 1)[-1]
        proxy = NginxProxy(Path(args.proxy_dir), int(args.proxy_port), upstream)
        return cls(args, client, history, proxy, Deployer(client, Path(args.store), Path(args.spec), history, proxy))


def cmd_status(ctx: Context) -> str:
    states = status(ctx.client)
    return json.dumps([s.as_dict() for s in states], indent=2) if ctx.args.json else format_status(states)


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
    a = ctx.args
    if ctx.proxy.state_file.is_file():
        ctx.proxy.state()  # a corrupt proxy state stops us before the default changes, not after
    event = ctx.deployer.promote(a.name, a.version)
    if ctx.proxy.state_file.is_file():
        ctx.proxy.promoted(a.name, a.version)
    return (
        f"promoted {a.name} {a.version} (golden set {event['golden']}/{event['golden']} correct); "
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


def cmd_proxy(ctx: Context) -> str:
    proxy = ctx.proxy
    if ctx.args.action == "start":
        proxy.start()
        return f"proxy listening on {proxy.url()} in front of {proxy.upstream}"
    if ctx.args.action == "stop":
        proxy.stop()
        return "proxy stopped"
    pid = proxy.running_pid()
    return json.dumps({"running": pid is not None, "pid": pid, **proxy.state()}, indent=2)


def cmd_canary(ctx: Context) -> str:
    a = ctx.args
    if a.percent > 0:
        require_version(ctx.client, a.name, a.version)
    ctx.proxy.set_canary(a.name, a.version, a.percent)
    ctx.history.append("canary", a.name, version=a.version, percent=a.percent)
    if a.percent == 0:
        return f"canary of {a.name} {a.version} aborted: all traffic to the default"
    return f"canary: {a.percent}% of {a.name} traffic through {ctx.proxy.url()} goes to {a.version}"


def cmd_shadow(ctx: Context) -> str:
    a = ctx.args
    if not a.off:
        require_version(ctx.client, a.name, a.version)
    ctx.proxy.set_shadow(a.name, None if a.off else a.version)
    ctx.history.append("shadow-off" if a.off else "shadow", a.name, version=a.version)
    if a.off:
        return f"shadow of {a.name} {a.version} stopped"
    return f"shadow: every {a.name} request through {ctx.proxy.url()} is mirrored to {a.version}"


def cmd_history(ctx: Context) -> str:
    return "\n".join(json.dumps(e, sort_keys=True) for e in ctx.history.events(ctx.args.name))


COMMANDS: dict[str, Callable[[Context], str]] = {
    "status": cmd_status,
    "register": cmd_register,
    "scale": cmd_scale,
    "retire": cmd_retire,
    "promote": cmd_promote,
    "rollback": cmd_rollback,
    "compare": cmd_compare,
    "proxy": cmd_proxy,
    "canary": cmd_canary,
    "shadow": cmd_shadow,
    "history": cmd_history,
}
READ_ONLY = {"status", "compare", "history"}


def changes_state(args: argparse.Namespace) -> bool:
    """Whether the command writes TorchServe, the proxy or the history: those run under the state lock."""
    if args.command == "proxy":
        return args.action != "status"
    return args.command not in READ_ONLY


def run(args: argparse.Namespace, description: str = "servekit") -> str:
    ctx = Context.from_args(args)
    command = COMMANDS[args.command]
    if not changes_state(args):
        return command(ctx)
    # One lock for every state-changing command, next to the history it appends to.
    with StateLock(Path(args.history).parent / LOCK_NAME, timeout=args.lock_timeout, holder=description):
        return command(ctx)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        output = run(args, description=_describe(argv, args))
    except (DeployError, ProxyError, StateLockError, OSError) as exc:
        return _fail(str(exc))
    except Exception as exc:  # a bug: still one line, with the traceback on request
        if os.environ.get("SERVEKIT_DEBUG"):
            raise
        return _fail(f"internal error: {type(exc).__name__}: {exc} (SERVEKIT_DEBUG=1 shows the traceback)")
    if output:
        print(output)
    return 0


def _describe(argv: list[str], args: argparse.Namespace) -> str:
    """The command as the lock's holder line shows it: from the subcommand on, without global flags."""
    start = argv.index(args.command) if args.command in argv else 0
    return " ".join(["servekit", *argv[start:]])


def _fail(message: str) -> int:
    print(f"servekit: error: {' '.join(message.split())}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
