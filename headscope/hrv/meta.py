"""Metadata of an HRV build: where the shipped HRV lives, model and head fingerprints, seeds, defaults."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from headscope.concepts import ConceptSet
from headscope.errors import HeadscopeError
from headscope.heads import HeadIndex
from headscope.io import replace_folder

PAPER_STEPS, PAPER_GUIDANCE = 50, 7.5
EMBEDDED_STEPS, EMBEDDED_GUIDANCE = 25, 5.0  # as the shapes-world evaluation generates

HRV_FILES = {"shapes": "shapes_hrv.hrv", "shapes-mmdit": "shapes_mmdit_hrv.hrv"}  # embedded model -> its HRV
HRV_PROMPTS = {"shapes": 256, "shapes-mmdit": 128}  # prompts the shipped files were built from


def build_default_command(name: str = "shapes") -> str:
    """The command that built the shipped HRV of the embedded model `name`."""
    model = "" if name == "shapes" else f"--model {name} "
    return (f"headscope hrv build {model}--concepts shapes --n-prompts {HRV_PROMPTS[name]} --seed 0 "
            f"--out headscope/models/{HRV_FILES[name]}")


BUILD_DEFAULT_COMMAND = build_default_command()


def default_hrv_path(name: str = "shapes") -> Path:
    """Where the embedded model `name`'s HRV ships: headscope/models/shapes_hrv.hrv for the UNet model,
    headscope/models/shapes_mmdit_hrv.hrv for the SD3-style one. Built with `build_default_command(name)`."""
    return Path(__file__).resolve().parent.parent / "models" / HRV_FILES[name]


def embedded_of(pipe) -> str | None:
    """The name of the embedded model `pipe` was loaded from ("shapes", "shapes-mmdit"), else None."""
    from headscope.models import embedded_name

    source = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")
    return embedded_name(source) if source else None


def is_embedded(pipe) -> bool:
    """Whether `pipe` was loaded from one of the embedded shapes-world models' folders."""
    return embedded_of(pipe) is not None


# -- metadata helpers ------------------------------------------------------------------------------

def config_hash(config) -> str:
    """16 hex digits hashing a denoiser config (keys starting with "_" left out)."""
    clean = {key: value for key, value in dict(config).items() if not str(key).startswith("_")}
    text = json.dumps(clean, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_meta(pipe) -> dict:
    """Where the pipeline came from and what its denoiser is: family ("unet", "sd3", "flux"), class, config
    hash; UNets also keep "unet_class" (files written before joint attention had only that)."""
    from headscope.backbones import backbone_for

    backbone = backbone_for(pipe)
    source = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")
    name = embedded_of(pipe)
    meta = {"name_or_path": f"embedded {name} model" if name else (str(source) if source else None),
            "family": backbone.family, "denoiser_class": type(backbone.model).__name__,
            "config_hash": config_hash(backbone.model.config)}
    if backbone.family == "unet":
        meta["unet_class"] = meta["denoiser_class"]
    return meta


FAMILY_NOUNS = {"unet": "a UNet", "sd3": "an SD3 transformer", "flux": "a Flux transformer"}


def family_of(meta: dict) -> str:
    """The model family an HRV's metadata names; files from before joint attention were all UNets."""
    model = meta.get("model") or {}
    if model.get("family"):
        return str(model["family"])
    return family_of_kinds(entry.get("kind", "cross") for entry in (meta.get("heads") or {}).get("layout", []))


def family_of_kinds(kinds) -> str:
    """"unet" for cross-attention layers, "flux" when single-stream layers follow, else "sd3"."""
    kinds = set(kinds)
    if kinds <= {"cross"}:
        return "unet"
    return "flux" if "single" in kinds else "sd3"


def head_meta(index: HeadIndex) -> dict:
    return {"heads": {"fingerprint": index.fingerprint(), "n_heads": index.n_heads, "n_layers": index.n_layers,
                      "latent": list(index.latent_hw), "layout": index.layout()}}


def concept_meta(concept_set: ConceptSet) -> dict:
    return {"name": concept_set.name, "hash": concept_set.hash(), "source": concept_set.source,
            "license": concept_set.license, "concepts": {k: list(v) for k, v in concept_set.concepts.items()}}


def generation_defaults(pipe) -> tuple[int, float]:
    """(steps, guidance): the model's shipped defaults; the shapes evaluation's for the embedded model;
    else the paper's 50 steps at guidance 7.5."""
    from headscope.models import model_defaults

    defaults = model_defaults(pipe)
    fallback = (EMBEDDED_STEPS, EMBEDDED_GUIDANCE) if is_embedded(pipe) else (PAPER_STEPS, PAPER_GUIDANCE)
    return (int(defaults.get("num_inference_steps", fallback[0])),
            float(defaults.get("guidance_scale", fallback[1])))


def prompt_seed(seed: int, index: int, stream: str) -> int:
    """A 63-bit seed that depends only on (seed, prompt index, stream name)."""
    digest = hashlib.sha256(f"{seed}:{index}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _version() -> str:
    from headscope import __version__

    return __version__


def _replace_folder(stage: Path, target: Path) -> None:
    """Move the finished folder `stage` to `target`, replacing an older one only once `stage` is complete."""
    if target.exists() and not target.is_dir():
        raise HeadscopeError(f"{target} exists and is not a folder; give a .hrv file name or another folder")
    replace_folder(stage, target)
