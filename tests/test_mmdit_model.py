"""The SD3-style shapes model: architecture, text layout, and a tiny training run end to end."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from headscope.shapes.mmdit import (SHIPPED_MODEL, MMDiTConfig, build_text_encoders, build_transformer,
                                    encode_captions, random_mmdit_pipeline, warm_start_clip1)
from headscope.shapes.tokenizer import build_tokenizer
from headscope.shapes.train_mmdit import (batch_indices, learning_rate, pair_scenes, sample_sigmas, tiny_config,
                                          train_mmdit)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 20-step tiny run, checkpointed at 10 and 20, exported at 20."""
    run = tmp_path_factory.mktemp("mmdit") / "run"
    train_mmdit(run, tiny_config(), progress=False)
    return run


@pytest.fixture(scope="module")
def exported(tiny_run):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(tiny_run / "pipeline"), torch_dtype=torch.float32)  # no extra kwargs
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_random_pipeline_makes_a_64_pixel_image_in_two_steps():
    pipe = random_mmdit_pipeline()
    out = pipe("a red circle", num_inference_steps=2, guidance_scale=5.0, max_sequence_length=24,
               output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3)
    assert pipe.transformer.config.patch_size == 1


def test_text_layout_is_clip_tokens_padded_to_t5_width_then_t5_tokens():
    pipe = random_mmdit_pipeline()
    embeds, pooled = encode_captions(pipe, ["a red circle", ""], max_sequence_length=24)
    clip_width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    t5_width = pipe.text_encoder_3.config.d_model
    assert embeds.shape == (2, 48, t5_width) and pipe.transformer.config.joint_attention_dim == t5_width
    assert pooled.shape == (2, clip_width) and MMDiTConfig().text_tokens == 48
    assert bool((embeds[:, :24, clip_width:] == 0).all())  # SD3's zero padding of the CLIP tokens
    assert bool((embeds[:, 24:].abs().sum(-1) > 0).all())  # T5 tokens carry the caption


def test_exported_run_loads_through_a_plain_from_pretrained_and_generates(exported, tiny_run):
    assert type(exported).__name__ == "StableDiffusion3Pipeline"
    meta = json.loads((tiny_run / "pipeline" / "headscope.json").read_text())
    assert meta["kind"] == "shapes-world" and meta["steps_trained"] == 20
    out = exported("a small blue star", output_type="np", **{**meta["defaults"], "num_inference_steps": 2})
    assert out.images.shape == (1, 64, 64, 3)


def test_training_text_is_what_the_pipeline_feeds_the_transformer(exported, tiny_run):
    """Conditional rows = encode_captions(prompt); the CFG row = encode_captions("") = caption dropout."""
    defaults = json.loads((tiny_run / "pipeline" / "headscope.json").read_text())["defaults"]
    seen = {}

    def record(module, args, kwargs):
        seen["text"], seen["pooled"] = kwargs["encoder_hidden_states"], kwargs["pooled_projections"]

    prompts = ["a red circle on the left", "two green squares"]
    handle = exported.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        exported(prompts, output_type="latent", **{**defaults, "num_inference_steps": 1})
    finally:
        handle.remove()
    with torch.no_grad():
        cond, cond_pooled = encode_captions(exported, prompts, defaults["max_sequence_length"])
        empty, empty_pooled = encode_captions(exported, ["", ""], defaults["max_sequence_length"])
    torch.testing.assert_close(seen["text"], torch.cat([empty, cond]), rtol=0, atol=0)
    torch.testing.assert_close(seen["pooled"], torch.cat([empty_pooled, cond_pooled]), rtol=0, atol=0)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tiny_run, tmp_path):
    run = tmp_path / "resumed"
    train_mmdit(run, tiny_config(steps=10, latents_from=str(tiny_run)), progress=False)
    assert torch.load(run / "checkpoint" / "state.pt", weights_only=True)["step"] == 10
    train_mmdit(run, tiny_config(steps=20), progress=False)
    resumed, straight = (load_file(str(r / "checkpoint" / "weights.safetensors")) for r in (run, tiny_run))
    assert resumed.keys() == straight.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)
    steps = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert {"stage": "resume", "step": 10}.items() <= next(r for r in steps if r["stage"] == "resume").items()


