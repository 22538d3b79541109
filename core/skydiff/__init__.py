"""skydiff: astronomical difference imaging as a small core plus plugins.

This module is the public API: everything a user or a plugin author may rely on is importable
from ``skydiff`` directly. Submodules whose names start with an underscore are private.

Examples
--------
>>> import skydiff
>>> exposure = skydiff.Exposure.from_arrays(
...     [[0.0, 1.0, 0.0], [1.0, 4.0, 1.0], [0.0, 1.0, 0.0]], variance=1.0)
>>> exposure.shape
(3, 3)
"""

from importlib.metadata import PackageNotFoundError, version

from skydiff._manager import (
    BUILTIN_PLUGINS,
    PluginManager,
    SkydiffPluginWarning,
    get_manager,
    get_registries,
    use_manager,
)
from skydiff.config import (
    ChoiceField,
    Config,
    ConfigField,
    ConfigurableField,
    ConfigurableInstance,
    Field,
    ListField,
    RangeField,
    RegistryField,
    RegistrySelection,
    configclass,
)
from skydiff.convolve import FourierImage, convolve, direct_convolve, fft_convolve
from skydiff.detect import (
    CATALOG_COLUMNS,
    CatalogColumn,
    DetectAndMeasureConfig,
    DetectAndMeasureResult,
    DetectAndMeasureTask,
    detect_and_measure,
)
from skydiff.errors import (
    AlgorithmError,
    BadSubtractionError,
    ConfigError,
    InputError,
    InsufficientKernelSourcesError,
    NoKernelCandidatesError,
    NoWorkFound,
    PluginLoadError,
    PsfEstimationError,
    SkydiffError,
)
from skydiff.exposure import (
    Exposure,
    PhotoCalib,
    VisitInfo,
    estimate_variance,
    robust_sigma,
)
from skydiff.hookspecs import hookimpl, hookspec
from skydiff.kernel import BasisKernel, FixedKernel, Kernel, chebyshev_terms, spatial_functions
from skydiff.mapreduce import Cell, Grid, make_grid, map_reduce
from skydiff.mask import DEFAULT_PLANES, MaskPlanes
from skydiff.pairs import template_coverage, validate_pair
from skydiff.pipeline import PipelineConfig, PipelineResult, run_pipeline, subtract
from skydiff.psf import GaussianPsf, ImagePsf, PolynomialPsf, Psf, psf_fwhm_from_image
from skydiff.registry import ROLES, PluginInfo, Registries, Registry, RoleInfo
from skydiff.roles import (
    ROLE_BASES,
    Algorithm,
    ClassificationResult,
    DecorrelationResult,
    Decorrelator,
    DetectionResult,
    Detector,
    DipoleClassifier,
    Executor,
    ExecutorResult,
    KernelBasisGenerator,
    KernelBasisResult,
    Measurement,
    MeasurementInputs,
    MeasurementResult,
    Metric,
    MetricInputs,
    MetricResult,
    PsfEstimationResult,
    PsfEstimator,
    Subtraction,
    SubtractionResult,
    TemplateGetter,
    TemplateResult,
)
from skydiff.sources import DEFAULT_BAD_PLANES, SOURCE_COLUMNS, find_stars, measure_stars
from skydiff.stats import (
    ClippedStats,
    background_mesh,
    clipped_stats,
    robust_std,
    variance_scale_factor,
)
from skydiff.task import Task, TaskMetadata

try:
    __version__ = version("skydiff")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = [
    "BUILTIN_PLUGINS",
    "CATALOG_COLUMNS",
    "DEFAULT_BAD_PLANES",
    "DEFAULT_PLANES",
    "ROLES",
    "ROLE_BASES",
    "SOURCE_COLUMNS",
    "Algorithm",
    "AlgorithmError",
    "BadSubtractionError",
    "BasisKernel",
    "CatalogColumn",
    "Cell",
    "ChoiceField",
    "ClassificationResult",
    "ClippedStats",
    "Config",
    "ConfigError",
    "ConfigField",
    "ConfigurableField",
    "ConfigurableInstance",
    "DecorrelationResult",
    "Decorrelator",
    "DetectAndMeasureConfig",
    "DetectAndMeasureResult",
    "DetectAndMeasureTask",
    "DetectionResult",
    "Detector",
    "DipoleClassifier",
    "Executor",
    "ExecutorResult",
    "Exposure",
    "Field",
    "FixedKernel",
    "FourierImage",
    "GaussianPsf",
    "Grid",
    "ImagePsf",
    "InputError",
    "InsufficientKernelSourcesError",
    "Kernel",
    "KernelBasisGenerator",
    "KernelBasisResult",
    "ListField",
    "MaskPlanes",
    "Measurement",
    "MeasurementInputs",
    "MeasurementResult",
    "Metric",
    "MetricInputs",
    "MetricResult",
    "NoKernelCandidatesError",
    "NoWorkFound",
    "PhotoCalib",
    "PipelineConfig",
    "PipelineResult",
    "PluginInfo",
    "PluginLoadError",
    "PluginManager",
    "PolynomialPsf",
    "Psf",
    "PsfEstimationError",
    "PsfEstimationResult",
    "PsfEstimator",
    "RangeField",
    "Registries",
    "Registry",
    "RegistryField",
    "RegistrySelection",
    "RoleInfo",
    "SkydiffError",
    "SkydiffPluginWarning",
    "Subtraction",
    "SubtractionResult",
    "Task",
    "TaskMetadata",
    "TemplateGetter",
    "TemplateResult",
    "VisitInfo",
    "__version__",
    "background_mesh",
    "chebyshev_terms",
    "clipped_stats",
    "configclass",
    "convolve",
    "detect_and_measure",
    "direct_convolve",
    "estimate_variance",
    "fft_convolve",
    "find_stars",
    "get_manager",
    "get_registries",
    "hookimpl",
    "hookspec",
    "make_grid",
    "map_reduce",
    "measure_stars",
    "psf_fwhm_from_image",
    "robust_sigma",
    "robust_std",
    "run_pipeline",
    "spatial_functions",
    "subtract",
    "template_coverage",
    "use_manager",
    "validate_pair",
    "variance_scale_factor",
]
