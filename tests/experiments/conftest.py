from tests.training.conftest import fixture_data  # noqa: F401  (the fixture corpus and tokenizer)
