"""HandlerConfig: one typed definition from the spec, through the archive, to the worker."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import pytest
import yaml

from handlers.config import HandlerConfig
from handlers.image_io import DecodeLimits
from handlers.transforms import Preprocessing
from servekit.build.spec import load_spec


def test_defaults_round_trip() -> None:
    config = HandlerConfig()
    assert HandlerConfig.from_dict(config.to_dict()) == config
    assert HandlerConfig.from_dict(None) == config
    assert config.preprocessing == Preprocessing()
    assert config.limits == DecodeLimits()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"precision": "fp16"}, "precision: must be one of ['fp32', 'int8', 'bf16'], got 'fp16'"),
        ({"topk": 0}, "topk: must be a positive integer, got 0"),
        ({"topk": True}, "topk: must be a positive integer, got True"),
        ({"threads": -2}, "threads: must be a positive integer, got -2"),
        ({"labels_file": "../etc/passwd"}, "labels_file: must be a file name inside the archive"),
        ({"quantized_engine": "fast"}, "quantized_engine: must be one of ['x86', 'fbgemm', 'qnnpack'], got 'fast'"),
        ({"optimize": "yes"}, "optimize: must be true or false, got 'yes'"),
        ({"colour": "RGB"}, "colour: unknown key in the handler section"),
        ({"limits": {"max_bytes": -1}}, "max_bytes"),
        ({"preprocessing": {"crop": 0}}, "crop: must be a positive integer, got 0"),
    ],
)
def test_bad_values_are_refused_with_the_key(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        HandlerConfig.from_dict(data)
    assert message in str(info.value)


def test_what_the_build_writes_is_what_the_worker_reads(repo_root: Path, model_store: Path) -> None:
    for spec in load_spec(repo_root / "models.yaml"):
        with zipfile.ZipFile(model_store / spec.archive_name) as archive:
            section = yaml.safe_load(archive.read("model-config.yaml"))["handler"]
            tuned = json.loads(archive.read("metadata.json"))["tuned"]
        if "options" in tuned:  # chosen at build time (Task.tune: the detector's score threshold)
            spec = dataclasses.replace(spec, options=spec.task.parse_options(tuned["options"]))
        config_type = type(spec.handler_config())  # each task's handler has its own (HandlerConfig: images)
        assert config_type.from_dict(section) == spec.handler_config()
        assert set(section) == set(config_type().to_dict())  # every key written, defaults included
