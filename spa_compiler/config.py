"""What the user asks for: the target, the constraints and the options of one pruning run."""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Literal

import numpy as np

from .allocate import Constraints, Target
from .cost import CostMetric, get_metric
from .criteria import get_criterion
from .errors import TargetError

__all__ = [
    "PruneConfig", "TARGET_TOLERANCE", "CALIBRATION_SAMPLES", "SYNTHETIC_IMAGE_SAMPLES", "SYNTHETIC_TOKEN_SAMPLES",
    "SYNTHETIC_IMAGE_VALUES", "SYNTHETIC_AUDIO_SAMPLES", "SYNTHETIC_AUDIO_VALUES", "default_criterion",
]

TARGET_TOLERANCE = 0.02
CALIBRATION_SAMPLES = 128  # calibration samples by default
SYNTHETIC_IMAGE_SAMPLES = 256  # synthetic pictures by default (data-free) ...
SYNTHETIC_IMAGE_VALUES = 2**29  # ... unless they hold more values than this (2 GB in float32)
SYNTHETIC_TOKEN_SAMPLES = 512  # synthetic token sequences by default (data-free)
SYNTHETIC_AUDIO_SAMPLES = 2048  # synthetic clips by default (data-free) ...
SYNTHETIC_AUDIO_VALUES = 2**27  # ... unless they hold more waveform values than this (512 MB in float32)


def _bounded(samples: int, fitting: int) -> int:
    """``samples``, or as many as fit a bound of values (``fitting``), at least ``CALIBRATION_SAMPLES``."""
    return max(CALIBRATION_SAMPLES, min(samples, fitting))


def default_criterion(calibrated: bool) -> str:
    """The criterion the accuracy benchmark finds best for the data given: ``obs`` with
    calibration data, ``obs_joint`` data-free. At ``--flops 0.5`` data-free, choosing channels
    jointly lifts the PP-OCRv4 recogniser's character accuracy from 0.388 to 0.514 and the
    direction classifier's accuracy from 0.690 to 0.830 (0.75: 0.974 → 0.968, 0.945 → 0.965);
    calibrated, it loses there (0.994 → 0.978, 0.960 → 0.940). With the data-free re-fit's half
    step (:data:`spa_compiler.refit.SYNTHETIC_TRUST`) the data-free gains hold: 0.661 → 0.855
    and 0.730 → 0.810."""
    return "obs" if calibrated else "obs_joint"


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError("a number")
    return float(value)


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError("a whole number")
    return int(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError("True or False")
    return bool(value)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("a string")
    return value


def _path(value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError("a path")
    return os.fspath(value)


def _names(value: Any) -> tuple[str, ...]:
    names = (value,) if isinstance(value, str) else value
    if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) for n in names):
        raise TypeError("a tuple of names")
    return tuple(names)


def _shapes(value: Any) -> dict[str, tuple[int, ...]]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, (tuple, list)) for k, v in value.items()):
        raise TypeError("a dict of input name to shape, e.g. {'x': (1, 3, 224, 224)}")
    try:
        return {name: tuple(_integer(size) for size in shape) for name, shape in value.items()}
    except TypeError:
        raise TypeError("a dict of input name to a shape of whole numbers, e.g. {'x': (1, 3, 224, 224)}") from None


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else check(value)


# Each field's annotation (as Python keeps it: unevaluated, quotes made single) -> the check
# that accepts (and normalises) its values.
_CHECKS: dict[str, Callable[[Any], Any]] = {
    "float": _number, "float | None": _optional(_number), "int": _integer, "int | None": _optional(_integer),
    "bool": _flag, "bool | None": _optional(_flag), "str | None": _optional(_text),
    "tuple[str, ...]": _names, "dict[str, tuple[int, ...]]": _shapes,
    "Literal['global', 'uniform']": _text, "Literal['sensitivity', 'score']": _text, "Literal['width', 'depth']": _text,
    "str | os.PathLike[str] | None": _optional(_path),
}


