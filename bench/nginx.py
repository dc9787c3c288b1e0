"""nginx's grpc_pass as the reference C proxy, configured to be a fair comparison.

Fair means what a careful operator would run: one worker (the sidecar is one process), an
`upstream` block with `keepalive` so upstream connections are reused (a literal
`grpc_pass grpc://host:port` opens a connection per request), keepalive_requests raised far
above the default 1000 on both sides so no connection is recycled during the run, and no
access log (the sidecar does not write one either).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench import procstat
from bench.procs import Child, free_port, port_accepts, wait_for

CONFIG = """\
{user}worker_processes 1;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;

events {{
    worker_connections 1024;
}}

http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;

    upstream bench_upstream {{
        server {upstream};
        keepalive 64;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
    }}

    server {{
        listen 127.0.0.1:{port} http2;
        location / {{
            grpc_pass grpc://bench_upstream;
        }}
    }}
}}
"""


def render_config(directory: str, upstream: str, port: int) -> str:
    # Run as root, nginx would hand its worker to `nobody`, which cannot use our temp dir.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return CONFIG.format(user=user, dir=directory, upstream=upstream, port=port)


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                      else None)
    if not found:
        raise FileNotFoundError("nginx is not installed (make bench installs Debian's nginx)")
    return found


def version() -> str:
    out = subprocess.run([nginx_binary(), "-v"], capture_output=True, text=True, check=False)
    return (out.stderr or out.stdout).strip().removeprefix("nginx version: ").replace("/", " ")


class Nginx:
    """A private nginx (its own prefix, config and pid file) proxying to `upstream`."""

    def __init__(self, upstream: str, attempts: int = 3) -> None:
        self.dir = tempfile.mkdtemp(prefix="bench-nginx-")
        self.config_path = Path(self.dir) / "nginx.conf"
        last_error = ""
        for _ in range(attempts):  # the free port may be taken before nginx binds it
            port = free_port()
            self.address = f"127.0.0.1:{port}"
            self.config_path.write_text(render_config(self.dir, upstream, port))
            self.child = Child("nginx", [nginx_binary(), "-p", self.dir, "-e",
                                         f"{self.dir}/error.log", "-c", str(self.config_path)],
                               ready=False)
            try:
                wait_for(self._ready, 15.0, "nginx to accept connections")
                return
            except RuntimeError as exc:
                last_error = str(exc)
                self.child.stop()
        raise RuntimeError(f"nginx did not start: {last_error}")

    def _ready(self) -> bool:
        if not self.child.alive():
            log = Path(self.dir, "error.log")
            text = log.read_text(errors="replace") if log.exists() else ""
            raise RuntimeError(f"nginx exited with {self.child.proc.returncode}: "
                               f"{self.child.output()}{text}")
        return bool(procstat.children(self.child.pid)) and port_accepts(self.address)

    def pids(self) -> list[int]:
        """Master and worker: all of nginx's CPU counts."""
        return procstat.with_descendants([self.child.pid])

    def stop(self) -> None:
        self.child.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
