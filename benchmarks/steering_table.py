"""The printed table of the steering benchmark (benchmarks/steering.py): one model's results, or several side
by side, a value and an n column per model; what a model's family lacks shown as n/a with the reason."""
from __future__ import annotations

import harness


def table(results: dict) -> str:
    """`results` ({name of --models, or None for the one model of a plain run: its result}) side by side: a row
    per task x variant x metric, a value and an n column per model (a plain run's one is "value"); a task or
    variant a model's family lacks as n/a (why)."""
    tables = [_cells(result) for result in results.values()]
    keys = list(dict.fromkeys(key for cells, _ in tables for key in cells))
    shown = {key[:2] for key in keys} | {(key[0], "") for key in keys}
    keys += list(dict.fromkeys((task, variant, "") for _, lacking in tables for task, variant in lacking
                               if (task, variant) not in shown))
    order = list(next(iter(results.values()))["tasks"])
    keys.sort(key=lambda key: order.index(key[0]))  # stable: each task's rows in the order they came
    rows = [(*key, *(cell for cells, lacking in tables for cell in _cell(cells, lacking, key))) for key in keys]
    names = ["value"] if list(results) == [None] else list(results)
    return (_heading(results) + "\n"
            + harness.table(rows, ("task", "variant", "metric", *(c for name in names for c in (name, "n"))),
                            digits=4, left=3))


def _heading(results: dict) -> str:
    lines = [f"{result['model']}, HRV {result['hrv']}, {result['steps']} steps, guidance {result['guidance']}, "
             f"device {result['device']}, {result['threads']} threads" for result in results.values()]
    if list(results) == [None]:
        return f"steering benchmark — {lines[0]}"
    return "steering benchmark, side by side:\n" + "\n".join(f"  {name}: {line}" for name, line in zip(results, lines))


def _cells(result: dict) -> tuple[dict, dict]:
    """One model's table: {(task, variant, metric): (value shown, n)}, and {(task, variant): why} of what its
    family lacks (variant "" for a whole task)."""
    cells, lacking = {}, {}
    for task, values in result["tasks"].items():
        n = values.get("n", "")
        for variant, metrics in values.items():
            if variant == "unsupported":
                lacking[(task, "")] = metrics
            elif isinstance(metrics, dict) and "unsupported" in metrics:
                lacking[(task, variant)] = metrics["unsupported"]
            elif isinstance(metrics, dict) and variant != "records":
                cells.update({(task, variant, metric): (_show(value), metrics.get("n", n))
                              for metric, value in metrics.items() if metric != "n"})
            elif variant not in ("records", "n", "prompt", "adjust", "guidance", "repeats"):
                cells[(task, "", variant)] = (_show(metrics), n)
    return cells, lacking


def _cell(cells: dict, lacking: dict, key: tuple) -> tuple:
    """(value, n) of one model at a row: its own, n/a (why) where its family lacks the variant, else n/a."""
    if key in cells:
        return cells[key]
    why = lacking.get(key[:2]) or lacking.get((key[0], ""))
    return (f"n/a ({why})" if why else None), ""


def _show(value):
    """A paired test as prompts only the baseline had : only the variant had, p; any other value as it is."""
    if isinstance(value, dict):
        return f"{value['baseline_only']}:{value['variant_only']} p={value['p']:.3f}"
    return value
