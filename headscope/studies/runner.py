"""The one loop every study shares: prompts -> generations -> per-image records -> summary, resumable.

A study (`Study`) says what to measure on one generated image and how to summarise and plot the
records; `StudyRunner` does the rest, the way `HRVBuilder` does for votes:
  - jobs are (prompt, variant) pairs (a variant is a set of pipeline-call overrides, e.g. one guidance
    scale); every prompt gets its own starting noise, `prompt_seed(seed, prompt index, "latents")`,
    the same for every variant, so variants compare like with like;
  - under `accelerate launch` / torchrun the batches of jobs are split across processes and the
    records gathered, so every process ends with the same records;
  - every finished job is committed to a partial folder (its image and arrays first, then one JSON
    line), so a rerun with the same arguments resumes where the last one stopped; a partial folder made
    with other arguments is refused. The partial folder must be visible to every process (one machine,
    or a shared file system).
"""
from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from headscope.errors import HeadscopeError
from headscope.hrv.meta import generation_defaults, model_meta, prompt_seed
from headscope.hrv.processes import Processes
from headscope.maps.daam import threshold
from headscope.studies.store import RecordStore, jsonable, settings_hash

DEFAULT_TAU = 0.4  # DAAM's threshold on min-max normalised maps


@dataclass(frozen=True)
class Job:
    """One generation: the prompt (and its shapes-world scene, when sampled) under one variant."""

    key: str
    prompt_index: int
    variant: int
    prompt: str
    seed: int
    scene: dict | None = None  # Scene.to_json() of a sampled shapes-world scene


@dataclass
class Sample:
    """One generated image and what a study may read about it.

    `trace` is the `headscope.trace` of the batch the image belongs to and `image_index` its row in
    that batch; `batch` is what the study's `recording` context yielded for that batch (None if it
    records nothing of its own).
    """

    job: Job
    image: object  # PIL image
    trace: object
    image_index: int
    tau: float
    batch: object = None
    example: bool = False

    def word_map(self, word: str, occurrence: int = 0, **options) -> torch.Tensor:
        """DAAM map [H, W] of a prompt word in this image (float32, CPU)."""
        return self.trace.word_map(word, occurrence=occurrence, image=self.image_index, **options).float().cpu()

    def mask(self, word: str, occurrence: int = 0, **options) -> torch.Tensor:
        """The word's map thresholded at tau: bool [H, W]."""
        return threshold(self.word_map(word, occurrence, **options), self.tau)

    @cached_property
    def parse(self):
        """spaCy's reading of the prompt (`headscope.language.parse`)."""
        from headscope.language import parse

        return parse(self.job.prompt)

    @cached_property
    def scene(self):
        """The shapes-world scene the prompt was sampled from, or None for a prompt from a file."""
        return scene_from_json(self.job.scene) if self.job.scene is not None else None

    @cached_property
    def objects(self):
        """The annotator's objects of the image (shapes world), largest first."""
        from headscope.shapes.annotate import annotate

        return annotate(self.image)


class Study:
    """What one study measures. Subclasses set `name` and override the methods they need."""

    name = "study"
    title = ""
    uses_spacy = True
    keep_steps = False
    captions: dict = {}  # figure file name -> what it shows, for the report page

    def settings(self) -> dict:
        """The study's own parameters (they enter the partial folder's hash and the JSON)."""
        return {}

    def variants(self) -> list[dict]:
        """Pipeline-call overrides, one dict per variant (default: one variant, no overrides)."""
        return [{}]

    def variant_label(self, variant: int) -> str:
        return ""

    def shapes_scenes(self, sampler, n: int) -> list:
        """Shapes-world scenes to generate when no prompt file is given (a shapes model)."""
        return [sampler.sample() for _ in range(n)]

    def check_prompts(self, prompts: list[str]) -> None:
        """Refuse a prompt list that cannot give any record (HeadscopeError)."""

    def recording(self, pipe):
        """A context manager around one batch's pipeline call; what it yields is `Sample.batch`."""
        return nullcontext(None)

    def measure(self, sample: Sample) -> tuple[dict, dict]:
        """(record, arrays): a JSON-able record of the image and numpy arrays kept for the figures."""
        raise NotImplementedError

    def summarize(self, records: list[dict]) -> dict:
        """The study's summary; its "table" (a list of flat dicts) becomes the CSV."""
        raise NotImplementedError

    def figures(self, summary: dict, records: list[dict], store: "RecordStore") -> dict:
        """{file name: matplotlib Figure}."""
        return {}

    def headline(self, summary: dict) -> list[str]:
        """A few lines for the terminal."""
        return []


