"""A Prometheus of our own beside ``make serve``: it scrapes the metrics and evaluates ``monitoring/rules``.

``PrometheusServer`` keeps everything under one prefix (``var/prometheus`` for ``make monitor``): the
rendered ``prometheus.yml``, the TSDB in ``data/``, ``prometheus.log`` and the pid file. It

1. renders the configuration (``render_config``, a pure function): every ``monitoring/rules/*.yml``
   by absolute path, one job per scrape target: ``servekit`` (the OIP front's ``/metrics``: the
   handler metrics and the exporter's gauges, docs/monitoring.md), ``torchserve`` (TorchServe's own
   ``/metrics``) and, when given, ``proxy``;
2. installs it only once ``promtool check config`` accepted it (which also checks the rule files);
3. starts ``prometheus`` in its own session on a loopback address and waits for ``/-/ready``;
4. stops it by its pid file, signalling only a process whose command line is this prefix's
   Prometheus (``servekit.serving.processes``): a stale pid file is reported and removed, nothing signalled.

    server = PrometheusServer(Path("var/prometheus"), listen="127.0.0.1:9090")
    server.start()          # returns once Prometheus is ready
    server.stop()           # True if it was running

    python -m servekit.serving.monitor start [--port 9090] [--interval 5] [--proxy 127.0.0.1:8090/metrics]
    python -m servekit.serving.monitor status | stop
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from servekit.errors import ServekitError, one_line
from servekit.files import atomic_write_text
from servekit.serving.oip_service import DEFAULT_HTTP_PORT
from servekit.serving.processes import command_line, stop_recorded, verified_pid
from servekit.serving.server import BASE_CONFIG, read_properties

REPO_ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = REPO_ROOT / "monitoring" / "rules"
DEFAULT_PREFIX = REPO_ROOT / "var" / "prometheus"
DEFAULT_PORT = 9090
DEFAULT_INTERVAL = 5.0
MAX_INTERVAL = 15.0  # the rules' 1-minute rates need at least 4 samples a minute
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


class MonitorError(ServekitError):
    """Prometheus could not be found, configured, started or stopped."""


class ScrapeTarget(NamedTuple):
    """One scrape job: ``job`` names it in every series (``job="servekit"``), ``address`` is host:port."""

    job: str
    address: str
    metrics_path: str = "/metrics"


def _warn(message: str) -> None:
    print(f"servekit: warning: {message}", file=sys.stderr)


def _binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        raise MonitorError(f"{name} is not installed (make tools installs Debian's prometheus package)")
    return path


def default_targets(config: Path = BASE_CONFIG, oip_port: int = DEFAULT_HTTP_PORT) -> list[ScrapeTarget]:
    """What ``make serve`` exposes: the OIP front on ``oip_port`` and TorchServe's ``metrics_address``."""
    address = read_properties(config).get("metrics_address", "http://127.0.0.1:8082")
    torchserve = address.split("://", 1)[-1].rstrip("/")
    return [ScrapeTarget("servekit", f"127.0.0.1:{oip_port}"), ScrapeTarget("torchserve", torchserve)]


def rule_files(rules_dir: Path = RULES_DIR) -> list[Path]:
    return sorted(Path(rules_dir).resolve().glob("*.yml"))


def duration(seconds: float) -> str:
    """Seconds as a Prometheus duration (``5s``, ``1500ms``)."""
    millis = round(seconds * 1000)
    if millis <= 0:
        raise MonitorError(f"an interval must be at least 1 ms, got {seconds!r} s")
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


