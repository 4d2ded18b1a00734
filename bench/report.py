"""`make bench`'s report: which targets each part met, the tables of one run, and several runs as ranges (`python -m
bench.run --range`); reads results, measures nothing."""

from __future__ import annotations

import json

from bench import ab, heavy, lifecycle, peer_setup, serving, text, triton_tools


def level(section: dict, c: int) -> dict:
    return next(lv for lv in section["levels"] if lv["concurrency"] == c)


def targets(r: dict) -> list[dict]:
    out = []

    def check(name, value, goal, ok):
        out.append({"target": name, "value": value, "goal": goal, "met": bool(ok)})

    for lv in r.get("ab", {}).get("levels", []):  # a change judged against its baseline: within the rounds' noise
        latency = lv["metric"] == "p50_ms"
        ratio = lv["median_ratio"]
        goal = "<= 1.1" if latency else ">= 0.9"
        ok = ratio is not None and (ratio <= 1.1 if latency else ratio >= 0.9)
        check(f"{lv['protocol']} c={lv['concurrency']} {lv['metric']}, new/old (median of rounds)", ratio, goal, ok)
    if "serving" in r:
        s = r["serving"]
        b16, o16 = level(s["baseline"], 16), level(s["ours"], 16)
        b1, o1 = level(s["baseline"], 1), level(s["ours"], 1)
        ratio = o16["throughput"] / b16["throughput"]
        check("serving throughput c=16, ours/baseline", round(ratio, 2), ">= 10", ratio >= 10)
        check(
            "serving p99 c=16, ours vs baseline (ms)",
            [round(o16["latency_ms"]["p99"], 2), round(b16["latency_ms"]["p99"], 2)],
            "ours <= baseline",
            o16["latency_ms"]["p99"] <= b16["latency_ms"]["p99"],
        )
        ours = [k for k in ("ours", *serving.OIP_SETUPS) if k in s and "levels" in s[k]]
        errors = sum(sum(lv["errors"].values()) for k in ours for lv in s[k]["levels"])
        check(f"serving errors ({', '.join(ours)}, all levels)", errors, "0", errors == 0)
        p50 = o1["latency_ms"]["p50"] / b1["latency_ms"]["p50"]
        check("serving p50 c=1, ours/baseline", round(p50, 2), "<= 0.5", p50 <= 0.5)
        for name in [k for k in ("oip", "oip-json") if k in s and "levels" in s[k]]:
            sends = SENDS[s[name].get("sends", "v2")]  # the serving table says what the answer holds
            k16, k4, k1 = level(s[name], 16), level(s[name], 4), level(s[name], 1)
            vs_ts = k16["throughput"] / o16["throughput"]
            check(f"OIP ({sends}) c=16 throughput / our TorchServe", round(vs_ts, 2), ">= 1.5", vs_ts >= 1.5)
            check(
                f"OIP ({sends}) c=16 / c=4 throughput",
                round(k16["throughput"] / k4["throughput"], 2),
                ">= 1",
                k16["throughput"] >= k4["throughput"],
            )
            if best_peer(s):
                b = best_peer_levels(s)
                vs16 = k16["throughput"] / b[16]["throughput"]
                check(f"OIP ({sends}) c=16 throughput / best peer ({b['name16']})", round(vs16, 2), ">= 3", vs16 >= 3)
                vs1 = k1["latency_ms"]["p50"] / b[1]["latency_ms"]["p50"]
                check(f"OIP ({sends}) c=1 p50 / best peer ({b['name1']})", round(vs1, 2), "<= 0.3", vs1 <= 0.3)
            agree = min(lv["accuracy"] for lv in s[name]["levels"])
            check(f"OIP ({sends}) agreement with in-process ONNX Runtime", round(agree, 4), "1.0", agree == 1.0)
    if "heavy" in r:
        for name, value, goal, ok in heavy.targets(r["heavy"]):
            check(name, round(value, 2), goal, ok)
    if "lifecycle" in r:
        sw = r["lifecycle"]["swap"]
        check("swap under 64 clients: p99 during / steady", round(sw["ratio"], 2), "<= 2", sw["ratio"] <= 2)
        check("swap under 64 clients: failed requests", sum(sw["errors"].values()), "0", not sw["errors"])
        t = r["lifecycle"]["tracing"]
        off = t.get("traces off", {})
        for name, goal in lifecycle.TRACING_GOALS.items():
            if "levels" in off and "levels" in t.get(name, {}):
                ratio = level(t[name], 16)["throughput"] / level(off, 16)["throughput"]
                # three places: at two, 0.899 read "0.9 >= 0.9: NO"
                check(f"{name} sampled: c=16 throughput / tracing off", round(ratio, 3), f">= {goal}", ratio >= goal)
    if "triton" in r:
        pa = {(x["server"], x["protocol"], x["input"], x["concurrency"]): x for x in r["triton"]["rows"]}
        http, grpc = pa.get(("oip", "http", "images", 16), {}), pa.get(("oip", "grpc", "images", 16), {})
        if "throughput" in http and "throughput" in grpc:
            ratio = grpc["throughput"] / http["throughput"]
            check("perf_analyzer c=16, gRPC / HTTP throughput (digits)", round(ratio, 2), ">= 0.8", ratio >= 0.8)
    if "workers" in r:
        two = r["workers"]["2 workers"]["disruption"]
        check("2 workers: no answer for at most (s)", round(two["longest_gap_s"], 2), "<= 2", two["longest_gap_s"] <= 2)
        check(
            "2 workers: failed requests sent after the kill",
            two["failed_sent_after_kill"],
            "0",
            two["failed_sent_after_kill"] == 0,
        )
    if "inference" in r:
        rows = {(x["backend"], x["batch"]): x["us_per_image"] for x in r["inference"]["rows"]}
        onnx = "onnx" if ("onnx", 1) in rows else "onnxruntime"  # results written before the formats issue
        ort1 = next(x for x in r["inference"]["rows"] if x["backend"] == onnx and x["batch"] == 1)
        speed = ort1.get("eager_over_this", rows["eager", 1] / rows[onnx, 1])  # median of paired rounds
        check("in-process batch 1, eager/onnx", round(speed, 2), ">= 3", speed >= 3)
        floor = rows[onnx, 64] / r["inference"]["floor_us_per_image"]
        check("in-process batch 64, onnx/FLOP floor", round(floor, 2), "<= 1.5", floor <= 1.5)
    if "training" in r:
        t = r["training"]
        check("training epoch time, ours/tutorial loop", round(t["ratio"], 2), "<= 0.7", t["ratio"] <= 0.7)
        gap = t["accuracy_gap_points"]
        check("training test accuracy gap (points)", round(gap, 2), "within +-0.5", abs(gap) <= 0.5)
    return out


