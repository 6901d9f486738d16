"""The generative recommender's LM: `backbone` builds or loads it and adds the SCID tokens, `rec_lm` is the
saved bundle (model + tokenizer + metadata) and its prompt/response encoding, `constrained_decoding` ranks
the catalogue's valid SCIDs with beam search."""
