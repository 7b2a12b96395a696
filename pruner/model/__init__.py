"""What a model is and holds: the torch-free catalogue (``catalogue``), the anatomy of its blocks (``anatomy``),
loading (``loading``) and reading a checkpoint block by block (``streaming``)."""
