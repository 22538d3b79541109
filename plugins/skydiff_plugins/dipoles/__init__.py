"""Built-in dipoles plugins (being written; registers nothing yet)."""

from __future__ import annotations

import skydiff


@skydiff.hookimpl
def skydiff_register_algorithms(registries: skydiff.Registries) -> None:
    del registries
