"""Known-harmless library noise, silenced in one place so a normal run prints only what matters.

Each entry is a message our code cannot avoid (it comes from inside a library we call) and that does not
change a result. Tests keep the same list in pyproject.toml's `filterwarnings`.
"""

from __future__ import annotations

import logging
import warnings

KNOWN_WARNINGS = (
    # Raised while importing torch-based libraries that still decorate with torch.jit.script_method.
    (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated"),
    # peft's prepare_model_for_kbit_training calls the old transformers names.
    (FutureWarning, r"`gradient_checkpointing_enable` is deprecated"),
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
)
# bitsandbytes looks for an optional faster CPU kernel package on AVX512-BF16 CPUs; we don't use that path.
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops",)


def silence_known_noise() -> None:
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
