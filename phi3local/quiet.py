"""Known-harmless library noise, silenced in one place so a normal run prints only what matters.

Each entry is a message our code cannot avoid (it comes from inside a library we call) and that does not
change a result. Tests keep the same list in pyproject.toml's `filterwarnings`.
"""

from __future__ import annotations

import logging
import sys
import warnings

KNOWN_WARNINGS = (
    # Raised while importing torch-based libraries that still decorate with torch.jit.script_method.
    (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated"),
    # peft's prepare_model_for_kbit_training calls the old transformers names.
    (FutureWarning, r"`gradient_checkpointing_enable` is deprecated"),
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
)
# bitsandbytes looks for an optional faster CPU kernel package on AVX512-BF16 CPUs; we don't use that path.
# The Hub `kernels` package (pulled in by transformers for bitsandbytes kernels) warns on every load in offline
# mode that it skipped a publisher check for a kernel we do not download.
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")
# (logger, text) of single log messages to drop. transformers 5 asks every LongRoPE config as the Hub has it
# (Phi-3.5-mini, Phi-4-mini: original_max_position_embeddings beside max_position_embeddings) to state a `factor`
# instead, on every load, in one 330-character line; it derives the same factor from the two.
QUIET_MESSAGES = (("transformers.modeling_rope_utils",
                   "field, to be used together with `max_position_embeddings` to determine a scaling factor"),)


class _DropMessages(logging.Filter):
    def __init__(self, texts: list[str]):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.texts)


def silence_known_noise() -> None:
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in {name for name, _ in QUIET_MESSAGES}:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):  # once, however often this is called
            logger.addFilter(_DropMessages([text for n, text in QUIET_MESSAGES if n == name]))
    silence_loading_bars()


def silence_loading_bars() -> None:
    """transformers' own progress bars off ("Loading weights: 100%|███| 27/27" of every from_pretrained, "Writing
    model shards"): a few seconds of local work, drawn between our lines. The Hugging Face Hub's download bars
    stay as they were: a download of gigabytes needs its progress.

    transformers.utils.logging.disable_progress_bar is its documented switch; it also turns the Hub's bars off,
    so they are turned back on by their group (the Hub names its download bars "huggingface_hub.*"). Before
    transformers is imported (3-5 s, which commands such as `monitor` never pay) the same state is set on the
    Hub alone: transformers starts with its bars off when the Hub's global switch is off.
    """
    try:
        import huggingface_hub.utils as hub
        from huggingface_hub import constants
    except ImportError:  # the Azure venv: no Hub, so no bars to silence
        return

    if constants.HF_HUB_DISABLE_PROGRESS_BARS is False:  # HF_HUB_DISABLE_PROGRESS_BARS=0: the user wants them all
        return
    downloads_shown = not hub.are_progress_bars_disabled("huggingface_hub")
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    else:
        hub.disable_progress_bars()
    if downloads_shown:
        hub.enable_progress_bars("huggingface_hub")
