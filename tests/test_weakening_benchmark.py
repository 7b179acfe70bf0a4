"""benchmarks/weakening.py: HRV variants side by side on both tiny shapes models, generations shared per model,
specificity per concept, today's keys kept, bad variants refused before anything is loaded."""
import json

import pytest
import torch

from headscope.hrv import HRV

OLD_KEYS = {"model", "hrv", "device", "torch", "threads", "machine", "n_heads", "k", "factor", "n_prompts", "seeds",
            "steps", "rows", "run"}
OLD_ROW_KEYS = {"concept", "accuracy", "drop_morhf", "drop_lerhf", "drop_random", "others_drop_morhf",
                "others_drop_lerhf", "others_drop_random"}


def test_variants_of_both_models_share_each_models_unweakened_images(tmp_path, monkeypatch, capsys, load_benchmark):
    from headscope.weaken import OrderedWeakening

    benchmark = load_benchmark("weakening")
    unweakened = []
    original = OrderedWeakening._generate

    def counting(self, pipe, heads, *args):
        if not heads:
            unweakened.append(type(pipe).__name__)
        return original(self, pipe, heads, *args)

    monkeypatch.setattr(OrderedWeakening, "_generate", counting)
    out = tmp_path / "weakening.json"
    benchmark.main(["--tiny", "--models", "shapes,shapes-mmdit", "--n-prompts", "1", "--seeds", "0", "--steps", "1",
                    "--variants", "argmax,soft:early,argmax:head-share", "--soft-prompts", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert OLD_KEYS | {"comparison", "generations", "share"} == set(result) and result["share"] == 0.25
    assert [(entry["model"], entry["variant"]) for entry in result["comparison"]] == [
        (model, variant) for model in ("shapes", "shapes-mmdit") for variant in ("argmax", "soft:early", "argmax:head-share")]
    assert sorted(unweakened) == ["StableDiffusion3Pipeline", "StableDiffusionPipeline"]  # once per model
    soft_early, head_share = result["comparison"][1]["hrv"], result["comparison"][2]["hrv"]
    assert soft_early["soft"] and soft_early["step_window"] == [0, 1] and soft_early["n_prompts"] == 2
    assert head_share["relevance"] == "head shares" and not head_share["soft"]
    for entry in result["comparison"]:
        assert [row["concept"] for row in entry["rows"]] == ["color", "shape", "size", "position", "count", "fill"]
        assert entry["k"] == entry["n_heads"] // 4
        assert all(row["morhf_minus_lerhf"] == pytest.approx(row["drop_morhf"] - row["drop_lerhf"])
                   for row in entry["rows"])
    assert result["rows"] == result["comparison"][0]["rows"] and result["n_heads"] == 20
    printed = capsys.readouterr().out
    assert "shapes-mmdit  soft:early" in printed and "MoRHF - LeRHF" in printed


def test_a_plain_run_keeps_todays_keys(tmp_path, load_benchmark):
    out = tmp_path / "weakening.json"
    load_benchmark("weakening").main(["--tiny", "--n-prompts", "1", "--seeds", "0", "--steps", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert OLD_KEYS <= set(result) and len(result["comparison"]) == 1
    assert result["model"] == result["comparison"][0]["description"] and result["comparison"][0]["variant"] == "argmax"
    assert all(OLD_ROW_KEYS < set(row) for row in result["rows"])


def test_specificity_is_the_concepts_morhf_drop_against_the_others_and_against_lerhf(load_benchmark):
    summary = [{"order": order, "k": k, "concept": concept, "role": "weakened" if concept == "color" else "control",
                "mean": mean} for order, k, concept, mean in [
                   ("morhf", 0, "color", 1.0), ("morhf", 2, "color", 0.4), ("lerhf", 2, "color", 0.9),
                   ("random", 2, "color", 0.8), ("morhf", 0, "shape", 1.0), ("morhf", 2, "shape", 0.9),
                   ("lerhf", 2, "shape", 1.0), ("random", 2, "shape", 1.0), ("morhf", 0, "size", 0.5),
                   ("morhf", 2, "size", 0.2), ("lerhf", 2, "size", 0.5), ("random", 2, "size", 0.5)]]
    row = load_benchmark("weakening").concept_row("color", summary, 2)
    assert row["drop_morhf"] == pytest.approx(0.6) and row["others_drop_morhf"] == pytest.approx(0.2)
    assert row["morhf_minus_others"] == pytest.approx(0.4) and row["morhf_minus_lerhf"] == pytest.approx(0.5)


def test_step_windows_are_thirds_rounded_up(load_benchmark):
    third = load_benchmark("weakening").third

    def hrv(steps):
        return HRV(["color"], torch.ones(1, 4), torch.ones(steps, 1, 4), {})

    assert [third(hrv(25), window) for window in ("early", "middle", "late")] == [(0, 9), (8, 17), (16, 25)]
    assert [third(hrv(2), window) for window in ("early", "middle", "late")] == [(0, 1), (0, 1), (1, 2)]


@pytest.mark.parametrize("options, message", [
    (["--variants", "argmax,softest"], "unknown HRV variant 'softest'"),
    (["--variants", "argmax:late:first"], "VIEW one of early, middle, late, head-share"),
    (["--variants", "soft"], "the soft variant needs --hrv-soft FILE"),
    (["--hrv-extra", "soft=x.hrv"], "give NAME=FILE with a NAME other than argmax, soft"),
    (["--hrv-soft", "missing.hrv", "--variants", "soft"], "no HRV file at missing.hrv"),
    (["--share", "0"], "--share 0.0: give the share of the heads to weaken, above 0 and at most 1"),
    (["--share", "1.5"], "--share 1.5: give the share"),
])
def test_bad_variants_are_one_line_errors_before_any_model_loads(tmp_path, capsys, monkeypatch, options, message,
        load_benchmark):
    benchmark = load_benchmark("weakening")
    monkeypatch.setattr(benchmark, "load_model", lambda *args: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--tiny", *options, "--out", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_an_hrv_file_that_fits_no_model_is_refused(tmp_path, capsys, load_benchmark):
    from headscope.hrv import default_hrv_path

    with pytest.raises(SystemExit) as exit_info:
        load_benchmark("weakening").main(["--tiny", "--hrv-extra", f"words={default_hrv_path('shapes')}",
                                          "--variants", "words", "--out", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2 and "fits none of the models (shapes): HRV built for" in capsys.readouterr().err


def test_share_sets_how_many_heads_each_order_weakens(tmp_path, load_benchmark):
    out = tmp_path / "weakening.json"
    load_benchmark("weakening").main(["--tiny", "--n-prompts", "1", "--seeds", "0", "--steps", "1", "--share", "1.0",
                                      "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["share"] == 1.0 and result["k"] == result["n_heads"] == 20
    row = result["rows"][0]  # every head weakened: the three orders pick the same heads
    assert row["drop_morhf"] == row["drop_lerhf"] == row["drop_random"]
