"""Measuring: the evaluated `cases` and lists, ranking `metrics` (Recall/NDCG with ties, bootstrap CIs, paired tests), `valid_recall` (the
validation recall that selects checkpoints), `report` (the evaluation table's Markdown and plot)."""
