import warnings
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The team's real data folder (``../shared/data``); tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture
def quiet():
    """Ignore warnings inside the test (tiny models and data warn a lot); opt in per module."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
