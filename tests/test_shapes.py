"""The shapes world: sampler, renderer, annotator, tokenizer, training and evaluation."""
import json
from collections import Counter

import numpy as np
import pytest
import torch

from headscope.shapes.annotate import annotate, score_scene
from headscope.shapes.evaluate import eval_scenes, summarize
from headscope.shapes.tokenizer import build_tokenizer
from headscope.shapes.world import HELD_OUT, SHAPES, ObjectSpec, Scene, SceneSampler, render


def _match(detected, mask):
    return max(detected, key=lambda d: (d.mask & mask).sum(), default=None)


def test_sampler_is_deterministic_for_a_seed():
    first = [SceneSampler(seed=3).sample().caption for _ in range(1)]
    a, b = SceneSampler(seed=3), SceneSampler(seed=3)
    assert [a.sample().caption for _ in range(50)] == [b.sample().caption for _ in range(50)]
    assert first[0] == SceneSampler(seed=3).sample().caption


def test_training_sampler_never_draws_held_out_pairs():
    sampler = SceneSampler(seed=0)
    pairs = {(o.color, o.shape) for _ in range(3000) for o in sampler.sample().objects}
    assert not pairs & HELD_OUT
    assert len(pairs) > 40


def test_render_returns_one_mask_per_object_inside_the_canvas():
    scene = SceneSampler(seed=1).count(n=3)
    image, masks = render(scene)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert masks.shape == (3, 64, 64)
    assert all(m.sum() > 20 for m in masks)
    assert not (masks[0] & masks[1]).any() and not (masks[1] & masks[2]).any()


def test_annotator_reads_clean_renders_back_at_least_99_percent_per_attribute():
    sampler = SceneSampler(seed=11, held_out=())
    hits, total = Counter(), 0
    for _ in range(300):
        scene = sampler.sample()
        image, masks = render(scene, color_jitter=8, rng=sampler.rng)
        detected = annotate(image)
        hits["count"] += len(detected) == len(scene.objects)
        for obj, mask in zip(scene.objects, masks):
            total += 1
            found = _match(detected, mask)
            for attr in ("color", "shape", "size", "position", "fill"):
                hits[attr] += found is not None and getattr(found, attr) == getattr(obj, attr)
    for attr in ("color", "shape", "size", "position", "fill"):
        assert hits[attr] / total >= 0.99, (attr, hits[attr] / total)
    assert hits["count"] / 300 >= 0.99


def test_annotator_masks_overlap_ground_truth_masks():
    scene = SceneSampler(seed=5).pair()
    image, masks = render(scene)
    for mask in masks:
        found = _match(annotate(image), mask)
        iou = (found.mask & mask).sum() / (found.mask | mask).sum()
        assert iou > 0.8


@pytest.mark.parametrize("shape", SHAPES)
def test_annotator_tells_every_shape_apart(shape):
    color = "orange" if shape == "orange" else "red"
    obj = ObjectSpec(shape=shape, color=color, size="large", position="center", center=(32.0, 32.0))
    image, _ = render(Scene([obj], "", "single"))
    assert annotate(image)[0].shape == shape


def test_annotator_tells_which_sense_of_a_polysemous_word_was_drawn():
    asked = Scene([ObjectSpec("square", "rose", "large", "center", center=(32.0, 32.0))],
                  "a large rose square in the center", "single")
    flower = Scene([ObjectSpec("rose", "red", "large", "center", center=(32.0, 32.0))], "a rose", "single")
    right = score_scene(asked, annotate(render(asked)[0]))["polysemy"]
    wrong = score_scene(asked, annotate(render(flower)[0]))["polysemy"]
    assert right == {"word": "rose", "asked": "color", "wanted_sense": True, "unwanted_sense": False}
    assert wrong["unwanted_sense"] and not wrong["wanted_sense"]


def test_annotator_finds_nothing_on_a_black_image():
    assert annotate(np.zeros((64, 64, 3), np.uint8)) == []


