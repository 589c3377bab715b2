"""One stand-in for TorchServe's ``ts.context.Context``, for every handler test in process.

It holds what a handler reads (``system_properties``, ``manifest``, ``model_yaml_config``, the request
headers and TorchServe's request IDs) and records what it writes per request (status and phrase,
content type, response headers), with the getters TorchServe's own ``create_predict_response`` reads
back when it frames a reply.

    context = FakeContext.from_archive(unpacked_dir)                 # or FakeContext(manifest=..., ...)
    context.reset(headers=[{}, {"X-Request-ID": "c-1"}], request_ids=["ts-1", "ts-2"])   # the next batch
    handler.handle(batch, context); context.statuses[1]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


class FakeContext:
    """The parts of ts.context.Context a handler uses, recording the per-request responses."""

    def __init__(
        self,
        model_dir: Path | None = None,
        manifest: dict | None = None,
        model_yaml_config: dict | None = None,
        batch_size: int = 1,
    ) -> None:
        self.system_properties = {
            "model_dir": str(model_dir) if model_dir is not None else None, "batch_size": batch_size, "gpu_id": None,
        }  # fmt: skip
        self.manifest = manifest or {}
        self.model_yaml_config = model_yaml_config or {}
        self.model_name = self.manifest.get("model", {}).get("modelName", "?")
        self.statuses: dict[int, tuple[int, str]] = {}
        self.content_types: dict[int, str] = {}
        self.response_headers: dict[int, dict[str, str]] = {}
        self.request_headers: list[dict[str, str]] = []
        self.request_ids: list[str] = []  # TorchServe's ID per request of the batch; "-" where none is set
        self.stopping_criteria = None  # read by TorchServe's create_predict_response

    @classmethod
    def from_archive(cls, model_dir: Path, batch_size: int | None = None, **yaml_overrides: Any) -> FakeContext:
        """A context for an unpacked archive: its MANIFEST.json and model-config.yaml (``yaml_overrides`` on top)."""
        manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
        config = yaml.safe_load((model_dir / manifest["model"]["configFile"]).read_text())
        config.update(yaml_overrides)
        return cls(model_dir, manifest, config, batch_size or config["batchSize"])

    # ------------------------------------------------------------------ what a handler writes
    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.content_types[idx] = value

    def set_response_header(self, idx: int, key: str, value: str) -> None:
        self.response_headers.setdefault(idx, {})[key] = value

    def get_all_request_header(self, idx: int) -> dict[str, str]:
        return self.request_headers[idx] if idx < len(self.request_headers) else {}

    def get_request_id(self, idx: int) -> str:
        return self.request_ids[idx] if idx < len(self.request_ids) else "-"

    # ------------------------------------------------------------------ what TorchServe reads back
    def get_response_content_type(self, idx: int) -> str | None:
        return self.content_types.get(idx)

    def get_response_status(self, idx: int) -> tuple[int | None, str | None]:
        return self.statuses.get(idx, (None, None))

    def get_response_headers(self, idx: int) -> dict[str, str]:
        return self.response_headers.get(idx, {})

    def reset(self, headers: list[dict[str, str]] | None = None, request_ids: list[str] | None = None) -> None:
        """Forget the recorded responses; ``headers``, ``request_ids``: the next batch's."""
        self.statuses.clear()
        self.content_types.clear()
        self.response_headers.clear()
        self.request_headers = headers or []
        self.request_ids = request_ids or []
