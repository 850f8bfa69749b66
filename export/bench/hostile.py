"""Hostile-load probes of a real ``specserve serve`` process (issue 18): the overload probe (96
unary callers with 5-20 ms deadlines and 16 flood streams at once) and the big-message probe,
each with the server's resident memory sampled from ``/proc`` before, during and after.

``python -m specserve.export.bench.hostile [--repository DIR] [-- serve options]`` prints both;
``tests/test_limits.py`` holds the server to the bounds
(peak under 2x idle memory, back within 1.2x idle 10 s later, a too-big message refused at once).
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from specserve.export.bench.serving import spawn
from specserve.runtime.errors import SpecserveError

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
DEADLINES = (0.005, 0.020)
"""The unary callers' deadlines, seconds."""
IDLE_WAIT_S = 2.5
"""After the warm-up: the server gives memory back a second after the last request."""
CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MB (from /proc; 0 when it has gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class RssSampler:
    """The peak resident memory of a process, sampled every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.02):
        self.pid, self.interval, self.peak = pid, interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb(self.pid))


@contextmanager
def base_models(repository: Path, names: tuple[str, ...] = ("rbm", "spt", "physformer")):
    """A repository of links to the ``names`` folders of ``repository`` (the variants left out,
    so idle memory is that of the three served models)."""
    with tempfile.TemporaryDirectory(prefix="specserve-probe-") as tmp:
        for name in names:
            (Path(tmp) / name).symlink_to(Path(repository).resolve() / name)
        yield Path(tmp)


@contextmanager
def server(repository: Path, *extra: str):
    """``specserve serve`` on a free port; yields ``(process, address)`` and stops it with SIGTERM."""
    command = [str(Path(sys.executable).with_name("specserve")), "serve", "--repository", str(repository),
               "--port", "0", "--metrics-port", "-1", "--poll-repository", "0", "--device", "cpu", *extra]
    with spawn(command, "serving") as (proc, address):
        yield proc, address


def model_requests(repository: Path, rows: int) -> dict[str, bytes]:
    """For each spectrum model of ``repository``: a serialised ModelInferRequest of ``rows`` kit
    LAMOST spectra prepared onto its grid by the runtime's own data path."""
    from specserve.export.bench import serving
    from specserve.runtime.datakit import data_dir

    return serving.model_requests(repository, serving.lamost_inputs(data_dir())[:rows])


@dataclass
class Outcome:
    idle_mb: float
    peak_mb: float
    after_mb: float
    seconds: float
    statuses: Counter = field(default_factory=Counter)
    """Final status of every unary call and stream, plus ``in-band <code>`` for stream errors."""
    answers: int = 0

    @property
    def peak_ratio(self) -> float:
        return self.peak_mb / self.idle_mb

    @property
    def after_ratio(self) -> float:
        return self.after_mb / self.idle_mb

    def line(self) -> str:
        codes = ", ".join(f"{k} {v}" for k, v in sorted(self.statuses.items()))
        return (f"idle {self.idle_mb:.0f} MB, peak {self.peak_mb:.0f} MB ({self.peak_ratio:.2f}x), "
                f"10 s later {self.after_mb:.0f} MB ({self.after_ratio:.2f}x); {self.answers} answers; {codes}")


async def _warm(address: str, requests: dict[str, bytes]) -> None:
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        infer = channel.unary_unary(INFER_METHOD)
        for payload in requests.values():
            await infer(payload, timeout=60)


async def _overload(address: str, small: dict[str, bytes], large: dict[str, bytes], seconds: float,
                    callers: int, floods: int, statuses: Counter) -> int:
    """``callers`` unary callers (5-20 ms deadlines, one or 64 spectra per request) and ``floods``
    streams writing 64-spectrum messages as fast as flow control lets them, for ``seconds``."""
    from specserve.protos.kserve import service_pb2 as kserve

    rng = random.Random(0)
    stop_at = time.perf_counter() + seconds
    answers = 0
    pool = list(small.values()) + list(large.values())
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        infer = channel.unary_unary(INFER_METHOD)
        stream_call = channel.stream_stream(STREAM_METHOD)

        async def caller() -> None:
            nonlocal answers
            while time.perf_counter() < stop_at:
                try:
                    await infer(rng.choice(pool), timeout=rng.uniform(*DEADLINES))
                    answers += 1
                    statuses["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    statuses[exc.code().name] += 1

        async def flood() -> None:
            nonlocal answers
            stream = stream_call()
            payload = rng.choice(list(large.values()))

            async def write() -> None:
                try:
                    while time.perf_counter() < stop_at:
                        await stream.write(payload)
                    await stream.done_writing()
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    pass

            writer = asyncio.create_task(write())
            try:
                async for raw in stream:
                    answer = kserve.ModelStreamInferResponse.FromString(raw)
                    if answer.error_message:
                        statuses["in-band error"] += 1
                    else:
                        answers += 1
                statuses["stream OK"] += 1
            except grpc.aio.AioRpcError as exc:
                statuses[f"stream {exc.code().name}"] += 1
            writer.cancel()

        await asyncio.gather(*(caller() for _ in range(callers)), *(flood() for _ in range(floods)))
    return answers


def overload_probe(repository: Path, *server_args: str, seconds: float = 6.0, callers: int = 96,
                   floods: int = 16, settle: float = 10.0) -> Outcome:
    """The overload probe against a fresh server started with ``server_args``."""
    small, large = model_requests(repository, 1), model_requests(repository, 64)
    with server(repository, *server_args) as (proc, address):
        asyncio.run(_warm(address, {**small, **large}))
        time.sleep(IDLE_WAIT_S)
        idle = rss_mb(proc.pid)
        statuses: Counter = Counter()
        t0 = time.perf_counter()
        with RssSampler(proc.pid) as sampler:
            answers = asyncio.run(_overload(address, small, large, seconds, callers, floods, statuses))
            elapsed = time.perf_counter() - t0
            time.sleep(settle)
        after = rss_mb(proc.pid)
        if proc.poll() is not None:
            raise SpecserveError(f"the server died under the overload probe (exit {proc.returncode})")
        return Outcome(idle, sampler.peak, after, elapsed, statuses, answers)


def largest_request_probe(repository: Path, *server_args: str, rows: int = 64, gap: float = 3.0) -> dict:
    """The peak memory of one legal request of ``rows`` spectra per model, alone on an idle
    server, then of one to each model at once: the floor under any overload bound. Returns
    ``{"idle": MB, model: peak MB, ..., "all at once": peak MB}``."""
    large = model_requests(repository, rows)
    out: dict[str, float] = {}
    with server(repository, *server_args) as (proc, address):
        asyncio.run(_warm(address, {**model_requests(repository, 1), **large}))
        time.sleep(IDLE_WAIT_S)
        out["idle"] = rss_mb(proc.pid)

        async def send(payloads) -> None:
            async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
                infer = channel.unary_unary(INFER_METHOD)
                await asyncio.gather(*(infer(p, timeout=60) for p in payloads))

        for name, payload in [*large.items(), ("all at once", None)]:
            time.sleep(gap)  # the arenas shrink a second after the last request
            with RssSampler(proc.pid) as sampler:
                asyncio.run(send(list(large.values()) if payload is None else [payload]))
            out[name] = sampler.peak
    return out


def big_message_probe(repository: Path, *server_args: str, megabytes: int = 200, settle: float = 6.0) -> dict:
    """One ``megabytes`` ModelInfer request to the RBM: its status, seconds, and the server's
    memory before and ``settle`` seconds after."""
    from specserve.export.bench.serving import infer_request

    small = model_requests(repository, 1)
    with server(repository, *server_args) as (proc, address):
        asyncio.run(_warm(address, small))
        time.sleep(IDLE_WAIT_S)
        idle = rss_mb(proc.pid)
        from specserve.protos.kserve import service_pb2 as kserve

        request = kserve.ModelInferRequest.FromString(small["rbm"])
        width = request.inputs[0].shape[1]
        rows = megabytes * 1024 * 1024 // (4 * width)
        payload = infer_request("rbm", {"flux": np.ones((rows, width), np.float32)}).SerializeToString()

        async def send() -> str:
            async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
                try:
                    await channel.unary_unary(INFER_METHOD)(payload, timeout=120)
                    return "OK"
                except grpc.aio.AioRpcError as exc:
                    return f"{exc.code().name}: {exc.details()[:160]}"

        with RssSampler(proc.pid) as sampler:
            t0 = time.perf_counter()
            status = asyncio.run(send())
            seconds = time.perf_counter() - t0
        time.sleep(settle)
        return {"megabytes": len(payload) / 2**20, "status": status, "seconds": seconds, "idle_mb": idle,
                "peak_mb": sampler.peak, "after_mb": rss_mb(proc.pid), "alive": proc.poll() is None}


def main(argv: list[str] | None = None) -> int:
    import argparse

    from specserve.runtime.defaults import default_repository

    parser = argparse.ArgumentParser(prog="python -m specserve.export.bench.hostile")
    parser.add_argument("--repository", type=Path)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("server_args", nargs="*", help="extra `specserve serve` arguments (after --)")
    args = parser.parse_args(argv)
    with base_models(args.repository or default_repository().path) as repository:
        print("overload:", overload_probe(repository, *args.server_args, seconds=args.seconds).line(), flush=True)
        alone = largest_request_probe(repository, *args.server_args)
        print("one 64-spectrum request, alone:", ", ".join(
            f"{k} {v:.0f} MB" + ("" if k == "idle" else f" ({v / alone['idle']:.2f}x)") for k, v in alone.items()),
            flush=True)
        big = big_message_probe(repository, *args.server_args)
    print("big message:", ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in big.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
