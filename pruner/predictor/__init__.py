"""The damage-table predictor: perplexity of any allocation predicted before pruning (``table``), measured on held-out
text (``measure``), compounding fitted (``compounding``), cached (``cache``), optimised (``optimal``) and used to tune
allocator parameters (``tuning``)."""
