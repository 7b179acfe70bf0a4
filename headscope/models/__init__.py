"""Pipeline loading: a local diffusers folder, a hub id, or one of the embedded shapes-world models.

Embedded models ship inside the package and load through `from_pretrained` like any folder; their names:
  "shapes"        the SD-style UNet model (the default: `model=None`)
  "shapes-mmdit"  the SD3-style joint-attention model (`StableDiffusion3Pipeline`)
Each has its own shipped HRV file beside it (`headscope.hrv.default_hrv_path(name)`).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from headscope.errors import HeadscopeError

MODELS_DIR = Path(__file__).resolve().parent
EMBEDDED = {"shapes": "shapes_model", "shapes-mmdit": "shapes_mmdit"}  # name -> folder in this package
DEFAULT_MODEL = "shapes"
EMBEDDED_MODEL = MODELS_DIR / EMBEDDED[DEFAULT_MODEL]
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def embedded_model_path(name: str = DEFAULT_MODEL) -> Path:
    """Folder of the embedded model `name` ("shapes", "shapes-mmdit") shipped inside the package."""
    if name not in EMBEDDED:
        raise HeadscopeError(f"no embedded model {name!r}; the embedded models are {', '.join(EMBEDDED)}")
    folder = MODELS_DIR / EMBEDDED[name]
    if not (folder / "model_index.json").is_file():
        raise HeadscopeError(f"the embedded model {name!r} is missing at {folder}; "
                             "reinstall headscope or pass --model PATH_OR_HUB_ID")
    return folder


def resolve_model(model: str | Path | None):
    """What `model` names: an embedded model's folder for None or an embedded name, else `model` itself."""
    if model is None:
        return embedded_model_path()
    if isinstance(model, str) and model in EMBEDDED:
        return embedded_model_path(model)
    return model


def embedded_name(source) -> str | None:
    """The name of the embedded model whose folder `source` is (a path, a name, None = the default), else None."""
    if source is None:
        return DEFAULT_MODEL
    if isinstance(source, str) and source in EMBEDDED:
        return source
    try:
        path = Path(str(source)).expanduser().resolve()
    except (OSError, RuntimeError):
        return None
    return next((name for name, folder in EMBEDDED.items() if path == (MODELS_DIR / folder).resolve()), None)


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def check_device(device: str) -> str:
    """`device` when torch can use it here; HeadscopeError naming the devices that are available."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise HeadscopeError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if not available.get(kind, True):
        usable = ", ".join(name for name, ok in available.items() if ok)
        raise HeadscopeError(f"device {device!r} is not available on this machine; use {usable}")
    number, count = torch.device(device).index, torch.cuda.device_count()
    if kind == "cuda" and number is not None and number >= count:
        raise HeadscopeError(f"device {device!r} does not exist; this machine has {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}")
    return device


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise HeadscopeError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16") from None


def load_pipeline(model: str | Path | None = None, device: str | None = None, dtype=None, **kwargs):
    """Load a diffusers text-to-image pipeline through `DiffusionPipeline.from_pretrained`.

    Args:
        model: a local pipeline folder, a hub id (SD 1.x / 2.x / XL, SD3, Flux), an embedded model's name
            ("shapes", "shapes-mmdit"), or None for the default embedded model ("shapes").
        device: "cpu", "cuda", "mps"...; None picks the best available.
        dtype: torch dtype or one of "fp32", "fp16", "bf16"; None keeps the saved dtype, except on a CPU,
            where None means fp32.
        **kwargs: passed on to `from_pretrained` (e.g. `variant="fp16"`).
    """
    from diffusers import DiffusionPipeline
    from safetensors import SafetensorError

    source = resolve_model(model)
    device = check_device(device or default_device())
    # Half-precision weights (the embedded model is stored in fp16 to stay small) compute in fp32 on a CPU.
    torch_dtype = _resolve_dtype(dtype if dtype is not None or str(device) != "cpu" else "fp32")
    path = Path(source).expanduser()
    if path.exists():
        index = path / "model_index.json"
        if path.is_file():
            raise HeadscopeError(f"{path} is a file, not a pipeline folder; pass a diffusers pipeline folder "
                                 "or a hub id")
        if not index.is_file():
            raise HeadscopeError(f"{path} is not a diffusers pipeline folder (no model_index.json); "
                                 "pass a folder written by save_pretrained or a hub id")
        try:
            components = json.loads(index.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise HeadscopeError(f"{index} is not valid JSON ({err}); re-save the pipeline") from None
        if not isinstance(components, dict):
            raise HeadscopeError(f"{index} is not a diffusers model index (a JSON object); re-save the pipeline")
    elif str(source).startswith((".", "/", "~")) or str(source).count("/") > 1:
        raise HeadscopeError(f"model folder {source} does not exist; pass an existing folder or a hub id")
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    try:
        with warnings.catch_warnings():  # newer diffusers renames torch_dtype to dtype; older ones lack dtype
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(str(path) if path.exists() else str(source), **kwargs)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as err:
        # A damaged folder fails in many ways (truncated safetensors, a component class that does not exist).
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HeadscopeError(f"could not load model {source}: {first.rstrip('.')}; re-save or re-download "
                             "the model") from None
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_defaults(pipe) -> dict:
    """Pipeline-call arguments a model ships in headscope.json `defaults` besides steps and guidance, those
    the pipeline's `__call__` takes: an SD3 model trained on fewer T5 tokens records its max_sequence_length,
    and every call must pass it (the pipeline's own default would pad the text to 256 tokens)."""
    import inspect

    accepted = inspect.signature(type(pipe).__call__).parameters
    return {key: value for key, value in model_defaults(pipe).items()
            if key not in ("num_inference_steps", "guidance_scale") and key in accepted}


def model_defaults(pipe) -> dict:
    """Generation defaults a headscope-trained model ships in headscope.json (guidance, steps); else {}."""
    folder = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")
    meta = Path(str(folder)) / "headscope.json" if folder else None
    if meta is None or not meta.is_file():
        return {}
    try:
        return json.loads(meta.read_text()).get("defaults", {})
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def is_shapes_model(model: str | Path | None) -> bool:
    """Whether `model` (None = the embedded model, or a folder) is a shapes-world model headscope trained.

    Such models speak the shapes-world vocabulary: commands default to its concepts and prompts.
    """
    if embedded_name(model) is not None:
        return True
    meta = Path(str(model)).expanduser() / "headscope.json"
    try:
        return meta.is_file() and json.loads(meta.read_text()).get("kind") == "shapes-world"
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
