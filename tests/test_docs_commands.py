"""Every command the documentation (Markdown files, module docstrings) gives names options that exist.

The bundle is measured by running its docs' commands, so a config key or script option renamed in the
code must not leave a documented command behind. Each fenced code block, and each one-line code span
that is a command, is read as a shell script (continued lines joined, ``$(...)`` substitutions set
aside, ``&&`` / ``;`` / ``|`` splitting commands); each ``monai.bundle run`` goes through the check
the configs run first (``scripts.overrides.check_overrides``: config files exist, every key is known,
booleans parse), and each ``--option`` of a ``python -m scripts.X`` / ``python benchmarks/X.py``
command must be a parameter or an ``argparse`` option of that file. Nothing is run."""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from scripts.overrides import OverrideError, check_overrides

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    ROOT / "README.md",
    ROOT / "sample_data" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "apps").rglob("*.md")),
]
MODULES = sorted(
    [*(ROOT / "scripts").glob("*.py"), *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "apps").rglob("*.py")]
)
FENCE = re.compile(r"^\s*```")
INLINE = re.compile(r"`((?:python|torchrun) [^`]*)`")
SUBSTITUTION = re.compile(r"\$\([^()]*\)")
SEPARATORS = set(";&|()<>")
BUNDLE_ARGV0 = "/site-packages/monai/bundle/__main__.py"  # what check_overrides recognises as the runner


def code_blocks(text: str):
    """(first line number, lines) of each fenced code block, and of each inline code span on one line
    that is a command (starts with ``python`` or ``torchrun``)."""
    block, start = None, 0
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            if block is None:
                block, start = [], number + 1
            else:
                yield start, block
                block = None
        elif block is not None:
            block.append(line)
        else:
            yield from ((number, [span]) for span in INLINE.findall(line))


def shell_commands(lines: list[str]):
    """Simple commands of a block: comments dropped, ``\\`` continuations joined, ``$(...)`` replaced by
    a placeholder word, then split on the shell's separators."""
    text, pending = [], ""
    for line in lines:
        line = "" if line.lstrip().startswith("#") else re.split(r"\s#\s", line)[0]
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text.append(pending + line)
        pending = ""
    for command in text:
        while SUBSTITUTION.search(command):
            command = SUBSTITUTION.sub("SUBSTITUTED", command)
        lexer = shlex.shlex(command, posix=True, punctuation_chars="".join(sorted(SEPARATORS)))
        lexer.whitespace_split = True
        lexer.commenters = ""  # "--loss#beta 3.0" is one option; comments are gone already
        words: list[str] = []
        for token in lexer:
            if set(token) <= SEPARATORS:
                if words:
                    yield words
                words = []
            else:
                words.append(token)
        if words:
            yield words


def docstring_commands(path: Path):
    """(line, lines) of each command in a module docstring's examples: a line that starts with
    ``python`` or ``torchrun``, with its ``\\`` continuations."""
    lines = (ast.get_docstring(ast.parse(path.read_text())) or "").splitlines()
    i = 0
    while i < len(lines):
        if lines[i].lstrip().startswith(("python ", "torchrun ")):
            j = i
            while lines[j].rstrip().endswith("\\") and j + 1 < len(lines):
                j += 1
            yield i + 1, lines[i : j + 1]  # the docstring starts on the file's line 1
            i = j
        i += 1


def documented_commands():
    for doc in DOCS:
        for start, lines in code_blocks(doc.read_text()):
            for words in shell_commands(lines):
                yield f"{doc.relative_to(ROOT)}:{start}", words
    for module in MODULES:
        for start, lines in docstring_commands(module):
            for words in shell_commands(lines):
                yield f"{module.relative_to(ROOT)}:{start}", words


def bundle_runs():
    for where, words in documented_commands():
        args = words[words.index("monai.bundle") + 1 :] if "monai.bundle" in words else []
        if args[:1] == ["run"]:  # not ckpt_export, download, ...: those check their own arguments
            yield pytest.param(args, id=where)


def script_file(words: list[str]) -> Path | None:
    """The project file a ``python ...`` command runs, if it is one of this bundle's."""
    if not words or not Path(words[0]).name.startswith("python"):
        return None
    if words[1:2] == ["-m"] and len(words) > 2 and words[2].startswith(("scripts.", "apps.", "benchmarks.")):
        return ROOT / (words[2].replace(".", "/") + ".py")
    if len(words) > 1 and words[1].endswith(".py") and not words[1].startswith("-"):
        return ROOT / words[1]
    return None


