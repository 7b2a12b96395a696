"""Stored runs: pruning into a run and recovering it (``execute``), reading runs and their zips (``manifest``), their
metrics (``metrics``) and comparisons of run groups (``groups``)."""
