"""Evaluation and generation: KV-cache decoding (generate.py), likelihood scoring
(scoring.py), UNSCENE (unscene.py, open_ended.py), MVBench (mvbench.py), the synthetic
benchmark (synthetic.py) and attention plots (plots.py). ``mashvlm eval`` runs them."""
