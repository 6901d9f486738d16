"""Measuring: the evaluated `cases` and lists, ranking `metrics` (Recall/NDCG with ties, bootstrap CIs,
paired tests), `report` (the evaluation table's Markdown and plot), `paired_stats` (pooled paired Δ over
seeds, user-cluster bootstrap, MDE), `valid_recall` (the validation recall that selects checkpoints),
`stage_reuse` (a DPO stage that kept its input), `sasrec_bce` (the paper's baseline SASRec), `timing`."""
