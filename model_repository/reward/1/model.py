"""Triton adapter: the public entry point `reward`, via reward_server.pipeline.entry (forwards to the
ensemble `reward_pipeline`; a request whose client went is dropped through every step)."""

try:  # written by `reward-server serve`: the stub runs Python isolated, ignoring PYTHONPATH
    import reward_server_paths  # noqa: F401
except ImportError:  # a tritonserver whose own Python has the packages installed
    pass

from reward_server.pipeline.entry import EntryModel as TritonPythonModel  # noqa: F401
