"""A word-level tokenizer for the shapes world, saved and loaded like any transformers tokenizer."""
from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from headscope.shapes.world import WORDS

BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"
MAX_LENGTH = 24  # tokens, start and end included: room for the longest caption of the grammar


def build_tokenizer(words=WORDS, max_length: int = MAX_LENGTH) -> PreTrainedTokenizerFast:
    """One token per word of the world's vocabulary (plus '.' and ','), CLIP-style special tokens.

    Like CLIP in SD 1.x, the end token doubles as padding, and every prompt is framed by start/end.
    """
    vocab = {tok: i for i, tok in enumerate([BOS, EOS, UNK, ".", ","] + sorted(set(words)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Punctuation()])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                   unk_token=UNK, model_max_length=max_length)
