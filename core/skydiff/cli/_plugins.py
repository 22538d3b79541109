"""``skydiff plugins``: every registered algorithm per role, with provider and version."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any


def add_parser(subparsers: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    parser = subparsers.add_parser(
        "plugins", help="list registered algorithms per role and plugin load errors",
        description="List every registered algorithm per role with the distribution that "
                    "provides it and its version, then any plugin that failed to load.")
    parser.add_argument("--role", help="show only this role")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    add_common(parser)
    parser.set_defaults(func=run)


def rows() -> list[dict[str, Any]]:
    """One dict per registered algorithm: role, name, distribution, version, tags."""
    from skydiff._manager import get_registries

    registries = get_registries()
    out = []
    for role in registries.roles():
        for name in registries[role].names():
            info = registries[role][name]
            out.append({"role": role, "name": name, "distribution": info.distribution,
                        "version": info.version, "tags": sorted(info.tags),
                        "summary": info.doc.strip().splitlines()[0] if info.doc else ""})
    return out


def run(args: argparse.Namespace) -> int:
    from skydiff._manager import get_manager, get_registries
    from skydiff.errors import ConfigError

    registries = get_registries()
    roles = list(registries.roles())
    if args.role is not None and args.role not in roles:
        msg = f"unknown role {args.role!r}; roles are: {', '.join(roles)}"
        raise ConfigError(msg)
    selected = [args.role] if args.role else roles
    table = [r for r in rows() if r["role"] in selected]
    errors = [{"plugin": e.plugin, "distribution": e.distribution, "error": str(e)}
              for e in get_manager().load_errors]
    if args.json:
        json.dump({"plugins": table, "load_errors": errors}, sys.stdout, indent=2)
        print()
        return 0
    widths = {k: max([len(k)] + [len(str(r[k])) for r in table])
              for k in ("name", "distribution", "version")}
    for role in selected:
        print(f"{role}:")
        entries = [r for r in table if r["role"] == role]
        if not entries:
            print("  (none registered)")
        for r in entries:
            tags = f"  [{', '.join(r['tags'])}]" if r["tags"] else ""
            print(f"  {r['name']:<{widths['name']}}  {r['distribution']:<{widths['distribution']}}"
                  f"  {r['version']:<{widths['version']}}  {r['summary']}{tags}")
    if errors:
        print("\nplugins that failed to load:")
        for e in errors:
            print(f"  {e['plugin']} ({e['distribution']}): {e['error']}")
    return 0
