"""Work as requests: typed workflows (``workflows``), the job table and its workers (``queue``), sweeps (``sweep``)
and the Ray executor (``ray_exec``)."""