PEER_KIND = "peer"


def peers_of(s: dict) -> list[str]:
    """The peers that ran and answered every request right: one that errs is no yardstick."""
    return [
        k
        for k, v in s.items()
        if isinstance(v, dict)
        and v.get("kind") == PEER_KIND
        and "levels" in v
        and all(not lv["errors"] and lv["accuracy"] == 1.0 for lv in v["levels"])
    ]


def best_peer(s: dict) -> str | None:
    names = peers_of(s)
    return max(names, key=lambda n: level(s[n], 16)["throughput"]) if names else None


def best_peer_levels(s: dict) -> dict:
    """The best peer at each level on its own terms: most requests/s at c=16, lowest p50 at c=1."""
    names = peers_of(s)
    n16 = max(names, key=lambda n: level(s[n], 16)["throughput"])
    n1 = min(names, key=lambda n: level(s[n], 1)["latency_ms"]["p50"])
    return {16: level(s[n16], 16), 1: level(s[n1], 1), "name16": n16, "name1": n1}


def rounds_line(rounds: dict) -> str:
    per = rounds["p50_ms"]
    n = len(next(iter(per.values())))
    vs = rounds["p50_ratio_median_vs_first"]
    return (
        f"c=1 measured in {n} alternating rounds of {rounds['seconds_each']:g} s per setup; median per-round p50 "
        f"ratio to {rounds['first']}: " + ", ".join(f"{k} {v:.2f}" for k, v in vs.items())
    )


