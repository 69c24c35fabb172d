"""The trainer tests' tiny model (SmolLM2 tokenizer) and corpus, for the EditFlow end-to-end test."""
from tests.trainer.conftest import tiny_corpus, tiny_model_dir  # noqa: F401