@dataclass(frozen=True)
class PruneConfig:
    """Everything that decides the output. Exactly one of flops/params/ratio/latency is set."""

    flops: float | None = None
    params: float | None = None
    ratio: float | None = None
    latency: float | None = None
    criterion: str | None = None  # None: default_criterion(), by whether there is calibration data
    scope: Literal["global", "uniform"] = "global"
    round_to: int = 16
    min_keep: float = 0.1
    exclude: tuple[str, ...] = ()
    prune_hidden: bool = False
    head_dims: bool | None = None  # None: head dimensions where every attention can be rotated (Analyse)
    depth: int = 0  # residual branches to remove before width pruning (spa_compiler.depth_prune)
    units: Literal["width", "depth"] = "width"  # depth: only residual branches, until the target
    allow_io_change: tuple[str, ...] = ()  # fnmatch patterns of graph inputs/outputs that may change size
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    seed: int = 0
    verify: bool = True
    bench_runs: int = 20
    calibration: str | os.PathLike[str] | None = None  # an .npz or a folder of .npy files; held as a str
    calibration_samples: int | None = None  # None: samples_for() chooses
    calibration_batch: int = 16
    allocation: Literal["sensitivity", "score"] = "sensitivity"
    refit_rounds: int = 1
    token_copies: bool = True  # few token sequences: read more of the file, then add copies (spa_compiler.token_augment)
    known_text: bool = True  # data-free, English sentences for a recognised vocabulary (spa_compiler.known_text)
    self_written: bool = True  # data-free, a causal language model's statistics from its own text (spa_compiler.self_written)
    refit_residual: bool = True  # re-fit residual blocks toward the stream's sum (spa_compiler.residual_target)
    evaluation: str | os.PathLike[str] | None = None  # a Python file defining score(model_path) -> float; held as a str
    reinit: bool = False  # write the pruned architecture with fresh weights (spa_compiler.reinit)

    def __post_init__(self) -> None:
        """Every option checked for its type, so that a Python caller's mistake is one clear
        error here and not a failure deep inside a pass; values normalised to the types the
        passes read (NumPy scalars to Python's, paths to ``str``, lists to tuples)."""
        for option in fields(self):
            value = getattr(self, option.name)
            try:
                object.__setattr__(self, option.name, _CHECKS[option.type](value))
            except TypeError as expected:
                raise TargetError(f"PruneConfig.{option.name} must be {expected}, got {value!r} "
                                  f"({type(value).__name__})") from None

    def samples_for(self, synthetic_tokens: bool = False, picture_values: int = 0, waveform_values: int = 0) -> int:
        """Calibration samples to use: as asked, else ``CALIBRATION_SAMPLES``; when there is no
        calibration data, ``SYNTHETIC_TOKEN_SAMPLES`` synthetic token sequences for a model
        with token inputs; for one whose inputs hold ``picture_values`` values of pictures a
        sample, ``SYNTHETIC_IMAGE_SAMPLES`` synthetic pictures; for one whose inputs hold
        ``waveform_values`` values of audio a sample, ``SYNTHETIC_AUDIO_SAMPLES`` clips of notes.
        Large pictures and long clips get fewer, as many as ``SYNTHETIC_IMAGE_VALUES`` or
        ``SYNTHETIC_AUDIO_VALUES`` values hold, never fewer than ``CALIBRATION_SAMPLES`` (256
        pictures of 640×640 hold 315 million values, 16-frame clips of 224×224 pictures get 222).
        Synthetic samples cost little to make, and the draw matters less the more of them there
        are: a data-free language model needs their variety (MiniLM at ``--flops 0.75``: cosine 0.897
        from 128 sequences, 0.909 from 512), and at ``--flops 0.5`` the PP-OCRv4 recogniser reads
        0.925 to 0.968 of its characters over five seeds from 256 pictures, 0.801 to 0.954 from
        128 (the direction classifier 0.875 to 0.945 against 0.815 to 0.900; 512 pictures were no
        better). basic-pitch's notes data-free at ``--flops 0.75`` hung on the draw from 128
        clips (F1 0.743 to 0.993 over four seeds) and do not from 2048 (0.992 to 0.994; two
        seconds at 22,050 Hz, 360 MB); at 0.5 they read 0.715 to 0.877 over four seeds from 128,
        0.714 to 0.940 over six from 2048, 0.899 and 0.711 on the first two from 4096
        (:mod:`.synthetic_audio`). Other synthetic inputs (standard normal) keep 128: nothing
        measured says more help."""
        if self.calibration_samples is not None:
            return self.calibration_samples
        if not self.calibration and synthetic_tokens:
            return SYNTHETIC_TOKEN_SAMPLES
        if not self.calibration and picture_values:
            return _bounded(SYNTHETIC_IMAGE_SAMPLES, SYNTHETIC_IMAGE_VALUES // picture_values)
        if not self.calibration and waveform_values:
            return _bounded(SYNTHETIC_AUDIO_SAMPLES, SYNTHETIC_AUDIO_VALUES // waveform_values)
        return CALIBRATION_SAMPLES

    @property
    def criterion_name(self) -> str:
        """The criterion asked for, else :func:`default_criterion` for the data given."""
        return self.criterion if self.criterion is not None else default_criterion(self.calibration is not None)

    @property
    def needs_statistics(self) -> bool:
        """Whether the run collects layer statistics (calibration or data-free)."""
        return (get_criterion(self.criterion_name).needs_statistics or self.allocation == "sensitivity"
                or self.refit_rounds > 0)

    def target(self) -> Target:
        kinds = (("flops", self.flops), ("params", self.params), ("ratio", self.ratio), ("latency", self.latency))
        given = [(k, v) for k, v in kinds if v is not None]
        if len(given) != 1:
            raise TargetError(
                "give exactly one target: --flops R, --params R, --ratio R or --latency R (e.g. --flops 0.5)"
            )
        return Target(*given[0])

    def metric(self, progress: Callable[[str], None] | None = None) -> CostMetric:
        """The cost metric the target counts (MACs for a per-group ``ratio``); the ``latency``
        metric profiles under this run's constraints and tells ``progress`` how far it is."""
        kind = self.target().kind
        if kind == "latency":
            return get_metric(kind, constraints=self.constraints(), progress=progress)
        return get_metric("flops" if kind == "ratio" else kind)

    def constraints(self) -> Constraints:
        if self.scope not in ("global", "uniform"):
            raise TargetError(f"--scope must be global or uniform, got '{self.scope}'")
        if self.allocation not in ("sensitivity", "score"):
            raise TargetError(f"--allocation must be sensitivity or score, got '{self.allocation}'")
        if self.units not in ("width", "depth"):
            raise TargetError(f"--units must be width or depth, got '{self.units}'")
        if self.depth < 0:
            raise TargetError(f"--depth must be 0 or more residual branches, got {self.depth}")
        if self.refit_rounds < 0:
            raise TargetError(f"--refit must be 0 or more rounds, got {self.refit_rounds}")
        return Constraints(self.scope, self.round_to, self.min_keep)
