"""Nodes of the `data_prep` stage: thin orchestration over modules in align3gr_pipelines."""