def test_tokenizer_round_trips_every_caption_without_unknown_tokens():
    tokenizer = build_tokenizer()
    sampler = SceneSampler(seed=2)
    for _ in range(300):
        caption = sampler.sample().caption
        ids = tokenizer(caption).input_ids
        assert tokenizer.unk_token_id not in ids
        assert len(ids) <= tokenizer.model_max_length
        assert tokenizer.decode(ids, skip_special_tokens=True) == caption


def test_tokenizer_gives_one_token_per_word_framed_by_start_and_end():
    tokenizer = build_tokenizer()
    ids = tokenizer("a red circle").input_ids
    assert len(ids) == 5
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id


def test_eval_prompts_include_held_out_pairs_and_both_polysemy_senses():
    scenes = eval_scenes()
    assert any((o.color, o.shape) in HELD_OUT for s in scenes for o in s.objects)
    senses = {(o.sense, o.color if o.sense == "color" else o.shape) for s in scenes for o in s.objects if o.sense}
    assert senses == {("color", "rose"), ("color", "orange"), ("object", "rose"), ("object", "orange")}


def test_ground_truth_renders_score_perfectly_through_the_eval_summary():
    records = []
    for scene in eval_scenes(n_single=8, n_pair=4, n_count=4, n_polysemy=8):
        record = score_scene(scene, annotate(render(scene)[0]))
        record["held_out"] = any((o.color, o.shape) in HELD_OUT for o in scene.objects)
        records.append(record)
    table = summarize(records)
    assert table["single"]["shape"] == 1.0 and table["pair"]["both_present"] == 1.0
    assert table["count"]["count_ok"] == 1.0
    assert all(v["wanted_sense"] == 1.0 for v in table["polysemy"].values())


def test_tiny_training_run_exports_a_loadable_pipeline_and_resumes(tmp_path):
    from headscope.models import load_pipeline
    from headscope.shapes.model import TINY
    from headscope.shapes.train import TrainConfig, train

    cfg = TrainConfig(model=TINY, vae_steps=4, vae_batch=4, n_scenes=64, unet_steps=10, unet_batch=4,
                      checkpoint_every=5, export_every=10, log_every=1)
    train(tmp_path, cfg, progress=False)
    cfg.unet_steps = 20
    pipeline = train(tmp_path, cfg, progress=False)
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()
             if json.loads(line)["stage"] == "unet"]
    assert steps == list(range(20))  # the second call went on from step 10, not from 0
    pipe = load_pipeline(pipeline, device="cpu", dtype="fp32")
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_zero_terminal_snr_schedule_ends_in_pure_noise_and_samples_from_its_last_step():
    from headscope.shapes.model import build_scheduler

    legacy, zero = build_scheduler(), build_scheduler("v_prediction", zero_terminal_snr=True)
    assert legacy.alphas_cumprod[-1].sqrt() > 0.05  # SD's schedule leaks about 7% of the image
    assert zero.alphas_cumprod[-1] == 0 and zero.config.prediction_type == "v_prediction"
    zero.set_timesteps(25)
    assert int(zero.timesteps[0]) == 999
    with pytest.raises(ValueError, match="v_prediction"):
        build_scheduler("epsilon", zero_terminal_snr=True)


def test_min_snr_weights_and_targets_follow_the_prediction_type():
    from headscope.shapes.model import build_scheduler
    from headscope.shapes.train import min_snr_weights, training_target

    t = torch.tensor([0, 500, 999])
    eps, v = build_scheduler(), build_scheduler("v_prediction", zero_terminal_snr=True)
    w_eps, w_v = min_snr_weights(eps, t, 5.0), min_snr_weights(v, t, 5.0)
    snr = v.alphas_cumprod[t] / (1 - v.alphas_cumprod[t])
    assert torch.allclose(w_v, torch.clamp(snr + 1, max=5.0) / (snr + 1))
    assert w_v[-1] == 1.0 and w_eps[-1] == 1.0  # pure noise keeps full weight: the layout is decided there
    assert w_eps[0] < 0.01 and w_v[0] < 0.01    # nearly clean steps are capped
    z0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    assert torch.equal(training_target(eps, z0, noise, t), noise)
    target = training_target(v, z0, noise, t)
    assert torch.allclose(target[-1], -z0[-1])  # at zero SNR, v is minus the clean latent


