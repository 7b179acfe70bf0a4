"""Why the shapes model misses position words: does the word or the seed decide where an object goes?

    python benchmarks/position_probe.py              # the embedded model, 12 seeds
    python benchmarks/position_probe.py --model runs/shapes/pipeline --seeds 24

Three measurements on "a large red circle <position phrase>" for the five position phrases:
  seed vs word   for each seed, the five prompts are generated from the same starting noise and the
                 annotator reads where the object went: "follows word" = the position drawn is the one
                 asked; "same place for every edge word" = left, right, top and bottom all ended up at
                 one place (the noise decided, not the word).
  text encoder   distance between the text encoder's outputs at the position word's token for two
                 phrases, relative to their mean norm (0 = the UNet is handed the same vector for both
                 words); the same at the end token (which, in a causal encoder, has read the whole
                 prompt) and for the input token embeddings, to tell learned collapse from init.
  first step     where the model's first clean-image estimate (at the first sampling step, from pure
                 noise) puts the prompt's content: the centroid of |x0(prompt) - x0("")|^2 on the latent
                 grid, per phrase, averaged over seeds; the spread between phrases shows whether the
                 word moves it at all.
Results are printed and written atomically to benchmarks/results/position_probe.json.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch

import harness

EDGES = ("left", "right", "top", "bottom")


def options():
    parser = harness.parser(__doc__, "position_probe", device=False)
    parser.add_argument("--seeds", type=int, default=12, help="seeds 0..N-1")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=None)
    return parser


def measure(args) -> dict:
    from headscope.shapes.annotate import annotate
    from headscope.shapes.world import POSITION_PHRASES, POSITIONS

    started = time.perf_counter()
    pipe, model = harness.load(args)
    from headscope.models import model_defaults

    guidance = args.guidance if args.guidance is not None else model_defaults(pipe).get("guidance_scale", 7.5)
    words = list(POSITIONS)
    prompts = {word: f"a large red circle {POSITION_PHRASES[word]}" for word in words}

    drawn = {word: [] for word in words}
    for seed in range(args.seeds):
        for word in words:
            image = pipe(prompts[word], num_inference_steps=args.steps, guidance_scale=guidance,
                         generator=torch.Generator().manual_seed(seed)).images[0]
            objects = annotate(image)
            drawn[word].append(objects[0].position if objects else None)
    follows = {word: float(np.mean([p == word for p in drawn[word]])) for word in words}
    same_place = float(np.mean([len({drawn[w][s] for w in EDGES}) == 1 for s in range(args.seeds)]))

    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    ids = tokenizer([prompts[w] for w in words], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        states = encoder(ids)[0]
    where = [tokenizer(prompts[w]).input_ids.index(tokenizer.convert_tokens_to_ids(w)) for w in words]
    def relative_distances(vectors: torch.Tensor) -> list:
        return (torch.cdist(vectors, vectors) / vectors.norm(dim=-1).mean()).tolist()

    distance = relative_distances(torch.stack([states[i, p] for i, p in enumerate(where)]))
    end_distance = relative_distances(torch.stack([states[i, p + 1] for i, p in enumerate(where)]))  # end token
    inputs = encoder.get_input_embeddings().weight.detach()[tokenizer.convert_tokens_to_ids(words)]
    input_distance = (torch.cdist(inputs, inputs) / inputs.norm(dim=-1).mean()).tolist()

    scheduler = pipe.scheduler
    scheduler.set_timesteps(args.steps)
    t = scheduler.timesteps[0]
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        context = torch.cat([states, encoder(empty)[0]])
        centroids = {word: [] for word in words}
        side = pipe.unet.config.sample_size
        ys, xs = torch.meshgrid(torch.arange(float(side)), torch.arange(float(side)), indexing="ij")
        for seed in range(args.seeds):
            noise = torch.randn(1, pipe.unet.config.in_channels, side, side,
                                generator=torch.Generator().manual_seed(seed)) * scheduler.init_noise_sigma
            batch = noise.repeat(len(words) + 1, 1, 1, 1)
            output = pipe.unet(scheduler.scale_model_input(batch, t), t, context).sample
            alpha = scheduler.alphas_cumprod[int(t)]
            if scheduler.config.prediction_type == "v_prediction":
                x0 = alpha.sqrt() * batch - (1 - alpha).sqrt() * output
            else:
                x0 = (batch - (1 - alpha).sqrt() * output) / alpha.sqrt()
            energy = (x0[:-1] - x0[-1:]).pow(2).sum(1)  # [words, side, side]
            for i, word in enumerate(words):
                weight = energy[i] / energy[i].sum()
                centroids[word].append((float((weight * xs).sum()), float((weight * ys).sum())))
    mean_centroid = {w: [round(float(np.mean([c[k] for c in centroids[w]])), 2) for k in (0, 1)] for w in words}
    spread = float(np.mean([np.hypot(*np.subtract(centroids[a][s], centroids[b][s]))
                            for s in range(args.seeds) for a in EDGES for b in EDGES if a < b]))

    result = {"model": model, "seeds": args.seeds, "steps": args.steps,
              "guidance": guidance, "prompts": prompts, "drawn": drawn, "follows_word": follows,
              "same_place_for_every_edge_word": same_place,
              "text_encoder_relative_distance": {"words": words,
                                                 "output": [[round(v, 3) for v in row] for row in distance],
                                                 "end_token": [[round(v, 3) for v in row] for row in end_distance],
                                                 "input_embedding": [[round(v, 3) for v in row]
                                                                     for row in input_distance]},
              "first_step_centroid_latent_xy": mean_centroid, "first_step_timestep": int(t),
              "first_step_edge_word_spread_latent_px": round(spread, 3),
              "latent_side": side, "seconds": round(time.perf_counter() - started, 1)}
    print(f"position probe — {result['model']}, {args.seeds} seeds, {args.steps} steps, guidance {guidance}")
    print(harness.table([[word, follows[word], str(tuple(mean_centroid[word]))] for word in words],
                        ["word", "follows word", "first-step centroid (x, y)"], digits=2))
    print(f"same place for left, right, top and bottom from one seed: {same_place:.2f} of seeds")
    print(f"edge words' first-step centroids differ by {spread:.2f} latent pixels on average (grid {side}x{side})")
    print("text encoder outputs, distance / norm: at the position word | at the end token (input embeddings)")
    print(harness.table([[word, *(f"{v:.3f} | {e:.3f} ({u:.2f})" for v, e, u in zip(row, row_end, row_in))]
                         for word, row, row_end, row_in in zip(words, distance, end_distance, input_distance)],
                        ["", *words]))
    return result


def main(argv=None) -> int:
    return harness.run(measure, options(), argv)


if __name__ == "__main__":
    sys.exit(main())
