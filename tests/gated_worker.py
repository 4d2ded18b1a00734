"""One worker of the OIP server, the real one on the real model, whose forward passes wait for the test: each pass
prints `pass N` (its rows) and waits until a line arrives on stdin; after that every pass runs at once. It lets a test
hold a request in the queue behind a pass for as long as it needs, instead of racing a fast model.

python tests/gated_worker.py OIP_SERVER_FLAGS...   (the flags of torchship.handlers.oip_server; give --max_batch,
--max_delay_ms and --threads, so nothing is measured)
"""

import sys
import threading

from torchship.handlers import control, oip_server


def main(argv: list[str]) -> int:
    args = oip_server.parser().parse_args(argv)
    args.max_queue = args.max_queue or 64
    load = oip_server.loader(args)
    state = control.initial_state(args.model_dir, args.backend, oip_server.served_names(args))
    repo = oip_server.worker_repository(state, load)
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
    return oip_server.serve_model(repo, args, load, lambda: print("ready", flush=True))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