SENDS = {
    "torchserve": "raw bytes",
    "v2": "v2 binary",
    "v2-json": "v2 JSON base64",
    "multipart": "multipart",
    "raw": "raw bytes",
}
OIP_ANSWERS = {
    ("v2", "all"): "label + 10 probabilities, binary",
    ("v2-json", "all"): "label + 10 probabilities, JSON",
    ("v2", "label"): "the label alone, JSON",
    ("v2-json", "label"): "the label alone, JSON",
}


def what(name: str, s: dict) -> tuple[str, str, str]:
    """A setup's server and version, its settings, and what the client sends it."""
    if s.get("kind") == "torchserve":
        handler = "stock MNIST handler" if s.get("handler") == "stock MNIST" else "our handler"
        cfg = s.get("config")
        settings = (
            f"{cfg['minWorkers']} workers, batch {cfg['batchSize']}, {cfg['maxBatchDelay']} ms"
            if isinstance(cfg, dict)
            else "defaults: no batching"
        )
        server = f"TorchServe {s.get('version', '')}, {handler}"
        return server, f"{s.get('backend')}; {settings}", f"{SENDS['torchserve']} -> label + top-3 probabilities, JSON"
    if s.get("kind") == "oip":
        st = s.get("settings", {})
        settings = (
            f"{st.get('workers')} workers, batch {st.get('max_batch')}, {st.get('max_batch_delay_ms')} ms, "
            f"queue {st.get('max_queue')}"
        )
        sends, outputs = s.get("sends", "v2"), s.get("outputs", "label")  # results before issue 23: label alone
        return "torchship OIP server", settings, f"{SENDS[sends]} -> {OIP_ANSWERS[sends, outputs]}"
    if s.get("kind") == "peer":
        peer = peer_setup.PEERS.get(name)
        sends = SENDS.get(s.get("sends"), s.get("sends", ""))
        return f"{name} {s.get('version', '')}", s.get("settings", ""), f"{sends} -> {peer.answers}" if peer else sends
    return "do-nothing (asyncio + httptools)", "answers every request with a fixed label", "raw bytes"


def serving_table(s: dict) -> list[str]:
    names = [k for k, v in s.items() if isinstance(v, dict) and "kind" in v]
    lines = [
        "Serving: one load test (asyncio keep-alive clients on 127.0.0.1), the same 1,000 held-out digits, every "
        "server started and measured one at a time (the rest paused); agreement = answers equal to in-process "
        "ONNX Runtime's",
        f"{'setup':<10} {'c':>3} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>8} {'errors':>6} {'agree':>6}  server; "
        "settings; sends -> what the answer holds",
    ]
    for name in names:
        server, settings, sends = what(name, s[name])
        if "error" in s[name]:
            lines.append(f"{name:<10} could not run: {s[name]['error']}  ({server}; {settings})")
            continue
        for i, lv in enumerate(s[name]["levels"]):
            idle = s[name].get("idle_cpu_percent")
            note = (
                f"  {server}; {settings}; {sends}"
                if i == 0
                else (f"  idle: {idle}% of a core" if i == 1 and idle is not None else "")
            )
            if i == 2 and "memory_mb" in s[name]:
                note += f"  ready in {s[name]['ready_s']:.1f} s, {s[name]['memory_mb']:,.0f} MB (PSS)"
            cost = lv.get("server", {})
            if "server_cores" in cost:
                rows = cost.get("rows_per_pass")
                note += (
                    f"{';' if note else ' '} server {cost['server_cores']:.2f} + client {cost['client_cores']:.2f}"
                    " cores" + (f", {rows:.1f} rows/pass" if rows else "")
                )
            lat = lv["latency_ms"]
            agree = "n/a" if s[name].get("kind") == "ceiling" else f"{lv['accuracy']:.4f}"
            lines.append(
                f"{name:<10} {lv['concurrency']:>3} {lv['throughput']:>8.1f} {lat['p50']:>7.2f} "
                f"{lat['p99']:>8.2f} {sum(lv['errors'].values()):>6} {agree:>6}{note}"
            )
    if s.get("c1_rounds"):
        lines.append(rounds_line(s["c1_rounds"]))
    if "oip" in s and "levels" in s["oip"] and best_peer(s):
        b, k1, k16 = best_peer_levels(s), level(s["oip"], 1), level(s["oip"], 16)
        o16 = level(s["ours"], 16)
        t16, p50 = k16["throughput"], k1["latency_ms"]["p50"]
        lines.append(
            f"OIP server: c=16 {t16:.0f} req/s = {t16 / o16['throughput']:.2f}x our TorchServe, "
            f"{t16 / b[16]['throughput']:.2f}x the best peer ({b['name16']}); c=1 p50 {p50:.2f} ms = "
            f"{p50 / b[1]['latency_ms']['p50']:.2f}x the best peer's ({b['name1']})"
        )
    if "ceiling" in s and "levels" in s["ceiling"]:
        c16 = level(s["ceiling"], 16)
        lines.append(
            f"ceiling: a server that does nothing answers {c16['throughput']:.0f} req/s at c=16 with this "
            "client; every figure above is what a server reaches under it"
        )
    return lines


