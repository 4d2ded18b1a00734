"""A restart after a stop, a crash or a deploy succeeds at once, on the same ports, while the connections the last run
closed still sit in TIME_WAIT on them: the OIP server again, TorchServe right after it, and TorchServe again."""

import base64
import http.client
import json

from torchship.serve import oip, torchserve
from torchship.serve.archive import ModelConfig, build_archive
from torchship.serve.samples import held_out_digits, png

DIGIT = png(held_out_digits()[0][0])
TIME_WAIT = "06"  # /proc/net/tcp's state code


def time_waits(port: int) -> int:
    """Sockets in TIME_WAIT whose local end is PORT: the server's side of connections the server closed."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            count += state == TIME_WAIT and int(local.rsplit(":", 1)[1], 16) == port
    return count


def load_then_close(port: int, path: str, headers: dict, body: bytes = DIGIT, n: int = 50) -> set[int]:
    """N requests, each asking the server to close its connection after answering (so TIME_WAIT lands on its side)."""
    statuses = set()
    for _ in range(n):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", path, body, {"Connection": "close", **headers})
        r = conn.getresponse()
        r.read()
        statuses.add(r.status)
        conn.close()
    return statuses


def test_oip_then_oip_then_torchserve_then_torchserve_restart_at_once(convnet_export, tmp_path):
    state = tmp_path / "oip"
    cfg = oip.OIPConfig.on_free_ports(
        str(convnet_export.directory), "mnist", str(state), workers=1, max_batch=8, max_batch_delay_ms=1, threads=1
    )
    v2 = {"Content-Type": "application/json"}
    body = json.dumps(
        {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(DIGIT).decode()]}]}
    ).encode()

    def oip_round() -> None:
        oip.start(cfg, timeout=120)
        try:
            assert load_then_close(cfg.http_port, "/v2/models/mnist/infer", v2, body) == {200}
        finally:
            assert oip.stop(state)
        assert time_waits(cfg.http_port) > 0  # the condition a restart must survive

    oip_round()
    oip_round()  # at once, on the same ports

    store = tmp_path / "store"
    build_archive(convnet_export.directory, store, name="mnist", config=ModelConfig(minWorkers=1, maxWorkers=1))
    ts = torchserve.ServerConfig.on_free_ports(
        "mnist", str(store), str(tmp_path / "ts"), inference_port=cfg.http_port, management_port=cfg.grpc_port
    )
    for _ in range(2):  # right after the OIP server, on its ports; then again at once
        ts = torchserve.start(ts, timeout=240)
        try:
            key = torchserve.headers(ts.state_dir)
            assert load_then_close(ts.inference_port, "/predictions/mnist", {"Content-Type": "image/png", **key}) == {
                200
            }
        finally:
            torchserve.stop(ts.state_dir)
        assert time_waits(ts.inference_port) > 0
