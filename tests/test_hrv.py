"""HRVs: the builder's votes against a hand computation, normalisation, soft votes, untouched generation,
resumption, two processes, the file format, and the paper's official arrays."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import headscope
from headscope import HeadIndex, HeadscopeError
from headscope.concepts import ConceptSet
from headscope.hrv import (HRV, ConceptVotes, HRVBuilder, default_hrv_path, encode_concepts, project_keys,
                           prompt_seed)
from headscope.models.configs import SD15_UNET_CONFIG, SDXL_BASE_UNET_CONFIG
from headscope.processor import Hook
from headscope.testing import generate

ANCHORS = Path(__file__).resolve().parent / "data" / "hrv"  # the official HRV data, Apache-2.0
CONCEPTS = ConceptSet("tiny", {"color": ["red", "blue", "green"], "animal": ["dog", "cat", "giraffe", "bird"],
                               "shape": ["circle", "square"]})
PROMPTS = ["a red dog", "a blue circle", "a cat on the tree", "a green square"]
STEPS = 2


@pytest.fixture(scope="module")
def built(tiny_sd):
    return HRVBuilder(CONCEPTS, steps=STEPS, batch_size=2, seed=3).fit(tiny_sd, PROMPTS)


class QueryRecorder(Hook):
    def __init__(self):
        self.queries = {}

    def wants_query(self, ctx):
        return True

    def read_query(self, ctx, query):
        self.queries[(ctx.step, ctx.layer.index)] = query.clone()


def test_every_row_has_mean_one(built):
    assert built.hrv_.vectors.shape == (3, 22) and built.hrv_.vectors.dtype == torch.float32
    assert torch.allclose(built.hrv_.vectors.mean(dim=1), torch.ones(3))


def test_each_head_votes_once_per_step_and_prompt(built):
    assert built.step_votes_.shape == (STEPS, 3, 22)
    assert torch.equal(built.step_votes_.sum(dim=1), torch.full((STEPS, 22), len(PROMPTS)))
    assert torch.equal(built.votes_, built.step_votes_.sum(dim=0))


def test_vectors_are_votes_normalised_over_heads(built):
    votes = built.votes_.double()
    assert torch.allclose(built.hrv_.vectors.double(), votes / votes.sum(dim=1, keepdim=True) * 22, atol=1e-6)


def own_word_embedding(pipe, word):
    """The word's own token outputs, straight from the text encoder (no start/end/padding)."""
    ids = pipe.tokenizer(word, return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0][0, 1:-1]


@torch.no_grad()
def test_votes_of_one_layer_call_match_a_hand_computed_softmax(tiny_sd):
    index = HeadIndex.from_unet(tiny_sd.unet)
    tokens = encode_concepts(tiny_sd, CONCEPTS)
    reader = ConceptVotes(tokens, project_keys(tiny_sd, index, tokens.embeddings), index.n_heads, 1, seed=5)
    recorder = QueryRecorder()
    reader.begin([0])
    with headscope.trace(tiny_sd, hooks=[recorder, reader], maps=False):
        generate(tiny_sd, "a red dog", steps=1, guidance_scale=7.5)

    generator = torch.Generator().manual_seed(prompt_seed(5, 0, "words"))
    for layer in index.layers:  # one draw per concept at each layer call, in execution order
        draws = torch.rand(3, generator=generator, dtype=torch.float64)
        words = [CONCEPTS.concepts[name][int(u * len(CONCEPTS.concepts[name]))]
                 for name, u in zip(CONCEPTS.names, draws.tolist())]
        attn = tiny_sd.unet.get_submodule(layer.name)
        query = recorder.queries[(0, layer.index)][0]  # [heads, n_query, head_dim], the conditional row
        keys = [attn.to_k(own_word_embedding(tiny_sd, word)).view(-1, layer.heads, layer.head_dim).transpose(0, 1)
                for word in words]  # per word: [heads, tokens, head_dim]
        scores = torch.einsum("hqd,htd->hqt", query, torch.cat(keys, dim=1)) * attn.scale
        probs = scores.softmax(dim=-1).mean(dim=1)  # [heads, all sampled tokens]
        per_word = torch.stack([part.mean(dim=1) for part in probs.split([k.shape[1] for k in keys], dim=1)], dim=1)
        expected = torch.zeros(3, layer.heads, dtype=torch.int64)
        expected[per_word.argmax(dim=1), torch.arange(layer.heads)] = 1
        assert torch.equal(reader.step_votes[0][:, layer.offset:layer.offset + layer.heads], expected), layer.name


