"""Nodes of the `sp_dpo_curriculum` stage: thin orchestration over modules in align3gr_pipelines."""
