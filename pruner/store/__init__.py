"""Files on disk: atomic writes and manifests (``files``), the cache's one owner of paths (``layout``), and the format
versions and checksums every cache entry is keyed and verified by (``formats``)."""
