"""One TorchServe's operation: its config (properties), start/stop/run (server), readiness, API keys,
and the packer that builds the archive it serves (archive). `python -m serving.server` is the command."""
