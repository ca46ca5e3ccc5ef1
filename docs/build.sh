#!/usr/bin/env bash
# Build the HTML documentation with warnings as errors. Installs nothing:
# needs the packages of the "docs" extra (pip install -e ".[docs]").
# Runs every examples/plot_*.py (sphinx-gallery) on the CPU.
set -euo pipefail
cd "$(dirname "$0")"
export MPLBACKEND=Agg
rm -rf _build generated auto_examples sg_execution_times.rst
sphinx-build -W --keep-going -b html -j 1 . _build/html "$@"
echo "docs built: $(pwd)/_build/html/index.html"
