"""GPU back-pressure: a worker stops taking new work while its GPU stays busy.

Each worker decides for itself, from its own GPU's utilisation as NVML reports it; there is no
central scheduler. The policy is kept apart from NVML and from Celery so that it can be tested
with a plain list of numbers (the Celery side is ``workers.bootsteps``).

Two choices keep a worker from flapping between consuming and not:

* **sustain**: NVML's utilisation is the share of the last sample period (1/6 s to 1 s) in
  which any kernel ran, so a single large batch reads 100% for a moment. A worker pauses only
  after ``sustain_samples`` consecutive readings above the threshold.
* **hysteresis**: once paused it resumes only below ``resume_below`` (by default ten points
  under the threshold), not as soon as a reading dips just under the threshold.

On a machine without a GPU, NVML, or the ``nvidia-ml-py`` package, ``nvml_sampler`` returns
None and the worker behaves exactly as without back-pressure.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

logger = logging.getLogger(__name__)

DEFAULT_BUSY_PERCENT = 85.0
DEFAULT_SUSTAIN_SAMPLES = 3
DEFAULT_HYSTERESIS_POINTS = 10.0


class UtilisationSampler(Protocol):
    """Returns the GPU's current utilisation in percent, or None when it cannot be read."""

    def __call__(self) -> float | None: ...


class Decision(StrEnum):
    PAUSE = "pause"
    RESUME = "resume"
    KEEP = "keep"


@dataclass
class BackPressurePolicy:
    """Pause after ``sustain_samples`` readings in a row above ``threshold``; resume below
    ``resume_below`` (default: ``threshold`` minus ten points). A None reading changes nothing."""

    threshold: float = DEFAULT_BUSY_PERCENT
    sustain_samples: int = DEFAULT_SUSTAIN_SAMPLES
    resume_below: float | None = None
    paused: bool = field(default=False, init=False)
    _busy_streak: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 100:
            raise ValueError(f"the busy threshold must be above 0 and at most 100 percent, not {self.threshold}")
        if self.sustain_samples < 1:
            raise ValueError("sustain_samples must be at least 1")
        if self.resume_below is None:
            self.resume_below = max(self.threshold - DEFAULT_HYSTERESIS_POINTS, 0.0)
        if self.resume_below > self.threshold:
            raise ValueError(f"resume_below ({self.resume_below}) must not be above the threshold ({self.threshold})")

    def observe(self, utilisation: float | None) -> Decision:
        if utilisation is None:
            return Decision.KEEP
        if self.paused:
            assert self.resume_below is not None  # __post_init__ put the default in
            if utilisation < self.resume_below:
                self.paused = False
                return Decision.RESUME
            return Decision.KEEP
        if utilisation > self.threshold:
            self._busy_streak += 1
            if self._busy_streak >= self.sustain_samples:
                self.paused, self._busy_streak = True, 0
                return Decision.PAUSE
        else:
            self._busy_streak = 0
        return Decision.KEEP


def nvml_device(preferred: str = "auto", cuda_visible_devices: str | None = None) -> int | str | None:
    """The NVML device (index, or UUID) behind a torch device name such as ``auto``, ``cuda:1``.

    None for ``cpu`` and for a CUDA ordinal that ``CUDA_VISIBLE_DEVICES`` does not cover. CUDA
    ordinals map onto ``CUDA_VISIBLE_DEVICES`` entries; NVML indices ignore that variable and
    follow PCI order, as CUDA does on machines with one model of GPU (on mixed machines set
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID``).
    """
    name, _, ordinal_text = preferred.strip().lower().partition(":")
    if name not in ("auto", "cuda") or (name == "auto" and ordinal_text):
        return None
    try:
        ordinal = int(ordinal_text) if ordinal_text else 0
    except ValueError:
        return None
    if ordinal < 0:
        return None
    if cuda_visible_devices is None:
        return ordinal
    visible = [entry.strip() for entry in cuda_visible_devices.split(",") if entry.strip()]
    if ordinal >= len(visible):
        return None
    entry = visible[ordinal]
    if entry.isdigit():
        return int(entry)
    if entry.startswith(("GPU-", "MIG-")):
        return entry
    return None


class NvmlSampler:
    """Reads one device's utilisation through NVML; a failed reading is None, never an error."""

    def __init__(self, nvml: Any, handle: Any):
        self._nvml = nvml
        self._handle = handle

    def __call__(self) -> float | None:
        try:
            return float(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
        except self._nvml.NVMLError:
            return None

    def close(self) -> None:
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()


def nvml_sampler(device: int | str = 0) -> NvmlSampler | None:
    """A sampler for GPU ``device`` (NVML index or UUID), or None when it cannot be read.

    None without the ``nvidia-ml-py`` package, without the NVML library (no driver), without
    that device, or when the device does not report utilisation (MIG instances, some boards).
    """
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError) as exc:
        logger.debug("NVML is not available: %s", exc)
        return None
    try:
        if isinstance(device, str):
            handle = pynvml.nvmlDeviceGetHandleByUUID(device)
        else:
            handle = pynvml.nvmlDeviceGetHandleByIndex(device)
        pynvml.nvmlDeviceGetUtilizationRates(handle)  # a device that cannot report it gets no sampler
    except (pynvml.NVMLError, OSError, ValueError, TypeError) as exc:
        logger.debug("NVML cannot read the utilisation of GPU %s: %s", device, exc)
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
        return None
    return NvmlSampler(pynvml, handle)
