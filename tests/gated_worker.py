"""One worker of the OIP server, the real one on the real model, whose forward passes wait for the test: each pass
prints `pass N` (its rows) and waits until a line arrives on stdin; after that every pass runs at once. It lets a test
hold a request in the queue behind a pass for as long as it needs, instead of racing a fast model.

python tests/gated_worker.py OIP_SERVER_FLAGS...   (the flags of torchship.handlers.oip_server; give --max_batch,
--max_delay_ms and --threads, so nothing is measured)
"""

import sys
import threading

from torchship.handlers import oip_server, serving


def main(argv: list[str]) -> int:
    args = oip_server.parser().parse_args(argv)
    args.max_queue = args.max_queue or 64
    served = serving.load(args.model_dir, args.model_name, backend=args.backend, threads=args.threads,
                          max_pixels=args.max_pixels, max_batch=args.max_batch, max_delay_ms=args.max_delay_ms,
                          max_queue=args.max_queue)  # fmt: skip
    serving.warm_up(served)
    gate, run = threading.Event(), served.batcher.run
    threading.Thread(target=lambda: (sys.stdin.readline(), gate.set()), daemon=True).start()

    def gated(x):
        print(f"pass {len(x)}", flush=True)
        gate.wait()
        return run(x)

    served.batcher.run = gated
    return oip_server.serve_model(served, args, lambda: print("ready", flush=True))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
