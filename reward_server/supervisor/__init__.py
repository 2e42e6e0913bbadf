"""The supervising process of `reward-server serve`: options, rendering the runtime model repository,
the tritonserver process (or one per MPI rank) from start to drained stop, the watchdog that
restarts it, and the demo checkpoint it provisions. Imports the pipeline's rules, never the builder,
the gateway or the CLI."""
