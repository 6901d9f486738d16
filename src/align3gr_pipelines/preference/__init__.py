"""Preference level (paper §3.3): progressive Softmax-DPO.

`softmax_dpo` (the loss), `dpo_trainer` (one stage: train, select, gate), `self_play` (the policy's own
beam as negatives, bucketed easy → hard), `feedback_pairs` and `sentiment` (real-feedback pairs),
`stage_report` (what each stage changed).
"""