def test_noise_levels_mix_logit_normal_with_a_high_noise_share():
    cfg = tiny_config(high_noise_share=0.25, high_noise_from=0.8)
    sigmas = sample_sigmas(cfg, 4000, torch.Generator().manual_seed(0))
    assert 0 < sigmas.min() and sigmas.max() <= 1
    assert bool((sigmas[:1000] >= 0.8).all())
    # shift 2 moves the logit-normal median from 0.5 to 2/3
    assert abs(float(sigmas[1000:].median()) - 2 / 3) < 0.03


def test_batches_depend_only_on_seed_and_step():
    cfg = tiny_config(batch=6)
    first = batch_indices(cfg, 7, 20)
    assert torch.equal(first, batch_indices(cfg, 7, 20)) and len(first) == 6
    assert not torch.equal(first, batch_indices(tiny_config(batch=6, seed=1), 7, 20))
    epoch = torch.cat([batch_indices(cfg, step, 24) for step in range(4)])
    assert sorted(epoch.tolist()) == list(range(24))  # an epoch sees every scene once


def test_warm_start_gives_clip1_the_shipped_text_encoder():
    from transformers import CLIPTextModel

    tokenizer = build_tokenizer()
    clip1 = build_text_encoders(MMDiTConfig(), tokenizer)[0]
    warm_start_clip1(clip1)
    shipped = CLIPTextModel.from_pretrained(str(SHIPPED_MODEL / "text_encoder"), torch_dtype=torch.float32)
    ids = tokenizer(["a large purple star at the top"], return_tensors="pt").input_ids
    with torch.no_grad():
        ours = clip1(ids, output_hidden_states=True).hidden_states[-2]
        theirs = shipped(ids, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(ours, theirs)


def test_full_size_model_fits_the_package_budget_in_fp16():
    cfg = MMDiTConfig()
    modules = (build_transformer(cfg), *build_text_encoders(cfg, build_tokenizer()))
    tensors = sum(p.numel() for m in modules for p in m.state_dict().values())
    vae_bytes = (SHIPPED_MODEL / "vae" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert 2 * tensors + vae_bytes < 20e6


def test_shapes_train_arch_mmdit_trains_the_tiny_model_from_the_command_line(tmp_path):
    from click.testing import CliRunner

    from headscope_cli.main import cli

    run_dir = tmp_path / "run"
    result = CliRunner().invoke(cli, ["shapes", "train", "--arch", "mmdit", "--tiny", "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "exported pipeline:" in result.output
    assert (run_dir / "pipeline" / "transformer" / "config.json").is_file()
    assert json.loads((run_dir / "run.json").read_text())["steps"] == 20


def test_shapes_train_arch_mmdit_fine_tunes_from_another_run_on_the_command_line(tiny_run, tmp_path):
    from click.testing import CliRunner

    from headscope_cli.main import cli

    run_dir = tmp_path / "ft"
    result = CliRunner().invoke(cli, ["shapes", "train", "--arch", "mmdit", "--tiny", "--run-dir", str(run_dir),
                                      "--init-from", str(tiny_run), "--steps", "4", "--pair-share", "0.5",
                                      "--lr", "1e-4", "--lr-final", "1e-5", "--warmup", "2"])
    assert result.exit_code == 0, result.output
    saved = json.loads((run_dir / "run.json").read_text())
    assert (saved["init_from"], saved["pair_share"], saved["lr"], saved["lr_final"], saved["warmup"]) == (
        str(tiny_run.resolve()), 0.5, 1e-4, 1e-5, 2)
    assert json.loads((run_dir / "log.jsonl").read_text().splitlines()[0])["stage"] == "init"


def test_shipping_keeps_the_exports_own_defaults_and_adds_the_chosen_ones(tmp_path):
    import json

    from headscope.shapes.train import ship

    export = tmp_path / "run" / "pipeline"
    export.mkdir(parents=True)
    (export / "model_index.json").write_text("{}")
    (export / "headscope.json").write_text(json.dumps({"arch": "mmdit", "defaults": {"max_sequence_length": 24,
                                                                                   "guidance_scale": 7.0}}))
    folder = ship(export, tmp_path / "shipped", {"guidance_scale": 5.0, "num_inference_steps": 25})
    meta = json.loads((folder / "headscope.json").read_text())
    assert meta["defaults"] == {"max_sequence_length": 24, "guidance_scale": 5.0, "num_inference_steps": 25}
    assert "phases" not in meta  # an SD3-style run's recipe is its export's train_config


def test_pair_share_fills_the_end_of_each_batch_with_two_object_scenes_and_keeps_steps_reproducible():
    captions = ["a red circle", "a red circle and a blue square", "two green stars", "a white star on the left",
                "a small oval at the top and a large square at the bottom"] * 20
    pairs = pair_scenes(captions)
    assert set(pairs.tolist()) == {i for i, c in enumerate(captions) if i % 5 in (1, 4)}
    cfg = tiny_config(batch=8, pair_share=0.5)
    idx = batch_indices(cfg, 3, len(captions), pairs)
    assert len(idx) == 8 and all(" and " in captions[i] for i in idx[4:].tolist())
    assert torch.equal(idx[:4], batch_indices(tiny_config(batch=8), 3, len(captions))[:4])  # the rest is the plain draw
    assert torch.equal(idx, batch_indices(cfg, 3, len(captions), pairs))
    assert torch.equal(batch_indices(tiny_config(batch=8), 3, len(captions), pairs),
                       batch_indices(tiny_config(batch=8), 3, len(captions)))  # share 0: no change


def test_learning_rate_warms_up_then_stays_or_follows_a_cosine_to_its_final_value():
    flat = tiny_config(steps=100, warmup=10, lr=1e-3)
    assert learning_rate(flat, 4) == pytest.approx(5e-4) and learning_rate(flat, 99) == pytest.approx(1e-3)
    cosine = tiny_config(steps=100, warmup=10, lr=1e-3, lr_final=1e-4)
    rates = [learning_rate(cosine, step) for step in range(100)]
    assert rates[9] == pytest.approx(1e-3) and rates[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))
    assert rates[54] == pytest.approx(5.5e-4, rel=0.05)  # half way down


def test_fine_tuning_phase_starts_from_the_other_runs_weights_and_ship_records_both_phases(tiny_run, tmp_path):
    from headscope.shapes.train import ship

    run = tmp_path / "ft"
    train_mmdit(run, tiny_config(steps=4, init_from=str(tiny_run), pair_share=0.5, lr=0.0, lr_final=0.0,
                                 checkpoint_every=2, export_every=4), progress=False)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert records[0] == {**records[0], "stage": "init", "from": str(tiny_run), "step": 20}
    # learning rate 0: the weights are the source run's, bitwise (EMA of unchanged weights is unchanged)
    source = load_file(str(tiny_run / "checkpoint" / "weights.safetensors"))
    tuned = load_file(str(run / "checkpoint" / "weights.safetensors"))
    assert source.keys() == tuned.keys()
    assert all(torch.equal(source[k], tuned[k]) for k in source if k.startswith("model."))
    meta = json.loads((ship(run / "pipeline", tmp_path / "shipped", {}) / "headscope.json").read_text())
    assert [phase["steps"] for phase in meta["phases"]] == [20, 4] and meta["steps_trained"] == 24
    assert meta["phases"][1]["train_config"]["pair_share"] == 0.5
