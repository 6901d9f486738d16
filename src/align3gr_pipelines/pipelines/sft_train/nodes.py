"""Nodes of the `sft_train` stage: thin orchestration over modules in align3gr_pipelines."""
