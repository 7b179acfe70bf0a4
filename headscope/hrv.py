"""Head Relevance Vectors (Park et al., ICLR 2025): which cross-attention heads serve which visual concept.

How an HRV is built (faithful to the paper's code; `HRVBuilder.fit`):
  1. Every word of every concept is encoded by the pipeline's own text encoder, one word per prompt
     (`pipe.encode_prompt`), and only the word's own token outputs are kept (no start/end/padding).
  2. For each cross-attention layer, those token embeddings are projected by the layer's `to_k` once
     per run (cached): keys `[heads, concept tokens, head_dim]`.
  3. The pipeline generates ordinary images from the build prompts. At every cross-attention call and
     step, one word per concept is sampled; the layer's conditional queries are scored against the
     sampled words' keys: softmax over all sampled concept tokens per head and pixel, mean over
     pixels, mean over each word's tokens -> `[heads, concepts]`; the argmax over concepts is that
     head's vote (`soft=True`: the probabilities themselves are added instead). The generation is not
     altered: the votes are read beside it from the layer's queries.
  4. Votes are summed over prompts and steps; each concept's row is L1-normalised over the heads and
     multiplied by the number of heads, so every row has mean 1.

Several processes: `accelerate launch --multi_gpu --num_processes N -m headscope_cli.main hrv build ...`
(or `torchrun --nproc_per_node N -m headscope_cli.main hrv build ...`) — on a machine without CUDA the
processes run on CPU and sum over gloo. (`accelerate launch --cpu` starts a single process unless MPI
is set up.)

Reproducibility: word sampling and the starting noise of prompt i depend only on (seed, i), prompts are
batched in fixed chunks of the prompt list, so a resumed build and a multi-process build (prompts split
with accelerate, vote counts sum-reduced) end with the same counts as one uninterrupted process.

Cost of one more concept: only its words are encoded and projected (a few text-encoder passes and one
`to_k` product per layer), but the votes must be re-run over all prompts, because every vote is an
argmax over the whole concept set: adding a concept can move any head's vote.
"""
from __future__ import annotations

import hashlib
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
from headscope.io import atomic_path, replace_folder, umask
from headscope.processor import Hook, HookContext

FORMAT = "headscope-hrv/1"
PAPER_STEPS, PAPER_GUIDANCE = 50, 7.5
EMBEDDED_STEPS, EMBEDDED_GUIDANCE = 25, 5.0  # as the shapes-world evaluation generates
_WORD_CHUNK = 64


