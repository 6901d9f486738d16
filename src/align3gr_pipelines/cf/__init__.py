"""Collaborative models: `sasrec` (the CF encoder of tokenization and a baseline) and the other baselines
(`baselines`: most-popular, item-kNN, the SASRec scorer)."""
