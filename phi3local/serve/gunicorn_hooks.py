"""gunicorn server hooks of `phi3local serve`: GUNICORN_CMD_ARGS="--config python:phi3local.serve.gunicorn_hooks".

gunicorn reads every module-level name of a config module that is one of its settings, so this module holds
the hooks and nothing else (no `workers`, `bind`, `timeout`... that would override the server's own flags).
"""


def post_worker_init(worker):
    """After a worker loaded azmlinfsrv's app (score.init() included), before it serves: OpenAI's routes."""
    from phi3local.serve.openai_routes import add_routes_to_worker

    add_routes_to_worker(worker)
