"""Analyses of models and data (docs/design.md): pure array functions, plus the code that
runs a model to feed them. tpl.py: UTR's temporal perplexity of QA rows; rve.py: RVE's
action-relation head scores and inference-time attention enhancement; rve_heads.py: the
ARS table of a checkpoint."""
