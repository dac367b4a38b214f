"""The optional installs (pyproject.toml extras) and the one check every command makes before using one.

``pip install ml-engine`` serves; ``[train]`` adds training (scikit-learn, Ray Train); ``[report]``
adds the plots of ``--report`` (matplotlib). A command that needs an extra that is not installed
says which one, with status 2, before it spends minutes on work whose end it cannot reach.
"""

from __future__ import annotations

import importlib.util

from configs.errors import ConfigError


def require(module: str, extra: str, what: str) -> None:
    """Raise ConfigError naming ``extra`` when ``module`` cannot be imported."""
    try:
        found = importlib.util.find_spec(module) is not None
    except ImportError:
        found = False
    if not found:
        raise ConfigError(f"{what} needs {module}, which is not installed: pip install 'ml-engine[{extra}]' "
                          f"(a checkout: pip install -r requirements/dev.txt)")