def inference_table(inf: dict) -> list[str]:
    sizes = inf.get("batch_sizes", [1, 64])
    lines = [
        f"In-process inference, {inf.get('model', 'mnist-convnet')} {inf.get('input_shape', '')} (us per image; "
        f"FLOP floor {inf['floor_us_per_image']:.1f} us = {inf['flops_per_image'] / 1e6:.2f} MFLOP / "
        f"{inf['matmul_gflops']:.0f} GFLOP/s matmul)",
        f"{'backend':<18}" + "".join(f"{'batch ' + str(b):>10}" for b in sizes),
    ]
    rows = {(x["backend"], x["batch"]): x["us_per_image"] for x in inf["rows"]}
    for b in dict.fromkeys(x["backend"] for x in inf["rows"]):
        lines.append(f"{b:<18}" + "".join(f"{rows.get((b, s), float('nan')):>10.1f}" for s in sizes))
    return lines


def table(r: dict) -> str:
    lines = [
        f"machine: {r['machine']['cpu']}, {r['machine']['cores']} cores; torch {r['machine']['torch']}, "
        f"onnxruntime {r['machine']['onnxruntime']}"
    ]
    for key in ("inference", "resnet18"):
        if key in r:
            lines += ["", *inference_table(r[key])]
    if "serving" in r:
        lines += ["", *serving_table(r["serving"])]
    if "triton" in r:
        lines += ["", *triton_tools.table(r["triton"])]
    if "text" in r:
        lines += ["", *text.table(r["text"])]
    if "heavy" in r:
        lines += ["", *heavy.table(r["heavy"])]
    if "lifecycle" in r:
        lines += ["", *lifecycle.table(r["lifecycle"])]
    if "ab" in r:
        lines += ["", *ab.table(r["ab"])]
    if "formats" in r:
        f = r["formats"]
        lines += [
            "",
            "Serving the two fastest formats (our handler, same defaults, both up, same load test)",
            f"{'backend':<10} {'c=1 p50 ms':>10} {'c=1 p99 ms':>10} {'c=16 req/s':>10} {'c=16 p99':>8} "
            f"{'errors':>6} {'accuracy':>8}",
        ]
        for name in (k for k in f if k != "c1_rounds"):
            c1, c16 = level(f[name], 1), level(f[name], 16)
            errors = sum(sum(lv["errors"].values()) for lv in f[name]["levels"])
            lines.append(
                f"{name:<10} {c1['latency_ms']['p50']:>10.2f} {c1['latency_ms']['p99']:>10.2f} "
                f"{c16['throughput']:>10.1f} {c16['latency_ms']['p99']:>8.2f} {errors:>6} "
                f"{c16['accuracy']:>8.4f}"
            )
        lines.append(rounds_line(f["c1_rounds"]))
    if "workers" in r:
        w = r["workers"]
        lines += [
            "",
            "Workers (our handler, both up, same load test; then a READY worker SIGKILLed under 64 clients)",
            f"{'setup':<10} {'c=1 p50 ms':>10} {'c=16 req/s':>10} {'c=16 p99':>8} {'failed':>6} "
            f"{'sent after':>10} {'no answer':>9}",
        ]
        for name in (k for k in w if k != "c1_rounds"):
            c1, c16 = level(w[name], 1), level(w[name], 16)
            d = w[name].get("disruption", {})
            lines.append(
                f"{name:<10} {c1['latency_ms']['p50']:>10.2f} {c16['throughput']:>10.1f} "
                f"{c16['latency_ms']['p99']:>8.2f} {sum(d.get('failed', {}).values()):>6} "
                f"{d.get('failed_sent_after_kill', 0):>10} {d.get('longest_gap_s', 0):>8.2f}s"
            )
        lines.append(rounds_line(w["c1_rounds"]))
    if "training" in r:
        t = r["training"]
        lines += [
            "",
            f"Training (mnist-convnet, {t['epochs']} epochs, seeds {t['seeds']}: median epoch s, mean test accuracy)",
            f"ours      {t['ours_epoch_s']:.2f} s  {t['ours_accuracy']:.4f}",
            f"tutorial  {t['tutorial_epoch_s']:.2f} s  {t['tutorial_accuracy']:.4f}",
        ]
    if "ddp" in r:
        d = r["ddp"]
        lines += [
            "",
            f"Training {d['preset']} with DistributedDataParallel on this machine (gloo, CPU; median epoch "
            f"after the first of {d['epochs']})",
            f"{'processes':>9} {'epoch s':>8} {'images/s':>9} {'test acc':>8}",
        ]
        for row in d["rows"]:
            lines.append(
                f"{row['processes']:>9} {row['epoch_s']:>8.2f} {row['images_per_second']:>9.0f} "
                f"{row['test_accuracy']:>8.4f}"
            )
    w = max([len(t["target"]) for t in r["targets"]], default=6)
    lines += ["", f"{'target':<{w}} {'value':>18}  {'goal':<24} met"]
    for t in r["targets"]:
        lines.append(f"{t['target']:<{w}} {json.dumps(t['value']):>18}  {t['goal']:<24} {'yes' if t['met'] else 'NO'}")
    return "\n".join(lines)


