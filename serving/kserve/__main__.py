"""The KServe engine's command (docs/engines.md).

    python -m serving.kserve start --artifact artifacts/mnist_cnn.torchscript.pt --run-dir .run/kserve
        KServe ready on http://127.0.0.1:8085 (pid 12345): POST /predictions/mnist, /v2/models/mnist/infer;
        gRPC v2 (inference.GRPCInferenceService) on 127.0.0.1:8086
    python -m serving.kserve stop --run-dir .run/kserve
    python -m serving.kserve run --artifact ...     (the server itself, in the foreground)
"""
import sys

import click

from .launcher import DEFAULT_WORKERS, EngineError, start, stop

ARTIFACT = click.option("--artifact", required=True, type=click.Path(exists=True, dir_okay=False),
                        help="What `make export` wrote: the .torchscript.pt, .onnx or .int8.onnx file.")
ADDRESS = click.option("--address", default="127.0.0.1", show_default=True, help="The address to listen on.")
PORT = click.option("--port", default=8085, show_default=True, type=int, help="REST port.")
GRPC_PORT = click.option("--grpc-port", default=8086, show_default=True, type=int,
                         help="Open Inference Protocol gRPC port (on the same address).")
THREADS = click.option("--threads", default=1, show_default=True, type=int, help="Inference threads.")
WORKERS = click.option("--workers", default=DEFAULT_WORKERS, show_default=True, type=click.IntRange(min=1),
                       help="Requests answered at once, off the event loop; job_queue_size more wait (--config).")
CONFIG = click.option("--config", default="config.properties", show_default=True,
                      type=click.Path(exists=True, dir_okay=False),
                      help="The TorchServe config whose request limits this engine keeps too.")
RUN_DIR = click.option("--run-dir", default=".run/kserve", show_default=True, help="Pid file and log.")


@click.group()
def main() -> None:
    """Serve the digit model on KServe's Python model server."""


@main.command("start")
@ARTIFACT
@ADDRESS
@PORT
@GRPC_PORT
@THREADS
@WORKERS
@CONFIG
@RUN_DIR
def start_command(artifact: str, address: str, port: int, grpc_port: int, threads: int, workers: int, config: str,
                  run_dir: str) -> None:
    """Start in the background; return once ready."""
    try:
        engine = start(artifact, run_dir, address, port, threads, config, grpc_port=grpc_port, workers=workers)
    except EngineError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"KServe ready on {engine.address} (pid {engine.pid}): POST /predictions/mnist, /v2/models/mnist/infer; "
               f"gRPC v2 (inference.GRPCInferenceService) on {engine.grpc_target}")


@main.command("stop")
@RUN_DIR
def stop_command(run_dir: str) -> None:
    """Stop the engine started from run-dir, if it runs."""
    click.echo("KServe stopped" if stop(run_dir) else "no KServe running from " + run_dir)


@main.command("run")
@ARTIFACT
@ADDRESS
@PORT
@GRPC_PORT
@THREADS
@WORKERS
@CONFIG
def run_command(artifact: str, address: str, port: int, grpc_port: int, threads: int, workers: int,
                config: str) -> None:
    """Serve in the foreground until SIGTERM."""
    del sys.argv[1:]   # kserve.model_server parses sys.argv when imported: ours are not its flags
    from .server import serve
    serve(artifact, address, port, grpc_port, threads, workers, config)


main()
