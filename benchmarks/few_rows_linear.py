"""The concept stream's linears: few rows against a joint model's weights, two ways, on this CPU.

    python benchmarks/few_rows_linear.py                        # shapes MMDiT, SD3-medium and Flux-dev widths
    python benchmarks/few_rows_linear.py --rows 34,136 --repeats 9

The concept stream (`headscope.stream`) carries a few dozen tokens (hrv34: one word per concept, 34 or a
few more per prompt) through each block's own linears, whose weights are the model's: at Flux-dev's
width a 3072 x 12288 MLP weight against 34 rows. `headscope.backbones.streams.FewRowsLinear` computes such
a linear as (W @ x^T + b)^T instead of x @ W^T + b (what `F.linear` does) when the rows are few and the
weight wide, on a CPU in float32. This benchmark times both on random float32 weights of each model's
linear shapes (from its diffusers config: dim -> dim for q, k, v and the output; dim -> 4 dim and back for
the MLP; Flux's single-stream output 5 dim -> dim), at each row count, interleaved (order alternating),
after a warm-up, and reports the medians' ratio (transposed / F.linear) and whether the two results are
equal bit for bit. The thresholds in `FewRowsLinear` (MAX_ROWS, MIN_WEIGHT) come from this table.
Results are printed and written atomically to benchmarks/results/few_rows_linear.json.
"""
from __future__ import annotations

import statistics
import time

import torch

import harness
from headscope.backbones.streams import FewRowsLinear
from headscope.errors import HeadscopeError
from headscope.models import configs


def widths() -> dict[str, int]:
    """Model width (heads x head_dim) of each joint model: the shapes MMDiT, SD3-medium and Flux.1-dev."""
    from headscope.shapes.mmdit import MMDiTConfig

    shapes = MMDiTConfig()
    result = {"shapes-mmdit": shapes.heads * shapes.head_dim}
    for name, config in (("sd3-medium", configs.SD3_MEDIUM_TRANSFORMER_CONFIG),
                         ("flux-dev", configs.FLUX_DEV_TRANSFORMER_CONFIG)):
        result[name] = config["num_attention_heads"] * config["attention_head_dim"]
    return result


def shapes_of(name: str, dim: int) -> list[tuple[str, int, int]]:
    linears = [("q/k/v/out", dim, dim), ("MLP in", dim, 4 * dim), ("MLP out", 4 * dim, dim)]
    return linears + ([("single out", 5 * dim, dim)] if name == "flux-dev" else [])


def _rows(value: str) -> list[int]:
    try:
        rows = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        rows = []
    if not rows or min(rows) < 1:
        raise HeadscopeError(f"--rows {value!r}: give positive row counts, e.g. 34,136")
    return rows


def options():
    parser = harness.parser(__doc__, "few_rows_linear", model=False, device=False)
    parser.add_argument("--rows", default=[6, 34, 68, 136, 340], type=_rows, metavar="34,136",
                        help="rows of the input (concept tokens x prompts x forwards carried side by side)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls of each way per shape")
    return parser


def _time(call, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        call()
    return (time.perf_counter() - start) / number


@torch.no_grad()
def measure_one(rows: int, n_in: int, n_out: int, repeats: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(n_out, n_in, generator=generator) * n_in ** -0.5
    bias, x = torch.randn(n_out, generator=generator), torch.randn(rows, n_in, generator=generator)
    plain = lambda: torch.nn.functional.linear(x, weight, bias)  # noqa: E731

    def transposed():  # what FewRowsLinear computes, at every shape (it takes only some)
        return torch.addmm(bias[:, None], weight, x.t()).t()

    equal = torch.equal(plain(), transposed())
    number = max(1, int(2e7 / (rows * n_in * n_out)))  # calls per timing: about 40 MFLOP
    times = {"linear": [], "transposed": []}
    for repeat in range(repeats):
        ways = [("linear", plain), ("transposed", transposed)]
        for way, call in ways if repeat % 2 == 0 else ways[::-1]:
            times[way].append(_time(call, number))
    medians = {way: statistics.median(values) for way, values in times.items()}
    return {"rows": rows, "in": n_in, "out": n_out, "linear_ms": round(medians["linear"] * 1e3, 3),
            "transposed_ms": round(medians["transposed"] * 1e3, 3),
            "transposed_over_linear": round(medians["transposed"] / medians["linear"], 3),
            "bitwise_equal": equal, "taken_by_few_rows_linear": rows <= FewRowsLinear.MAX_ROWS and
            n_in * n_out >= FewRowsLinear.MIN_WEIGHT}


def measure(args) -> dict:
    if args.repeats < 1:
        raise HeadscopeError(f"--repeats {args.repeats}: give at least one timed call")
    results = []
    for name, dim in widths().items():
        for label, n_in, n_out in shapes_of(name, dim):
            for rows in args.rows:
                results.append({"model": name, "linear": label, **measure_one(rows, n_in, n_out, args.repeats)})
    print(harness.table([[r["model"], r["linear"], r["rows"], f"{r['in']} -> {r['out']}", r["linear_ms"],
                          r["transposed_ms"], r["transposed_over_linear"], r["bitwise_equal"],
                          r["taken_by_few_rows_linear"]] for r in results],
                        ["model", "linear", "rows", "shape", "F.linear ms", "W @ x^T ms", "ratio", "bitwise",
                         "taken"], left=4))
    return {"device": "cpu", "dtype": "float32", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "max_rows": FewRowsLinear.MAX_ROWS, "min_weight": FewRowsLinear.MIN_WEIGHT, "results": results}


def main(argv=None) -> int:
    return harness.run(measure, options(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
