"""The HRV object and its file format (safetensors vectors + JSON header), official-array import."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from headscope.concepts import ConceptSet
from headscope.errors import HeadscopeError
from headscope.heads import HeadIndex, LayerInfo
from headscope.hrv.meta import (FAMILY_NOUNS, PAPER_GUIDANCE, PAPER_STEPS, _replace_folder,
                                _version, concept_meta, config_hash, default_hrv_path, family_of,
                                family_of_kinds, head_meta, build_default_command,
                                embedded_of)
from headscope.io import atomic_path, umask

FORMAT = "headscope-hrv/1"


@dataclass
class HRV:
    """Head Relevance Vectors of one model for one concept set.

    Attributes:
        concepts: concept names, one per row.
        vectors: [concepts, heads] float32; each row has mean 1 (sum = number of heads).
        step_votes: [steps, concepts, heads] float32 vote counts per denoising step (soft: summed
            probabilities), or None (e.g. imported arrays).
        meta: provenance (model identity, head layout, concept set, prompts, settings; see `save`).
    """

    concepts: list[str]
    vectors: torch.Tensor
    step_votes: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    # -- reading ------------------------------------------------------------------------------

    @property
    def n_heads(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def index(self) -> HeadIndex:
        """The head index the HRV was built on (from its stored layout)."""
        heads = self.meta.get("heads") or {}
        layers = [LayerInfo(**{**entry, "resolution": tuple(entry["resolution"])}) for entry in heads.get("layout", [])]
        if not layers:
            raise HeadscopeError("this HRV stores no head layout")
        return HeadIndex(layers, tuple(heads.get("latent") or layers[0].resolution))

    @property
    def concept_words(self) -> dict[str, list[str]]:
        """Concept -> the words it was built from (meta["concept_set"]["concepts"]); {} when unknown."""
        return dict((self.meta.get("concept_set") or {}).get("concepts") or {})

    def concepts_of(self, word: str) -> list[str]:
        """Concepts whose stored words hold `word` or its singular ("circles" -> "circle"), case-insensitive."""
        folded = word.lower()
        forms = {folded, folded.rstrip("s"), folded[:-2] if folded.endswith("es") else folded}
        return [concept for concept, words in self.concept_words.items()
                if concept in self.concepts and forms & {entry.lower() for entry in words}]

    def concept(self, concept: str) -> str:
        """The stored name of `concept` (exact, else case-insensitive); HeadscopeError listing known ones."""
        if concept in self.concepts:
            return concept
        folded = {name.lower(): name for name in self.concepts}
        if str(concept).lower() in folded:
            return folded[str(concept).lower()]
        raise HeadscopeError(f"unknown concept {concept!r}; this HRV has: {', '.join(self.concepts)}")

    def vector(self, concept: str) -> torch.Tensor:
        """Relevance of every head to `concept`: [n_heads] float32 (mean 1)."""
        return self.vectors[self.concepts.index(self.concept(concept))].clone()

    def ranking(self, concept: str, most_relevant_first: bool = True) -> torch.Tensor:
        """All flat head ids ordered by relevance to `concept` ([n_heads] long); ties by lower id."""
        vector = self.vector(concept).double()
        # A stable sort keeps equal values in id order.
        return torch.sort(-vector if most_relevant_first else vector, stable=True).indices

    def top_heads(self, concept: str, k: int) -> torch.Tensor:
        """Flat ids of the `k` heads most relevant to `concept`, most relevant first: [k] long."""
        if not 0 <= k <= self.n_heads:
            raise HeadscopeError(f"k={k} out of range; this HRV has {self.n_heads} heads")
        return self.ranking(concept)[:k]

    def similarity(self) -> torch.Tensor:
        """Cosine similarity between concepts' vectors: [concepts, concepts] float32."""
        unit = torch.nn.functional.normalize(self.vectors.double(), dim=1)
        return (unit @ unit.T).float()

    # -- derived HRVs -------------------------------------------------------------------------

    def window(self, start: int, stop: int) -> "HRV":
        """The HRV of the votes cast at denoising steps `start`..`stop - 1` only (rows from `step_votes[start:stop]`,
        normalised as `from_votes` does); meta["step_window"] = [start, stop] in the build's steps.

        HeadscopeError when the HRV keeps no per-step votes or the window is empty or outside its steps.
        """
        if self.step_votes is None:
            raise HeadscopeError("this HRV keeps no per-step votes (step_votes), so it has no step windows; "
                                 "build one with `headscope hrv build`")
        n_steps = int(self.step_votes.shape[0])
        if not 0 <= start < stop <= n_steps:
            raise HeadscopeError(f"step window {start}:{stop} is empty or outside this HRV's {n_steps} steps; "
                                 f"give 0 <= start < stop <= {n_steps}")
        offset = (self.meta.get("step_window") or [0])[0]  # a window of a window counts in the build's steps
        step_votes = self.step_votes[start:stop]
        return HRV.from_votes(step_votes.sum(dim=0), self.concepts,
                              {**self.meta, "step_window": [offset + start, offset + stop]}, step_votes)

    def head_shares(self) -> "HRV":
        """Relevance as each head's share over the concepts: every head's column of `vectors` divided by its sum,
        then each concept's row rescaled to mean 1. meta["relevance"] = "head shares"; no step votes.

        A head relevant to every concept ranks lower for each of them than one that serves mostly c. The
        columns of `vectors` are divided, not the raw votes: every head casts one vote per layer call and
        step (soft: probabilities that sum to about 1), so the heads' vote totals (nearly) agree and dividing
        the votes would change no ranking; `vectors` first put the concepts on one scale (rows of mean 1).
        """
        totals = self.vectors.double().sum(dim=0, keepdim=True)
        shares = torch.where(totals > 0, self.vectors.double() / totals.clamp_min(1e-300), torch.zeros_like(totals))
        return HRV.from_votes(shares, self.concepts, {**self.meta, "relevance": "head shares"})

    @property
    def family(self) -> str:
        """The model family it was built on: "unet", "sd3" or "flux"."""
        return family_of(self.meta)

    def check_compatible(self, index_or_pipe) -> None:
        """HeadscopeError unless the HRV's family and head layout are those of `index_or_pipe` (HeadIndex or
        pipeline of any family); the one-line message names both."""
        index = index_or_pipe if isinstance(index_or_pipe, HeadIndex) else HeadIndex.from_model(index_or_pipe)
        heads = self.meta.get("heads") or {}
        family, theirs = self.family, family_of_kinds(layer.kind for layer in index.layers)
        if family == theirs and heads.get("fingerprint") == index.fingerprint() and self.n_heads == index.n_heads:
            return
        model = (self.meta.get("model") or {}).get("name_or_path")
        built = (f"HRV built for {FAMILY_NOUNS.get(family, family)} with layout {heads.get('fingerprint', '?')} "
                 f"({self.n_heads} heads{', model ' + model if model else ''})")
        here = (f"this pipeline has {index.fingerprint()} ({index.n_heads} heads)" if family == theirs else
                f"this pipeline is {FAMILY_NOUNS[theirs]} with layout {index.fingerprint()} ({index.n_heads} heads)")
        raise HeadscopeError(f"{built}; {here}; rebuild with `headscope hrv build --model ...`")

    # -- files --------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the HRV atomically: `X.hrv` is one safetensors file whose header holds the JSON metadata;
        any other path is a folder with `hrv.safetensors` + `hrv.json`. Never pickled.

        Tensors: vectors [concepts, heads] float32, step_votes [steps, concepts, heads] float32 (if any).
        Metadata: format, concepts, model identity (name_or_path, family, denoiser class, config hash), head layout
        and fingerprint, concept set (name, words, hash), prompts, steps, seed, scheduler, soft, version.
        """
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {"vectors": self.vectors.float().contiguous()}
        if self.step_votes is not None:
            tensors["step_votes"] = self.step_votes.float().contiguous()
        header = {"format": FORMAT, "concepts": list(self.concepts), "meta": self.meta}
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".hrv":
            with atomic_path(path) as temporary:
                save_file(tensors, str(temporary), metadata={"headscope": json.dumps(header)})
            return path
        stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        os.chmod(stage, 0o777 & ~umask())
        try:
            save_file(tensors, str(stage / "hrv.safetensors"))
            (stage / "hrv.json").write_text(json.dumps(header, indent=1))
            _replace_folder(stage, path)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "HRV":
        """Read an HRV written by `save` (a `.hrv` file or a folder); HeadscopeError if it is not one."""
        from safetensors import safe_open

        path = Path(path).expanduser()
        folder = path.is_dir()
        tensor_file = path / "hrv.safetensors" if folder else path
        if not tensor_file.is_file():
            raise HeadscopeError(f"no HRV file at {path}")
        try:
            with safe_open(str(tensor_file), framework="pt") as handle:
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
                metadata = handle.metadata() or {}
            if not folder and "headscope" not in metadata:
                raise ValueError("a safetensors file without a headscope header")
            header = json.loads((path / "hrv.json").read_text() if folder else metadata["headscope"])
        except Exception as error:  # safetensors raises several types for truncated / foreign files
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise HeadscopeError(f"{path} is not a readable HRV file ({reason}); rebuild it with "
                                 "`headscope hrv build`") from None
        return cls._from_parts(path, header, tensors)

    @classmethod
    def _from_parts(cls, path: Path, header, tensors: dict) -> "HRV":
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise HeadscopeError(f"{path} is not a headscope HRV file (format {header.get('format')!r} "
                                 f"if any; expected {FORMAT!r})")
        concepts, vectors = header.get("concepts"), tensors.get("vectors")
        meta = header.get("meta") if isinstance(header.get("meta"), dict) else {}
        n_heads = (meta.get("heads") or {}).get("n_heads")
        if (vectors is None or vectors.ndim != 2 or not isinstance(concepts, list)
                or vectors.shape[0] != len(concepts) or (n_heads is not None and vectors.shape[1] != n_heads)):
            raise HeadscopeError(f"{path} is inconsistent: vectors {tuple(vectors.shape) if vectors is not None else None} "
                                 f"for {len(concepts or [])} concepts and {n_heads} heads; rebuild it")
        step_votes = tensors.get("step_votes")
        if step_votes is not None and (step_votes.ndim != 3 or tuple(step_votes.shape[1:]) != tuple(vectors.shape)):
            raise HeadscopeError(f"{path} is inconsistent: step_votes {tuple(step_votes.shape)} do not match "
                                 f"vectors {tuple(vectors.shape)}; rebuild it")
        if not torch.isfinite(vectors).all():
            raise HeadscopeError(f"{path} holds non-finite relevance values; rebuild it")
        return cls(concepts=list(concepts), vectors=vectors.float(), step_votes=step_votes, meta=meta)

    # -- other sources ------------------------------------------------------------------------

    @classmethod
    def from_votes(cls, votes: torch.Tensor, concepts: list[str], meta: dict,
                   step_votes: torch.Tensor | None = None) -> "HRV":
        """HRV from vote counts [concepts, heads]: rows L1-normalised over heads, times the head count.

        A concept that got no vote at all (possible: votes are an argmax over the whole set) has no
        evidence; its row becomes all ones (every head equally relevant) and it is listed in
        meta["unvoted"].
        """
        votes = votes.double()
        totals = votes.sum(dim=1, keepdim=True)
        n_heads = votes.shape[1]
        vectors = torch.where(totals > 0, votes / totals.clamp_min(1e-300) * n_heads, torch.ones_like(votes))
        unvoted = [name for name, total in zip(concepts, totals[:, 0].tolist()) if total <= 0]
        return cls(concepts=list(concepts), vectors=vectors.float(),
                   step_votes=None if step_votes is None else step_votes.float(),
                   meta={**meta, "unvoted": unvoted})

    @classmethod
    def from_official(cls, npy_path: str | Path, layout: str = "sd15") -> "HRV":
        """The HRV paper's official array (e.g. hrv_sd_v1_4_34x128.npy, [34, 128]) on headscope's head index.

        Columns are heads in execution order, head index fastest — headscope's flat ids — and rows the
        34 concepts of the hrv34 set. layout: "sd15" (SD 1.4/1.5, 128 heads) or "sdxl" (SDXL base, 1300).
        """
        from headscope.models.configs import LAYOUTS

        if layout not in LAYOUTS:
            raise HeadscopeError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
        array = _read_npy(Path(npy_path).expanduser())
        concept_set = ConceptSet.load("hrv34")
        spec = LAYOUTS[layout]
        if array.ndim != 2 or array.shape != (len(concept_set), spec["heads"]):
            raise HeadscopeError(f"{npy_path} has shape {list(array.shape)}; layout {layout} expects "
                                 f"[{len(concept_set)}, {spec['heads']}] (34 concepts x heads)")
        if not np.isfinite(array).all():
            raise HeadscopeError(f"{npy_path} holds non-finite values")
        index = HeadIndex.from_config(spec["config"])
        meta = {"source": f"official HRV array {Path(npy_path).name} (SNU-DRL/HRV, Apache-2.0)",
                "model": {"name_or_path": spec["model"], "family": "unet", "denoiser_class": "UNet2DConditionModel",
                          "unet_class": "UNet2DConditionModel", "config_hash": config_hash(spec["config"])},
                **head_meta(index), "concept_set": concept_meta(concept_set),
                "prompts": None, "n_prompts": 2100, "steps": PAPER_STEPS, "guidance": PAPER_GUIDANCE,
                "seed": None, "scheduler": "PNDMScheduler", "soft": False, "headscope_version": _version()}
        return cls(concepts=concept_set.names, vectors=torch.from_numpy(np.array(array, dtype=np.float32)),
                   step_votes=None, meta=meta)

    @classmethod
    def for_pipeline(cls, pipe) -> "HRV":
        """The shipped HRV of an embedded model when `pipe` is one; HeadscopeError otherwise."""
        name = embedded_of(pipe)
        if name is None:
            raise HeadscopeError("no default HRV for this model: pass --hrv FILE (build one with "
                                 "`headscope hrv build --model MODEL --out FILE.hrv`, or import the paper's "
                                 "arrays with `headscope hrv import`)")
        path = default_hrv_path(name)
        if not path.is_file():
            raise HeadscopeError(f"the embedded model {name}'s HRV is missing at {path}; build it with "
                                 f"`{build_default_command(name)}` or pass --hrv FILE")
        hrv = cls.load(path)
        hrv.check_compatible(pipe)
        return hrv

    def __repr__(self) -> str:
        return (f"HRV({len(self.concepts)} concepts x {self.n_heads} heads, "
                f"model {(self.meta.get('model') or {}).get('name_or_path')}, "
                f"{self.meta.get('n_prompts')} prompts, {'soft' if self.meta.get('soft') else 'argmax'} votes)")


def _read_npy(path: Path) -> np.ndarray:
    """A numeric .npy array; HeadscopeError for anything else. Pickled content is refused, never unpickled."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(6)
    except OSError as error:
        raise HeadscopeError(f"cannot read {path}: {error.strerror or error}") from None
    if magic != b"\x93NUMPY":
        what = ("it is a Python pickle, and headscope never unpickles a file" if magic[:1] == b"\x80"
                else "it has no NumPy header")
        raise HeadscopeError(f"cannot read {path} as a .npy array: {what} (give the .npy array itself)")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise HeadscopeError(f"{path} holds pickled Python objects; headscope never unpickles a file (save the "
                                 "array as numbers: np.save(path, array.astype('float32')))") from None
        raise HeadscopeError(f"cannot read {path} as a .npy array ({error})") from None
    except (OSError, EOFError) as error:
        raise HeadscopeError(f"cannot read {path} as a .npy array ({error}); the file may be truncated") from None
