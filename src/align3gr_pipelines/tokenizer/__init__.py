"""Token level (paper §3.1): dual semantic-collaborative IDs.

`semantic_encoder` (frozen sentence-transformers) and the collaborative encoder (`cf.sasrec`) give item and
user features; `sc_encoder` maps them to SC embeddings under the U2I loss; `rq_vae` quantises them;
`sc_tokenizer` trains both phases; `scid_collisions` makes item SCIDs unique; `scid` is the token format.
"""
