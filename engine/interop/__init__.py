"""Interop: what other tools read and write (export to mlx-lm and PEFT, scoring a saved adapter,
mlx_lm.lora configs, TensorBoard and experiment trackers). docs/ARCHITECTURE.md."""
