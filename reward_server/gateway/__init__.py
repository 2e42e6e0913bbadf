"""The HTTP gateway: the reward server behind the protocols trainers already speak.

An ASGI app (Starlette, served by uvicorn) in front of any reward server, reached over gRPC
through the client SDK. It imports neither torch nor transformers, so it runs anywhere the
client runs.

    core.py        items to score, errors with where they happened, activations
    batching.py    concurrent HTTP requests merged into few large gRPC requests; work of gone
                   callers withdrawn, calls nobody waits for cancelled
    lifetime.py    a request's deadline (its timeout header) and its client's disconnect
    protocols/     one module per wire protocol: parse the request, shape the answer and errors
    options.py     its settings (light: the command line reads their defaults)
    app.py         routes, body limits, health, the HTML page; `run` serves it
    static/        the page at `/`
"""
