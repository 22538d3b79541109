"""The documentation is tested like code (style rule 14).

* every ``>>>`` example of every page under ``docs/`` runs as a doctest (one test per page);
* every ``$ skydiff ...`` line of a ``console`` block runs through the real command line and
  its output is compared with the page (one test per page that has any);
* every hook of :mod:`skydiff.hookspecs` has a heading and its signature in the hook reference
  (datasette's ``test_plugin_hooks_are_documented``);
* every role of :data:`skydiff.ROLES` has a section in the role reference;
* every public name of ``skydiff.__all__`` (and of ``skydiff.io``, ``skydiff.sim`` and
  ``skydiff.testing``) is documented in ``docs/api/``;
* every sub-command of ``skydiff`` has a section in the command-line reference that shows its
  current usage line and documents every one of its options;
* every built-in algorithm is listed in ``docs/plugins/builtins.md`` with an option table
  generated from its configuration that covers every key.
"""

from __future__ import annotations

import argparse
import contextlib
import doctest
import importlib
import importlib.util
import inspect
import io
import logging
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pluggy
import pytest

import skydiff
from skydiff import hookspecs

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
EXAMPLE_PLUGIN = REPO / "tests" / "example_plugin"
PAGES = sorted(path for path in DOCS.rglob("*.md") if "_build" not in path.parts)
OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
_FENCE = re.compile(r"^\s*(```|~~~|:::)")


def _page_id(path: Path) -> str:
    return path.relative_to(DOCS).as_posix()


def _read(relative: str) -> str:
    return (DOCS / relative).read_text(encoding="utf-8")


@contextlib.contextmanager
def _saved_logging() -> Iterator[None]:
    """The command line configures the ``skydiff`` logger; undo that after each command."""
    logger = logging.getLogger("skydiff")
    state = (list(logger.handlers), logger.level, logger.propagate)
    try:
        yield
    finally:
        logger.handlers[:], logger.level, logger.propagate = state


def test_pages_found() -> None:
    assert {"index.md", "user/getting-started.md", "plugins/hooks.md",
            "api/index.md"} <= {_page_id(page) for page in PAGES}


# -- (a) narrative examples run as doctests ---------------------------------------------------


