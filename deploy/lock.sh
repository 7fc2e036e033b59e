#!/bin/sh
# Regenerate the image's hash-locked requirements from PyPI (run from the repository root; needs uv, e.g.
# `python -m pip install uv==0.13.9`):
#   deploy/lock.sh              keep the current pins, add or drop what pyproject.toml changed
#   deploy/lock.sh --upgrade    move every pin to the newest release the ranges allow
# deploy/requirements.lock: nvdp's runtime dependencies ([project] dependencies in pyproject.toml), installed into the
# image's venv; deploy/build-requirements.lock: its build backend (deploy/build-requirements.in, which mirrors
# [build-system] requires). Resolved for the image (CPython 3.11, Linux); each pin lists the sha256 of every file
# PyPI has for it, so one lock serves amd64 and arm64. --no-config: no pip/uv configuration or local index reaches it.
set -eu
uv=${UV:-uv}
common="--no-config --index-url https://pypi.org/simple --python-version 3.11 --python-platform linux
        --generate-hashes --annotation-style line --custom-compile-command deploy/lock.sh"
# shellcheck disable=SC2086
"$uv" pip compile $common "$@" pyproject.toml -o deploy/requirements.lock
# shellcheck disable=SC2086
"$uv" pip compile $common "$@" deploy/build-requirements.in -o deploy/build-requirements.lock
