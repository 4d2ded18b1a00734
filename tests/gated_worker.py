"""One worker of the OIP server, the real one on the real model, whose forward passes wait for the test: each pass
prints `pass N` (its rows) and waits until a line arrives on stdin; after that every pass runs at once. It lets a test
hold a request in the queue behind a pass for as long as it needs, instead of racing a fast model.

python tests/gated_worker.py OIP_SERVER_FLAGS...   (the flags of `python -m torchship.handlers.oip`; give --max_batch,
--max_batch_delay_ms and --threads, so nothing is measured)
"""

import sys
import threading
from dataclasses import replace

from torchship.handlers.oip import main, supervisor, worker
from torchship.handlers.oip.config import Assignment
from torchship.handlers.oip.control import initial_state
from torchship.handlers.oip.sockets import shared_listener


def gated_main(argv: list[str]) -> int:
    config = main.config_from(argv)
    config = replace(config, max_queue=config.max_queue or 64)
    load = worker.loader(config)
    repo = worker.repository(
        initial_state(list(config.model_dirs), config.backend, supervisor.served_names(config)), load
    )
    gate = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), gate.set()), daemon=True).start()
    for served in repo.served():
        run = served.batcher.run

        def gated(x, run=run):
            print(f"pass {len(x)}", flush=True)
            gate.wait()
            return run(x)

        served.batcher.run = gated
        served.batcher.inline = False  # a pass that waits stands for a long one: long passes run on their thread
    listening = [
        shared_listener(config.host, port, what)
        for port, what in ((config.http_port, "REST"), (config.grpc_port, "gRPC"))
    ]  # what the supervisor would hand it
    job = Assignment(config, state_file="", http_fd=listening[0].fileno(), grpc_fd=listening[1].fileno())
    return worker.serve(repo, job, load, lambda: print("ready", flush=True))


if __name__ == "__main__":
    sys.exit(gated_main(sys.argv[1:]))
