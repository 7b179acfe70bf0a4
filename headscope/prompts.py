"""What a pipeline call's `encode_prompt` says: prompts, negative prompts, images per prompt, and the
tokens of every text encoder whose tokens are attention keys.

The trace wraps `encode_prompt` and hands each call's bound arguments here. Where a word's tokens sit
among a layer's text keys depends on the family (the backbone's `TextSlot`s): a UNet's keys are the
CLIP tokens; SD3's are 77 CLIP positions (CLIP-L and CLIP-G read the same prompt, side by side) then
the T5 tokens; Flux's are the T5 tokens. Each prompt is tokenized by each such encoder; prompts
longer than an encoder takes are refused (the pipelines would truncate them silently).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

from headscope.errors import HeadscopeError
from headscope.tokens import Tokenization, tokenize


@dataclass(frozen=True)
class EncoderTokens(Tokenization):
    """A `Tokenization` whose word positions count among the layer's text keys.

    Attributes (beyond Tokenization's):
        encoder: "clip" or "t5".
        offset: key index of this encoder's first token (SD3's T5 tokens start after the CLIP ones).
    """

    encoder: str = "clip"
    offset: int = 0

    def key_positions(self) -> list[int]:
        """Key indices of every token of the prompt (start / end tokens included)."""
        return list(range(self.offset, self.offset + len(self.input_ids)))

    @property
    def key_end(self) -> int:
        """One past the last key this prompt's tokens occupy."""
        return self.offset + len(self.input_ids)


def encoder_tokens(tokenization: Tokenization, encoder: str, offset: int) -> EncoderTokens:
    """`tokenization` with its word positions shifted by `offset` (the encoder's first key)."""
    values = {field.name: getattr(tokenization, field.name) for field in fields(tokenization)}
    values["words"] = tuple(replace(word, positions=tuple(position + offset for position in word.positions))
                            for word in tokenization.words)
    return EncoderTokens(**values, encoder=encoder, offset=offset)


