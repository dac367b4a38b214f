"""``python -m scripts.gen_config_docs``: write docs/configuration.md from :class:`configs.settings.Settings`.

Why generated: the settings module is the single source of truth (types, defaults, bounds), and a
hand-written reference drifts from it within a week. The descriptions are the comments written next
to each field in configs/settings.py and configs/sections.py (trailing ``# ...`` or the comment lines
right above it), so documenting a field means commenting it where it is defined.
tests/test_config_docs.py fails when the committed file differs from what this script writes
(``--check`` does the same from a shell).
"""

from __future__ import annotations

import argparse
import ast
import inspect
import io
import re
import sys
import tokenize
import typing
from collections.abc import Iterator
from pathlib import Path
from types import UnionType
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

import configs.settings as settings_module
from configs.settings import PROJECT_DIR, YAML_FILES, Settings

OUT = PROJECT_DIR / "docs" / "configuration.md"
ENV_PREFIX = Settings.model_config["env_prefix"]
NESTED = Settings.model_config["env_nested_delimiter"]


# ---------------------------------------------------------------------------------------------
# Comments next to fields, read from the source
# ---------------------------------------------------------------------------------------------

def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment in the class body (trailing comment, else the block right above)."""
    source = inspect.getsource(cls)
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    out: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        above: list[str] = []
        n = node.lineno - 1
        while n in comments and lines[n - 1].lstrip().startswith("#"):
            above.insert(0, comments[n])
            n -= 1
        # A block comment above a group of fields ("# Paths.") is a heading, not a description: use
        # it only when it is directly attached to this one field and ends a sentence about it.
        if trailing:
            out[node.target.id] = " ".join(trailing)
        elif above and not _is_heading(above):
            out[node.target.id] = " ".join(above)
    return out


def yaml_comments() -> dict[str, str]:
    """Dotted key (``models.xgb_params.eta``) -> the comment next to it in the shipped YAML files.

    Operators read the YAML files, so their comments are the second source of descriptions for
    the YAML sections (after comments in configs/sections.py).
    """
    out: dict[str, str] = {}
    for name in YAML_FILES:
        path = settings_module.CONFIG_DIR / name
        if not path.exists():
            continue
        stack: list[tuple[int, str]] = []
        above: list[str] = []
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if not stripped:
                above = []
                continue
            if stripped.startswith("#"):
                above.append(stripped.lstrip("#").strip())
                continue
            m = re.match(r"^(\s*)([A-Za-z_]\w*):(.*)$", line)
            if not m:
                above = []
                continue
            indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, key))
            trailing = rest.split("#", 1)[1].strip() if "#" in rest else ""
            text = trailing or " ".join(above)
            if text and len(stack) > 1:
                out[".".join(k for _, k in stack)] = text
            above = []
    return out


def _is_heading(block: list[str]) -> bool:
    return len(block) == 1 and len(block[0].split()) <= 12 and block[0].endswith((".", ":")) and \
        not any(ch in block[0] for ch in "=;")


def section_headings(cls: type) -> dict[str, str]:
    """Field name -> the short heading comment ("# Paths.") of the group it starts."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    out: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            prev = lines[node.lineno - 2].strip() if node.lineno >= 2 else ""
            before = lines[node.lineno - 3].strip() if node.lineno >= 3 else ""
            if prev.startswith("#") and not before.startswith("#") and _is_heading([prev.lstrip("# ").strip()]):
                out[node.target.id] = prev.lstrip("# ").strip().rstrip(".:")
    return out


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

