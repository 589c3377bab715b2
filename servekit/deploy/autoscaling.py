"""Scaling on the queue: KEDA's ScaledObject for the Deployment, and the same signal for KServe's Standard mode.

The signal is ``servekit_queue_pending`` (the exporter's gauge of requests waiting in each version's
job queue, read from TorchServe's management API at scrape time; docs/monitoring.md): summed over the
pods, KEDA divides it by the replicas (``AverageValue``) and adds pods while each holds more than
``queue_per_pod`` waiting requests, the requests one pod works on at once (the default versions'
``maxWorkers x batchSize``). CPU (``HPA_CPU_UTILIZATION`` %) is a second trigger: KEDA's HPA takes
the larger of the two proposals, so a pod saturated on CPU with an empty queue still scales, and when
Prometheus cannot be read KEDA's ``fallback`` holds at least the configured replicas.

    query = queue_query(deployment_series("servekit", "servekit"))
    scaled = render_scaled_object(record, "servekit", labels)   # keda.sh/v1alpha1 ScaledObject

Pure functions of their arguments: ``servekit.deploy.bundle`` calls them with its record and names.

Every metric name a query uses is one of ``QUEUE_METRIC``'s family, which the integration test
``tests/integration/test_monitoring.py`` reads back from a real server's scrape.
"""

from __future__ import annotations

from typing import Any

__all__ = ["QUEUE_METRIC", "SCRAPE_JOB", "deployment_series", "predictor_series", "queue_query", "render_scaled_object"]

QUEUE_METRIC = "servekit_queue_pending"  # servekit.serving.exporter.StateCollector: model, version
SCRAPE_JOB = "servekit"  # the PodMonitor names servekit's page so (as `make monitor` does; the rules' up{job=~})
KEDA_POLLING_S = 15
KEDA_COOLDOWN_S = 300  # as the HPA's scale-down stabilization: each pod drains before the next goes
KEDA_FALLBACK_FAILURES = 3


def _matchers(labels: dict[str, str]) -> str:
    return ",".join(f'{key}="{value}"' if not value.startswith("~") else f'{key}=~"{value[1:]}"'
                    for key, value in labels.items())  # fmt: skip


def queue_query(labels: dict[str, str]) -> str:
    """Requests waiting in the job queues of the selected pods, each pod counted once per version.

    ``labels`` select the series (a value starting with ``~`` is a regular expression); ``max by``
    keeps a page scraped twice from counting twice (the convention of ``monitoring/rules``).
    """
    return f"sum(max by (pod, model, version) ({QUEUE_METRIC}{{{_matchers(labels)}}}))"


def deployment_series(namespace: str, app: str) -> dict[str, str]:
    """The labels a PodMonitor gives the series of ``deployment/app``'s pods (NAME-HASH-SUFFIX, container app)."""
    return {"namespace": namespace, "job": SCRAPE_JOB, "container": app, "pod": f"~{app}-[a-z0-9]+-[a-z0-9]+"}


def predictor_series(namespace: str, isvc: str, container: str) -> dict[str, str]:
    """The same for a KServe InferenceService's predictor pods in Standard mode (Deployment ISVC-predictor)."""
    return {"namespace": namespace, "job": SCRAPE_JOB, "container": container,
            "pod": f"~{isvc}-predictor-[a-z0-9]+-[a-z0-9]+"}  # fmt: skip


def render_scaled_object(record: dict, app: str, labels: dict[str, str]) -> dict[str, Any]:
    """KEDA's ScaledObject for ``deployment/app``: the queue through Prometheus, CPU beside it, a fallback."""
    scaling = record["autoscaling"]
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": app, "namespace": record["namespace"], "labels": dict(labels)},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": app},
            "minReplicaCount": record["replicas"],
            "maxReplicaCount": record["max_replicas"],
            "pollingInterval": KEDA_POLLING_S,
            "cooldownPeriod": KEDA_COOLDOWN_S,
            # Prometheus unreadable 3 polls in a row: keep the current count if higher, else the floor.
            "fallback": {
                "failureThreshold": KEDA_FALLBACK_FAILURES,
                "replicas": record["replicas"],
                "behavior": "currentReplicasIfHigher",
            },  # fmt: skip
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    "behavior": {
                        "scaleDown": {
                            "stabilizationWindowSeconds": KEDA_COOLDOWN_S,
                            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
                        }
                    }
                }
            },
            "triggers": [
                {
                    "type": "prometheus",
                    "name": "queue",
                    "metricType": "AverageValue",
                    "metadata": {
                        "serverAddress": scaling["prometheus_url"],
                        "query": scaling["deployment_query"],
                        "threshold": str(scaling["queue_per_pod"]),
                        "ignoreNullValues": "true",  # no series yet (a fresh pod): 0, not an error
                    },
                },
                {
                    "type": "cpu",
                    "name": "cpu",
                    "metricType": "Utilization",
                    "metadata": {"value": str(scaling["cpu_utilization"])},
                },  # fmt: skip
            ],
        },
    }
