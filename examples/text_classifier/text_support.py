"""What the text classifier's task (build) and handler (worker) share: the tokenizer and the handler config.

The handler's file may define only one class (TorchServe's rule for an entry point), so the config
class lives here; the task copies this file into the archive beside ``vocab.json``, where the worker
imports it (the model folder is on the worker's ``sys.path``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from handlers.config import RuntimeConfig

PAD, UNKNOWN = 0, 1
WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def encode(text: str, vocab: dict[str, int], length: int) -> list[int]:
    """Token ids of ``text``: known words by id, others ``UNKNOWN``, cut or padded (``PAD``) to ``length``."""
    ids = [vocab.get(word, UNKNOWN) for word in words(text)][:length]
    return ids + [PAD] * (length - len(ids))


@dataclass
class TextCall:
    """One request, decoded: its protocol and its texts (the handler's ``decode``)."""

    protocol: str
    texts: list[str]
    request_id: str | None = None

    @property
    def size(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class TextConfig(RuntimeConfig):
    """The runtime settings every task shares (``RuntimeConfig``), and the text classifier's own."""

    max_length: int = 32  # tokens the model sees per text (longer texts are cut)
    max_chars: int = 4000  # a longer text is refused (400)
    max_texts: int = 64  # texts in one request
    vocab_file: str = "vocab.json"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_length", "max_chars", "max_texts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 100_000:
                raise ValueError(f"{name}: must be a whole number from 1 to 100000, got {value!r}")
