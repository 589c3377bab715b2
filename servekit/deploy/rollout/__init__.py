"""Progressive delivery: a canary walked through steps, then promoted or rolled back from live figures.

``servekit rollout NAME VERSION`` registers VERSION if needed, checks its golden set, sets the
canary at each step (default 10, 25, 50, 100 %), judges each step's window and advances or aborts,
then promotes; any failure or Ctrl-C puts the canary back to 0 and leaves the default as it was.
One module per job:

==================  ==================================================================================
``sources``         where a step window's figures come from: the proxy's request log (``RequestLog``),
                    the handler metrics page, Prometheus; ``select_source`` (``--source``, ``auto``)
``judging``         ``Thresholds``, ``Figures``, ``Window``; ``analyse`` (error rate, p99 ratio) and
                    ``class_drift`` (PSI of the canary's class mix): the rules
``settings``        ``BUILT_IN``, ``parse_steps``, ``Settings.resolve``: flag, else spec, else default;
                    the spec's ``rollout:`` section (``RolloutSpec``, ``rollout_settings``)
``status``          ``rollout-NAME.json`` (``StatusFile``, ``read_status``) and the process it names
                    (``RolloutProcess``: pid and command line, never the pid alone)
``run``             ``Rollout.run``: the walk, the per-change locking, the clean abort, SIGINT/SIGTERM
``formatting``      ``format_event`` (progress lines) and ``format_status`` (``rollout --status``)
==================  ==================================================================================

    source = ProxyLogSource(RequestLog(proxy.request_log))    # or MetricsPageSource, PrometheusSource
    rollout = Rollout(deployer, source, lock=lambda what: StateLock(path, holder=what),
                      status=StatusFile(status_path(proxy.prefix, "digits")))
    rollout.run("digits", "2.0")   # the rollout-done event, or raises RolloutAborted

Nothing here imports torch or the build side.
"""

from servekit.deploy.rollout.formatting import format_event, format_status
from servekit.deploy.rollout.judging import (
    Analysis,
    DriftCheck,
    Figures,
    Thresholds,
    Window,
    analyse,
    class_drift,
    p99,
)
from servekit.deploy.rollout.run import Rollout, RolloutAborted
from servekit.deploy.rollout.settings import (
    BUILT_IN,
    DEFAULT_STEPS,
    RolloutSpec,
    Settings,
    parse_steps,
    rollout_settings,
)
from servekit.deploy.rollout.sources import (
    SOURCES,
    LogRecord,
    MetricsPageSource,
    PrometheusSource,
    ProxyLogSource,
    RequestLog,
    log_window,
    metric_figures,
    metrics_window,
    select_source,
)
from servekit.deploy.rollout.status import RolloutProcess, StatusFile, read_status, status_path

__all__ = [
    "BUILT_IN",
    "DEFAULT_STEPS",
    "SOURCES",
    "Analysis",
    "DriftCheck",
    "Figures",
    "LogRecord",
    "MetricsPageSource",
    "PrometheusSource",
    "ProxyLogSource",
    "RequestLog",
    "Rollout",
    "RolloutAborted",
    "RolloutProcess",
    "RolloutSpec",
    "Settings",
    "StatusFile",
    "Thresholds",
    "Window",
    "analyse",
    "class_drift",
    "format_event",
    "format_status",
    "log_window",
    "metric_figures",
    "metrics_window",
    "p99",
    "parse_steps",
    "read_status",
    "rollout_settings",
    "select_source",
    "status_path",
]
