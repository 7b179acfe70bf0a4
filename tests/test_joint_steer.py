"""Steering on SD3 and Flux: per-head, per-text-token value factors act on image queries only; strengthen,
adjust, weakening and head reweighting on tiny random pipelines, and from the CLI on a saved tiny Flux folder."""
import json

import pytest
import torch
from click.testing import CliRunner

from headscope import HeadscopeError, HeadIndex
from headscope.steer import HeadScale, TokenFactors, mitigate_neglect, steering, strengthen_hook
from headscope.testing import random_hrv
from headscope.testing_joint import generate_joint
from headscope.weaken import HeadWeakening, word_key_positions
from headscope_cli.main import cli

PROMPT = "a red circle and a blue square"


@pytest.fixture(params=["sd3", "flux"])
def pipe(request, tiny_sd3, tiny_flux):
    return tiny_sd3 if request.param == "sd3" else tiny_flux


def layer_only(pipe, name, word="red", factor=3.0):
    """HeadScale of `factor` on every head of one layer at `word`'s tokens, 1 on every other head."""
    index = HeadIndex.from_model(pipe)
    factors = torch.ones(index.n_heads)
    factors[list(index.layer(name).head_ids)] = factor
    return HeadScale.for_words(pipe, PROMPT, {word: factors}, rows="all")


class BlockOutputs:
    """Forward hook keeping a block's outputs (text stream, image stream) at its first call."""

    def __init__(self, pipe, name):
        self.outputs = None
        self.handle = pipe.transformer.get_submodule(name).register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        if self.outputs is None:
            self.outputs = tuple(tensor.clone() for tensor in output)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.handle.remove()


def block_outputs(pipe, name, hooks, **options):
    """(text stream, image stream) of block `name` at the first transformer call, steered by `hooks`."""
    with BlockOutputs(pipe, name) as kept, steering(pipe, hooks):
        generate_joint(pipe, PROMPT, steps=1, **options)
    encoder_hidden_states, hidden_states = kept.outputs
    return encoder_hidden_states, hidden_states


# -- the processor ------------------------------------------------------------------------------

@pytest.mark.parametrize("guidance", [1.0, 7.0])
def test_steering_with_all_factors_one_is_bitwise_a_no_op(pipe, guidance):
    n_heads = HeadIndex.from_model(pipe).n_heads
    plain = generate_joint(pipe, PROMPT, guidance_scale=guidance)
    ones = HeadScale.for_words(pipe, PROMPT, {"red": torch.ones(n_heads), "square": torch.ones(n_heads)}, rows="all")
    unit = strengthen_hook(pipe, PROMPT, {"circle": ("color", 0.0)}, hrv=random_hrv(pipe))  # 1 + 0 * (HRV - 1)
    with steering(pipe, [ones, unit]):
        assert torch.equal(generate_joint(pipe, PROMPT, guidance_scale=guidance), plain)


def test_steering_changes_no_text_token_output_of_a_double_stream_block(pipe):
    text, image = block_outputs(pipe, "transformer_blocks.0", [])
    steered = [layer_only(pipe, "transformer_blocks.0.attn")]
    steered_text, steered_image = block_outputs(pipe, "transformer_blocks.0", steered)
    assert torch.equal(steered_text, text)
    assert not torch.allclose(steered_image, image)


def test_rows_left_unsteered_keep_their_outputs_bitwise(tiny_sd3):
    hook = HeadScale.for_words(tiny_sd3, PROMPT, {"red": 3.0 * torch.ones(6)})  # conditional rows only
    text, image = block_outputs(tiny_sd3, "transformer_blocks.0", [], guidance_scale=7.0)
    steered_text, steered_image = block_outputs(tiny_sd3, "transformer_blocks.0", [hook], guidance_scale=7.0)
    assert torch.equal(steered_text, text)
    assert torch.equal(steered_image[0], image[0])  # [uncond; cond]: the unconditional row is untouched
    assert not torch.allclose(steered_image[1], image[1])


def test_single_stream_blocks_are_steered_on_image_rows_only(tiny_flux):
    name = "single_transformer_blocks.0"
    text, image = block_outputs(tiny_flux, name, [])
    steered_text, steered_image = block_outputs(tiny_flux, name, [layer_only(tiny_flux, f"{name}.attn")])
    assert torch.equal(steered_text, text)
    assert not torch.allclose(steered_image, image)


class Spy(HeadScale):
    """HeadScale that also reads the weights the first layer applied at step 0."""

    rows = "all"

    def wants_probs(self, ctx):
        return ctx.layer.index == 0 and ctx.step == 0

    def read(self, ctx, probs):
        self.seen = probs.clone()


def test_steered_image_maps_are_the_plain_maps_times_the_factors(tiny_flux):
    spies = [Spy([TokenFactors((1,), torch.full((8,), factor))], rows="all") for factor in (1.0, 2.5)]
    for spy in spies:
        with steering(tiny_flux, [spy]):
            generate_joint(tiny_flux, PROMPT, steps=1)
    unit, scaled = (spy.seen for spy in spies)
    assert torch.allclose(scaled[..., 1], 2.5 * unit[..., 1]) and torch.equal(scaled[..., 2:], unit[..., 2:])


# -- words and HRV recipes ----------------------------------------------------------------------

