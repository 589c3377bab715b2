"""HandlerConfig: one typed definition from the spec, through the archive, to the worker."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import pytest
import yaml

from handlers.base import BatchHandler
from handlers.config import Faults, HandlerConfig, ImageClassifierConfig, RuntimeConfig
from handlers.detection import DetectorConfig
from handlers.image_io import DecodeLimits
from handlers.metrics import PredictionLogConfig
from handlers.tabular import TabularConfig
from handlers.transforms import Preprocessing
from servekit.build.spec import load_spec
from tests.fake_context import FakeContext

TASK_CONFIGS = (ImageClassifierConfig, TabularConfig, DetectorConfig)


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


# ------------------------------------------------------------------------------------------ the shared base
def test_every_task_config_is_a_runtime_config_and_the_old_name_still_works() -> None:
    assert HandlerConfig is ImageClassifierConfig
    for config_type in TASK_CONFIGS:
        assert issubclass(config_type, RuntimeConfig)
        shared = {"precision", "labels_file", "threads", "quantized_engine", "optimize"}
        assert shared <= set(config_type().to_dict())
        assert not {"faults", "prediction_log"} & set(config_type().to_dict())  # absent, not null


@pytest.mark.parametrize("config_type", TASK_CONFIGS)
@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"precision": "fp16"}, "precision: must be one of ['fp32', 'int8', 'bf16'], got 'fp16'"),
        ({"labels_file": "a/labels.json"}, "labels_file: must be a file name inside the archive, got 'a/labels.json'"),
        ({"labels_file": ""}, "labels_file: must be a file name inside the archive, got ''"),
        ({"quantized_engine": "fast"}, "quantized_engine: must be one of ['x86', 'fbgemm', 'qnnpack'], got 'fast'"),
        ({"optimize": "yes"}, "optimize: must be true or false, got 'yes'"),
        ({"faults": {"error_rate": 2}}, "faults.error_rate: must be a number from 0.0 to 1.0, got 2"),
        ({"faults": [1]}, "faults: must be a mapping (error_rate, delay_ms, start_after), got [1]"),
        ({"prediction_log": {"sample_rate": -1}}, "prediction_log.sample_rate: must be a number from 0.0 to 1.0"),
        ({"colour": "RGB"}, "colour: unknown key in the handler section (valid keys: "),
    ],
)
def test_the_shared_fields_are_validated_alike_for_every_task(config_type: type, data: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        config_type.from_dict(data)
    assert message in str(info.value)


@pytest.mark.parametrize("config_type", TASK_CONFIGS)
def test_the_shared_sub_sections_round_trip_for_every_task(config_type: type) -> None:
    config = config_type.from_dict(
        {"threads": 2, "faults": {"error_rate": 0.25, "start_after": 4}, "prediction_log": {"sample_rate": 0.5}}
    )
    assert config.faults == Faults(error_rate=0.25, start_after=4)
    assert config.prediction_log == PredictionLogConfig(sample_rate=0.5)
    assert config_type.from_dict(config.to_dict()) == config
    assert config.to_dict()["faults"] == {"error_rate": 0.25, "delay_ms": 0, "start_after": 4}


def test_threads_keep_each_task_s_bounds() -> None:
    for config_type in (ImageClassifierConfig, DetectorConfig):
        assert config_type(threads=2048).threads == 2048
        with pytest.raises(ValueError, match=r"threads: must be a positive integer, got 0"):
            config_type(threads=0)
    with pytest.raises(ValueError, match=r"threads: must be an integer from 1 to 1024, got 2048"):
        TabularConfig(threads=2048)


@dataclasses.dataclass(frozen=True)
class TextConfig(RuntimeConfig):
    """A user's handler config: the shared fields, and one of its own."""

    max_chars: int = 2000

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.max_chars, int) or isinstance(self.max_chars, bool) or self.max_chars < 1:
            raise ValueError(f"max_chars: must be a positive integer, got {self.max_chars!r}")


def test_a_user_config_declares_only_its_own_field_and_round_trips() -> None:
    config = TextConfig.from_dict({"max_chars": 80, "precision": "int8", "faults": {"delay_ms": 5}})
    assert (config.max_chars, config.precision, config.faults) == (80, "int8", Faults(delay_ms=5))
    data = config.to_dict()
    assert data == {
        "precision": "int8", "labels_file": "labels.json", "threads": None, "quantized_engine": "x86",
        "optimize": True, "faults": {"error_rate": 0.0, "delay_ms": 5, "start_after": 0}, "max_chars": 80,
    }  # fmt: skip
    assert TextConfig.from_dict(yaml.safe_load(yaml.safe_dump(data))) == config  # through model-config.yaml
    assert TextConfig.from_dict(None) == TextConfig()
    with pytest.raises(ValueError, match=r"max_chars: must be a positive integer, got 0"):
        TextConfig.from_dict({"max_chars": 0})
    with pytest.raises(ValueError, match=r"precision: must be one of"):  # the base's checks apply
        TextConfig.from_dict({"precision": "fp8"})
    with pytest.raises(ValueError, match=r"topk: unknown key in the handler section \(valid keys: .*max_chars"):
        TextConfig.from_dict({"topk": 5})


class TextHandler(BatchHandler):
    """The least a handler of one's own implements for ``initialize`` to run (no model: echoes its inputs)."""

    config_type = TextConfig

    def load(self, context, config) -> None:
        self.loaded_with = (config, dict(self.options))

    def warmup_items(self, batch_size: int) -> list:
        return ["warm"] * batch_size

    def inference(self, items: list) -> list:
        return items

    def postprocess(self, outputs: list, items: list) -> list:
        return list(outputs)


def test_a_user_handler_gets_its_typed_settings_and_free_form_options() -> None:
    yaml_config = {"handler": {"max_chars": 10, "threads": 1}, "handler_options": {"lowercase": True, "n": [1, 2]}}
    handler = TextHandler()
    handler.initialize(FakeContext(model_yaml_config=yaml_config, batch_size=2))
    assert handler.settings == TextConfig(max_chars=10, threads=1)
    assert handler.options == {"lowercase": True, "n": [1, 2]}
    assert handler.loaded_with == (handler.settings, handler.options)  # both set before load
    bare = TextHandler()
    bare.initialize(FakeContext())
    assert (bare.settings, bare.options) == (TextConfig(), {})


def test_handler_options_that_are_not_a_mapping_refuse_the_archive() -> None:
    with pytest.raises(RuntimeError, match=r"handler_options in model-config.yaml must be a mapping .*got list"):
        TextHandler().initialize(FakeContext(model_yaml_config={"handler_options": ["lowercase"]}))
