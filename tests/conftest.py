import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _environment_read_per_test():
    """`ltjax._config.settings()` reads the environment once per process: each test starts and ends with
    a fresh read, so one test's monkeypatched variables never reach another. A test that sets an
    LTJAX_* variable calls `settings.cache_clear()` right after."""
    from ltjax._config import settings

    settings.cache_clear()
    yield
    settings.cache_clear()
