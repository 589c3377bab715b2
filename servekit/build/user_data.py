"""The user's own data, named ``data`` in the spec: an image folder or a CSV table.

    data: {folder: shapes}                         # image_classifier: ImageFolder layout
    data: {csv: patients.csv, target: outcome}     # tabular_classifier: one row per record
    data: {csv: train.csv, val_csv: val.csv, target: outcome}

A version with a ``data:`` section can name it wherever a bundled data set is named
(``evaluation: data``, ``weights: {train: data}``, ``quantization.calibration: data``), and by
default it is the evaluation data (so an INT8 or BF16 version is gated on it) and the
calibration data. The ``train`` split serves training and calibration, the held-out split
(``val``) the accuracy gate, the metric in ``metadata.json``, the drift reference and
``golden_set: auto``.

Image folder: ``DIR/train/<label>/*`` and ``DIR/val/<label>/*``; labels are the sorted folder
names of ``train`` unless the spec gives ``labels`` (then every folder must be one of them).
Images are decoded as the handler decodes a request (``handlers.image_io.decode_image``), so an
image the server would refuse is refused here, by name.

CSV: a header row, the ``target`` column (any values: the class names, sorted, unless the spec
gives ``labels``) and numeric feature columns (every other column, in file order). Without
``val_csv`` a seeded, stratified 25 % of the rows is held out.

Both are fingerprinted by content (sha256 over every file's relative path and bytes): changing
one image or row makes a different version, moving the folder does not.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from servekit.build.splits import LabelledImages, TabularData

DATA = "data"  # the name the rest of the spec calls the user's data by
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
SPLITS = {"train": "train", "holdout": "val"}  # the build's split names -> the folder's
SPLIT_SEED = 0
HOLDOUT_FRACTION = 0.25
GOLDEN_PER_CLASS = 2


class DataError(ValueError):
    """A mistake in the user's data; the message starts with the field (``data.folder: ...``)."""


def _digest(root: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _check_mapping(value: Any, keys: set[str], example: str) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"data: must be a mapping such as {example}, got {value!r}")
    unknown = sorted(set(value) - keys)
    if unknown:
        raise DataError(f"data.{unknown[0]}: unknown key (valid keys: {', '.join(sorted(keys))})")
    return value


# ------------------------------------------------------------------------------------------ image folder
@dataclass(frozen=True)
class ImageFolder:
    """An ImageFolder data set: its files by split, each with its label index, and a content digest."""

    folder: str
    labels: tuple[str, ...]
    train: tuple[tuple[str, int], ...]
    val: tuple[tuple[str, int], ...]
    sha256: str

    kind = "folder"

    @property
    def source(self) -> str:
        return f"image folder {Path(self.folder).name}"

    def files(self, split: str) -> tuple[tuple[str, int], ...]:
        return {"train": self.train, "holdout": self.val}[split]

    def to_dict(self) -> dict:
        """What the fingerprint holds: the content, not where the folder is."""
        return {"folder": Path(self.folder).name, "sha256": self.sha256, "train": len(self.train), "val": len(self.val)}

    def golden(self, per_class: int = GOLDEN_PER_CLASS) -> list[tuple[str, str]]:
        """The first ``per_class`` held-out files of each class, as (path, label)."""
        chosen: list[tuple[str, str]] = []
        for index, label in enumerate(self.labels):
            chosen += [(path, label) for path, i in self.val if i == index][:per_class]
        return chosen