def type_name(annotation: Any) -> str:
    """A readable type: ``list[SecretStr]``, ``int | None``, ``"replay" | "binance"``."""
    origin = get_origin(annotation)
    if origin is typing.Annotated:
        return type_name(get_args(annotation)[0])
    if origin is Literal:
        return " \\| ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in get_args(annotation))
    if origin in (typing.Union, UnionType):
        return " \\| ".join("None" if a is type(None) else type_name(a) for a in get_args(annotation))
    if origin is not None:
        args = ", ".join("..." if a is Ellipsis else type_name(a) for a in get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def default_text(value: Any) -> str:
    if isinstance(value, Path):
        try:
            return f"`<repo>/{value.relative_to(PROJECT_DIR)}`"
        except ValueError:
            return f"`{value}`"
    if isinstance(value, SecretStr):  # a service URL: shown as the engine shows it, credentials redacted
        return f'`"{settings_module.redact_url(value)}"`'
    if isinstance(value, (list, tuple)):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if value is None:
        return "`None`"
    return f"`{value}`"


def bounds_text(info: FieldInfo) -> str:
    parts = []
    for meta in info.metadata:
        for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            v = getattr(meta, attr, None)
            if v is not None:
                parts.append(f"{sym} {_num(v)}")
    return ", ".join(parts)


def _num(v: Any) -> str:
    if isinstance(v, int) and v >= 1 << 20 and v & (v - 1) == 0:
        return f"2^{v.bit_length() - 1}"
    return str(v)


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def yaml_values() -> dict[str, Any]:
    """Dotted key -> the value the shipped YAML files set (what a fresh checkout actually runs with)."""
    import yaml

    out: dict[str, Any] = {}

    def flatten(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                flatten(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = node

    for name in YAML_FILES:
        path = settings_module.CONFIG_DIR / name
        if path.exists():
            flatten("", yaml.safe_load(path.read_text()) or {})
    return out


def _rows(model: type[BaseModel], env_path: list[str]) -> Iterator[tuple[str, str, str, str, str, str]]:
    """(key, env var, type, default, bounds, description) for each leaf field, nested models flattened.

    For keys the shipped YAML files set, the default column shows that value (what runs) and the
    code default next to it when they differ.
    """
    comments = field_comments(model)
    from_yaml = yaml_comments()
    shipped = yaml_values()
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _rows(annotation, env_path + [name])
            continue
        key = ".".join(env_path[1:] + [name]) if env_path else name
        env = ENV_PREFIX.upper() + NESTED.join(p.upper() for p in env_path + [name])
        dotted = ".".join(env_path + [name])
        desc = comments.get(name) or info.description or from_yaml.get(dotted, "")
        default = default_text(info.default)
        if dotted in shipped:
            value = shipped[dotted]
            code_default = info.default if not isinstance(info.default, tuple) else list(info.default)
            default = default_text(value) + ("" if value == code_default else f" (YAML; code: {default})")
        yield (key, env, type_name(annotation), default, bounds_text(info), _escape(desc))


def _yaml_file_of(section: str) -> str:
    for name in YAML_FILES:
        text = (settings_module.CONFIG_DIR / name).read_text()
        if re.search(rf"^{section}:", text, flags=re.M):
            return name
    return "(none)"


# The seed platform's engine settings -> this engine's (docs/configuration.md "Coming from the seed");
# tests/test_config_docs.py checks that every key named here is a real setting.
SEED_SETTINGS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("API_KEY", ("api_keys", "api_keys_file"), "a list (comma-separated), each key at least 24 characters; or a "
     "file of keys (a mounted secret). Sent as the `X-API-Key` header, as in the seed"),
    ("DATABASE_URL", ("database_url",), "the same PostgreSQL URL; tables live in schema `ml`"),
    ("REDIS_URL", ("redis_url",), "the same Redis URL (cache, rate limits, `signals:{symbol}`)"),
    ("MODEL_PATH", ("models_dir",), "a model registry folder (one subfolder per model, versions and a "
     "`current` pointer; docs/models.md), not one model file"),
    ("SUPPORTED_SYMBOLS", ("market.symbols",), "configs/market.yaml, or the variable as a JSON list"),
    ("DEFAULT_HORIZONS", ("market.horizons",), "in 5-minute candles, like the seed; configs/market.yaml"),
    ("CORS_ORIGINS", ("cors_origins", "cors_allow_credentials"), "comma-separated origins, default "
     "`http://localhost:3000` as in the seed; `*` is refused together with credentials"),
    ("BINANCE_API_KEY / BINANCE_API_SECRET", ("binance_api_url", "binance_ws_url"), "no equivalent: the engine "
     "reads only public market data (klines over REST and WebSocket), which needs no key; it never trades. "
     "Only the endpoints are configurable"),
)


def env_name(key: str) -> str:
    """``market.symbols`` -> ``MLE_MARKET__SYMBOLS``."""
    return ENV_PREFIX + NESTED.join(part.upper() for part in key.split("."))


def seed_section() -> list[str]:
    out = ["## Coming from the seed", "",
           "The seed platform's engine was configured by unprefixed variables; this engine reads `MLE_*` ones "
           "(and its YAML files). Each seed name and what replaces it:", "",
           "| seed variable | this engine | notes |", "|---|---|---|"]
    for seed, keys, note in SEED_SETTINGS:
        ours = ", ".join(f"`{k}` (`{env_name(k)}`)" for k in keys)
        out.append(f"| `{seed}` | {ours} | {note} |")
    return out + [""]


def render() -> str:
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m scripts.gen_config_docs` from configs/settings.py and configs/sections.py: do",
        "     not edit by hand; comment the field where it is defined and re-run. tests/test_config_docs.py checks it. -->",
        "",
        "Every setting of the engine lives in one typed object, `configs.settings.Settings`",
        "(pydantic-settings); code gets it from `get_settings()` and never reads `os.environ` itself.",
        "",
        "Where a value comes from, highest priority first:",
        "",
        "1. keyword arguments (tests, `load_settings(**overrides)`),",
        f"2. environment variables `{ENV_PREFIX}<FIELD>` (nested keys joined by `{NESTED}`, e.g. "
        f"`{ENV_PREFIX}MODELS{NESTED}XGB_PARAMS{NESTED}MAX_DEPTH=8`; lists and dicts as JSON, except "
        f"`{ENV_PREFIX}API_KEYS=key1,key2` and `{ENV_PREFIX}CORS_ORIGINS=https://a,https://b`),",
        "3. a `.env` file in the working directory (same names; any other key is an error),",
        f"4. the YAML files in `configs/` (or `{ENV_PREFIX}CONFIG_DIR`): " + ", ".join(f"`{f}`" for f in YAML_FILES)
        + ", each holding the sections named below,",
        "5. the defaults in the code. The tables show, for keys the shipped YAML files set, that value",
        "   (what a fresh checkout runs with) and the code default beside it when they differ.",
        "",
        "Unknown keys and out-of-range values stop the engine at start-up with a `ConfigError` naming the key.",
        "Ray workers (Serve replicas, jobs) inherit the environment of the `ray start` that launched them, so",
        "set `MLE_*` variables before `ray start` (cluster.yaml sources `.env` for that) or in a job's",
        "`runtime_env`.",
        "",
    ]
    out += seed_section()
    sections = [n for n, i in Settings.model_fields.items()
                if isinstance(i.annotation, type) and issubclass(i.annotation, BaseModel)]
    headings = section_headings(Settings)
    header = ["| key | environment variable | type | default | bounds | description |",
              "|---|---|---|---|---|---|"]

    out += ["## Top-level settings", ""]
    group = None
    top = [n for n in Settings.model_fields if n not in sections]
    for key, env, typ, default, bounds, desc in _rows(Settings, []):
        if key in sections or "." in key or key not in top:
            continue
        if key in headings and headings[key] != group:
            group = headings[key]
            out += ["", f"### {group}", "", *header]
        elif group is None:
            group = "General"
            out += ["", "### General", "", *header]
        out.append(f"| `{key}` | `{env}` | {typ} | {default} | {bounds} | {desc} |")
    out.append("")

    for section in sections:
        model = Settings.model_fields[section].annotation
        out += ["", f"## `{section}` (configs/{_yaml_file_of(section)})", ""]
        if model.__doc__ and model.__doc__.strip() and model.__doc__.strip() != BaseModel.__doc__:
            out += [inspect.cleandoc(model.__doc__), ""]
        out += header
        for key, env, typ, default, bounds, desc in _rows(model, [section]):
            out.append(f"| `{section}.{key}` | `{env}` | {typ} | {default} | {bounds} | {desc} |")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.gen_config_docs", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--check", action="store_true", help="exit 1 if the file is not up to date (writes nothing)")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date: run python -m scripts.gen_config_docs", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
