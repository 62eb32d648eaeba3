#!/usr/bin/env bash
# The test suite (CPU). Extra pytest arguments pass through, e.g. scripts/test.sh -m gpu
source "$(dirname "$0")/env.sh"
exec python -m pytest -q "$@" tests
