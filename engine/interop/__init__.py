"""Interop: export, import of mlx_lm configs, metrics writers and trackers, the Hub, the embedded default."""
