"""Behaviour level (paper §3.2): multi-task SFT.

`prompts` (the templates), `tasks` (SEQ, C1-C3, B1, B2 examples), `trainer` (fit a RecLM with the Hugging
Face Trainer, select on valid recall, resume), `hf_trainer` (the Trainer loop itself), `launcher`
(the same loop under torchrun), `tca4rec` (SASRec-distilled token targets).
"""