class StudyRunner:
    """Run a study over prompts (scikit-learn shape): `StudyRunner(study, ...).fit(pipe, prompts)`.

    Args:
        study: the `Study`.
        seed: decides every prompt's starting noise (per prompt: prompt_seed(seed, index, "latents")).
        steps, guidance: denoising steps and guidance scale (None: the model's defaults).
        batch_size: jobs per pipeline call.
        tau: threshold of normalised word maps (DAAM: 0.4).
        examples: the first N prompts keep arrays for example figures.
        partial: folder for per-job records; a rerun with the same arguments resumes from it. None: a
            temporary folder, removed by `discard_partial`.
        progress: tqdm bar on stderr (main process only).

    Fitted: `records_` (one dict per job, in job order), `summary_`, `settings_`, `is_main_`.
    """

    def __init__(self, study: Study, *, seed: int = 0, steps: int | None = None, guidance: float | None = None,
                 batch_size: int = 4, tau: float = DEFAULT_TAU, examples: int = 4, partial=None,
                 progress: bool = False):
        self.study = study
        self.seed = seed
        self.steps = steps
        self.guidance = guidance
        self.batch_size = batch_size
        self.tau = tau
        self.examples = examples
        self.partial = partial
        self.progress = progress

    def fit(self, pipe, prompts) -> "StudyRunner":
        """prompts: a list of strings, or of shapes-world `Scene`s (their captions are the prompts)."""
        jobs = self._jobs(prompts)
        steps, guidance = generation_defaults(pipe)
        steps = self.steps or steps
        guidance = self.guidance if self.guidance is not None else guidance
        self.settings_ = {"study": self.study.name, **self.study.settings(), "model": model_meta(pipe),
                          "scheduler": type(pipe.scheduler).__name__, "seed": self.seed, "steps": steps,
                          "guidance": guidance, "tau": self.tau, "batch_size": self.batch_size,
                          "n_prompts": len({job.prompt_index for job in jobs}),
                          "prompts_hash": settings_hash([job.prompt for job in jobs])}
        self.store = RecordStore(self.partial, self.settings_)
        with Processes() as processes:
            done = self.store.restore()
            if processes.state is not None:
                processes.state.wait_for_everyone()  # nobody writes before every process has read
            batches = _batches([job for job in jobs if job.key not in done], self.batch_size)
            mine = [batches[number] for number in processes.split(list(range(len(batches))))]
            self.store.open(processes.rank)
            try:
                self._generate(pipe, mine, steps, guidance, processes.is_main)
            finally:
                self.store.close()
            records = _gather(processes, self.store.records_of_this_run) | done
            self.is_main_ = processes.is_main
        self.records_ = [records[job.key] for job in jobs]
        self.summary_ = {**self.study.summarize(self.records_), "tau": self.tau}
        return self

    def _jobs(self, prompts) -> list[Job]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise HeadscopeError("no prompts to study; give at least one")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise HeadscopeError(f"batch_size={self.batch_size!r}; use a positive integer")
        if self.steps is not None and self.steps < 1:
            raise HeadscopeError(f"steps={self.steps}; use a positive integer")
        if not 0.0 <= self.tau <= 1.0:
            raise HeadscopeError(f"tau={self.tau} must lie in [0, 1]")
        scenes = [None if isinstance(item, str) else item.to_json() for item in prompts]
        texts = [item if isinstance(item, str) else item.caption for item in prompts]
        self.study.check_prompts(texts)
        variants = self.study.variants()
        return [Job(key=f"p{index:05d}" + (f"-v{variant}" if len(variants) > 1 else ""), prompt_index=index,
                    variant=variant, prompt=text, seed=prompt_seed(self.seed, index, "latents"), scene=scene)
                for variant in range(len(variants)) for index, (text, scene) in enumerate(zip(texts, scenes))]

    def _generate(self, pipe, batches, steps, guidance, is_main) -> None:
        import headscope
        from tqdm.auto import tqdm

        variants = self.study.variants()
        total = sum(len(batch) for batch in batches)
        with tqdm(total=total, desc=f"study {self.study.name}", unit="image",
                  disable=not (self.progress and is_main)) as bar:
            for batch in batches:
                call = {"num_inference_steps": steps, "guidance_scale": guidance, **variants[batch[0].variant]}
                generators = [torch.Generator("cpu").manual_seed(job.seed) for job in batch]
                with torch.no_grad(), self.study.recording(pipe) as recorded, \
                        headscope.trace(pipe, keep_steps=self.study.keep_steps) as tc:
                    images = pipe([job.prompt for job in batch], generator=generators, **call).images
                for row, (job, image) in enumerate(zip(batch, images)):
                    sample = Sample(job, image, tc, row, self.tau, recorded, example=job.prompt_index < self.examples)
                    record, arrays = self.study.measure(sample)
                    record = {"key": job.key, "prompt": job.prompt, "prompt_index": job.prompt_index,
                              "variant": job.variant, "seed": job.seed, **record}
                    self.store.add(job.key, record, image, arrays)
                    bar.update(1)

    def write(self, folder: Path) -> list[str]:
        """Write `<name>.json`, `<name>.csv`, the figures and images/ into `folder` (a staging folder)."""
        from headscope.viz import save_figure

        folder = Path(folder)
        name = self.study.name
        payload = {"study": name, "title": self.study.title, "figures": dict(self.study.captions),
                   "settings": self.settings_, "summary": self.summary_, "records": self.records_}
        files = [f"{name}.json", f"{name}.csv"]
        (folder / files[0]).write_text(json.dumps(payload, indent=1, default=jsonable) + "\n")
        (folder / files[1]).write_text(table_csv(self.summary_.get("table", [])))
        for file_name, figure in self.study.figures(self.summary_, self.records_, self.store).items():
            save_figure(figure, folder / file_name)
            files.append(file_name)
        (folder / "images").mkdir(exist_ok=True)
        for record in self.records_:
            source = self.store.image_path(record["key"])
            if source.is_file():
                shutil.copyfile(source, folder / "images" / source.name)
                files.append(f"images/{source.name}")
        return files

    def discard_partial(self) -> None:
        """Delete the partial folder (call once the results are safely written)."""
        shutil.rmtree(self.store.folder, ignore_errors=True)


