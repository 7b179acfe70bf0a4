"""Steering by heads: scaling (strengthen, adjust, weaken), editing (prompt-to-prompt, P2P-HRV) and
multi-concept neglect (Attend-and-Excite, A&E-HRV, head reweighting).

Modules: `scale` (HeadScale and the HRV factors), `edit` (prompt-to-prompt), `subjects` (who a
neglect method protects; head reweighting), `neglect` (Attend-and-Excite).
"""
from headscope.steer.edit import DEFAULT_CROSS, DEFAULT_SELF, EditResult, Editor, align, edit
from headscope.steer.neglect import METHODS, AttendAndExcite, diffusers_attend_and_excite, mitigate_neglect
from headscope.steer.scale import (DEFAULT_A, DEFAULT_B, HeadScale, TokenFactors, adjust, adjust_factors, adjust_hook,
                                   key_encoders, max_length, resolve_hrv, steering, strengthen, strengthen_factors,
                                   strengthen_hook, tokenize_prompts, word_occurrences)
from headscope.steer.subjects import Subject, default_concept, find_subjects, heads_hook, parse_subjects

__all__ = ["DEFAULT_A", "DEFAULT_B", "DEFAULT_CROSS", "DEFAULT_SELF", "METHODS", "AttendAndExcite", "EditResult",
           "Editor", "HeadScale", "Subject", "TokenFactors", "adjust", "adjust_factors", "adjust_hook", "align",
           "default_concept", "diffusers_attend_and_excite", "edit", "find_subjects", "heads_hook", "key_encoders",
           "max_length", "mitigate_neglect", "parse_subjects", "resolve_hrv", "steering", "strengthen",
           "strengthen_factors", "strengthen_hook", "tokenize_prompts", "word_occurrences"]
