"""A gRPC server that no one here wrote: grpcio's server and its standard health service
(grpcio-health-checking), for tests/http2_grpc.rs and examples/grpc_health.rs.

Usage: python3 grpc_health_server.py PORT [GRACE_SECONDS]

- Listens on 127.0.0.1:PORT (0: any free port) and prints `listening PORT` once it serves.
- The health service reports SERVING for "" and for "slow"; a Check of "slow" answers after
  half a second, so that a test can have a call in flight.
- SIGTERM stops the server gracefully: `server.stop(grace)` refuses new calls, sends GOAWAY and
  lets the calls in flight finish within the grace period; then the process exits with 0.
  SIGKILL is the crash.
"""

import signal
import sys
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


class SlowWhenAsked(health.HealthServicer):
    """The standard servicer; a Check of the service "slow" takes half a second."""

    def Check(self, request, context):
        if request.service == "slow":
            time.sleep(0.5)
        return super().Check(request, context)


def main():
    port = int(sys.argv[1])
    grace = float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    servicer = SlowWhenAsked()
    for service in ("", "slow"):
        servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"listening {port}", flush=True)

    stopped = threading.Event()

    def stop(_signum, _frame):
        # stop() returns at once; its event is set once the calls in flight are done.
        server.stop(grace).wait()
        stopped.set()

    signal.signal(signal.SIGTERM, stop)
    while not stopped.is_set():
        stopped.wait(0.1)
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
