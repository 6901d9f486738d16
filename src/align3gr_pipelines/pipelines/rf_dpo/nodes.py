"""Nodes of the `rf_dpo` stage: thin orchestration over modules in align3gr_pipelines."""
