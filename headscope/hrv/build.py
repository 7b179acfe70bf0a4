"""HRVBuilder: the estimator that generates, votes and sums, resumable and multi-process."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from headscope.concepts import ConceptSet
from headscope.errors import HeadscopeError
from headscope.heads import HeadIndex
from headscope.hrv.file import HRV
from headscope.hrv.meta import _version, concept_meta, generation_defaults, head_meta, model_meta, prompt_seed
from headscope.hrv.processes import Processes
from headscope.hrv.votes import ConceptVotes, concept_reader
from headscope.io import atomic_path


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
        call_options: further pipeline-call arguments (e.g. an SD3 / Flux model's `max_sequence_length`,
            `height` / `width`).
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
                 save_every: int = 32, progress: bool = False, call_options: dict | None = None):
        self.concepts = concepts
        self.soft = soft
        self.seed = seed
        self.steps = steps
        self.guidance = guidance
        self.batch_size = batch_size
        self.partial = partial
        self.save_every = save_every
        self.progress = progress
        self.call_options = call_options

    def fit(self, pipe, prompts) -> "HRVBuilder":
        prompts = self._check(prompts)
        _check_words(pipe, prompts, self.call_options)
        steps, guidance = generation_defaults(pipe)
        steps = self.steps or steps
        guidance = self.guidance if self.guidance is not None else guidance
        index = HeadIndex.from_model(pipe)
        reader, stream = concept_reader(pipe, index, self.concepts, steps, soft=self.soft, seed=self.seed)
        batches = [list(range(start, min(start + self.batch_size, len(prompts))))
                   for start in range(0, len(prompts), self.batch_size)]
        settings = {"model": model_meta(pipe), "fingerprint": index.fingerprint(),
                    "concepts": self.concepts.hash(), "prompts": _prompts_hash(prompts), "seed": self.seed,
                    "steps": steps, "guidance": guidance, "soft": self.soft, "batch_size": self.batch_size,
                    # joint attention: one word draw per forward since #13 (older partial builds drew per block)
                    **({"word_draws": "per forward"} if stream is not None else {}),
                    **({"call": self.call_options} if self.call_options else {})}
        with Processes() as processes:
            mine = processes.split(list(range(len(batches))))
            store = _PartialStore(self.partial, settings, processes.rank, processes.world)
            done = store.restore(reader)
            self._generate(pipe, prompts, batches, [b for b in mine if b not in done], reader, stream, store, done,
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
                "processes": processes.world, "call_options": self.call_options, "headscope_version": _version()}
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

    def _generate(self, pipe, prompts, batches, todo, reader, stream, store, done, steps, guidance, is_main) -> None:
        import headscope
        from tqdm.auto import tqdm

        every = max(1, self.save_every // self.batch_size)
        total = sum(len(batches[b]) for b in todo)
        with tqdm(total=total, desc="hrv votes", unit="prompt", disable=not (self.progress and is_main)) as bar, \
                headscope.trace(pipe, hooks=[reader] if stream is None else [], maps=False, concepts=stream):
            for count, batch in enumerate(todo, start=1):
                self._run_batch(pipe, [prompts[i] for i in batches[batch]], batches[batch], reader, steps, guidance)
                if stream is not None:
                    stream.flush()  # done after the last step; here too if a call stopped short of it
                done.add(batch)
                bar.update(len(batches[batch]))
                if count % every == 0 or count == len(todo):
                    store.save(reader, done)

    @torch.no_grad()
    def _run_batch(self, pipe, texts, prompt_indices, reader, steps, guidance) -> None:
        reader.begin(prompt_indices)
        generators = [torch.Generator("cpu").manual_seed(prompt_seed(self.seed, i, "latents")) for i in prompt_indices]
        pipe(texts, num_inference_steps=steps, guidance_scale=guidance, generator=generators, output_type="latent",
             **(self.call_options or {}))


def _check_words(pipe, prompts: list[str], call_options: dict | None) -> None:
    """Refuse, before generating anything, a prompt that is too long for one of the model's text encoders or
    has words it cannot represent."""
    from headscope.prompts import prompt_tokens

    lengths = {key: value for key, value in (call_options or {}).items() if key == "max_sequence_length"}
    for number, prompt in enumerate(prompts, start=1):
        try:
            prompt_tokens(pipe, prompt, **lengths)
        except HeadscopeError as error:
            raise HeadscopeError(f"prompt {number} ({prompt!r}): {error}") from None


def _prompts_hash(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()[:16]



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
