"""pytest configuration for tests/deploy."""

import pytest

# The shared manifest helpers assert too: give their failures pytest's detailed messages, as in a test module.
pytest.register_assert_rewrite("tests.deploy.manifests")