def test_scoring_every_layer_call_at_once_gives_the_votes_of_scoring_per_step(tiny_sd, built, monkeypatch):
    monkeypatch.setattr("headscope.hrv.votes.VOTE_BUDGET_BYTES", 0)  # no query kept past its own call
    again = HRVBuilder(CONCEPTS, steps=STEPS, batch_size=2, seed=3).fit(tiny_sd, PROMPTS)
    assert torch.equal(again.step_votes_, built.step_votes_)


def test_soft_votes_add_mean_probabilities_instead_of_argmax_votes(tiny_sd):
    soft = HRVBuilder(CONCEPTS, soft=True, steps=STEPS, seed=3).fit(tiny_sd, PROMPTS[:2])
    assert soft.step_votes_.dtype == torch.float64
    # per head call the concepts' shares sum to 1 (less when a two-token word's mean is taken): <= 2 prompts
    per_call = soft.step_votes_.sum(dim=1)
    assert (per_call <= 2.0 + 1e-5).all() and (per_call > 1.0).all()
    assert torch.allclose(soft.hrv_.vectors.mean(dim=1), torch.ones(3)) and soft.hrv_.meta["soft"] is True
    assert (soft.votes_ > 0).all() and not torch.equal(soft.votes_, soft.votes_.round())


def test_building_does_not_change_the_generated_image(tiny_sd):
    index = HeadIndex.from_unet(tiny_sd.unet)
    tokens = encode_concepts(tiny_sd, CONCEPTS)
    reader = ConceptVotes(tokens, project_keys(tiny_sd, index, tokens.embeddings), index.n_heads, STEPS)
    plain = generate(tiny_sd, ["a red dog", "a cat"], steps=STEPS)
    reader.begin([0, 1])
    with headscope.trace(tiny_sd, hooks=[reader], maps=False):
        probed = generate(tiny_sd, ["a red dog", "a cat"], steps=STEPS)
    assert reader.step_votes.sum() == 2 * STEPS * index.n_heads
    assert torch.equal(plain, probed)


def test_the_same_seed_gives_the_same_votes_and_another_seed_other_votes(tiny_sd, built):
    again = HRVBuilder(CONCEPTS, steps=STEPS, batch_size=2, seed=3).fit(tiny_sd, PROMPTS)
    other = HRVBuilder(CONCEPTS, steps=STEPS, batch_size=2, seed=4).fit(tiny_sd, PROMPTS)
    assert torch.equal(again.step_votes_, built.step_votes_)
    assert not torch.equal(other.step_votes_, built.step_votes_)


