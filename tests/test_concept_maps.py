"""Concept maps in output space (ConceptAttention) on tiny SD3 and Flux: the image is untouched, the maps
equal a reference computed here from the blocks' weights, and bad concept lists are refused."""
import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

import headscope
from headscope import HeadscopeError
from headscope.testing_joint import FirstCallInputs, generate_joint

PROMPT = "a red giraffe and a dog"
CONCEPTS = ["giraffe", "dog", "sky"]  # "giraffe" is two tokens in both tokenizers


def heads(tensor, n_heads):
    """[rows, tokens, heads * d] -> [rows, heads, tokens, d]."""
    return tensor.unflatten(-1, (n_heads, -1)).transpose(1, 2)


def attend(query, key, value):
    """softmax(q k^T / sqrt(d)) v, written out in float64: [rows, heads, queries, d]."""
    logits = torch.einsum("bhqd,bhkd->bhqk", query.double(), key.double()) / query.shape[-1] ** 0.5
    return torch.einsum("bhqk,bhkd->bhqd", logits.softmax(dim=-1), value.double())


def saliency(image_output, concept_output, spans, grid):
    """softmax over concepts of <o_x, mean of the concept's token outputs> (all heads): [concepts, h, w]."""
    words = torch.stack([concept_output[:, :, start:stop].mean(dim=2) for start, stop in spans], dim=2)
    scores = torch.einsum("bhxd,bhcd->bcx", image_output.double(), words.double())
    return scores.softmax(dim=1)[0].unflatten(-1, grid)


def encoded_concepts(pipe, positions_of):
    """Each concept encoded alone by the pipeline, its own tokens, through the context embedder: [1, T, dim]."""
    pieces = []
    for word in CONCEPTS:
        options = {"prompt_2": None, "prompt_3": None, "do_classifier_free_guidance": False} \
            if hasattr(pipe, "tokenizer_3") else {}
        embeds = pipe.encode_prompt(prompt=[word], max_sequence_length=16, **options)[0]
        pieces.append(embeds[0, positions_of(word)])
    return pipe.transformer.context_embedder(torch.cat(pieces))[None]


def spans_of(pipe, positions_of):
    spans, start = [], 0
    for word in CONCEPTS:
        spans.append((start, start + len(positions_of(word))))
        start = spans[-1][1]
    return spans


def traced(pipe, names, steps=2):
    recorder = FirstCallInputs(pipe.transformer, names)
    try:
        with headscope.trace(pipe, concepts=CONCEPTS, keep_steps=True) as tc:
            generate_joint(pipe, PROMPT, steps=steps)
    finally:
        recorder.remove()
    return tc, recorder.seen


# -- the image --------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["tiny_sd3", "tiny_flux"])
def test_the_concept_stream_leaves_the_image_bitwise_unchanged(family, request):
    pipe = request.getfixturevalue(family)
    plain = generate_joint(pipe, PROMPT, num_images_per_prompt=2)
    with headscope.trace(pipe, concepts=CONCEPTS) as tc:
        with_concepts = generate_joint(pipe, PROMPT, num_images_per_prompt=2)
    assert torch.equal(plain, with_concepts)
    assert tc.concept_maps(image=1).shape == (3, 16, 16)


@pytest.mark.parametrize("family", ["tiny_sd3", "tiny_flux"])
def test_the_concept_tokens_reuse_each_blocks_modulation_instead_of_computing_it_again(family, request):
    from headscope.backbones import backbone_for
    from headscope.backbones.streams import MODULATED
    from headscope.heads import HeadIndex

    pipe = request.getfixturevalue(family)
    model = pipe.transformer
    calls = {}
    handles = []
    for layer in HeadIndex.from_model(model).layers:
        block = model.get_submodule(layer.name.rsplit(".", 1)[0])
        linear = getattr(block, MODULATED[(backbone_for(pipe).family, layer.kind)]).linear
        handles.append(linear.register_forward_hook(
            lambda module, args, output, name=layer.name: calls.__setitem__(name, calls.get(name, 0) + 1)))
    try:
        generate_joint(pipe, PROMPT, steps=2)
        plain, calls = dict(calls), {}
        with headscope.trace(pipe, concepts=CONCEPTS):
            generate_joint(pipe, PROMPT, steps=2)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == plain and set(plain.values()) == {2}  # once per block and forward, by the block itself


