"""Command-line overrides of ``python -m monai.bundle run``, checked before any work.

MONAI's bundle runner (through ``fire``) accepts any ``--key value``: a misspelled key
(``--ouput_dir X``) is silently added to the config and ignored, so the run writes elsewhere with exit
code 0; and ``fire`` turns ``--figures false`` into the string ``'false'``, which Python reads as true.
The configs call ``check_overrides()`` first in their ``initialize`` step and read every boolean
through ``flag``.
"""

from __future__ import annotations

import ast
import difflib
import os
import sys

from monai.bundle import ConfigParser

__all__ = ["OverrideError", "check_overrides", "flag"]

# Arguments of monai.bundle.scripts.run itself, and the settings its experiment tracking adds.
RUN_ARGS = {"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file"}
TRACKING_KEYS = {"output_dir", "tracking_uri", "experiment_name", "run_name", "save_execute_config"}
# Keys renamed in this bundle: the old name is refused with the new one.
RENAMED = {"write_inverse": "write_fixed_to_moving"}
TRUE, FALSE = ("true", "1"), ("false", "0")


class OverrideError(ValueError):
    """An override the configs do not know, or a value the key cannot take; the message says which."""


def flag(value, name: str = "value") -> bool:
    """A boolean config value as given in a JSON config or on the command line: ``True`` / ``False``,
    ``1`` / ``0``, or the strings ``true`` / ``false`` / ``1`` / ``0`` (any case: ``fire`` passes
    ``false`` as a string). Anything else is refused."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
        return value.strip().lower() in TRUE
    raise OverrideError(f"--{name}: expected True or False (also true/false/1/0), got {value!r}")


def _bundle_command(argv: list[str]) -> bool:
    script = os.path.normpath(argv[0]) if argv else ""
    return script.endswith(os.path.join("monai", "bundle", "__main__.py")) and len(argv) > 1 and argv[1] == "run"


def _parse(argv: list[str]) -> dict[str, str | None]:
    """``--key value`` / ``--key=value`` pairs after ``run`` (a flag without value maps to None)."""
    pairs: dict[str, str | None] = {}
    i = 2
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
                value = argv[i + 1] if has_value else None
                i += has_value
            pairs[key.replace("-", "_") if key in ("config-file", "meta-file") else key] = value
        i += 1
    return pairs


def _config_files(value: str) -> list[str]:
    try:
        files = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        files = value
    return [files] if isinstance(files, str) else list(files)


def _lookup(config, path: list[str]):
    """The node at ``path``; KeyError with the first missing prefix (``a#b``)."""
    node = config
    for i, part in enumerate(path):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError("#".join(path[: i + 1]))
    return node


def _literal(text: str | None):
    # what fire does with a command-line value: a Python literal if it is one, else the string
    try:
        return ast.literal_eval(text) if text is not None else True
    except (ValueError, SyntaxError):
        return text


def check_overrides(argv: list[str] | None = None) -> None:
    """Refuses, before any work, an override that names no key of the run's config files (with the
    closest known keys suggested), a renamed key (with its new name), and a value that a boolean key
    cannot take. ``--a#b#c``: ``a#b`` must exist; ``c`` may be new (an argument added to a component).

    Does nothing unless this process is ``python -m monai.bundle run`` (configs parsed by other code,
    e.g. MONAI Label or tests, have no command line of their own). Overrides given in an
    ``--args_file`` are not checked."""
    argv = list(sys.argv if argv is None else argv)
    if not _bundle_command(argv):
        return
    given = _parse(argv)
    if "config_file" not in given or given["config_file"] is None:
        return
    config = ConfigParser.load_config_files(_config_files(given["config_file"]))
    known = sorted(k for k in config if isinstance(k, str))
    allowed = RUN_ARGS | (TRACKING_KEYS if given.get("tracking") else set()) | {"workflow_type"}
    for key, text in given.items():
        if key in allowed or key.startswith("_meta_"):
            continue
        if key in RENAMED:
            raise OverrideError(f"--{key} was renamed: use --{RENAMED[key]}")
        path = key.lstrip("+").split("#")
        try:
            parent = _lookup(config, path[:-1])
        except KeyError as e:
            raise OverrideError(f"--{key}: the config files have no {e.args[0]}") from None
        exists = isinstance(parent, dict) and path[-1] in parent
        if len(path) == 1 and not exists:
            close = difflib.get_close_matches(path[0], known, n=1)
            hint = f"did you mean --{close[0]}?" if close else "see the config files for the keys"
            if key in TRACKING_KEYS and not given.get("tracking"):
                hint = "it is a setting of MONAI's experiment tracking: add --tracking mlflow"
            raise OverrideError(f"--{key}: unknown key for {', '.join(_config_files(given['config_file']))}; {hint}")
        if exists and isinstance(parent[path[-1]], bool):
            flag(_literal(text), key)