def script_runs():
    for where, words in documented_commands():
        path = script_file(words)
        if path is not None:
            yield pytest.param(path, words, id=f"{where}:{path.name}")


def known_options(path: Path) -> set[str]:
    """Parameter names of the file's functions (``fire`` exposes them as ``--name``) and the
    ``--option`` strings it gives ``argparse``."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            names |= {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("--"):
            names.add(node.value[2:])
    return names


def options(words: list[str]) -> list[str]:
    return [w[2:].split("=")[0] for w in words if w.startswith("--") and len(w) > 2]


def test_the_documents_hold_commands_of_both_kinds():
    """The reader finds the commands at all (a broken reader would pass every test below vacuously)."""
    runs, scripts = list(bundle_runs()), list(script_runs())
    assert len(runs) >= 50 and len(scripts) >= 30, (len(runs), len(scripts))
    configs = {w[w.index("--config_file") + 1] for p in runs for w in [p.values[0]] if "--config_file" in w}
    assert {"configs/train.json", "configs/inference.json", "configs/evaluate.json"} <= configs


@pytest.mark.parametrize("args", bundle_runs())
def test_documented_bundle_run_names_known_keys(args, monkeypatch):
    monkeypatch.chdir(ROOT)  # the docs' config paths are relative to the bundle root
    check_overrides([BUNDLE_ARGV0, *args])


def check_inference_overrides(overrides: list[str]) -> None:
    check_overrides([BUNDLE_ARGV0, "run", "--config_file", str(ROOT / "configs" / "inference.json"), *overrides])


@pytest.mark.parametrize("path, words", script_runs())
def test_documented_script_exists_and_takes_its_options(path, words):
    assert path.is_file(), f"{' '.join(words[:3])}: no file {path.relative_to(ROOT)}"
    unknown = sorted(set(options(words)) - known_options(path))
    assert not unknown, f"{path.relative_to(ROOT)} has no option(s) {unknown}"
    if path.name == "benchmark_test_time.py":  # its --set NAME=OVERRIDES are inference.json overrides
        for flag_, value in zip(words, words[1:], strict=False):
            if flag_ == "--set":
                check_inference_overrides(shlex.split(value.partition("=")[2]))


def test_benchmark_test_time_variants_are_inference_overrides():
    spec = importlib.util.spec_from_file_location("benchmark_test_time", ROOT / "benchmarks" / "benchmark_test_time.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for overrides in module.VARIANTS.values():
        check_inference_overrides(overrides)


def test_the_checks_catch_a_renamed_key_and_option():
    """The property the tests above rely on, on commands that are wrong on purpose."""
    block = [
        "# a comment line",
        "python -m monai.bundle run --config_file configs/train.json --loss#beta 3.0 \\",
        '    --dataset_dir "$(cat x)" --keep_checkpoint 5 && echo done  # a comment',
    ]
    [run, echo] = list(shell_commands(block))
    assert echo == ["echo", "done"]
    assert run[-4:] == ["--dataset_dir", "SUBSTITUTED", "--keep_checkpoint", "5"]
    with pytest.raises(OverrideError, match="keep_checkpoint: unknown key.*did you mean --keep_checkpoints"):
        check_overrides([BUNDLE_ARGV0, *run[run.index("run") :]])
    assert "out" in known_options(ROOT / "scripts" / "averaging.py")
    assert not {"outt", "ouput_dir"} & known_options(ROOT / "scripts" / "averaging.py")


GPU_SCRIPT = ROOT.parent / "shared" / "gpu" / "train.sh"  # the team's GPU run (DEVELOPERS.md), beside the bundle


def test_the_gpu_run_script_trains_with_known_keys(monkeypatch):
    """The one training run a GPU session gets goes through ``../shared/gpu/train.sh``: a key it sets that
    train.json no longer knows would only show on the GPU machine, with its minutes spent."""
    if not GPU_SCRIPT.is_file():
        pytest.skip(f"{GPU_SCRIPT} missing")
    lines = GPU_SCRIPT.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "monai.bundle run" in line)
    end = start
    while lines[end].rstrip().endswith("\\"):
        end += 1
    [words] = [w for w in shell_commands(lines[start : end + 1]) if "monai.bundle" in w]
    args = [w for w in words[words.index("monai.bundle") + 1 :] if w != "$@"]  # "$@": the caller's overrides
    assert args[:3] == ["run", "--config_file", "configs/train.json"] and "--channels" in args, args
    monkeypatch.chdir(ROOT)
    check_overrides([BUNDLE_ARGV0, *args])
