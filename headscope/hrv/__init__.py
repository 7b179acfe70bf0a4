"""Head Relevance Vectors (Park et al., ICLR 2025): which cross-attention heads serve which visual concept.

How an HRV is built (faithful to the paper's code; `HRVBuilder.fit`):
  1. Every word of every concept is encoded by the pipeline's own text encoder, one word per prompt
     (`pipe.encode_prompt`), and only the word's own token outputs are kept (no start/end/padding).
  2. For each cross-attention layer, those token embeddings are projected by the layer's `to_k` once
     per run (cached): keys `[heads, concept tokens, head_dim]`.
  3. The pipeline generates ordinary images from the build prompts. At every cross-attention call and
     step, one word per concept is sampled; the layer's conditional queries are scored against the
     sampled words' keys: softmax over all sampled concept tokens per head and pixel, mean over
     pixels, mean over each word's tokens -> `[heads, concepts]`; the argmax over concepts is that
     head's vote (`soft=True`: the probabilities themselves are added instead). The generation is not
     altered: the votes are read beside it from the layer's queries.
  4. Votes are summed over prompts and steps; each concept's row is L1-normalised over the heads and
     multiplied by the number of heads, so every row has mean 1.

Joint attention (SD3, Flux): there is no fixed text key per layer, since a block's text keys are
projected from the text stream as it stands in that block. The word sampled for each concept is drawn
once per denoiser forward and row (a UNet draws per layer: a joint block's keys exist only for tokens
carried from the first block), and only those words are carried through the text stream as concept
tokens (`headscope.stream`, as ConceptAttention carries concepts: the block's own text-stream weights,
one-way attention to [concepts; image], the image untouched), so the probe carries one word per concept,
not the whole set (34 tokens instead of 340 for hrv34). At each block the image queries (after q-norm;
RoPE on Flux) are scored against that block's concept keys (the text-stream projection and its
k-norm; Flux's text positions are 0, where RoPE is the identity), with the model's scale
1/sqrt(head_dim); softmax, means and argmax as in step 3. The keys
differ per image, so the stream runs during the build. The file records the family ("unet", "sd3",
"flux") and the head fingerprint; `HRV.check_compatible` refuses another family or layout.

Several processes: `accelerate launch --multi_gpu --num_processes N -m headscope_cli.main hrv build ...`
(or `torchrun --nproc_per_node N -m headscope_cli.main hrv build ...`) — on a machine without CUDA the
processes run on CPU and sum over gloo. (`accelerate launch --cpu` starts a single process unless MPI
is set up.)

Reproducibility: word sampling and the starting noise of prompt i depend only on (seed, i), prompts are
batched in fixed chunks of the prompt list, so a resumed build and a multi-process build (prompts split
with accelerate, vote counts sum-reduced) end with the same counts as one uninterrupted process.

Cost of one more concept: only its words are encoded and projected (a few text-encoder passes and one
`to_k` product per layer), but the votes must be re-run over all prompts, because every vote is an
argmax over the whole concept set: adding a concept can move any head's vote.

Modules: `file` (the HRV object and its file), `keys` (concept words as keys), `votes` (the vote
reader), `sampling` (its per-step word tables), `build`
(the estimator), `processes` (several processes), `meta` (what a build records).
"""
from headscope.hrv.build import HRVBuilder
from headscope.hrv.file import FORMAT, HRV
from headscope.hrv.meta import (BUILD_DEFAULT_COMMAND, build_default_command, concept_meta, config_hash,
                                default_hrv_path, embedded_of, generation_defaults, head_meta, is_embedded, model_meta,
                                prompt_seed)
from headscope.hrv.processes import Processes
from headscope.hrv.keys import ConceptTokens, concept_scores, encode_concepts, project_keys
from headscope.hrv.votes import ConceptVotes, concept_reader

__all__ = ["BUILD_DEFAULT_COMMAND", "FORMAT", "HRV", "ConceptTokens", "ConceptVotes", "HRVBuilder", "Processes",
           "build_default_command", "concept_meta", "concept_reader", "concept_scores", "config_hash", "default_hrv_path", "encode_concepts",
           "embedded_of", "generation_defaults", "head_meta", "is_embedded", "model_meta", "project_keys", "prompt_seed"]
