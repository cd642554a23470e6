"""Where the front door holds request bodies: nginx's memory or its body temp files (issue 27).

    python -m benchmarks.nginx_bodies [--docs]   # --docs: its lines into docs/kubernetes.md too

One client address sends CONNECTIONS_PER_ADDRESS bodies of max_request_size at once (what the front
door lets one address hold in progress) through a real nginx (one worker) to an upstream that answers
each after --hold-s; nginx keeps every body until its answer (a retry may need it). Sampled: the
worker's RSS, and the body temp files it holds (unlinked at once, so counted through its open fds).
The same bytes either way: in the pod they fill the nginx-tmp emptyDir, or the container's memory.
"""
from __future__ import annotations

import http.server
import os
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import click
import psutil

from serving.fleet.frontdoor import NGINX
from serving.fleet.topology import CONNECTIONS_PER_ADDRESS
from serving.server.properties import free_ports, read_properties

MIB = 2 ** 20


def held_body_bytes(worker: psutil.Process, temp_dir: Path) -> int:
    """Bytes of the body temp files the worker holds open (nginx unlinks each as it creates it)."""
    held = 0
    for fd in Path(f"/proc/{worker.pid}/fd").iterdir():
        try:
            if str(temp_dir) in os.readlink(fd):
                held += os.stat(fd).st_size
        except OSError:
            pass   # closed since listed
    return held


def measure(buffer: str, bodies: int, body_bytes: int, hold_s: float) -> tuple[float, float, float]:
    """(worker RSS before, its peak, the peak of body temp files held), in MiB."""
    root = Path(tempfile.mkdtemp())
    temp_dir = root / "body"
    temp_dir.mkdir()
    temp_dir.chmod(0o777)   # nginx started as root writes them as nobody
    root.chmod(0o755)
    upstream_port, port = free_ports(2)

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(hold_s)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", upstream_port), Slow)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    (root / "nginx.conf").write_text(f"""worker_processes 1; pid {root}/nginx.pid; error_log stderr error;
events {{ worker_connections 1024; }}
http {{ access_log off; client_body_temp_path {temp_dir}; proxy_temp_path {root}/proxy;
  client_max_body_size {body_bytes}; client_body_buffer_size {buffer};
  server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://127.0.0.1:{upstream_port}; }} }} }}""")
    nginx = subprocess.Popen([NGINX, "-p", str(root), "-c", str(root / "nginx.conf"), "-g", "daemon off;"])
    try:
        time.sleep(0.5)
        worker = psutil.Process(nginx.pid).children()[0]
        before = worker.memory_info().rss
        body = os.urandom(body_bytes)
        sent = urllib.request.Request(f"http://127.0.0.1:{port}/", data=body,
                                      headers={"Content-Type": "application/octet-stream"})
        clients = [threading.Thread(target=lambda: urllib.request.urlopen(sent, timeout=120).read())
                   for _ in range(bodies)]
        for client in clients:
            client.start()
        peak, held = before, 0
        while any(client.is_alive() for client in clients):
            peak, held = max(peak, worker.memory_info().rss), max(held, held_body_bytes(worker, temp_dir))
            time.sleep(0.05)
    finally:
        nginx.terminate()
        nginx.wait(10)
        upstream.shutdown()
    return before / MIB, peak / MIB, held / MIB


DOCS = Path(__file__).resolve().parent.parent / "docs" / "kubernetes.md"
BEGIN, END = "<!-- nginx-bodies:start -->", "<!-- nginx-bodies:end -->"


@click.command()
@click.option("--bodies", default=CONNECTIONS_PER_ADDRESS, show_default=True, help="Bodies held at once.")
@click.option("--hold-s", default=3.0, show_default=True, help="How long the upstream holds each.")
@click.option("--docs", "write_docs", is_flag=True, help=f"Also write the lines into {DOCS.name}'s block.")
def main(bodies: int, hold_s: float, write_docs: bool) -> None:
    """Print nginx's memory and temp files with bodies buffered to files (default) and in memory."""
    from benchmarks.report import replace_block
    from benchmarks.host import cpu_name

    body_bytes = int(read_properties(Path("config.properties"))["max_request_size"])
    lines = []
    for buffer, name in (("16k", "16k (default)"), (str(body_bytes), str(body_bytes))):
        before, peak, held = measure(buffer, bodies, body_bytes, hold_s)
        lines.append(f"client_body_buffer_size {name}: {bodies} bodies of {body_bytes:,} bytes held: worker RSS "
                     f"{before:.0f} -> {peak:.0f} MiB, body temp files {held:.0f} MiB")
        click.echo(lines[-1])
    if write_docs:
        heading = (f"  Written by `python -m benchmarks.nginx_bodies --docs` on {cpu_name()} "
                   f"({len(os.sched_getaffinity(0))} cores), {time.strftime('%Y-%m-%d')}: one address holding "
                   f"{bodies} requests in progress (`CONNECTIONS_PER_ADDRESS`, without the spool caps below) with "
                   f"bodies of `max_request_size` to an upstream that answers after {hold_s:g} s:")
        replace_block(DOCS, BEGIN, END, "\n".join([BEGIN, heading, *(f"  - {line}" for line in lines), END]))
        click.echo(f"wrote {DOCS}")


if __name__ == "__main__":
    main()
