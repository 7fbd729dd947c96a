"""Analyses of models and data (docs/design.md): pure array functions, plus the code that
runs a model to feed them. tpl.py: UTR's temporal perplexity of QA rows."""