def test_a_run_started_from_another_runs_checkpoint_reuses_its_data_and_weights(tmp_path):
    from headscope.shapes.model import TINY
    from headscope.shapes.train import TrainConfig, train

    first = tmp_path / "first"
    cfg = TrainConfig(model=TINY, vae_steps=2, vae_batch=4, n_scenes=32, unet_steps=4, unet_batch=4,
                      checkpoint_every=4, export_every=4, log_every=1, prediction_type="epsilon",
                      zero_terminal_snr=False)
    train(first, cfg, progress=False)
    second = tmp_path / "second"
    tuned = TrainConfig(model=TINY, vae_steps=2, vae_batch=4, n_scenes=32, unet_steps=2, unet_batch=4,
                        checkpoint_every=2, export_every=2, log_every=1, init_from=str(first),
                        prediction_type="v_prediction", zero_terminal_snr=True)
    pipeline = train(second, tuned, progress=False)
    log = [json.loads(line) for line in (second / "log.jsonl").read_text().splitlines()]
    assert log[0] == {**log[0], "stage": "init", "step": 4}
    assert not any(record["stage"] == "vae" for record in log)  # the VAE came from the first run
    assert (second / "latents.safetensors").read_bytes() == (first / "latents.safetensors").read_bytes()
    scheduler = json.loads((pipeline / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["rescale_betas_zero_snr"]
    saved = TrainConfig.from_json({k: v for k, v in cfg.to_json().items()
                                   if k not in ("prediction_type", "zero_terminal_snr")})
    assert saved.prediction_type == "epsilon" and not saved.zero_terminal_snr  # old run folders keep their recipe

    from headscope.shapes.train import ship

    shipped = ship(pipeline, tmp_path / "shipped", {"guidance_scale": 5.0, "num_inference_steps": 25})
    meta = json.loads((shipped / "headscope.json").read_text())
    assert meta["defaults"]["guidance_scale"] == 5.0
    assert [phase["unet_steps"] for phase in meta["phases"]] == [4, 2] and meta["unet_steps_trained"] == 6
    assert [phase["train_config"]["prediction_type"] for phase in meta["phases"]] == ["epsilon", "v_prediction"]


def test_layout_focus_draws_noisy_timesteps_and_positioned_scenes(tmp_path, monkeypatch):
    from headscope.shapes import train as training
    from headscope.shapes.model import TINY

    seen = {"t": [], "captions": []}
    original_add_noise = training.build_scheduler().__class__.add_noise

    def spy_add_noise(self, z0, noise, t):
        seen["t"].append(t.clone())
        return original_add_noise(self, z0, noise, t)

    monkeypatch.setattr(training.build_scheduler().__class__, "add_noise", spy_add_noise)
    cfg = training.TrainConfig(model=TINY, vae_steps=2, vae_batch=4, n_scenes=64, unet_steps=6, unet_batch=8,
                               checkpoint_every=6, export_every=6, log_every=1, high_noise_share=0.5,
                               high_noise_from=900, position_share=0.5)
    training.train(tmp_path, cfg, progress=False)
    t = torch.stack(seen["t"])  # [steps, batch]
    assert (t[:, :4] >= 900).all() and (t[:, 4:] < 900).any()
    captions = json.loads((tmp_path / "latents.json").read_text())["captions"]
    assert 0 < sum(training._says_position(c) for c in captions) < len(captions)
