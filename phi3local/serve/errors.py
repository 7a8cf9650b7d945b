"""The serving stage's errors: a setting, a model folder or a request that cannot be served."""

from __future__ import annotations

from phi3local.errors import Phi3LocalError


class ServeError(Phi3LocalError):
    """The server cannot start or serve as asked (bad setting, model folder, port); the message says why."""

    exit_code = 2


class ModelDirError(ServeError):
    """No usable exported model (one folder holding genai_config.json) under the model directory."""
