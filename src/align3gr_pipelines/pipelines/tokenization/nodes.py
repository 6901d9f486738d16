"""Nodes of the `tokenization` stage: thin orchestration over modules in align3gr_pipelines."""