def _label_folders(split_dir: Path, field: str) -> dict[str, list[Path]]:
    if not split_dir.is_dir():
        raise DataError(f"{field}: {split_dir} is missing: the layout is DIR/train/<label>/* and DIR/val/<label>/*")
    folders: dict[str, list[Path]] = {}
    for entry in sorted(split_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            raise DataError(f"{field}: {entry} is not a label folder (the layout is {split_dir.name}/<label>/<image>)")
        images = sorted(p for p in entry.rglob("*") if p.is_file() and not p.name.startswith("."))
        others = [p for p in images if p.suffix.lower() not in IMAGE_SUFFIXES]
        if others:
            suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
            raise DataError(f"{field}: {others[0]} is not an image file (suffixes: {suffixes})")
        if not images:
            raise DataError(f"{field}: label folder {entry} has no images")
        folders[entry.name] = images
    if not folders:
        raise DataError(f"{field}: {split_dir} has no label folders (the layout is {split_dir.name}/<label>/<image>)")
    return folders


def image_folder(value: Any, base_dir: Path, labels: tuple[str, ...] | None) -> ImageFolder:
    """Check ``data: {folder: DIR}`` (layout, labels, no empty class) and fingerprint it; decodes nothing."""
    _check_mapping(value, {"folder"}, "{folder: path/to/images}")
    if not isinstance(value.get("folder"), str) or not value["folder"]:
        raise DataError("data.folder: must be the path of an image folder (DIR/train/<label>/*, DIR/val/<label>/*)")
    root = (base_dir / value["folder"]).resolve()
    if not root.is_dir():
        raise DataError(f"data.folder: folder not found: {root}")
    train = _label_folders(root / "train", "data.folder")
    val = _label_folders(root / "val", "data.folder")
    missing = sorted(set(val) - set(train))
    if missing:
        raise DataError(f"data.folder: val label {missing[0]!r} has no train folder (train labels: {sorted(train)})")
    if labels is None:
        labels = tuple(sorted(train))
        if len(labels) < 2:
            raise DataError(f"data.folder: {root / 'train'} has one label folder {labels[0]!r}; a classifier needs 2+")
    else:
        unknown = sorted(set(train) - set(labels))
        if unknown:
            raise DataError(f"data.folder: label folder {unknown[0]!r} is not one of the spec's labels {list(labels)}")
    index = {label: i for i, label in enumerate(labels)}

    def listed(folders: dict[str, list[Path]]) -> tuple[tuple[str, int], ...]:
        return tuple((str(path), index[label]) for label in sorted(folders) for path in folders[label])

    every = [path for folders in (train, val) for label in sorted(folders) for path in folders[label]]
    return ImageFolder(str(root), tuple(labels), listed(train), listed(val), _digest(root, every))


@cache
def _decoded(folder: ImageFolder, split: str, limits: Any) -> tuple[tuple, tuple[int, ...]]:
    from handlers.errors import HandlerError
    from handlers.image_io import decode_image

    images, labels = [], []
    for path, label in folder.files(split):
        try:
            image = decode_image(Path(path).read_bytes(), limits)
        except HandlerError as exc:
            raise DataError(f"data.folder: {path} does not decode as an image the server accepts: {exc}") from None
        images.append(image)
        labels.append(label)
    return tuple(images), tuple(labels)


def folder_split(folder: ImageFolder, split: str, limits: Any) -> LabelledImages:
    """The ``train`` or ``holdout`` (val) split as ``LabelledImages``, decoded once per build process."""
    images, labels = _decoded(folder, split, limits)
    return LabelledImages(images, labels)


# ------------------------------------------------------------------------------------------ CSV table
@dataclass(frozen=True)
class CsvTable:
    """A CSV data set: feature names, class names and both splits as arrays, with a content digest."""

    csv: str
    target: str
    val_csv: str | None
    feature_names: tuple[str, ...]
    labels: tuple[str, ...]
    x_train: Any
    y_train: Any
    x_val: Any
    y_val: Any
    sha256: str

    kind = "csv"

    def __hash__(self) -> int:
        return hash(self.sha256)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CsvTable) and (self.sha256, self.labels) == (other.sha256, other.labels)

    @property
    def source(self) -> str:
        return f"CSV {Path(self.csv).name}" + (f" + {Path(self.val_csv).name}" if self.val_csv else "")

    def split(self, split: str) -> TabularData:
        x, y = {"train": (self.x_train, self.y_train), "holdout": (self.x_val, self.y_val)}[split]
        return TabularData(x, y, self.feature_names, self.labels)

    def to_dict(self) -> dict:
        data = {"csv": Path(self.csv).name, "target": self.target, "sha256": self.sha256}
        data.update(train=len(self.y_train), val=len(self.y_val))
        if self.val_csv:
            data["val_csv"] = Path(self.val_csv).name
        return data

    def golden_records(self, per_class: int = GOLDEN_PER_CLASS) -> list[tuple[str, dict, str]]:
        """The first ``per_class`` held-out records of each class as (file name, record, label)."""
        chosen = []
        for index, label in enumerate(self.labels):
            for n, row in enumerate(np.flatnonzero(self.y_val == index)[:per_class]):
                record = {name: float(v) for name, v in zip(self.feature_names, self.x_val[row], strict=True)}
                chosen.append((f"golden_{index}_{n}.json", record, label))
        return chosen


def _read_csv(path: Path, field: str, target: str) -> tuple[list[str], list[list[str]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{field}: {path} is not UTF-8 text: {exc}") from None
    rows = [row for row in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in row)]
    if len(rows) < 2:
        raise DataError(f"{field}: {path} needs a header row and at least one record")
    header = [name.strip() for name in rows[0]]
    if len(set(header)) != len(header):
        duplicate = next(name for name in header if header.count(name) > 1)
        raise DataError(f"{field}: {path}: column {duplicate!r} appears twice in the header")
    if target not in header:
        raise DataError(f"data.target: {path} has no column {target!r} (columns: {', '.join(header)})")
    if len(header) < 2:
        raise DataError(f"{field}: {path} has no feature columns besides the target {target!r}")
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"{field}: {path} line {line} has {len(row)} values, the header {len(header)}")
    return header, rows[1:]


