"""Sphinx extension of the skydiff docs: option tables generated from the plugins' configs.

``docs/plugins/builtins.md`` documents every built-in algorithm. Its option tables are not
written by hand (a subtraction plugin has well over a hundred settable keys, nested plugin
options included, and they change as the algorithms are tuned); each is rendered at build time
from the algorithm's ``ConfigClass.describe()`` by the directive

.. code-block:: markdown

    ```{plugin-options} subtraction:al
    ```

which renders one row per key of ``describe(plugins=False)`` (type, default, documentation).
A key that selects another algorithm (a registry field, such as ``kernel_basis.name``) is
followed by one row ``kernel_basis.<name>.*`` per registered algorithm of that role, linking
to that algorithm's own table instead of repeating it, so every key of
``describe(plugins=True)`` is covered exactly once across the page.

Sections of the page carry the labels of :func:`label` (``(plugin-subtraction-al)=``), which
the generated links target. ``tests/docs/test_docs.py`` imports this module (without Sphinx)
and checks that the tables cover every key of every built-in's configuration.
"""

from __future__ import annotations

import re
from typing import Any

#: The name of the directive.
DIRECTIVE = "plugin-options"

_REGISTRY_TYPE = re.compile(r"^(?P<role>\w+) algorithm names?\b")
_CODE_SPAN = re.compile(r"(`[^`]*`)")
_MARKDOWN_SPECIAL = re.compile(r"([\\|$<>*\[\]_])")


def label(role: str, name: str) -> str:
    """The label of the section documenting algorithm ``role:name`` (``plugin-<role>-<name>``)."""
    return f"plugin-{role}-{name}"


def _escape(text: str) -> str:
    """Escape Markdown syntax in a table cell, leaving code spans (backticks) as they are."""
    parts = _CODE_SPAN.split(text)
    out = []
    for index, part in enumerate(parts):
        if index % 2:  # a code span: only the table's cell separator needs escaping
            out.append(part.replace("|", "\\|"))
        else:
            out.append(_MARKDOWN_SPECIAL.sub(r"\\\1", part))
    return " ".join("".join(out).split())


def _value(value: Any) -> str:
    """A default value as TOML text in a code span (*unset* for None)."""
    if value is None:
        return "*unset*"
    import tomli_w

    text = tomli_w.dumps({"v": value}, multiline_strings=False).strip()
    text = " ".join(text.split("=", 1)[1].split())  # one line, e.g. ["BAD", "SAT"]
    text = text.replace("[ ", "[").replace(", ]", "]").replace(",]", "]")
    return f"`{text}`".replace("|", "\\|")


def _info(role: str, name: str) -> Any:
    import skydiff

    registries = skydiff.get_registries()
    if role not in registries.roles():
        msg = f"unknown role {role!r}"
        raise KeyError(msg)
    registry = registries[role]
    if name not in registry.names():
        msg = f"no {role} algorithm named {name!r}; registered: {', '.join(registry.names())}"
        raise KeyError(msg)
    return registry[name]


def option_rows(role: str, name: str) -> list[tuple[str, str, str, str]]:
    """``(key, type, default, meaning)`` cells of the option table of ``role:name``.

    Keys are those of ``ConfigClass.describe(plugins=False)``; after a key that selects an
    algorithm of another role come rows ``<field>.<algorithm>.*`` referring to the table of
    each algorithm registered for that role (a link to its section for built-ins).
    """
    import skydiff

    info = _info(role, name)
    registries = skydiff.get_registries()
    rows: list[tuple[str, str, str, str]] = []
    for row in info.ConfigClass.describe(plugins=False):
        rows.append((f"`{row.key}`", _escape(row.type), _value(row.default), _escape(row.doc)))
        match = _REGISTRY_TYPE.match(row.type)
        if match is None or match.group("role") not in registries.roles():
            continue
        field = row.key.rsplit(".", 1)[0]
        other = match.group("role")
        for algorithm, nested in registries[other].items():
            if nested.distribution == "skydiff":
                target = (f"{{ref}}`{other}: {algorithm} <{label(other, algorithm)}>`")
            else:
                target = f"`{other}: {algorithm}` ({nested.distribution})"
            rows.append((f"`{field}.{algorithm}.*`", "", "",
                         f"the options of {target}, used when `{row.key}` selects "
                         f"`{algorithm}`"))
    return rows


def options_table(role: str, name: str) -> str:
    """The Markdown option table of algorithm ``role:name`` (see :func:`option_rows`)."""
    rows = option_rows(role, name)
    if not rows:
        return "*This algorithm has no options.*\n"
    lines = ["| option | type | default | meaning |", "|---|---|---|---|"]
    lines.extend("| " + " | ".join(cells) + " |" for cells in rows)
    return "\n".join(lines) + "\n"


def setup(app: Any) -> dict[str, Any]:
    """Register the ``plugin-options`` directive."""
    from docutils import nodes
    from docutils.statemachine import StringList
    from sphinx.util.docutils import SphinxDirective

    class PluginOptions(SphinxDirective):
        """``{plugin-options} role:name``: the generated option table of an algorithm."""

        required_arguments = 1
        has_content = False

        def run(self) -> list[nodes.Node]:
            role, _, name = self.arguments[0].partition(":")
            try:
                text = options_table(role, name)
            except KeyError as exc:
                raise self.error(f"{DIRECTIVE}: {exc.args[0]}") from exc
            container = nodes.container(classes=["skydiff-plugin-options"])
            self.state.nested_parse(StringList(text.splitlines(), source=self.get_source_info()[0]),
                                    self.content_offset, container)
            return [container]

    app.add_directive(DIRECTIVE, PluginOptions)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
