"""Nodes of the `evaluation` stage: thin orchestration over modules in align3gr_pipelines."""