class PromptLog:
    """Prompts of the latest pipeline call and their tokens, per row kind ("cond", "uncond") and encoder.

    Args:
        pipe: the pipeline (tokenizers and encoders are read from it).
        backbone: its adapter (which encoders feed the keys, where).
        negatives_wanted: also tokenize negative prompts (the trace records unconditional rows).
        allow_unknown: passed to `headscope.tokens.tokenize` (words that become the unknown token).
    """

    def __init__(self, pipe, backbone, negatives_wanted: bool, allow_unknown: bool | None = None):
        self.pipe = pipe
        self.backbone = backbone
        self.negatives_wanted = negatives_wanted
        self.allow_unknown = allow_unknown
        self.prompts: list[str] | None = None
        self.negatives: list[str] | None = None
        self.images_per_prompt = 1
        self.separate_uncond = False  # this call runs a separate negative-prompt pass (Flux true CFG)
        self.tokens: dict[str, dict[str, list[EncoderTokens]]] = {}

    def start_call(self, arguments: dict) -> None:
        """The first `encode_prompt` of a pipeline call: its prompts, and negatives when they come with it."""
        prompts = _as_list(arguments.get("prompt"))
        embeds = arguments.get("prompt_embeds")
        n_prompts = len(prompts) if prompts is not None else (embeds.shape[0] if embeds is not None else None)
        self.prompts = prompts
        self.images_per_prompt = int(arguments.get("num_images_per_prompt") or 1)
        self.separate_uncond = False
        negatives = None
        if not self.backbone.separate_cfg_passes and arguments.get("do_classifier_free_guidance") is not False:
            negatives = _as_list(arguments.get("negative_prompt"))
            if negatives is None and arguments.get("negative_prompt_embeds") is None and n_prompts:
                negatives = [""] * n_prompts
            elif negatives is not None and len(negatives) == 1 and n_prompts:
                negatives = negatives * n_prompts
        self.negatives = negatives
        slots = self.backbone.text_slots(self.pipe, arguments)
        self.tokens = {"cond": self._tokenize(slots, arguments, "prompt_args", prompts)}
        if negatives is not None and self.negatives_wanted:
            self.tokens["uncond"] = self._tokenize(slots, arguments, "negative_args", negatives, n_prompts)

    def negative_call(self, arguments: dict) -> None:
        """A second `encode_prompt` before the denoiser ran: the negative prompt of a separate pass."""
        self.separate_uncond = True
        self.negatives = _as_list(arguments.get("prompt"))
        if self.negatives is not None and self.negatives_wanted:
            slots = self.backbone.text_slots(self.pipe, arguments)
            self.tokens["uncond"] = self._tokenize(slots, arguments, "prompt_args", self.negatives)

    def key_limit(self, kinds: set[str], encoder: str) -> int | None:
        """Keys to keep: up to the end of the longest recorded prompt of `encoder`; None (all) when text is unknown."""
        groups = [self.tokens.get(kind, {}).get(encoder) for kind in kinds]
        if any(group is None for group in groups):
            return None
        return max(tokens.key_end for group in groups for tokens in group)

    def _tokenize(self, slots, arguments: dict, which: str, fallback: list[str] | None,
                  n_prompts: int | None = None) -> dict[str, list[EncoderTokens]]:
        """{encoder: tokens of each prompt} for the slots whose encoder is there; other slots only check lengths."""
        found: dict[str, list[EncoderTokens]] = {}
        for slot in slots:
            given = [name for name in getattr(slot, which) if arguments.get(name) is not None]
            texts = _as_list(arguments[given[0]]) if given else (fallback if slot.keys else None)
            tokenizer = getattr(self.pipe, slot.tokenizer, None)
            if texts is None or tokenizer is None or getattr(self.pipe, slot.text_encoder, None) is None:
                continue
            if n_prompts and len(texts) == 1:
                texts = texts * n_prompts
            limit = self._max_length(tokenizer, slot)
            tokenized = [tokenize(tokenizer, text, limit, allow_unknown=self.allow_unknown) for text in texts]
            if slot.keys:
                found[slot.encoder] = [encoder_tokens(tokens, slot.encoder, slot.offset) for tokens in tokenized]
        return found

    def _max_length(self, tokenizer, slot) -> int:
        """The slot's token limit, capped by the tokenizer's and the encoder's own."""
        limits = [slot.max_length, tokenizer.model_max_length]
        encoder = getattr(self.pipe, slot.text_encoder, None)
        limits.append(getattr(getattr(encoder, "config", None), "max_position_embeddings", None))
        return min(limit for limit in limits if limit)

    def check_encoder(self, encoder: str, arguments: dict) -> None:
        """HeadscopeError when the pipeline lacks the encoder whose tokens were asked for."""
        slot = next((slot for slot in self.backbone.text_slots(self.pipe, arguments)
                     if slot.keys and slot.encoder == encoder), None)
        if slot is not None and getattr(self.pipe, slot.text_encoder, None) is None:
            raise HeadscopeError(f"this pipeline has no {encoder} text encoder (pipe.{slot.text_encoder} is None): "
                                 f"its {encoder} keys are zeros; map words with "
                                 f"encoder={self.backbone.default_encoder!r}")


def _as_list(prompt) -> list[str] | None:
    if prompt is None:
        return None
    return [prompt] if isinstance(prompt, str) else list(prompt)


def prompt_tokens(pipe, prompt: str, encoder: str | None = None, **call_options) -> EncoderTokens:
    """How `prompt` reaches the attention keys of `pipe` through `encoder` (default: the family's), as a
    pipeline call with `call_options` (e.g. `max_sequence_length`) tokenizes it; too long a prompt or an
    encoder the family or pipeline lacks raises HeadscopeError. For checking words before generating."""
    from headscope.backbones import backbone_for

    backbone = backbone_for(pipe)
    encoder = backbone.check_encoder_name(encoder)
    log = PromptLog(pipe, backbone, negatives_wanted=False)
    arguments = {"prompt": prompt, **call_options}
    log.check_encoder(encoder, arguments)
    log.start_call(arguments)
    return log.tokens["cond"][encoder][0]