def span(values: list) -> str:
    """min-max of numbers; the values as they are otherwise (a pair of p99s, say)."""
    if all(isinstance(v, (int, float)) for v in values):
        lo, hi = min(values), max(values)
        return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"
    return " ".join(json.dumps(v) for v in values)


def range_table(runs: list[dict]) -> str:
    """Several runs of one machine side by side: every figure the targets judge as a range, and how many runs met
    each target. Single runs on a shared machine swing by tens of percent; a claim rests on the range."""
    lines = [
        f"{len(runs)} runs: "
        + "; ".join(f"{r.get('started', '?')} {r['machine']['cpu']}, {r['machine']['cores']} cores" for r in runs)
    ]
    if all("serving" in r for r in runs):
        lines += ["", f"{'setup':<10} {'c':>3} {'req/s':>15} {'p50 ms':>13} {'p99 ms':>13}"]
        for name in (k for k, v in runs[0]["serving"].items() if isinstance(v, dict) and "levels" in v):
            for c in (1, 4, 16):
                try:
                    lv = [level(r["serving"][name], c) for r in runs]
                except (KeyError, StopIteration):
                    continue
                lines.append(
                    f"{name:<10} {c:>3} {span([round(x['throughput']) for x in lv]):>15} "
                    f"{span([round(x['latency_ms']['p50'], 2) for x in lv]):>13} "
                    f"{span([round(x['latency_ms']['p99'], 2) for x in lv]):>13}"
                )
    judged = [targets(r) for r in runs]
    w = max(len(t["target"]) for t in judged[0])
    lines += ["", f"{'target':<{w}} {'values over the runs':>24}  {'goal':<16} met"]
    for i, t in enumerate(judged[0]):
        same = [j[i] for j in judged if i < len(j) and j[i]["target"] == t["target"]]
        values = [x["value"] for x in same]
        met = sum(x["met"] for x in same)
        lines.append(f"{t['target']:<{w}} {span(values):>24}  {t['goal']:<16} {met} of {len(same)}")
    return "\n".join(lines)