@pytest.mark.parametrize("kind", ["AdaLayerNormZero", "AdaLayerNormZeroSingle", "AdaLayerNormContinuous"])
def test_adaptive_norm_on_a_kept_modulation_is_bitwise_the_modules_own(kind):
    from diffusers.models import normalization

    from headscope.backbones.streams import adaptive_norm

    torch.manual_seed(0)
    norm = (normalization.AdaLayerNormContinuous(16, 16, elementwise_affine=False, eps=1e-6)
            if kind == "AdaLayerNormContinuous" else getattr(normalization, kind)(16))
    states, temb = torch.randn(3, 5, 16), torch.randn(3, 16)
    def parts(result):
        return result if isinstance(result, tuple) else (result,)

    own = parts(norm(states, temb) if kind == "AdaLayerNormContinuous" else norm(states, emb=temb))
    kept = parts(adaptive_norm(norm, states, temb, norm.linear(norm.silu(temb))))
    called = parts(adaptive_norm(norm, states, temb))  # no modulation kept: the module itself
    assert len(own) == len(kept) == len(called)
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(own, kept, called))


# -- against a reference ----------------------------------------------------------------------------

@torch.no_grad()
def test_sd3_concept_maps_equal_the_attention_outputs_computed_from_the_blocks(tiny_sd3):
    pipe, model = tiny_sd3, tiny_sd3.transformer
    tc, seen = traced(pipe, ["transformer_blocks.0", "transformer_blocks.1"])

    def positions_of(word):  # CLIP: the word's tokens sit after the start token
        return list(range(1, len(pipe.tokenizer(word).input_ids) - 1))

    spans = spans_of(pipe, positions_of)
    states = encoded_concepts(pipe, positions_of)  # the concept stream entering block 0
    for number in (0, 1):
        block, inputs = model.transformer_blocks[number], seen[f"transformer_blocks.{number}"]
        image, text, temb = (inputs[name][1:] for name in ("hidden_states", "encoder_hidden_states", "temb"))
        attn, n = block.attn, block.attn.heads  # row 1 is the conditional row of the [uncond; cond] batch
        image_n, text_n = block.norm1(image, emb=temb)[0], block.norm1_context(text, emb=temb)[0]
        key_image, value_image = attn.norm_k(heads(attn.to_k(image_n), n)), heads(attn.to_v(image_n), n)
        image_output = attend(attn.norm_q(heads(attn.to_q(image_n), n)),
                              torch.cat([key_image, attn.norm_added_k(heads(attn.add_k_proj(text_n), n))], 2),
                              torch.cat([value_image, heads(attn.add_v_proj(text_n), n)], 2))
        concept_n, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(states, emb=temb)
        key_concepts = attn.norm_added_k(heads(attn.add_k_proj(concept_n), n))
        concept_output = attend(attn.norm_added_q(heads(attn.add_q_proj(concept_n), n)),
                                torch.cat([key_concepts, key_image], 2),
                                torch.cat([heads(attn.add_v_proj(concept_n), n), value_image], 2))
        expected = saliency(image_output, concept_output, spans, (4, 4))
        got = tc.concept_maps(layers=[number], steps=[0], size=(4, 4))
        assert torch.allclose(got.double(), expected, atol=1e-5), number
        # the stream after the block, as JointTransformerBlock updates its context
        states = states + gate_msa[:, None] * attn.to_add_out(concept_output.float().transpose(1, 2).flatten(2))
        normed = block.norm2_context(states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        states = states + gate_mlp[:, None] * block.ff_context(normed)


def rope(tensor, rotary, positions):
    """RoPE on [rows, heads, tokens, d] with the rows `positions` of the (cos, sin) table."""
    cos, sin = (part[positions] for part in rotary)
    return apply_rotary_emb(tensor.transpose(1, 2), (cos, sin), sequence_dim=1).transpose(1, 2)


@torch.no_grad()
def test_flux_concept_maps_equal_the_attention_outputs_of_double_and_single_blocks(tiny_flux):
    pipe, model = tiny_flux, tiny_flux.transformer
    names = ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0"]
    tc, seen = traced(pipe, names)

    def positions_of(word):  # T5: the word's pieces, then </s>
        return list(range(len(pipe.tokenizer_2(word).input_ids) - 1))

    spans = spans_of(pipe, positions_of)
    states = encoded_concepts(pipe, positions_of)
    n_text = 16
    for number, name in enumerate(names):
        block, inputs = model.get_submodule(name), seen[name]
        image, text, temb, rotary = (inputs[key] for key in ("hidden_states", "encoder_hidden_states", "temb",
                                                             "image_rotary_emb"))
        attn, n = block.attn, block.attn.heads
        text_positions = list(range(n_text))  # txt_ids are zeros: every text and concept token at position 0
        image_positions = list(range(n_text, n_text + image.shape[1]))
        zero = [0] * states.shape[1]
        if name.startswith("single"):
            joined, _ = block.norm(torch.cat([text, image], dim=1), emb=temb)
            text_n, image_n = joined[:, :n_text], joined[:, n_text:]
            concept_n, gate = block.norm(states, emb=temb)
            project = {"q": (attn.to_q, attn.norm_q), "k": (attn.to_k, attn.norm_k), "v": (attn.to_v, None)}
            text_project = concept_project = project
        else:
            image_n = block.norm1(image, emb=temb)[0]
            text_n = block.norm1_context(text, emb=temb)[0]
            concept_n, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(states, emb=temb)
            project = {"q": (attn.to_q, attn.norm_q), "k": (attn.to_k, attn.norm_k), "v": (attn.to_v, None)}
            text_project = concept_project = {"q": (attn.add_q_proj, attn.norm_added_q),
                                              "k": (attn.add_k_proj, attn.norm_added_k), "v": (attn.add_v_proj, None)}

        def qkv(states_n, table, positions):
            parts = {}
            for kind, (linear, norm) in table.items():
                part = heads(linear(states_n), n)
                part = norm(part) if norm is not None else part
                parts[kind] = rope(part, rotary, positions) if kind != "v" else part
            return parts

        img, txt, con = qkv(image_n, project, image_positions), qkv(text_n, text_project, text_positions), \
            qkv(concept_n, concept_project, zero)
        image_output = attend(img["q"], torch.cat([txt["k"], img["k"]], 2), torch.cat([txt["v"], img["v"]], 2))
        concept_output = attend(con["q"], torch.cat([con["k"], img["k"]], 2), torch.cat([con["v"], img["v"]], 2))
        expected = saliency(image_output, concept_output, spans, (4, 4))
        got = tc.concept_maps(layers=[name + ".attn"], steps=[0], size=(4, 4))
        assert torch.allclose(got.double(), expected, atol=1e-5), name
        flat = concept_output.float().transpose(1, 2).flatten(2)
        if name.startswith("single"):
            mlp = block.act_mlp(block.proj_mlp(concept_n))
            states = states + gate[:, None] * block.proj_out(torch.cat([flat, mlp], 2))
        else:
            states = states + gate_msa[:, None] * attn.to_add_out(flat)
            normed = block.norm2_context(states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            states = states + gate_mlp[:, None] * block.ff_context(normed)


# -- reading maps -----------------------------------------------------------------------------------

def test_maps_sum_to_one_over_the_concepts_and_average_the_later_blocks(tiny_sd3):
    tc, _ = traced(tiny_sd3, [])
    grid = tc.concept_maps(size=(4, 4))
    assert grid.shape == (3, 4, 4) and torch.allclose(grid.sum(dim=0), torch.ones(4, 4), atol=1e-5)
    later = (tc.concept_maps(layers=[1], size=(4, 4)) + tc.concept_maps(layers=[2], size=(4, 4))) / 2
    assert torch.allclose(grid, later, atol=1e-6)  # 3 blocks: the later half is blocks 1 and 2
    assert torch.equal(tc.concept_maps(["sky", "dog"], size=(4, 4)), grid[[2, 1]])


def test_concept_maps_need_the_concepts_during_generation(tiny_sd3):
    with headscope.trace(tiny_sd3) as tc:
        generate_joint(tiny_sd3, PROMPT, steps=1)
    with pytest.raises(HeadscopeError, match=r"open the trace with headscope.trace\(pipe, concepts=\["):
        tc.concept_maps(["dog", "sky"])
    tc, _ = traced(tiny_sd3, [], steps=1)
    with pytest.raises(HeadscopeError, match="'tree' was not carried during generation; this trace carried giraffe, "
                                             "dog, sky"):
        tc.concept_maps(["dog", "tree"])


# -- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("concepts, message", [
    (["dog"], r"a softmax over the concepts, which over one concept \(\['dog'\]\) is 1 everywhere; give at least two"),
    (["dog", "Dog"], "concept 'dog' is given twice"),
    (["hot dog", "sky"], "concept 'hot dog': give one word per concept"),
    ("dog,sky", "give a list of concept words"),
    (["dog", "猫"], "concept '猫': '猫' is not in this model's vocabulary"),
])
def test_bad_concept_lists_are_refused_before_generating(tiny_flux, concepts, message):
    with pytest.raises(HeadscopeError, match=message):
        headscope.trace(tiny_flux, concepts=concepts)


