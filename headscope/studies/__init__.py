"""Studies of the DAAM paper and beyond: parts of speech, syntax, co-hyponyms, adjectives, numerals, guidance."""