def test_sd3_steers_a_words_clip_and_t5_tokens_and_flux_its_t5_tokens(tiny_sd3, tiny_flux):
    sd3 = strengthen_hook(tiny_sd3, PROMPT, {"red": ("color", 1.0)}, hrv=random_hrv(tiny_sd3))
    assert [entry.positions for entry in sd3.entries] == [(2,), (24 + 1,)]  # CLIP after its start token, then T5
    flux = strengthen_hook(tiny_flux, PROMPT, {"red": ("color", 1.0)}, hrv=random_hrv(tiny_flux))
    assert [entry.positions for entry in flux.entries] == [(1,)]


def test_strengthening_changes_the_image(pipe):
    plain = generate_joint(pipe, PROMPT)
    with steering(pipe, [strengthen_hook(pipe, PROMPT, {"red": ("color", 3.0)}, hrv=random_hrv(pipe))]):
        assert not torch.allclose(generate_joint(pipe, PROMPT), plain)


def test_an_hrv_of_another_model_is_refused(tiny_sd3, tiny_flux):
    with pytest.raises(HeadscopeError, match="rebuild with"):
        strengthen_hook(tiny_flux, PROMPT, {"red": "color"}, hrv=random_hrv(tiny_sd3))
    with pytest.raises(HeadscopeError, match="this model has 8 joint-attention heads"):
        HeadScale.for_words(tiny_flux, PROMPT, {"red": torch.ones(6)})


def test_weakening_covers_the_word_tokens_of_every_key_encoder(tiny_sd3, tiny_flux):
    assert word_key_positions(tiny_flux, "a red dog") == [0, 1, 2]  # T5: no start token; </s> left out
    assert word_key_positions(tiny_sd3, "a red dog") == [1, 2, 3, 24, 25, 26]
    assert word_key_positions(tiny_sd3, "a red dog", max_sequence_length=16, guidance_scale=5.0) == [1, 2, 3, 24, 25, 26]
    with pytest.raises(HeadscopeError, match="takes at most 3"):  # as the call with max_sequence_length=3 would
        word_key_positions(tiny_sd3, "a red dog on a blue tree", max_sequence_length=3)
    plain = generate_joint(tiny_flux, "a red dog")
    hook = HeadWeakening(range(8), -2.0, [word_key_positions(tiny_flux, "a red dog")])
    with steering(tiny_flux, [hook]):
        assert not torch.allclose(generate_joint(tiny_flux, "a red dog"), plain)


def test_head_reweighting_runs_on_joint_attention(tiny_flux):
    output, details = mitigate_neglect(tiny_flux, PROMPT, "heads", "circle,square", hrv=random_hrv(tiny_flux),
                                       num_inference_steps=1, height=16, width=16, max_sequence_length=16,
                                       output_type="pt")
    assert details["subjects"] == [{"word": "circle", "tokens": [2], "concept": "shape"},
                                   {"word": "square", "tokens": [6], "concept": "shape"}]
    assert not torch.allclose(output.images, generate_joint(tiny_flux, PROMPT, steps=1))


# -- the command line on a saved tiny Flux folder ------------------------------------------------

@pytest.fixture(scope="module")
def flux_hrv(tiny_flux, tmp_path_factory):
    return random_hrv(tiny_flux).save(tmp_path_factory.mktemp("flux-hrv") / "flux.hrv")


def invoke(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


@pytest.mark.parametrize("options, summarised", [
    (["--strengthen", "red=color:1.5"], "strengthen"),
    (["--adjust", "circle=+shape,-color:3,1"], "adjust"),
    (["--mitigate-neglect", "heads", "--subjects", "circle,square"], "neglect"),
])
def test_generate_steers_a_flux_folder(flux_folder, flux_hrv, tmp_path, options, summarised):
    out = tmp_path / "run"
    result = invoke("generate", PROMPT, "--model", flux_folder, "--hrv", flux_hrv, "--out", out, "--steps", 1,
                    "--device", "cpu", *options)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summarised in summary["steering"] and (out / "image.png").is_file()


def test_hrv_weaken_runs_on_a_flux_folder(flux_folder, flux_hrv, tiny_flux, tmp_path):
    from headscope.testing import build_tiny_clip

    clip = build_tiny_clip(tmp_path / "clip", tiny_flux.tokenizer)
    out = tmp_path / "weaken"
    result = invoke("hrv", "weaken", "--concept", "color", "--hrv", flux_hrv, "--model", flux_folder, "--clip", clip,
                    "--k", "0,4", "--seeds", "0", "--order", "morhf", "--n-prompts", 1, "--steps", 1,
                    "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    assert {path.name for path in out.iterdir()} == {"weakening.csv", "weakening.json", "weakening.png"}
    settings = json.loads((out / "weakening.json").read_text())["settings"]
    assert settings["n_heads"] == 8 and settings["ks"] == [0, 4]


def test_generate_runs_attend_and_excite_hrv_on_a_flux_folder(flux_folder, flux_hrv, tmp_path):
    out = tmp_path / "run"
    result = invoke("generate", PROMPT, "--model", flux_folder, "--mitigate-neglect", "ae-hrv", "--subjects",
                    "circle,square", "--hrv", flux_hrv, "--out", out, "--steps", 2, "--device", "cpu")
    assert result.exit_code == 0, result.output
    neglect = json.loads((out / "summary.json").read_text())["steering"]["neglect"]
    assert neglect["method"] == "ae-hrv" and [entry["step"] for entry in neglect["log"]] == [0]


def test_prompt_to_prompt_refuses_a_joint_model_with_a_headscope_error(tiny_sd3):
    from headscope.steer.edit import edit

    with pytest.raises(HeadscopeError, match="prompt-to-prompt edits run on UNet models"):
        edit(tiny_sd3, "a red circle", "a blue circle", steps=2)
