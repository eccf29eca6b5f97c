"""Fixtures of the integration tests: Prefect's test server with a state folder of its own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.testing.utilities import prefect_test_harness

from tests.browser import browser_page


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A Prefect test server and a state folder, one per test module; results persist there."""
    home = tmp_path_factory.mktemp("flowhome")
    mp = pytest.MonkeyPatch()
    mp.setenv("VISIONPIPE_HOME", str(home))
    mp.setenv("PREFECT_LOCAL_STORAGE_PATH", str(home / "prefect-results"))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    with prefect_test_harness(server_startup_timeout=120):
        yield home
    mp.undo()


@pytest.fixture()
def page() -> Iterator[Any]:
    """A page of headless Chromium (Debian's, through Playwright) for the browser tests."""
    with browser_page() as page:
        yield page