def _quoted(text: str) -> str:
    """A YAML double-quoted scalar (the JSON string syntax is valid YAML)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_config(targets: Sequence[ScrapeTarget], rules: Sequence[Path], interval: float = DEFAULT_INTERVAL) -> str:
    """The whole ``prometheus.yml``: scrape and evaluate every ``interval`` s, the rule files by absolute path."""
    every = duration(interval)
    jobs = [target.job for target in targets]
    if len(set(jobs)) != len(jobs):
        raise MonitorError(f"scrape jobs must have distinct names, got {jobs}")
    lines = [
        "# Written by servekit.serving.monitor (make monitor): replaced at every start.",
        "global:",
        f"  scrape_interval: {every}",
        f"  scrape_timeout: {every}",
        f"  evaluation_interval: {every}",
        "rule_files:" if rules else "rule_files: []",
        *(f"  - {_quoted(str(Path(path).resolve()))}" for path in rules),
        "scrape_configs:",
    ]
    for target in targets:
        lines += [
            f"  - job_name: {_quoted(target.job)}",
            f"    metrics_path: {_quoted(target.metrics_path)}",
            "    static_configs:",
            f"      - targets: [{_quoted(target.address)}]",
        ]
    return "\n".join(lines) + "\n"


def _is_loopback(listen: str) -> bool:
    host, _, port = listen.rpartition(":")
    return host in LOOPBACK_HOSTS and port.isdigit()


def _port_in_use(listen: str) -> bool:
    host, _, port = listen.rpartition(":")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        return sock.connect_ex((host.strip("[]"), int(port))) == 0


def _http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    """Status and body of a GET; (0, reason) when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", "replace")
    except (OSError, urllib.error.URLError) as error:
        return 0, str(error)


@dataclass
class PrometheusServer:
    """One Prometheus, its files under ``prefix`` (see the module docstring)."""

    prefix: Path
    listen: str = f"127.0.0.1:{DEFAULT_PORT}"
    targets: list[ScrapeTarget] = field(default_factory=default_targets)
    interval: float = DEFAULT_INTERVAL  # seconds between scrapes and between rule evaluations
    retention: str = "6h"  # a local window onto serving, not an archive
    retention_size: str = "256MB"
    rules_dir: Path = RULES_DIR
    warn: Callable[[str], None] = field(default=_warn, kw_only=True)

    def __post_init__(self) -> None:
        self.prefix = Path(self.prefix).resolve()
        self.targets = [ScrapeTarget(*target) for target in self.targets]
        if not _is_loopback(self.listen):
            raise MonitorError(f"Prometheus listens on loopback only (127.0.0.1:PORT), not {self.listen!r}")
        if self.interval > MAX_INTERVAL:
            raise MonitorError(f"the interval must be at most {MAX_INTERVAL:.0f} s (the rules' 1-minute rates need "
                               f"4 samples a minute), got {self.interval:g} s")  # fmt: skip

    @property
    def config_file(self) -> Path:
        return self.prefix / "prometheus.yml"

    @property
    def data_dir(self) -> Path:
        return self.prefix / "data"

    @property
    def pid_file(self) -> Path:
        return self.prefix / "prometheus.pid"

    @property
    def log_file(self) -> Path:
        return self.prefix / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://{self.listen}"

    @property
    def fragments(self) -> tuple[str, ...]:
        """What our Prometheus's command line holds; nothing else is ever signalled."""
        return (f"--config.file={self.config_file}", f"--storage.tsdb.path={self.data_dir}")

    def render(self) -> str:
        return render_config(self.targets, rule_files(self.rules_dir), self.interval)

    def running_pid(self) -> int | None:
        """Our Prometheus's pid; a pid file naming anything else is reported, removed and never signalled."""
        return verified_pid(self.pid_file, self.fragments, warn=self.warn)

    def running_listen(self) -> str | None:
        """The address the running Prometheus listens on (from its command line), None when it is not running."""
        pid = self.running_pid()
        if pid is None:
            return None
        for argument in command_line(pid):
            if argument.startswith("--web.listen-address="):
                return argument.split("=", 1)[1]
        return None

    # ------------------------------------------------------------------ configuration
    def check_config(self, candidate: Path) -> None:
        result = subprocess.run([_binary("promtool"), "check", "config", str(candidate)],
                                capture_output=True, text=True, check=False)  # fmt: skip
        if result.returncode != 0:
            why = one_line(result.stderr.strip() or result.stdout)  # promtool says what failed on stderr
            raise MonitorError(f"promtool check config rejected the configuration: {why}")

    def install(self) -> None:
        """Write ``prometheus.yml`` once ``promtool check config`` accepts it; otherwise keep the old one."""
        self.prefix.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_file, self.render(), check=self.check_config)

    # ------------------------------------------------------------------ process
    def start(self, timeout: float = 30.0) -> None:
        """Install the configuration, start Prometheus and return once it answers ``/-/ready``."""
        if (pid := self.running_pid()) is not None:
            raise MonitorError(f"Prometheus is already running (pid {pid}): python -m servekit.serving.monitor stop")
        if _port_in_use(self.listen):
            raise MonitorError(f"{self.listen} is already in use: another Prometheus? (--port picks another port)")
        prometheus = _binary("prometheus")
        self.install()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            prometheus, f"--config.file={self.config_file}", f"--storage.tsdb.path={self.data_dir}",
            f"--storage.tsdb.retention.time={self.retention}", f"--storage.tsdb.retention.size={self.retention_size}",
            f"--web.listen-address={self.listen}", "--log.level=warn",
        ]  # fmt: skip
        log = open(self.log_file, "ab")  # noqa: SIM115 - handed to the child
        try:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True, cwd=self.prefix)  # fmt: skip
        finally:
            log.close()
        self.pid_file.write_text(str(process.pid))
        deadline = time.monotonic() + timeout
        while _http_get(f"{self.url}/-/ready", timeout=1.0)[0] != 200:
            if process.poll() is not None or time.monotonic() > deadline:
                why = "exited" if process.poll() is not None else f"was not ready within {timeout:.0f}s"
                self.stop()
                tail = self.log_file.read_text(errors="replace")[-400:]
                raise MonitorError(f"Prometheus {why} (log {self.log_file}): {one_line(tail)}")
            time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> bool:
        """Stop our Prometheus (SIGTERM, then SIGKILL after ``timeout`` s); False when it was not running."""
        return stop_recorded(self.pid_file, self.fragments, timeout, self.warn)

    # ------------------------------------------------------------------ queries
    def ready(self) -> bool:
        return _http_get(f"{self.url}/-/ready", timeout=1.0)[0] == 200


