"""Executors: run one function over many independent items (CCD pairs).

``serial`` runs in the calling process, in order; ``processes`` fans out over local worker
processes with :class:`concurrent.futures.ProcessPoolExecutor`. Both return the results in input
order and record a failing item's exception instead of stopping the others.
"""

from __future__ import annotations

import skydiff

from ._local import ProcessesExecutor, SerialExecutor

__all__ = ["ProcessesExecutor", "SerialExecutor"]


@skydiff.hookimpl
def skydiff_register_algorithms(registries: skydiff.Registries) -> None:
    registries.executor.add(SerialExecutor)
    registries.executor.add(ProcessesExecutor)
