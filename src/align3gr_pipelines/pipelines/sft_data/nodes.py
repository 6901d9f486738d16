"""Nodes of the `sft_data` stage: thin orchestration over modules in align3gr_pipelines."""
