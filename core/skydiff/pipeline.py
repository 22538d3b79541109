"""The top-level pipeline configuration: which algorithm runs each step, and its settings.

A pipeline file is TOML; each step is a :class:`~skydiff.config.RegistryField`, so switching an
algorithm is one line (``name = "..."``) and every alternative keeps its own settings::

    [executor]
    name = "processes"

    [executor.processes]
    max_workers = 2

Steps are added here as their algorithms land; today the pipeline selects the executor that
batch runs use.
"""

from __future__ import annotations

from skydiff.config import Config, RegistryField, RegistrySelection, configclass

__all__ = ["PipelineConfig"]


@configclass
class PipelineConfig(Config):
    """Configuration of a skydiff pipeline run."""

    executor: RegistrySelection = RegistryField("executor", default="serial",
                             doc="How many science/template pairs are processed: in turn "
                                 "(serial) or in local worker processes (processes).")