class MarkdownDocTestParser(doctest.DocTestParser):
    """A doctest parser for Markdown: code-fence lines end an example's expected output.

    Without this, the closing fence of a code block would be read as part of the expected
    output of the block's last example. Fence lines are blanked (line numbers are kept).
    """

    def parse(self, string: str, name: str = "<string>") -> list[str | doctest.Example]:
        lines = ["" if _FENCE.match(line) else line for line in string.split("\n")]
        return super().parse("\n".join(lines), name)


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_page_examples(page: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``>>>`` example of the page passes (run from the repository root)."""
    monkeypatch.chdir(REPO)
    report = io.StringIO()
    with _saved_logging(), contextlib.redirect_stdout(report):
        results = doctest.testfile(str(page), module_relative=False, name=_page_id(page),
                                   parser=MarkdownDocTestParser(), optionflags=OPTIONFLAGS,
                                   raise_on_error=False, report=True)
    assert results.failed == 0, report.getvalue()


# -- console blocks run through the real command line -----------------------------------------


def _console_blocks(text: str) -> Iterator[list[str]]:
    """The lines of every ```console block of a page."""
    lines = text.split("\n")
    index = 0
    while index < len(lines):
        if lines[index].strip() == "```console":
            block = []
            index += 1
            while index < len(lines) and not _FENCE.match(lines[index]):
                block.append(lines[index])
                index += 1
            yield block
        index += 1


def _skydiff_commands(text: str) -> list[tuple[str, str]]:
    """``(command line, expected output)`` of every ``$ skydiff ...`` line of a page."""
    commands: list[tuple[str, str]] = []
    for block in _console_blocks(text):
        current: list[str] | None = None
        for line in block:
            if line.startswith("$ "):
                current = None
                if line.startswith("$ skydiff"):
                    current = []
                    commands.append((line[2:], ""))
            elif current is not None:
                current.append(line)
                commands[-1] = (commands[-1][0], "\n".join(current) + "\n")
    return commands


CONSOLE_PAGES = [page for page in PAGES if _skydiff_commands(page.read_text(encoding="utf-8"))]


def _run_cli(command: str) -> tuple[int, str]:
    from skydiff.cli import main

    argv = shlex.split(command)[1:]
    target = None
    if ">" in argv:
        position = argv.index(">")
        argv, target = argv[:position], argv[position + 1]
    output = io.StringIO()
    with _saved_logging(), contextlib.redirect_stdout(output), \
            contextlib.redirect_stderr(output):
        try:
            status = main(argv)
        except SystemExit as exc:  # --help, --version and usage errors exit from argparse
            status = exc.code if isinstance(exc.code, int) else 1
    if target is not None:
        Path(target).write_text(output.getvalue(), encoding="utf-8")
        return status, ""
    return status, output.getvalue()


@pytest.mark.parametrize("page", CONSOLE_PAGES, ids=_page_id)
def test_page_commands(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``$ skydiff ...`` line runs (in a scratch directory) and prints what is shown."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "100")
    checker = doctest.OutputChecker()
    for command, expected in _skydiff_commands(page.read_text(encoding="utf-8")):
        status, output = _run_cli(command)
        fails = "skydiff: error:" in expected
        assert (status != 0) == fails, f"{command!r} exited with status {status}:\n{output}"
        # A line holding only "..." stands for any number of lines, including none.
        pattern = re.sub(r"(^|\n)\.\.\.\n", r"\1...", expected)
        if expected.strip():
            assert checker.check_output(pattern, output, OPTIONFLAGS), (
                f"{command!r} printed\n{output}\nbut {_page_id(page)} shows\n{expected}")


# -- example test files run with pytest --------------------------------------------------------


def _example_files(text: str) -> dict[str, str]:
    """``{file name: content}`` of the code blocks preceded by ``<!-- file: NAME -->``."""
    files: dict[str, str] = {}
    lines = text.split("\n")
    for index, line in enumerate(lines):
        match = re.match(r"^<!-- file: (\S+) -->$", line.strip())
        if match and index + 1 < len(lines) and _FENCE.match(lines[index + 1]):
            body = []
            for following in lines[index + 2:]:
                if _FENCE.match(following):
                    break
                body.append(following)
            files[match.group(1)] = "\n".join(body) + "\n"
    return files


FILE_PAGES = [page for page in PAGES if _example_files(page.read_text(encoding="utf-8"))]


@pytest.mark.parametrize("page", FILE_PAGES, ids=_page_id)
def test_page_test_files(page: Path, tmp_path: Path) -> None:
    """The example test modules of a page pass when run by pytest, as a plugin author would.

    They run in a separate process (with the example plugin of ``tests/example_plugin``
    importable), so that their fixtures and plugin registrations cannot leak into this one.
    """
    for name, content in _example_files(page.read_text(encoding="utf-8")).items():
        (tmp_path / name).write_text(content, encoding="utf-8")
    env = dict(os.environ)
    env["SKYDIFF_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(EXAMPLE_PLUGIN)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    process = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error",
         "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert process.returncode == 0, process.stdout + process.stderr
    assert " passed" in process.stdout and "skipped" not in process.stdout, process.stdout


# -- (b) every hook is documented --------------------------------------------------------------


def _headings(text: str) -> list[str]:
    """Markdown ATX headings (``# ...`` to ``###### ...``) outside code blocks."""
    headings, fenced = [], False
    for line in text.split("\n"):
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced and (match := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)):
            headings.append(match.group(1).replace("`", ""))
    return headings


HOOKS = sorted(name for name, value in vars(hookspecs).items()
               if name.startswith("skydiff_") and inspect.isfunction(value))


def test_hooks_found() -> None:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    assert HOOKS == sorted(name for name in vars(pm.hook) if name.startswith("skydiff_"))


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook: str) -> None:
    text = _read("plugins/hooks.md")
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    caller = getattr(pm.hook, hook)
    assert caller.spec is not None
    signature = f"{hook}({', '.join(caller.spec.argnames)})"
    parameters = inspect.signature(getattr(hookspecs, hook)).parameters
    assert signature == f"{hook}({', '.join(parameters)})"
    assert any(heading.startswith(hook) for heading in _headings(text)), (
        f"docs/plugins/hooks.md has no heading for {hook}")
    assert signature in text, f"docs/plugins/hooks.md does not show {signature}"
    assert f"skydiff.hookspecs.{hook}" in text, f"docs/plugins/hooks.md does not autodoc {hook}"


# -- (c) every role has a section ---------------------------------------------------------------


def _sections(text: str) -> dict[str, str]:
    """``{heading: body}`` of the level-2 sections of a page."""
    sections: dict[str, str] = {}
    current = None
    fenced = False
    for line in text.split("\n"):
        if _FENCE.match(line):
            fenced = not fenced
        if not fenced and line.startswith("## "):
            current = line[3:].replace("`", "").strip()
            sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
    return sections


@pytest.mark.parametrize("role", list(skydiff.ROLES))
def test_role_is_documented(role: str) -> None:
    sections = _sections(_read("plugins/roles.md"))
    matching = [body for heading, body in sections.items() if heading.split()[0] == role]
    assert matching, f"docs/plugins/roles.md has no section '## {role}'"
    body = matching[0]
    base = skydiff.ROLE_BASES[role]
    assert f"skydiff.{base.__name__}" in body, f"the {role} section does not name its base class"
    run = inspect.signature(base.run)
    params = [name for name in run.parameters if name != "self"]
    assert all(name in body for name in params), f"the {role} section misses run() arguments"
    assert "Result" in body or "result" in body


def _options_extension() -> ModuleType:
    """``docs/_ext/skydiff_docs.py``: renders the option tables (importable without Sphinx)."""
    path = DOCS / "_ext" / "skydiff_docs.py"
    spec = importlib.util.spec_from_file_location("_skydiff_docs_options", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _option_is_covered(key: str, role: str, name: str, options: ModuleType) -> bool:
    """Whether the generated table of ``role:name`` documents ``key``.

    Either the key has its own row, or a row ``<prefix>.*`` links to the section of another
    algorithm (``<plugin-ROLE-NAME>``) whose own table documents the rest of the key.
    """
    table = options.options_table(role, name)
    if f"| `{key}` |" in table:
        return True
    for line in table.splitlines():
        match = re.match(r"^\| `(?P<prefix>[\w.]+)\.\*` \|.*<plugin-(?P<role>\w+)-(?P<name>\w+)>",
                         line)
        if match and key.startswith(match.group("prefix") + "."):
            rest = key[len(match.group("prefix")) + 1:]
            return _option_is_covered(rest, match.group("role"), match.group("name"), options)
    return False


def test_builtin_plugins_are_listed() -> None:
    """docs/plugins/builtins.md names every built-in algorithm, its class and its options.

    The option tables are generated at build time from ``ConfigClass.describe()`` by the
    ``plugin-options`` directive of ``docs/_ext/skydiff_docs.py``: the page must use the
    directive (under the section label the generated links target) for every built-in, and
    the generated table must cover every key of the algorithm's configuration.
    """
    text = _read("plugins/builtins.md")
    options = _options_extension()
    registries = skydiff.get_registries()
    for role in registries:
        for name, info in registries[role].items():
            if info.distribution != "skydiff":
                continue
            row = f"| `{role}` | `{name}` |"
            assert row in text, f"docs/plugins/builtins.md does not list {role}:{name}"
            public = info.target.__module__.rsplit("._", 1)[0]
            assert f"`{public}.{info.target.__name__}`" in text
            assert f"({options.label(role, name)})=" in text, (
                f"docs/plugins/builtins.md has no section label ({options.label(role, name)})=")
            assert f"```{{{options.DIRECTIVE}}} {role}:{name}\n" in text, (
                f"docs/plugins/builtins.md does not embed the option table of {role}:{name}")
            for option in info.ConfigClass.describe():
                assert _option_is_covered(option.key, role, name, options), (
                    f"the generated option table of {role}:{name} misses {option.key}")
            for tag in info.tags:
                assert f"| `{tag}` |" in _read("plugins/roles.md"), (
                    f"tag {tag!r} of {role}:{name} is not in the tag table of roles.md")


def test_conformance_checks_are_documented() -> None:
    """The check table of docs/plugins/testing.md lists every registered check."""
    from skydiff.testing import registered_checks

    text = _read("plugins/testing.md")
    missing = [check.name for check in registered_checks() if f"| `{check.name}` |" not in text]
    assert not missing, f"docs/plugins/testing.md does not list the checks {missing}"


# -- (d) every public name is in the API reference ---------------------------------------------


def _api_text() -> str:
    pages = sorted((DOCS / "api").glob("*.md"))
    return "\n".join(page.read_text(encoding="utf-8") for page in pages)


@pytest.mark.parametrize("name", sorted(skydiff.__all__))
def test_public_name_is_documented(name: str) -> None:
    assert f"skydiff.{name}" in _api_text(), f"skydiff.{name} is not documented in docs/api/"


@pytest.mark.parametrize("module", ["skydiff.io", "skydiff.sim", "skydiff.testing"])
def test_subpackage_is_documented(module: str) -> None:
    text = _api_text()
    names = importlib.import_module(module).__all__
    missing = [name for name in names if f"{module}.{name}" not in text]
    assert not missing, f"not documented in docs/api/: {', '.join(missing)}"


# -- (e) the command-line reference matches the parser ------------------------------------------


def _commands(parser: argparse.ArgumentParser, prefix: str = "skydiff",
              ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """``("skydiff config show", parser)`` for the program and every (nested) sub-command."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, f"{prefix} {name}")


def _options(parser: argparse.ArgumentParser) -> list[str]:
    """Every option string and positional argument name of one parser."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        if action.option_strings:
            found.extend(action.option_strings)
        else:
            found.append(action.metavar if isinstance(action.metavar, str) else action.dest)
    return found


@pytest.fixture
def cli_parser(monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    from skydiff.cli import build_parser

    monkeypatch.setenv("COLUMNS", "100")
    with _saved_logging():
        return build_parser()


def test_cli_reference(cli_parser: argparse.ArgumentParser) -> None:
    text = _read("user/cli.md")
    sections = _sections(text)
    problems = []
    for command, parser in _commands(cli_parser):
        body = sections.get(command)
        if body is None:
            problems.append(f"no section '## {command}'")
            continue
        usage = " ".join(parser.format_usage().split())
        if usage not in " ".join(body.split()):
            problems.append(f"{command}: the section does not show the current usage: {usage}")
        for option in _options(parser):
            if f"`{option}" not in body:
                problems.append(f"{command}: option {option} is not documented")
    assert not problems, "docs/user/cli.md is out of date:\n" + "\n".join(problems)


def test_cli_help_matches_reference(cli_parser: argparse.ArgumentParser) -> None:
    """Every option that ``skydiff <command> --help`` prints is documented in its section."""
    sections = _sections(_read("user/cli.md"))
    problems = []
    for command, _ in _commands(cli_parser):
        status, output = _run_cli(f"{command} --help")
        assert status == 0 and output.startswith(f"usage: {command}"), output
        body = sections.get(command, "")
        for option in sorted(set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", output))):
            if f"`{option}" not in body:
                problems.append(f"{command}: {option} (from --help) is not documented")
    assert not problems, "docs/user/cli.md is out of date:\n" + "\n".join(problems)