def _features(
    path: Path, field: str, header: list[str], rows: list[list[str]], target: str
) -> tuple[np.ndarray, list[str]]:
    columns = [i for i, name in enumerate(header) if name != target]
    t = header.index(target)
    x = np.empty((len(rows), len(columns)), dtype=np.float64)
    for r, row in enumerate(rows):
        for c, column in enumerate(columns):
            cell = row[column].strip()
            try:
                value = float(cell)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise DataError(
                    f"{field}: {path} line {r + 2}: feature {header[column]!r} is {cell!r}, not a finite number "
                    "(every column but the target must be numeric)"
                )
            x[r, c] = value
    return x, [row[t].strip() for row in rows]


def csv_table(value: Any, base_dir: Path, labels: tuple[str, ...] | None) -> CsvTable:
    """Read and check ``data: {csv, target, val_csv?}``: numeric features, known classes, a stratified split."""
    _check_mapping(value, {"csv", "target", "val_csv"}, "{csv: records.csv, target: label}")
    for key in ("csv", "target"):
        if not isinstance(value.get(key), str) or not value[key]:
            raise DataError(f"data.{key}: is required (data: {{csv: records.csv, target: COLUMN}})")
    target = value["target"]
    paths = {"csv": (base_dir / value["csv"]).resolve()}
    if value.get("val_csv") is not None:
        paths["val_csv"] = (base_dir / str(value["val_csv"])).resolve()
    for key, path in paths.items():
        if not path.is_file():
            raise DataError(f"data.{key}: file not found: {path}")
    header, rows = _read_csv(paths["csv"], "data.csv", target)
    x, y_text = _features(paths["csv"], "data.csv", header, rows, target)
    names = tuple(name for name in header if name != target)
    if "val_csv" in paths:
        val_header, val_rows = _read_csv(paths["val_csv"], "data.val_csv", target)
        if val_header != header:
            raise DataError(f"data.val_csv: its columns {val_header} differ from data.csv's {header}")
        x_val, y_val_text = _features(paths["val_csv"], "data.val_csv", val_header, val_rows, target)
    classes = sorted(set(y_text)) if labels is None else list(labels)
    if labels is None and len(classes) < 2:
        raise DataError(f"data.target: column {target!r} has one class {classes}; a classifier needs 2+")
    for split_text, key in ((y_text, "csv"),) + (((y_val_text, "val_csv"),) if "val_csv" in paths else ()):
        unknown = sorted(set(split_text) - set(classes))
        if unknown:
            where = "one of the spec's labels" if labels is not None else "a class of data.csv"
            raise DataError(f"data.{key}: target value {unknown[0]!r} is not {where} {classes}")
    index = {label: i for i, label in enumerate(classes)}
    y = np.array([index[v] for v in y_text], dtype=np.int64)
    if "val_csv" in paths:
        y_val = np.array([index[v] for v in y_val_text], dtype=np.int64)
        x_train, y_train = x, y
    else:
        counts = np.bincount(y, minlength=len(classes))
        scarce = [classes[i] for i, n in enumerate(counts) if 0 < n < 2]
        if scarce:
            raise DataError(f"data.csv: class {scarce[0]!r} has one record: a held-out split needs 2+ per class "
                            "(or give val_csv)")  # fmt: skip
        from sklearn.model_selection import train_test_split

        x_train, x_val, y_train, y_val = train_test_split(
            x, y, test_size=HOLDOUT_FRACTION, random_state=SPLIT_SEED, stratify=y
        )
    files = [paths[key] for key in ("csv", "val_csv") if key in paths]
    digest = _digest(Path(os.path.commonpath([f.parent for f in files])), files)
    return CsvTable(
        str(paths["csv"]), target, str(paths["val_csv"]) if "val_csv" in paths else None, names, tuple(classes),
        np.ascontiguousarray(x_train), np.ascontiguousarray(y_train), np.ascontiguousarray(x_val),
        np.ascontiguousarray(y_val), digest,
    )  # fmt: skip


PARSERS = {"folder": image_folder, "csv": csv_table}


def parse_data(value: Any, base_dir: Path, kinds: tuple[str, ...], handler: str, labels: tuple[str, ...] | None):
    """The spec's ``data:`` section for a task that takes ``kinds`` (``folder``, ``csv``)."""
    if not kinds:
        raise DataError(f"data: handler {handler} takes no data section (its data sets are built in)")
    kind = next((k for k in PARSERS if isinstance(value, dict) and k in value), None)
    if kind not in kinds:
        wanted = " or ".join(f"{{{k}: ...}}" for k in kinds)
        raise DataError(f"data: handler {handler} takes {wanted}, got {value!r}")
    return PARSERS[kind](value, base_dir, labels)
