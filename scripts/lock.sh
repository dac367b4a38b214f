#!/usr/bin/env bash
# Refresh the lock files from pyproject.toml (`make lock`). One resolution for every supported
# Python (--universal), with dev as the widest set; serve and train are resolved inside dev's pins
# (-c), so a package has the same version in every file.
#   requirements/dev.txt    make venv / make test: everything (the project with [train,report,dev])
#   requirements/train.txt  the Docker image: serving + training (retrain jobs, first-start training)
#   requirements/serve.txt  a serving-only install (docker build --build-arg REQUIREMENTS=requirements/serve.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
UV="${UV:-.venv/bin/uv}"
opts=(--universal --quiet --no-header "$@")
"$UV" pip compile pyproject.toml "${opts[@]}" --extra dev -o requirements/dev.txt
"$UV" pip compile pyproject.toml "${opts[@]}" --extra train -c requirements/dev.txt -o requirements/train.txt
"$UV" pip compile pyproject.toml "${opts[@]}" -c requirements/dev.txt -o requirements/serve.txt
echo "requirements/{dev,train,serve}.txt written; commit them with pyproject.toml"
