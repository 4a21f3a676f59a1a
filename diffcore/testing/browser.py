"""The real headless chromium the browser tests drive with playwright (Debian's; no download)."""
from __future__ import annotations

import shutil
from pathlib import Path

# The flags a closed-network machine needs (no background connections, no GPU, root without a sandbox).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    """chromium's path; the test is skipped where there is none."""
    import pytest

    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None and Path("/usr/bin/chromium").exists():
        path = "/usr/bin/chromium"
    if path is None:
        pytest.skip("no chromium on this machine: `apt-get install chromium` (bash scripts/install-browser.sh, "
                    "which .ci/run calls, does it as root); skipping the browser test")
    return path
