"""``python -m scripts.serve_build``: what ``serve build`` would write for the engine's app *builder*.

``serve build`` only accepts an ``Application`` object, and the engine's import path
(``deployments.app:build_app``) is a builder taking ``args`` (Settings overrides). This does the same
as ``serve build`` (Ray's ``build_app`` + ``deployment_to_schema``, validated by
``ServeDeploySchema``) for the application the builder returns, so tests/test_serve_config.py can
compare serve_config.yaml with the code, and an operator can start a new config from it:

    python -m scripts.serve_build > /tmp/generated.yaml
    python -m scripts.serve_build --args models_dir=/srv/models --port 8000 --host 0.0.0.0
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

IMPORT_PATH = "deployments.app:build_app"
APP_NAME = "ml-engine"


def built_application(args: dict[str, Any] | None = None, name: str = APP_NAME) -> dict[str, Any]:
    """The application section ``serve build`` would produce (one dict per deployment, code options)."""
    from ray._common.utils import import_attr
    from ray.serve._private.build_app import build_app
    from ray.serve.deployment import deployment_to_schema
    from ray.serve.schema import ServeApplicationSchema

    builder = import_attr(IMPORT_PATH)
    built = build_app(builder(dict(args or {})), name=name)
    schema = ServeApplicationSchema(name=name, route_prefix="/", import_path=IMPORT_PATH, runtime_env={},
                                    deployments=[deployment_to_schema(d) for d in built.deployments])
    app = schema.model_dump(exclude_unset=True)
    if args:
        app["args"] = dict(args)
    return app


def built_config(args: dict[str, Any] | None = None, host: str = "127.0.0.1", port: int = 8000) -> dict[str, Any]:
    from ray.serve.schema import ServeDeploySchema

    config = {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port},
              "applications": [built_application(args)]}
    ServeDeploySchema.model_validate(config)
    return config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.serve_build", description=__doc__.splitlines()[0])
    p.add_argument("--args", nargs="*", default=[], help="Settings overrides KEY=VALUE (JSON values allowed)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    a = p.parse_args(argv)
    overrides: dict[str, Any] = {}
    for item in a.args:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    yaml.safe_dump(built_config(overrides, a.host, a.port), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
