"""OpenAI-compatible HTTP server for BitNet b1.58 models (needs the ``serve`` extra: fastapi, uvicorn).

    bitnet158 serve MODEL --port 8000 --max-batch 8           # command line
    from bitnet158.serve import create_app                    # or build the FastAPI app yourself

``protocol`` holds the OpenAI schemas and error bodies, ``stops`` the stop-string filter, ``app``
the routes; continuous batching lives in :mod:`bitnet158.engine.batch`.
"""


def create_app(*args, **kwargs):
    """See :func:`bitnet158.serve.app.create_app` (imported lazily: fastapi is an optional extra)."""
    from .app import create_app as _create_app
    return _create_app(*args, **kwargs)


__all__ = ["create_app"]
