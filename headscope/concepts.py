"""Concept word sets: named concepts, each a list of words, loaded from the package or a user's file.

A concept set is data (JSON shipped in the package `headscope_concepts`, folder `concepts/`):

    {"name": "shapes", "source": "...", "license": "...", "description": "...",
     "concepts": {"color": ["red", "green", ...], "shape": ["circle", ...], ...}}

The HRV paper's own format is also read (its concepts_34x10.csv): blocks separated by blank lines,
a concept name on the first line of each block, then numbered words ("1. Dog"); words are
lower-cased, as in the shipped hrv34 set.

Concept order is meaningful: it is the row order of every HRV built from the set.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from headscope.errors import HeadscopeError

SHIPPED = ("shapes", "hrv34")
_NUMBERED = re.compile(r"^\s*\d+\s*[.)]\s*(.+?)\s*$")


@dataclass(frozen=True)
class ConceptSet:
    """Named concepts, each a non-empty list of words (one word may be several, e.g. "oak tree").

    Attributes:
        name: the set's name ("shapes", "hrv34", or a file's stem).
        concepts: concept name -> words, in row order.
        source, license, description: provenance, kept in every HRV built from the set.
    """

    name: str
    concepts: dict[str, list[str]]
    source: str = ""
    license: str = ""
    description: str = field(default="", compare=False)

    def __post_init__(self):
        if not self.concepts:
            raise HeadscopeError(f"concept set {self.name!r} has no concepts")
        cleaned = {}
        for concept, words in self.concepts.items():
            concept = str(concept).strip()
            if not concept:
                raise HeadscopeError(f"concept set {self.name!r} has a concept without a name")
            if concept in cleaned:
                raise HeadscopeError(f"concept set {self.name!r} names the concept {concept!r} twice")
            if isinstance(words, str) or not all(isinstance(word, str) for word in words):
                raise HeadscopeError(f"concept {concept!r} of {self.name!r} must be a list of words (strings)")
            words = [" ".join(word.split()) for word in words]
            if not words or not all(words):
                raise HeadscopeError(f"concept {concept!r} of {self.name!r} is empty; give it at least one word")
            repeated = sorted({word for word in words if words.count(word) > 1})
            if repeated:
                raise HeadscopeError(f"concept {concept!r} of {self.name!r} lists {', '.join(repeated)} twice")
            cleaned[concept] = words
        object.__setattr__(self, "concepts", cleaned)

    # -- loading ------------------------------------------------------------------------------

    @classmethod
    def load(cls, name_or_path: str | Path) -> "ConceptSet":
        """A shipped set by name ("shapes", "hrv34") or a user's .json / .csv file by path."""
        text = str(name_or_path)
        if text in SHIPPED:
            return cls._from_json_text(shipped_text(f"{text}.json"), text)
        path = Path(text).expanduser()
        if not path.is_file():
            raise HeadscopeError(f"no concept set {text!r}: give a shipped name ({', '.join(SHIPPED)}) "
                                 "or the path of a .json or .csv concept file")
        try:
            content = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as error:
            raise HeadscopeError(f"cannot read concept file {path}: {error}") from None
        if path.suffix.lower() == ".csv":
            return cls(name=path.stem, concepts=parse_paper_csv(content, path), source=str(path))
        return cls._from_json_text(content, path.stem, path)

    @classmethod
    def _from_json_text(cls, content: str, default_name: str, path: Path | None = None) -> "ConceptSet":
        where = path or default_name
        try:
            data = json.loads(content, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as error:
            raise HeadscopeError(f"concept file {where} is not valid JSON ({error})") from None
        if not isinstance(data, dict) or not isinstance(data.get("concepts"), dict):
            raise HeadscopeError(f'concept file {where} needs a "concepts" object: '
                                 '{"concepts": {"color": ["red", "blue"], ...}}')
        return cls(name=str(data.get("name") or default_name), concepts=data["concepts"],
                   source=str(data.get("source") or (str(path) if path else "")),
                   license=str(data.get("license", "")), description=str(data.get("description", "")))

    # -- views --------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Concept names, in row order."""
        return list(self.concepts)

    def __len__(self) -> int:
        return len(self.concepts)

    def __getitem__(self, concept: str) -> list[str]:
        return list(self.concepts[self.check(concept)])

    def check(self, concept: str) -> str:
        """`concept` if the set has it (exact, else case-insensitive match); HeadscopeError otherwise."""
        if concept in self.concepts:
            return concept
        folded = {name.lower(): name for name in self.concepts}
        if str(concept).lower() in folded:
            return folded[str(concept).lower()]
        raise HeadscopeError(f"unknown concept {concept!r} in set {self.name!r}; known: {', '.join(self.names)}")

    def subset(self, names) -> "ConceptSet":
        """The concepts `names` (in that order), same provenance."""
        names = [self.check(name) for name in names]
        if not names:
            raise HeadscopeError("choose at least one concept")
        return ConceptSet(name=self.name, concepts={name: self.concepts[name] for name in names},
                          source=self.source, license=self.license, description=self.description)

    def to_json(self) -> dict:
        return {"name": self.name, "source": self.source, "license": self.license,
                "description": self.description, "concepts": {k: list(v) for k, v in self.concepts.items()}}

    def hash(self) -> str:
        """sha256 (hex) of the canonical JSON of the concepts and their words, in order.

        Only the content counts (not the set's name or provenance): two files with the same concepts
        and words hash the same.
        """
        canonical = json.dumps([[name, words] for name, words in self.concepts.items()],
                               ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    # -- against a tokenizer ------------------------------------------------------------------

    def token_ids(self, tokenizer) -> dict[str, list[list[int]]]:
        """Each concept's words as token ids without start/end/padding: concept -> [word ids].

        Refuses (HeadscopeError) a word the tokenizer turns into no token, or only into its
        unknown token (a word outside a word-level vocabulary).
        """
        special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
        unknown = tokenizer.unk_token_id if tokenizer.unk_token_id not in special else None
        result = {}
        for concept, words in self.concepts.items():
            result[concept] = []
            for word in words:
                ids = [token for token in tokenizer(word, add_special_tokens=False).input_ids if token not in special]
                if not ids:
                    raise HeadscopeError(f"word {word!r} of concept {concept!r} becomes no token with this "
                                         "model's tokenizer; remove it from the concept set")
                if unknown is not None and unknown in ids:
                    raise HeadscopeError(f"word {word!r} of concept {concept!r} is not in this model's vocabulary "
                                         f"(it becomes {tokenizer.unk_token}); remove it from the concept set")
                result[concept].append(ids)
        return result


def shipped_text(filename: str) -> str:
    """Text of a data file shipped in the package `headscope_concepts` (folder concepts/)."""
    try:
        return resources.files("headscope_concepts").joinpath(filename).read_text(encoding="utf-8")
    except (NotADirectoryError, TypeError):
        # An editable install made before concepts/ had an __init__.py sees it as a namespace package.
        import headscope_concepts

        for folder in headscope_concepts.__path__:
            candidate = Path(folder) / filename
            if candidate.is_file():
                return candidate.read_text(encoding="utf-8")
        raise


def parse_paper_csv(content: str, where="concept file") -> dict[str, list[str]]:
    """The HRV paper's concept file: "Concept\\n\\n1. Word\\n2. Word\\n\\nNext concept\\n..." -> dict.

    A line that is not numbered starts a new concept; numbered lines are its words (lower-cased).
    Quotes and trailing commas left by spreadsheet export are stripped.
    """
    concepts: dict[str, list[str]] = {}
    current = None
    for number, raw in enumerate(content.lstrip("\ufeff").splitlines(), start=1):
        line = raw.strip().strip(",").strip().strip('"').strip()
        if not line:
            continue
        numbered = _NUMBERED.match(line)
        if numbered:
            if current is None:
                raise HeadscopeError(f"{where}, line {number}: word {numbered.group(1)!r} before any concept name")
            concepts[current].append(numbered.group(1).lower())
        else:
            if line in concepts:
                raise HeadscopeError(f"{where}, line {number}: concept {line!r} appears twice")
            current = line
            concepts[current] = []
    if not concepts:
        raise HeadscopeError(f"{where} holds no concepts; expected 'Concept' lines followed by '1. word' lines")
    return concepts


def _no_duplicate_keys(pairs):
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise HeadscopeError(f"concept file names {', '.join(map(repr, repeated))} twice")
    return dict(pairs)