# -- the HRV object and its file -----------------------------------------------------------------

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

    def check_compatible(self, index_or_pipe) -> None:
        """HeadscopeError unless the HRV's head layout is that of `index_or_pipe` (HeadIndex or pipeline)."""
        index = index_or_pipe if isinstance(index_or_pipe, HeadIndex) else HeadIndex.from_unet(index_or_pipe.unet)
        heads = self.meta.get("heads") or {}
        if heads.get("fingerprint") == index.fingerprint() and self.n_heads == index.n_heads:
            return
        model = (self.meta.get("model") or {}).get("name_or_path")
        raise HeadscopeError(
            f"HRV built for a UNet with layout {heads.get('fingerprint', '?')} ({self.n_heads} heads"
            f"{', model ' + model if model else ''}); this pipeline has {index.fingerprint()} ({index.n_heads} heads); "
            "rebuild with `headscope hrv build --model ...`")

    # -- files --------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the HRV atomically: `X.hrv` is one safetensors file whose header holds the JSON metadata;
        any other path is a folder with `hrv.safetensors` + `hrv.json`. Never pickled.

        Tensors: vectors [concepts, heads] float32, step_votes [steps, concepts, heads] float32 (if any).
        Metadata: format, concepts, model identity (name_or_path, unet class, config hash), head layout
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
        try:
            array = np.load(Path(npy_path).expanduser(), allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            raise HeadscopeError(f"cannot read {npy_path} as a .npy array ({error})") from None
        concept_set = ConceptSet.load("hrv34")
        spec = LAYOUTS[layout]
        if array.ndim != 2 or array.shape != (len(concept_set), spec["heads"]):
            raise HeadscopeError(f"{npy_path} has shape {list(array.shape)}; layout {layout} expects "
                                 f"[{len(concept_set)}, {spec['heads']}] (34 concepts x heads)")
        if not np.isfinite(array).all():
            raise HeadscopeError(f"{npy_path} holds non-finite values")
        index = HeadIndex.from_config(spec["config"])
        meta = {"source": f"official HRV array {Path(npy_path).name} (SNU-DRL/HRV, Apache-2.0)",
                "model": {"name_or_path": spec["model"], "unet_class": "UNet2DConditionModel",
                          "config_hash": config_hash(spec["config"])},
                **head_meta(index), "concept_set": concept_meta(concept_set),
                "prompts": None, "n_prompts": 2100, "steps": PAPER_STEPS, "guidance": PAPER_GUIDANCE,
                "seed": None, "scheduler": "PNDMScheduler", "soft": False, "headscope_version": _version()}
        return cls(concepts=concept_set.names, vectors=torch.from_numpy(np.array(array, dtype=np.float32)),
                   step_votes=None, meta=meta)

    @classmethod
    def for_pipeline(cls, pipe) -> "HRV":
        """The shipped HRV of the embedded shapes model when `pipe` is that model; HeadscopeError otherwise."""
        if not is_embedded(pipe):
            raise HeadscopeError("no default HRV for this model: pass --hrv FILE (build one with "
                                 "`headscope hrv build --model MODEL --out FILE.hrv`, or import the paper's "
                                 "arrays with `headscope hrv import`)")
        path = default_hrv_path()
        if not path.is_file():
            raise HeadscopeError(f"the embedded model's HRV is missing at {path}; build it with "
                                 f"`{BUILD_DEFAULT_COMMAND}` or pass --hrv FILE")
        hrv = cls.load(path)
        hrv.check_compatible(pipe)
        return hrv

    def __repr__(self) -> str:
        return (f"HRV({len(self.concepts)} concepts x {self.n_heads} heads, "
                f"model {(self.meta.get('model') or {}).get('name_or_path')}, "
                f"{self.meta.get('n_prompts')} prompts, {'soft' if self.meta.get('soft') else 'argmax'} votes)")


BUILD_DEFAULT_COMMAND = ("headscope hrv build --concepts shapes --n-prompts 512 --seed 0 "
                         "--out headscope/models/shapes_hrv.hrv")


def default_hrv_path() -> Path:
    """Where the embedded shapes model's HRV ships: headscope/models/shapes_hrv.hrv.

    Built (once the embedded model is trained) with BUILD_DEFAULT_COMMAND.
    """
    return Path(__file__).resolve().parent / "models" / "shapes_hrv.hrv"


def is_embedded(pipe) -> bool:
    """Whether `pipe` was loaded from the embedded shapes model's folder."""
    from headscope.models import EMBEDDED_MODEL

    source = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")
    try:
        return bool(source) and Path(str(source)).expanduser().resolve() == EMBEDDED_MODEL.resolve()
    except OSError:
        return False


# -- metadata helpers ------------------------------------------------------------------------------

def config_hash(config) -> str:
    """16 hex digits hashing a UNet config (keys starting with "_" left out)."""
    clean = {key: value for key, value in dict(config).items() if not str(key).startswith("_")}
    text = json.dumps(clean, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_meta(pipe) -> dict:
    source = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")
    return {"name_or_path": "embedded shapes model" if is_embedded(pipe) else (str(source) if source else None),
            "unet_class": type(pipe.unet).__name__, "config_hash": config_hash(pipe.unet.config)}


def head_meta(index: HeadIndex) -> dict:
    return {"heads": {"fingerprint": index.fingerprint(), "n_heads": index.n_heads, "n_layers": index.n_layers,
                      "latent": list(index.latent_hw), "layout": index.layout()}}


def concept_meta(concept_set: ConceptSet) -> dict:
    return {"name": concept_set.name, "hash": concept_set.hash(), "source": concept_set.source,
            "license": concept_set.license, "concepts": {k: list(v) for k, v in concept_set.concepts.items()}}


def generation_defaults(pipe) -> tuple[int, float]:
    """(steps, guidance): the model's shipped defaults; the shapes evaluation's for the embedded model;
    else the paper's 50 steps at guidance 7.5."""
    from headscope.models import model_defaults

    defaults = model_defaults(pipe)
    fallback = (EMBEDDED_STEPS, EMBEDDED_GUIDANCE) if is_embedded(pipe) else (PAPER_STEPS, PAPER_GUIDANCE)
    return (int(defaults.get("num_inference_steps", fallback[0])),
            float(defaults.get("guidance_scale", fallback[1])))


def prompt_seed(seed: int, index: int, stream: str) -> int:
    """A 63-bit seed that depends only on (seed, prompt index, stream name)."""
    digest = hashlib.sha256(f"{seed}:{index}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _version() -> str:
    from headscope import __version__

    return __version__


def _replace_folder(stage: Path, target: Path) -> None:
    """Move the finished folder `stage` to `target`, replacing an older one only once `stage` is complete."""
    if target.exists() and not target.is_dir():
        raise HeadscopeError(f"{target} exists and is not a folder; give a .hrv file name or another folder")
    replace_folder(stage, target)


# -- concept keys ----------------------------------------------------------------------------------

@dataclass
class ConceptTokens:
    """Every concept word's token embeddings, concatenated, and where each word's tokens lie.

    embeddings: [tokens, dim] text-encoder outputs of the words' own tokens.
    spans[c][w]: (start, stop) of word w of concept c in `embeddings`.
    """

    embeddings: torch.Tensor
    spans: list[list[tuple[int, int]]]

    @property
    def n_words(self) -> list[int]:
        return [len(words) for words in self.spans]


@torch.no_grad()
def encode_concepts(pipe, concept_set: ConceptSet) -> ConceptTokens:
    """Encode each word alone with `pipe.encode_prompt` (the pipeline's own conditioning) and keep its
    own tokens' outputs."""
    concept_set.token_ids(pipe.tokenizer)  # validates: no empty or unknown word
    words = [word for concept in concept_set.names for word in concept_set.concepts[concept]]
    tokenizer = pipe.tokenizer
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    pieces = []
    for start in range(0, len(words), _WORD_CHUNK):
        chunk = words[start:start + _WORD_CHUNK]
        embeds = _encode(pipe, chunk)  # [words, keys, dim]
        for row, word in enumerate(chunk):
            ids = tokenizer(word, add_special_tokens=True).input_ids
            positions = [position for position, token in enumerate(ids) if token not in special]
            pieces.append(embeds[row, positions].float().cpu())
    spans, cursor, piece = [], 0, iter(pieces)
    for concept in concept_set.names:
        concept_spans = []
        for _ in concept_set.concepts[concept]:
            length = next(piece).shape[0]
            concept_spans.append((cursor, cursor + length))
            cursor += length
        spans.append(concept_spans)
    return ConceptTokens(embeddings=torch.cat(pieces), spans=spans)


def _encode(pipe, words: list[str]) -> torch.Tensor:
    """Conditional prompt embeddings [len(words), keys, dim] exactly as the pipeline makes them."""
    output = pipe.encode_prompt(prompt=words, device=pipe.device, num_images_per_prompt=1,
                                do_classifier_free_guidance=False)
    return output[0]


@torch.no_grad()
def project_keys(pipe, index: HeadIndex, embeddings: torch.Tensor) -> dict[int, tuple[torch.Tensor, float]]:
    """Per layer: (keys [heads, tokens, head_dim] float32, attn.scale), through the layer's own to_k."""
    keys = {}
    for layer in index.layers:
        attn = pipe.unet.get_submodule(layer.name)
        states = embeddings.to(device=attn.to_k.weight.device, dtype=attn.to_k.weight.dtype)[None]
        if attn.norm_cross:
            states = attn.norm_encoder_hidden_states(states)
        projected = attn.to_k(states)  # [1, tokens, heads * head_dim]
        projected = projected.view(1, -1, attn.heads, layer.head_dim).transpose(1, 2)  # [1, heads, tokens, head_dim]
        if attn.norm_k is not None:
            projected = attn.norm_k(projected)
        keys[layer.index] = (projected[0].float(), float(attn.scale))
    return keys


def concept_scores(query: torch.Tensor, keys: torch.Tensor, scale: float, token_index: torch.Tensor,
                   pooling: torch.Tensor) -> torch.Tensor:
    """Mean attention of each head's queries to each sampled concept word: [heads, concepts].

    query: [heads, n_query, head_dim]; keys: [heads, tokens, head_dim]; token_index: [sampled tokens]
    into keys; pooling: [sampled tokens, concepts], 1/len(word) on each word's tokens.
    Softmax over all sampled concept tokens per head and pixel, mean over pixels, mean over a word's tokens.
    """
    chosen = keys[:, token_index]  # [heads, sampled tokens, head_dim]
    scores = torch.matmul(query.float(), chosen.transpose(1, 2)) * scale  # [heads, n_query, sampled tokens]
    return scores.softmax(dim=-1).mean(dim=1) @ pooling


# -- the reader ------------------------------------------------------------------------------------

class ConceptVotes(Hook):
    """Reader of the conditional queries: one vote per head and layer call for its most-attended concept.

    State: `step_votes` [steps, concepts, heads] (int64 counts; soft: float64 summed probabilities),
    added to across pipeline calls. Before each call, `begin(prompt_indices)` names the global prompt
    index of every image of the batch; word sampling then uses one generator per prompt, seeded by
    (seed, prompt index) only.
    """

    rows = "cond"

    def __init__(self, tokens: ConceptTokens, keys: dict, n_heads: int, n_steps: int, *, soft: bool = False,
                 seed: int = 0):
        self.tokens, self.keys, self.soft, self.seed = tokens, keys, soft, seed
        self.n_words = torch.tensor(tokens.n_words, dtype=torch.float64)
        self.step_votes = torch.zeros(n_steps, len(tokens.spans), n_heads,
                                      dtype=torch.float64 if soft else torch.int64)
        self._generators: list[torch.Generator] = []

    def begin(self, prompt_indices) -> None:
        self._generators = [torch.Generator().manual_seed(prompt_seed(self.seed, index, "words"))
                            for index in prompt_indices]

    def wants_query(self, ctx: HookContext) -> bool:
        return True

    def sample(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One word per concept: (token index [sampled tokens], pooling [sampled tokens, concepts])."""
        draws = torch.rand(len(self.tokens.spans), generator=generator, dtype=torch.float64)
        choices = (draws * self.n_words).long().clamp(max=self.n_words.long() - 1)
        positions, owners = [], []
        for concept, (spans, choice) in enumerate(zip(self.tokens.spans, choices.tolist())):
            start, stop = spans[choice]
            positions.extend(range(start, stop))
            owners.extend([concept] * (stop - start))
        owner = torch.tensor(owners)
        pooling = torch.nn.functional.one_hot(owner, len(self.tokens.spans)).float()
        pooling = pooling / pooling.sum(dim=0, keepdim=True)
        return torch.tensor(positions), pooling

    def grow(self, n_steps: int) -> None:
        """Make room for `n_steps` UNet forwards per call (some schedulers run more than one per step)."""
        missing = n_steps - self.step_votes.shape[0]
        if missing > 0:
            extra = self.step_votes.new_zeros(missing, *self.step_votes.shape[1:])
            self.step_votes = torch.cat([self.step_votes, extra])

    @torch.no_grad()
    def read_query(self, ctx: HookContext, query: torch.Tensor) -> None:
        """query: [cond rows, heads, n_query, head_dim] of one layer call."""
        self.grow(ctx.step + 1)
        keys, scale = self.keys[ctx.layer.index]
        heads = torch.arange(ctx.layer.offset, ctx.layer.offset + ctx.layer.heads)
        for position, row in enumerate(ctx.rows):
            generator = self._generators[ctx.layout.prompt_index(ctx.layout.image(row))]
            token_index, pooling = self.sample(generator)
            scores = concept_scores(query[position].to(keys.device), keys, scale, token_index.to(keys.device),
                                    pooling.to(keys.device)).cpu()  # [heads, concepts]
            if self.soft:
                self.step_votes[ctx.step, :, heads] += scores.T.double()
            else:
                self.step_votes[ctx.step, scores.argmax(dim=1), heads] += 1


# -- the estimator ---------------------------------------------------------------------------------

class HRVBuilder:
    """Build Head Relevance Vectors from ordinary generations (scikit-learn shape).

        builder = HRVBuilder(ConceptSet.load("shapes"), seed=0).fit(pipe, prompts)
        builder.hrv_.save("shapes.hrv")

    Args:
        concepts: the concept set; the vote always runs over all of it.
        soft: add mean probabilities instead of argmax votes.
        seed: decides word sampling and each prompt's starting noise (per prompt: (seed, index)).
        steps, guidance: denoising steps and guidance scale (None: the model's defaults, else the
            paper's 50 steps at 7.5).
        batch_size: prompts per pipeline call (fixed chunks of the prompt list).
        partial: folder for partial vote counts: a rerun with the same arguments resumes from it (it is
            kept after `fit`; `discard_partial()` removes it once the result is saved). None: no files.
        save_every: write partial counts after about this many prompts.
        progress: tqdm bar on stderr.

    Fitted: `votes_` [concepts, heads], `step_votes_` [steps, concepts, heads] (int64; soft: float64),
    `hrv_` (HRV), `index_` (HeadIndex), `n_prompts_`, `is_main_` (False on the other processes of a
    multi-process run; every process holds the same result).
    Under several processes (`accelerate launch --multi_gpu --num_processes N`, or torchrun) the prompt
    batches are split across processes and the counts sum-reduced; every process ends with the same result.
    """

    def __init__(self, concepts: ConceptSet, *, soft: bool = False, seed: int = 0, steps: int | None = None,
                 guidance: float | None = None, batch_size: int = 4, partial: str | Path | None = None,
                 save_every: int = 32, progress: bool = False):
        self.concepts = concepts
        self.soft = soft
        self.seed = seed
        self.steps = steps
        self.guidance = guidance
        self.batch_size = batch_size
        self.partial = partial
        self.save_every = save_every
        self.progress = progress

    def fit(self, pipe, prompts) -> "HRVBuilder":
        prompts = self._check(prompts)
        steps, guidance = generation_defaults(pipe)
        steps = self.steps or steps
        guidance = self.guidance if self.guidance is not None else guidance
        index = HeadIndex.from_unet(pipe.unet)
        tokens = encode_concepts(pipe, self.concepts)
        keys = project_keys(pipe, index, tokens.embeddings)
        reader = ConceptVotes(tokens, keys, index.n_heads, steps, soft=self.soft, seed=self.seed)
        batches = [list(range(start, min(start + self.batch_size, len(prompts))))
                   for start in range(0, len(prompts), self.batch_size)]
        settings = {"model": model_meta(pipe), "fingerprint": index.fingerprint(),
                    "concepts": self.concepts.hash(), "prompts": _prompts_hash(prompts), "seed": self.seed,
                    "steps": steps, "guidance": guidance, "soft": self.soft, "batch_size": self.batch_size}
        with Processes() as processes:
            mine = processes.split(list(range(len(batches))))
            store = _PartialStore(self.partial, settings, processes.rank, processes.world)
            done = store.restore(reader)
            self._generate(pipe, prompts, batches, [b for b in mine if b not in done], reader, store, done,
                           steps, guidance, processes.is_main)
            step_votes = processes.sum(reader.step_votes)
        self.step_votes_ = step_votes
        self.votes_ = step_votes.sum(dim=0)
        self.index_ = index
        self.n_prompts_ = len(prompts)
        self.is_main_ = processes.is_main
        meta = {"source": "headscope HRVBuilder", "model": settings["model"], **head_meta(index),
                "concept_set": concept_meta(self.concepts), "prompts": prompts, "n_prompts": len(prompts),
                "steps": steps, "guidance": guidance, "seed": self.seed,
                "scheduler": type(pipe.scheduler).__name__, "soft": self.soft, "batch_size": self.batch_size,
                "processes": processes.world, "headscope_version": _version()}
        self.hrv_ = HRV.from_votes(self.votes_, self.concepts.names, meta, step_votes)
        return self

    def discard_partial(self) -> None:
        """Delete the partial-results folder (call once the HRV is safely saved)."""
        if self.partial is not None:
            shutil.rmtree(self.partial, ignore_errors=True)

    def _check(self, prompts) -> list[str]:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [str(prompt) for prompt in prompts]
        if not prompts:
            raise HeadscopeError("no prompts to build the HRV from; give at least one")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise HeadscopeError(f"batch_size={self.batch_size!r}; use a positive integer")
        if self.steps is not None and self.steps < 1:
            raise HeadscopeError(f"steps={self.steps}; use a positive integer")
        return prompts

    def _generate(self, pipe, prompts, batches, todo, reader, store, done, steps, guidance, is_main) -> None:
        from tqdm.auto import tqdm

        import headscope

        every = max(1, self.save_every // self.batch_size)
        total = sum(len(batches[b]) for b in todo)
        with tqdm(total=total, desc="hrv votes", unit="prompt", disable=not (self.progress and is_main)) as bar, \
                headscope.trace(pipe, hooks=[reader], maps=False):
            for count, batch in enumerate(todo, start=1):
                self._run_batch(pipe, [prompts[i] for i in batches[batch]], batches[batch], reader, steps, guidance)
                done.add(batch)
                bar.update(len(batches[batch]))
                if count % every == 0 or count == len(todo):
                    store.save(reader, done)

    @torch.no_grad()
    def _run_batch(self, pipe, texts, prompt_indices, reader, steps, guidance) -> None:
        reader.begin(prompt_indices)
        generators = [torch.Generator("cpu").manual_seed(prompt_seed(self.seed, i, "latents")) for i in prompt_indices]
        pipe(texts, num_inference_steps=steps, guidance_scale=guidance, generator=generators, output_type="latent")


def _prompts_hash(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()[:16]


class Processes:
    """One process, or the processes of `accelerate launch` (PartialState; sum over gloo/NCCL)."""

    def __enter__(self) -> "Processes":
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            try:
                from accelerate import PartialState
            except ImportError:
                raise HeadscopeError("WORLD_SIZE > 1 but accelerate is not installed; "
                                     "pip install 'headscope[accelerate]'") from None
            # `accelerate launch --cpu`, or a machine without CUDA: processes on CPU, summed over gloo.
            cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") \
                or not torch.cuda.is_available()
            self.state = PartialState(cpu=cpu)
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    @property
    def device(self) -> str | None:
        """This process's device under accelerate (e.g. cuda:1); None in a single process."""
        return str(self.state.device) if self.state else None

    @property
    def rank(self) -> int:
        return self.state.process_index if self.state else 0

    @property
    def world(self) -> int:
        return self.state.num_processes if self.state else 1

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process if self.state else True

    def split(self, items: list) -> list:
        if self.state is None:
            return items
        with self.state.split_between_processes(items) as mine:
            return list(mine)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of every process's tensor (every process gets the result)."""
        if self.state is None:
            return tensor.clone()
        from accelerate.utils import reduce

        self.state.wait_for_everyone()
        return reduce(tensor.to(self.state.device), reduction="sum").cpu()


class _PartialStore:
    """Partial vote counts of one process: `<partial>/rank-R-of-W.safetensors`, written atomically.

    The file's header holds the build settings' hash and the finished batch numbers; a file made with
    other settings is refused (HeadscopeError), never silently mixed in.
    """

    def __init__(self, folder, settings: dict, rank: int, world: int):
        self.folder = Path(folder) if folder is not None else None
        self.rank, self.world = rank, world
        text = json.dumps({**settings, "processes": world}, sort_keys=True, default=str)
        self.settings_hash = hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def path(self) -> Path:
        return self.folder / f"rank-{self.rank}-of-{self.world}.safetensors"

    def restore(self, reader: ConceptVotes) -> set[int]:
        """Load this process's partial counts into `reader`; returns the finished batch numbers."""
        if self.folder is None or not self.path.is_file():
            if self.folder is not None and self.folder.is_dir() and any(self.folder.glob("rank-*-of-*.safetensors")) \
                    and not any(self.folder.glob(f"rank-*-of-{self.world}.safetensors")):
                raise HeadscopeError(f"partial results in {self.folder} were made with another number of "
                                     f"processes; resume with that number or delete {self.folder}")
            return set()
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as handle:
                state = json.loads((handle.metadata() or {})["state"])
                step_votes = handle.get_tensor("step_votes")
        except Exception:
            raise HeadscopeError(f"{self.path} is damaged; delete {self.folder} and build again") from None
        if state.get("settings") != self.settings_hash or step_votes.shape[1:] != reader.step_votes.shape[1:] \
                or step_votes.dtype != reader.step_votes.dtype:
            raise HeadscopeError(f"partial results in {self.folder} were made with other arguments; "
                                 f"rerun with the same arguments to resume, or delete {self.folder}")
        reader.grow(step_votes.shape[0])
        reader.step_votes[:step_votes.shape[0]] = step_votes
        return set(state["done"])

    def save(self, reader: ConceptVotes, done: set[int]) -> None:
        if self.folder is None:
            return
        from safetensors.torch import save_file

        state = {"settings": self.settings_hash, "done": sorted(done)}
        with atomic_path(self.path) as temporary:
            save_file({"step_votes": reader.step_votes.contiguous()}, str(temporary),
                      metadata={"state": json.dumps(state)})