# ------------------------------------------------------------------------------------------ command line
def _proxy_target(value: str) -> ScrapeTarget:
    address, slash, path = value.partition("/")
    return ScrapeTarget("proxy", address, "/" + path if slash else "/metrics")


def print_usage(server: PrometheusServer) -> None:
    query = f"curl -s {server.url}/api/v1/query --data-urlencode 'query=servekit:requests:rate1m'"
    rules = ", ".join(str(path.relative_to(REPO_ROOT)) for path in rule_files(server.rules_dir)) or "none"
    jobs = "".join(f"\n  {t.job:<11} http://{t.address}{t.metrics_path}" for t in server.targets)
    print(
        f"""Prometheus is ready on {server.url} (loopback only), scraping every {duration(server.interval)}:{jobs}
rules:  {rules}; files under {server.prefix}
query:  {query}
alerts: curl -s {server.url}/api/v1/alerts    (or open {server.url}/alerts)
stop:   make stop    (or python -m servekit.serving.monitor stop)"""
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m servekit.serving.monitor", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="start: Prometheus's loopback port (9090)")
    parser.add_argument("--interval", type=float, default=DEFAULT_INTERVAL,
                        help="start: seconds between scrapes and between rule evaluations (5)")  # fmt: skip
    parser.add_argument("--proxy", type=_proxy_target, metavar="HOST:PORT[/PATH]",
                        help="start: also scrape this address as job 'proxy' (path /metrics unless given)")  # fmt: skip
    parser.add_argument("--prefix", type=Path, default=DEFAULT_PREFIX, help="its files (var/prometheus)")
    args = parser.parse_args(argv)
    try:
        targets = default_targets()
        if args.proxy is not None:
            targets.append(args.proxy)
        server = PrometheusServer(args.prefix, listen=f"127.0.0.1:{args.port}", targets=targets,
                                  interval=args.interval)  # fmt: skip
        if args.command == "start":
            server.start()
            print_usage(server)
        elif args.command == "stop":
            pid = server.running_pid()
            print(f"stopped Prometheus (pid {pid})" if server.stop() else "Prometheus is not running")
        else:
            listen = server.running_listen()
            if listen is None:
                print("Prometheus is not running (make monitor starts it)")
                return 3
            server.listen = listen
            state = "ready" if server.ready() else "not ready"
            print(f"Prometheus is running (pid {server.running_pid()}) on {server.url}, {state}")
    except ServekitError as error:
        print(f"servekit: error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
