"""Where the exposure's time goes (``specserve bench profile``): the tables of docs/performance.md.

Three views of the same work, the LAMOST exposure of :func:`.serving.exposure`:

- stages: :func:`.serving.compute_stages`, each stage alone in one thread (the compute ceiling);
- the server: ``specserve serve`` sampled by py-spy (a developer tool, ``pip install py-spy``)
  while one client streams the exposure, with the server's and the client's CPU seconds. The
  samples are summed per function, by the time spent in the function itself and by the time under
  it (its callees included), over every thread of the server;
- the graphs: ONNX Runtime's own profiler on the session runs of each spectrum model at batch 64,
  the kernel time summed per operator type.
"""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from specserve.export.bench import serving as sb
from specserve.runtime.errors import SpecserveError


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def stages_table(repository: Path, spectra: list, n: int) -> str:
    cycled = [spectra[i % len(spectra)] for i in range(n)]
    stages = sb.compute_stages(repository, cycled)
    work = sum(s.seconds for s in stages)
    rows = [(s.name, f"{s.seconds:.3f}", f"{s.seconds / s.spectra * 1e3:.3f}" if s.spectra else "-",
             f"{s.seconds / work:.0%}") for s in stages]
    rows.append(("total (single-core work)", f"{work:.3f}", f"{work / n * 1e3:.3f}", "100%"))
    return _table(("stage (one thread)", "seconds", "ms per spectrum", "share"), rows)


def _frame(name: str) -> str:
    """``function (path/to/file.py:line)`` -> ``function (file.py)``: lines of one function merged."""
    if " (" not in name:
        return name
    function, where = name.split(" (", 1)
    return f"{function} ({Path(where.rstrip(')').rsplit(':', 1)[0]).name})"


def server_table(repository: Path, spectra: list, n: int, top: int = 20, rate: int = 100) -> str:
    """py-spy on the server during the exposure: the top functions by own and by inclusive time."""
    import psutil

    from specserve.runtime.client import Client
    from specserve.runtime.spectrum import SpectrumInput

    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise SpecserveError("py-spy is not installed (pip install py-spy)")
    cycled = [SpectrumInput(f"{s.id}#{i}", s.wavelength, s.flux, s.ivar, s.mask, s.redshift, s.metadata)
              for i, s in ((i, spectra[i % len(spectra)]) for i in range(n))]
    command = [str(Path(sys.executable).with_name("specserve")), "serve", "--repository", str(repository),
               "--port", "0", "--metrics-port", "-1", "--poll-repository", "0"]
    with tempfile.TemporaryDirectory() as tmp, sb.spawn(command, "serving") as (proc, address):
        raw = Path(tmp) / "server.txt"
        with Client(address) as client:
            list(client.stream(cycled[:64]))  # warm-up
            server, me = psutil.Process(proc.pid), psutil.Process()
            recorder = subprocess.Popen([spy, "record", "-p", str(proc.pid), "-o", str(raw), "-f", "raw",
                                         "-r", str(rate), "--threads", "--nonblocking"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
            s0, c0, t0 = server.cpu_times(), me.cpu_times(), time.perf_counter()
            rows = list(client.stream(cycled))
            wall = time.perf_counter() - t0
            s1, c1 = server.cpu_times(), me.cpu_times()
            recorder.send_signal(2)
            recorder.wait(timeout=60)
        if len(rows) != n or not all(r.ok for r in rows):
            raise SpecserveError("the exposure lost or failed spectra")
        own, under, total = collections.Counter(), collections.Counter(), 0
        for line in raw.read_text().splitlines():
            stack, count = line.rsplit(" ", 1)
            frames = [_frame(f) for f in stack.split(";") if not f.startswith(("thread (", "process "))]
            if not frames:
                continue
            total += int(count)
            own[frames[-1]] += int(count)
            for f in set(frames):
                under[f] += int(count)
    server_cpu = s1.user + s1.system - s0.user - s0.system
    client_cpu = c1.user + c1.system - c0.user - c0.system
    head = (f"{n:,} spectra in {wall:.2f} s wall; server CPU {server_cpu:.2f} s, client CPU {client_cpu:.2f} s; "
            f"{total:,} py-spy samples of the server's threads at {rate} Hz")
    return "\n\n".join([
        head,
        _table(("function (own time)", "share of samples"), [(f, f"{c / total:.1%}") for f, c in own.most_common(top)]),
        _table(("function (with its callees)", "share of samples"),
               [(f, f"{c / total:.1%}") for f, c in under.most_common(top + 10)
                if not f.startswith(("_bootstrap", "run (threading", "_worker", "<module>"))][:top]),
    ])


def graph_table(model_path: Path, batch: int = 64, runs: int = 10, top: int = 12) -> str:
    """ONNX Runtime's profiler on ``runs`` session runs at ``batch`` rows, one thread."""
    import onnxruntime as ort

    from specserve.export.bench.suite import model_feed
    from specserve.runtime.contract import ModelCard

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        card = ModelCard.from_metadata_props(session.get_modelmeta().custom_metadata_map)
        feed = model_feed(card, batch)
        outputs = [o.name for o in session.get_outputs()]
        session.run(outputs, feed)
        t0 = time.perf_counter()
        for _ in range(runs):
            session.run(outputs, feed)
        per_run = (time.perf_counter() - t0) / runs
        events = json.loads(Path(session.end_profiling()).read_text())
    by_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"].get("op_name", "?")] += e["dur"]
    total = sum(by_op.values())
    rows = [(op, f"{us / (runs + 1) / 1e3:.2f}", f"{us / total:.0%}") for op, us in by_op.most_common(top)]
    return (f"{model_path.parent.parent.name} at batch {batch}: {per_run * 1e3:.1f} ms per run (one thread)\n\n"
            + _table(("operator", "ms per run", "share of kernel time"), rows))


def profile(repository: Path, n: int = 4000, server: bool = True) -> str:
    from specserve.runtime.datakit import data_dir
    from specserve.runtime.layout import model_folders

    spectra = sb.lamost_inputs(data_dir())
    parts = [f"Repository {repository}; {n:,} LAMOST spectra (the kit's {len(spectra)} cycled), messages of 64.",
             "### Stages, each alone in one thread", stages_table(repository, spectra, n)]
    if server:
        parts += ["### The server during the exposure (py-spy)", server_table(repository, spectra, n)]
    parts.append("### The graphs (ONNX Runtime profiler)")
    for folder in model_folders(repository):
        if folder.name in ("physformer", "spt", "rbm"):
            versions = sorted((p for p in folder.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
            parts.append(graph_table(versions[-1] / "model.onnx"))
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m specserve.export.bench.profile REPOSITORY [N] [--no-server]")
    print(profile(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2].isdigit() else 4000,
                  server="--no-server" not in sys.argv))
