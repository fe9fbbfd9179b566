"""UI test fixtures: a live server over a real index, and headless Debian chromium."""

from __future__ import annotations

import os
import shutil

import pytest

from service.app import create_app
from service.settings import Settings
from tests.service.live import live_server

CHROMIUM = "/usr/bin/chromium"
MAX_COMPLETION_TOKENS = 16


@pytest.fixture(scope="session")
def ui_index_dir(tiny_index):
    return tiny_index


@pytest.fixture(scope="session")
def ui_server(ui_index_dir):
    """The real app (API + static UI) on 127.0.0.1, serving the test index."""
    settings = Settings(index_dir=ui_index_dir, max_completion_tokens=MAX_COMPLETION_TOKENS)
    with live_server(create_app(settings)) as base:
        yield base


@pytest.fixture(scope="session")
def browser():
    """Headless Debian chromium driven by Playwright (``make test`` installs chromium)."""
    if shutil.which("chromium") is None and not os.path.exists(CHROMIUM):
        pytest.fail("chromium is missing: run `make system-deps` (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()
