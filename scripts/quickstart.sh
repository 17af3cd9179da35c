#!/usr/bin/env bash
# The README's first command: install (./.venv) and run the main job, `distilpose demo`.
# Extra arguments go to `distilpose demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
exec distilpose demo "$@"
