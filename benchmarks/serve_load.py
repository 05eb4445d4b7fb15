"""HTTP server throughput and latency at several concurrency levels, on loopback.

Starts ``cifar10-resnet50 serve`` in a child process, then for each concurrency level keeps that
many connections posting real CIFAR-10 test images (PNG) for ``--seconds``, and reports
requests/s and p50/p99 latency. The load comes from ``wrk`` (Debian package ``wrk``: C, one
thread, cheap enough to leave the 2 cores to the server) when it is installed, else from
async httpx clients in this process. The same is done with micro-batching off
(``--max-batch 1``) as the side-by-side baseline. Bounded: every level stops after
``--seconds``; only 127.0.0.1 is contacted.

    python benchmarks/serve_load.py MODEL --data-dir ../shared/cifar10 --levels 1 8 32
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from cifar10_resnet50.data import cifar10

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pngs(data_dir: str, n: int = 64) -> list[bytes]:
    from PIL import Image

    arrays = cifar10.load(cifar10.resolve_data_dir(data_dir))
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(arrays.test_x[i].permute(1, 2, 0).numpy()).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


async def level(url: str, bodies: list[bytes], concurrency: int, seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker(k: int) -> None:
            nonlocal errors
            i = k
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = await client.post(
                    "/predict",
                    content=bodies[i % len(bodies)],
                    headers={"content-type": "image/png"},
                )
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
                i += concurrency

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - t0
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50": 1000 * latencies[len(latencies) // 2] if latencies else float("nan"),
        "p99": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        if latencies
        else float("nan"),
        "ok": len(latencies),
        "errors": errors,
    }


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "image/png"
local bodies, i = {}, 0
for path in io.popen("ls " .. os.getenv("WRK_BODIES") .. "/*.png"):lines() do
  local f = io.open(path, "rb"); bodies[#bodies + 1] = f:read("*a"); f:close()
end
request = function()
  i = i % #bodies + 1
  return wrk.format(nil, "/predict", nil, bodies[i])
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %f %f %d\\n", summary.requests,
    summary.duration, latency:percentile(50), latency:percentile(99),
    summary.errors.status + summary.errors.connect + summary.errors.read +
    summary.errors.write + summary.errors.timeout))
end
"""


def level_wrk(url: str, bodies: list[bytes], concurrency: int, seconds: float) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for i, body in enumerate(bodies):
            Path(tmp, f"{i:03d}.png").write_bytes(body)
        script = Path(tmp, "post.lua")
        script.write_text(WRK_SCRIPT)
        proc = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{concurrency}",
                f"-d{seconds:g}s",
                "--timeout",
                "60s",
                "-s",
                str(script),
                url,
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "WRK_BODIES": tmp},
            check=True,
        )
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    requests, duration_us, p50_us, p99_us, errors = line.split()[1:]
    ok = int(requests) - int(errors)
    return {
        "rps": ok / (int(duration_us) / 1e6),
        "p50": float(p50_us) / 1000,
        "p99": float(p99_us) / 1000,
        "ok": ok,
        "errors": int(errors),
    }


def serve(model: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cifar10_resnet50",
            "-q",
            "serve",
            model,
            "--port",
            str(port),
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/readyz").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode())
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model")
    p.add_argument("--data-dir", default=os.environ.get("CIFAR10_DATA_DIR", "../shared/cifar10"))
    p.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument(
        "--serve-args", default="", help="extra flags for serve, e.g. '--precision bf16'"
    )
    p.add_argument(
        "--httpx", action="store_true", help="generate load with httpx even if wrk exists"
    )
    args = p.parse_args()

    import shutil

    bodies = pngs(args.data_dir)
    extra = args.serve_args.split()
    use_wrk = shutil.which("wrk") is not None and not args.httpx
    print(
        f"# model {args.model}; serve flags: {' '.join(extra) or '(defaults)'}; "
        f"{args.seconds:g} s per level; load from {'wrk' if use_wrk else 'httpx'}; "
        f"client and server on the same {os.cpu_count()} cores"
    )
    print("| micro-batching | concurrency | requests/s | p50 ms | p99 ms | ok | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    results = {}
    for label, flags in (("on (max 32)", []), ("off (max-batch 1)", ["--max-batch", "1"])):
        proc, url = serve(args.model, extra + flags)
        try:
            asyncio.run(level(url, bodies, 2, 2.0))  # warm-up
            for c in args.levels:
                if use_wrk:
                    r = level_wrk(url, bodies, c, args.seconds)
                else:
                    r = asyncio.run(level(url, bodies, c, args.seconds))
                results[(label, c)] = r
                print(
                    f"| {label} | {c} | {r['rps']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} | "
                    f"{r['ok']} | {r['errors']} |",
                    flush=True,
                )
        finally:
            proc.terminate()
            proc.wait(10)
    on = [r for (label, _), r in results.items() if label.startswith("on")]
    if len(on) >= 2:
        print(
            f"\nwith micro-batching: throughput at concurrency {args.levels[-1]} = "
            f"{on[-1]['rps'] / on[0]['rps']:.2f}× concurrency {args.levels[0]}"
        )
        off = [r for (label, _), r in results.items() if label.startswith("off")]
        print(
            f"at concurrency {args.levels[-1]}: micro-batching on/off = "
            f"{on[-1]['rps'] / off[-1]['rps']:.2f}×"
        )


if __name__ == "__main__":
    main()
