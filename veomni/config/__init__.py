"""Strict nested-dataclass configs. The public entry point is ``veomni.arguments``."""