def test_an_interrupted_build_resumes_to_the_identical_result(tiny_sd, built, tmp_path, monkeypatch):
    partial = tmp_path / "out.hrv.partial"
    builder = HRVBuilder(CONCEPTS, steps=STEPS, batch_size=2, seed=3, partial=partial, save_every=2)
    original = HRVBuilder._run_batch
    calls = []

    def crash_on_second_batch(self, *args):
        calls.append(args[2])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(HRVBuilder, "_run_batch", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        builder.fit(tiny_sd, PROMPTS)
    assert [path.name for path in partial.iterdir()] == ["rank-0-of-1.safetensors"]
    calls.clear()
    builder.fit(tiny_sd, PROMPTS)
    assert calls == [[2, 3]]  # only the batch that was not finished
    assert torch.equal(builder.step_votes_, built.step_votes_)
    builder.discard_partial()
    assert not partial.exists()


def test_partial_results_of_other_arguments_are_refused(tiny_sd, tmp_path):
    partial = tmp_path / "partial"
    HRVBuilder(CONCEPTS, steps=1, seed=3, partial=partial).fit(tiny_sd, PROMPTS[:1])
    with pytest.raises(HeadscopeError, match="made with other arguments"):
        HRVBuilder(CONCEPTS, steps=1, seed=4, partial=partial).fit(tiny_sd, PROMPTS[:1])


WORKER = """
import sys, torch
torch.set_num_threads(1)
from pathlib import Path
from safetensors.torch import save_file
from headscope.concepts import ConceptSet
from headscope.hrv import HRVBuilder
from headscope.testing import build_tiny_sd
folder = Path(sys.argv[1])
pipe = build_tiny_sd(folder / ("pipe-" + sys.argv[2]))
concepts = ConceptSet("tiny", {concepts!r})
ran, original = [], HRVBuilder._run_batch
def run_batch(self, *args):
    ran.extend(args[2])
    return original(self, *args)
HRVBuilder._run_batch = run_batch
builder = HRVBuilder(concepts, steps={steps}, batch_size=2, seed=3).fit(pipe, {prompts!r})
meta = {{"processes": str(builder.hrv_.meta["processes"]), "ran": ",".join(map(str, ran))}}
save_file({{"step_votes": builder.step_votes_}}, str(folder / ("votes-" + sys.argv[2] + ".safetensors")), metadata=meta)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_two_workers(code: str, folder) -> list[tuple[int, str]]:
    port = str(free_port())
    workers = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
        workers.append(subprocess.Popen([sys.executable, "-c", code, str(folder), str(rank)], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = []
    for worker in workers:
        output, _ = worker.communicate(timeout=120)
        results.append((worker.returncode, output))
    return results


def test_two_processes_sum_to_the_single_process_result(built, tmp_path):
    from safetensors.torch import load_file

    code = WORKER.format(concepts=CONCEPTS.concepts, steps=STEPS, prompts=PROMPTS)
    # The free port can be taken between probing and gloo's bind, so a failed rendezvous is retried.
    for attempt in range(3):
        outputs = run_two_workers(code, tmp_path)
        if all(code_ == 0 for code_, _ in outputs):
            break
    assert all(code_ == 0 for code_, _ in outputs), outputs
    from safetensors import safe_open

    for rank, prompts_run in ((0, "0,1"), (1, "2,3")):  # each process generated its half of the prompts
        path = str(tmp_path / f"votes-{rank}.safetensors")
        with safe_open(path, framework="pt") as handle:
            assert handle.metadata() == {"processes": "2", "ran": prompts_run}
        assert torch.equal(load_file(path)["step_votes"], built.step_votes_)


# -- the HRV object and its file -------------------------------------------------------------------

def test_metadata_says_how_the_hrv_was_made(built, tiny_sd):
    meta = built.hrv_.meta
    assert meta["heads"]["fingerprint"] == HeadIndex.from_unet(tiny_sd.unet).fingerprint()
    assert meta["concept_set"]["hash"] == CONCEPTS.hash() and meta["concept_set"]["concepts"]["shape"] == ["circle", "square"]
    assert (meta["prompts"], meta["n_prompts"], meta["steps"], meta["seed"]) == (PROMPTS, 4, STEPS, 3)
    assert meta["scheduler"] == "DDIMScheduler" and meta["soft"] is False
    assert meta["model"]["unet_class"] == "UNet2DConditionModel" and len(meta["model"]["config_hash"]) == 16
    assert meta["headscope_version"] == headscope.__version__


@pytest.mark.parametrize("name", ["built.hrv", "built-folder"])
def test_save_and_load_round_trip(built, tmp_path, name):
    path = built.hrv_.save(tmp_path / name)
    loaded = HRV.load(path)
    assert loaded.concepts == built.hrv_.concepts
    assert torch.equal(loaded.vectors, built.hrv_.vectors)
    assert torch.equal(loaded.step_votes, built.hrv_.step_votes)
    assert loaded.meta == json.loads(json.dumps(built.hrv_.meta))
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary files left


def test_saving_is_atomic_when_writing_fails(built, tmp_path, monkeypatch):
    path = built.hrv_.save(tmp_path / "keep.hrv")
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError):
        built.hrv_.save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["keep.hrv"]


def test_truncated_and_foreign_files_are_one_line_errors(built, tmp_path):
    data = built.hrv_.save(tmp_path / "good.hrv").read_bytes()
    (tmp_path / "cut.hrv").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.hrv").write_bytes(b"not an hrv at all" * 10)
    from safetensors.torch import save_file
    save_file({"vectors": torch.ones(2, 3)}, str(tmp_path / "foreign.hrv"))
    for name in ("cut.hrv", "noise.hrv", "foreign.hrv", "missing.hrv"):
        with pytest.raises(HeadscopeError) as error:
            HRV.load(tmp_path / name)
        assert "\n" not in str(error.value) and name in str(error.value)


def test_vectors_that_disagree_with_the_stored_layout_are_refused(built, tmp_path):
    broken = HRV(built.hrv_.concepts, torch.ones(3, 21), None, built.hrv_.meta)
    with pytest.raises(HeadscopeError, match="inconsistent"):
        HRV.load(broken.save(tmp_path / "broken.hrv"))


def test_an_hrv_for_another_unet_is_refused(built, tiny_sd, tiny_sdxl):
    built.hrv_.check_compatible(tiny_sd)
    with pytest.raises(HeadscopeError, match=r"HRV built for a UNet with layout \w+ \(22 heads.*this pipeline has "
                                             r"\w+ \(32 heads.*rebuild with `headscope hrv build --model"):
        built.hrv_.check_compatible(tiny_sdxl)


def test_lookups_by_concept(built):
    hrv = built.hrv_
    assert torch.equal(hrv.vector("Color"), hrv.vectors[0])
    top = hrv.top_heads("shape", 5)
    assert top.tolist() == sorted(range(22), key=lambda head: (-float(hrv.vectors[2, head]), head))[:5]
    with pytest.raises(HeadscopeError, match="unknown concept 'texture'; this HRV has: color, animal, shape"):
        hrv.vector("texture")


def test_similarity_is_the_cosine_matrix(built):
    similarity = built.hrv_.similarity()
    unit = built.hrv_.vectors / built.hrv_.vectors.norm(dim=1, keepdim=True)
    assert similarity.shape == (3, 3) and torch.allclose(similarity, unit @ unit.T, atol=1e-6)
    assert torch.allclose(similarity.diagonal(), torch.ones(3))


def test_a_concept_without_votes_gets_a_uniform_row():
    hrv = HRV.from_votes(torch.tensor([[3, 1], [0, 0]]), ["a", "b"], {})
    assert hrv.vectors.tolist() == [[1.5, 0.5], [1.0, 1.0]] and hrv.meta["unvoted"] == ["b"]


# -- official arrays, defaults -----------------------------------------------------------------------

@pytest.mark.skipif(not ANCHORS.is_dir(), reason="shared/anchors not present")
def test_the_official_sd14_array_lands_on_the_sd15_head_index():
    hrv = HRV.from_official(ANCHORS / "hrv_sd_v1_4_34x128.npy", layout="sd15")
    array = np.load(ANCHORS / "hrv_sd_v1_4_34x128.npy", allow_pickle=False)
    assert hrv.vectors.shape == (34, 128) and np.array_equal(hrv.vectors.numpy(), array)
    assert hrv.concepts == ConceptSet.load("hrv34").names
    assert torch.allclose(hrv.vectors.mean(dim=1), torch.ones(34), atol=1e-4)
    index = HeadIndex.from_config(SD15_UNET_CONFIG)
    hrv.check_compatible(index)
    assert hrv.index.fingerprint() == index.fingerprint()
    assert index.unflat(int(hrv.top_heads("Color", 1))) == (15, 0)  # up_blocks.3.attentions.2, head 0


@pytest.mark.skipif(not ANCHORS.is_dir(), reason="shared/anchors not present")
def test_the_official_sdxl_array_lands_on_1300_heads(tmp_path):
    hrv = HRV.from_official(ANCHORS / "hrv_sdxl_base_1_0_34x1300.npy", layout="sdxl")
    assert hrv.vectors.shape == (34, 1300) and hrv.index.n_layers == 70
    assert hrv.meta["heads"]["fingerprint"] == HeadIndex.from_config(SDXL_BASE_UNET_CONFIG).fingerprint()
    assert torch.allclose(hrv.vectors.mean(dim=1), torch.ones(34), atol=1e-3)


def test_an_official_array_of_the_wrong_shape_is_refused(tmp_path):
    np.save(tmp_path / "wrong.npy", np.ones((34, 100), dtype=np.float32))
    with pytest.raises(HeadscopeError, match=r"shape \[34, 100\]; layout sd15 expects \[34, 128\]"):
        HRV.from_official(tmp_path / "wrong.npy", layout="sd15")


def test_the_default_hrv_belongs_to_the_embedded_model_only(tiny_sd):
    assert default_hrv_path() == Path(headscope.__file__).parent / "models" / "shapes_hrv.hrv"
    assert default_hrv_path("shapes-mmdit") == Path(headscope.__file__).parent / "models" / "shapes_mmdit_hrv.hrv"
    with pytest.raises(HeadscopeError, match="no default HRV for this model: pass --hrv FILE"):
        HRV.for_pipeline(tiny_sd)


def test_builds_on_an_sdxl_pipeline_with_two_text_encoders(tiny_sdxl):
    built = HRVBuilder(CONCEPTS, steps=1).fit(tiny_sdxl, ["a red dog"])
    assert built.hrv_.vectors.shape == (3, 32)
    assert torch.equal(built.votes_.sum(dim=0), torch.ones(32, dtype=torch.int64))


def test_query_readers_get_the_conditional_rows_queries(tiny_sd):
    recorder = QueryRecorder()
    with headscope.trace(tiny_sd, hooks=[recorder], maps=False) as tc:
        generate(tiny_sd, ["a red dog", "a cat"], steps=1, guidance_scale=7.5)
    index = HeadIndex.from_unet(tiny_sd.unet)
    assert sorted(recorder.queries) == [(0, layer.index) for layer in index.layers]
    first = index.layers[0]
    assert recorder.queries[(0, 0)].shape == (2, first.heads, 64, first.head_dim)  # 2 cond rows of 4, 8x8 queries
    with pytest.raises(HeadscopeError, match="maps=False"):
        tc.word_map("dog")


def test_the_embedded_models_hrv_is_found_or_its_build_command_named(tiny_sd, built, tmp_path, monkeypatch):
    import headscope.hrv.file as hrv_module

    monkeypatch.setattr(hrv_module, "embedded_of", lambda pipe: "shapes")
    monkeypatch.setattr(hrv_module, "default_hrv_path", lambda name: tmp_path / "shapes_hrv.hrv")
    with pytest.raises(HeadscopeError, match="build it with `headscope hrv build --concepts shapes"):
        HRV.for_pipeline(tiny_sd)
    built.hrv_.save(tmp_path / "shapes_hrv.hrv")
    assert torch.equal(HRV.for_pipeline(tiny_sd).vectors, built.hrv_.vectors)


def test_concept_words_come_from_the_stored_concept_set(built):
    assert built.hrv_.concept_words == CONCEPTS.concepts
    assert HRV(["a"], torch.ones(1, 2), None, {}).concept_words == {}