def described_single(obj, *, say_size: bool, say_color: bool = True, say_fill: bool = True,
                     use_one: bool = False):
    """A one-object shapes-world Scene whose caption names the chosen attributes and always the position."""
    from headscope.shapes.world import POSITION_PHRASES, Scene, noun_phrase

    caption = noun_phrase(obj, say_size=say_size, say_color=say_color, say_fill=say_fill,
                          use_one=use_one) + " " + POSITION_PHRASES[obj.position]
    return Scene([obj], caption, "single", {"size": say_size, "color": say_color, "fill": say_fill,
                                            "position": True})


def scene_from_json(data: dict):
    """A shapes-world Scene back from `Scene.to_json()`."""
    from headscope.shapes.world import ObjectSpec, Scene

    objects = [ObjectSpec(**{**item, "center": tuple(item["center"])}) for item in data["objects"]]
    return Scene(objects, data["caption"], data["kind"], dict(data.get("mentioned", {})))


def table_csv(rows: list[dict]) -> str:
    """Rows of flat dicts as CSV text (the union of their keys, in first-seen order)."""
    import csv
    import io

    fields = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: _cell(row.get(key)) for key in fields} for row in rows)
    return buffer.getvalue()


def coverage(heat_map: torch.Tensor, tau: float = DEFAULT_TAU) -> float:
    """Share of the image (0..1) where the min-max normalised map [H, W] is >= tau."""
    return float(threshold(heat_map, tau).float().mean())


def overlap(first: torch.Tensor, second: torch.Tensor) -> dict:
    """How two bool masks [H, W] overlap: IoU and the share of each inside the other (None if empty)."""
    both = float((first & second).sum())
    union = float((first | second).sum())
    size_first, size_second = float(first.sum()), float(second.sum())
    return {"iou": both / union if union else None,
            "first_in_second": both / size_first if size_first else None,
            "second_in_first": both / size_second if size_second else None}


def mean(values) -> float | None:
    values = [float(value) for value in values if value is not None]
    return float(np.mean(values)) if values else None


def _batches(jobs: list[Job], size: int) -> list[list[Job]]:
    """Consecutive jobs of the same variant, at most `size` per batch."""
    batches: list[list[Job]] = []
    for job in jobs:
        if batches and len(batches[-1]) < size and batches[-1][0].variant == job.variant:
            batches[-1].append(job)
        else:
            batches.append([job])
    return batches


def _gather(processes: Processes, records: dict) -> dict:
    """Every process's records, on every process."""
    if processes.state is None:
        return dict(records)
    from accelerate.utils import gather_object

    processes.state.wait_for_everyone()
    return dict(gather_object(list(records.items())))


def _cell(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return "" if value is None else value


__all__ = ["DEFAULT_TAU", "Job", "RecordStore", "Sample", "Study", "StudyRunner", "coverage", "mean", "overlap",
           "scene_from_json", "table_csv"]
