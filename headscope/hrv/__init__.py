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

Modules: `file` (the HRV object and its file), `votes` (concept keys and the vote reader), `build`
(the estimator), `processes` (several processes), `meta` (what a build records).
"""
from headscope.hrv.build import HRVBuilder
from headscope.hrv.file import FORMAT, HRV
from headscope.hrv.meta import (BUILD_DEFAULT_COMMAND, concept_meta, config_hash, default_hrv_path, generation_defaults,
                                head_meta, is_embedded, model_meta, prompt_seed)
from headscope.hrv.processes import Processes
from headscope.hrv.votes import ConceptTokens, ConceptVotes, concept_scores, encode_concepts, project_keys

__all__ = ["BUILD_DEFAULT_COMMAND", "FORMAT", "HRV", "ConceptTokens", "ConceptVotes", "HRVBuilder", "Processes",
           "concept_meta", "concept_scores", "config_hash", "default_hrv_path", "encode_concepts",
           "generation_defaults", "head_meta", "is_embedded", "model_meta", "project_keys", "prompt_seed"]