def test_a_unet_has_no_text_stream_to_carry_concepts(tiny_sd):
    with pytest.raises(HeadscopeError, match="concept maps need a joint-attention model .* this model is a "
                                             r"UNet2DConditionModel \(SD 1.x / 2.x / XL\)"):
        headscope.trace(tiny_sd, concepts=["dog", "cat"])


# -- the command line -------------------------------------------------------------------------------

def invoke(*args):
    from click.testing import CliRunner

    from headscope_cli.main import cli

    return CliRunner().invoke(cli, [str(arg) for arg in args])


def test_daam_concepts_writes_one_map_per_concept_and_a_figure(sd3_folder, tmp_path):
    import json

    out = tmp_path / "out"
    result = invoke("daam", PROMPT, "--model", sd3_folder, "--concepts", "giraffe,dog,sky", "--steps", 1, "--out", out)
    assert result.exit_code == 0, result.output
    written = sorted(path.name for path in (out / "maps").iterdir())
    assert written == ["concept-dog.png", "concept-giraffe.png", "concept-sky.png", "concepts.png"]  # no word maps
    summary = json.loads((out / "summary.json").read_text())["concepts"]
    assert summary["layers"] == ["transformer_blocks.1.attn", "transformer_blocks.2.attn"]
    shares = [summary["maps"][concept][0]["argmax_share"] for concept in CONCEPTS]
    assert abs(sum(shares) - 1.0) < 1e-5 and "one map per concept" in result.output


@pytest.mark.parametrize("arguments, message", [
    (["--concepts", "circle,square"], "concept maps need a joint-attention model (SD3 / SD3.5, Flux), whose blocks "
                                      "carry a text stream; this model is a UNet2DConditionModel"),
    (["--concepts", "circle"], "a softmax over the concepts, which over one concept (['circle']) is 1 everywhere"),
    (["--concepts", "circle,dragon"], "concept 'dragon': 'dragon' is not in this model's vocabulary"),
])
def test_daam_concepts_mistakes_are_one_line(arguments, message, tmp_path, monkeypatch):
    if "dragon" in arguments[1]:  # a word-level vocabulary: the SD3-style shapes architecture
        from headscope.shapes.mmdit import random_mmdit_pipeline

        monkeypatch.setattr("headscope.models.load_pipeline", lambda *args: random_mmdit_pipeline())
    result = invoke("daam", "a red circle", *arguments, "--steps", 1, "--out", tmp_path / "out")
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
