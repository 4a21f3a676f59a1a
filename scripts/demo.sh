#!/usr/bin/env bash
# The main job: set up, then draw a picture offline with the bundled demo model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/diffcore generate --prompt "${PROMPT:-a red circle on a blue background}" --output "${OUTPUT:-demo.png}"
