"""The ``specserve`` command line: ``main(argv) -> exit code`` over the Python API.

Subcommands:

- ``specserve data inspect [PATH...]``: read every file of the data kit (or the given files) and
  list its detected format; exit 1 if any file cannot be read.
- ``specserve data build NAME...``: build benchmark sets (``giants``, ``stars``, ``cv``) into the
  cache and print their sizes and content hashes.
- ``specserve bench preprocess``: time resampling + normalisation of 4,000 LAMOST spectra.
- ``specserve bench mc [--repository DIR] [--model spt]``: one in-graph MC run of T = 64 samples
  against 64 separate runs, on the same input batch.
- ``specserve bench all [--out BENCHMARKS.md]``: every serving benchmark (ORT vs torch, MC,
  transport ceiling, serving overhead, latency under load, one exposure), written to a report.
- ``specserve bench embedded [--repository DIR]``: every model and variant on one thread, one
  process each; rewrites the report's Embedded section.
- ``specserve bench reprocess``: ``reprocess`` on 1 and 2 Dask workers against the in-process pipeline;
  rewrites the report's Reprocess section.
- ``specserve bench load [--server HOST:PORT] [--model rbm] [--tls-ca ...] [--token-file ...]``:
  unary, stream and latency figures of a running (possibly protected) server, measured from here.
- ``specserve bench gpu [--device cuda]``: CUDA parity checks and benchmarks; rewrites the report's
  CUDA section.
- ``specserve serve [--repository DIR] [--host H] [--port N] [--device auto|cpu|cuda[:N]] [--threads N]``:
  serve a model repository over gRPC
  (default ``<cache>/models``, port 8001).
- ``specserve analyze [--server HOST:PORT] [--out CATALOGUE] FILE...``: stream spectrum files to a
  server, print a table and write a catalogue (CSV, or FITS by extension).
- ``specserve watch DIR --out CATALOGUE [--server HOST:PORT] [--once]``: stream every spectrum file
  that appears in DIR to a server, appending to the catalogue; resumes after a restart
  (:mod:`specserve.runtime.client.watch`).
- ``specserve reprocess INPUT... --out CATALOGUE [--scheduler tcp://HOST:8786] [--workers N]``: an
  archive through every model on Dask distributed, no server; resumable
  (:mod:`specserve.runtime.archive.reprocess`).
- ``specserve train ...`` / ``specserve eval ...``: training and evaluation (the ``train`` extra).
- ``specserve export rbm ...`` / ``specserve models build``: ONNX export into a model repository
  and the default repository that ``make serve`` serves (the ``train`` extra).

Exit codes: 0 success, 1 a domain error (message on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from specserve.runtime.errors import SpecserveError

log = logging.getLogger(__name__)


REPOSITORY_HELP = "model repository (default: the shipped models, or <cache>/models when it is a newer build)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specserve", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="the data kit and the benchmark sets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    inspect = data_sub.add_parser("inspect", help="read every kit file and list its format")
    inspect.add_argument("paths", nargs="*", type=Path, help="files to read (default: the whole kit)")
    inspect.add_argument("--data", type=Path, help="data kit folder (default: $SPECSERVE_DATA or ../shared/data)")
    build = data_sub.add_parser("build", help="build benchmark sets into the cache")
    build.add_argument("names", nargs="+", choices=("giants", "stars", "cv"))
    build.add_argument("--data", type=Path, help="data kit folder")
    build.add_argument("--cache", type=Path, help="cache folder (default: $SPECSERVE_CACHE or ~/.cache/specserve)")
    build.add_argument("--seed", type=int, default=None, help="random seed (default: the documented one)")
    build.add_argument("--no-plot", action="store_true", help="skip examples.png")

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    pre = bench_sub.add_parser("preprocess", help="resample + normalise 4,000 LAMOST spectra")
    pre.add_argument("--n", type=int, default=4000)
    pre.add_argument("--data", type=Path)
    mc = bench_sub.add_parser("mc", help="MC dropout: one in-graph run of T samples vs T separate runs")
    mc.add_argument("--repository", type=Path, help=REPOSITORY_HELP)
    mc.add_argument("--model", default="spt", help="model name (default spt)")
    mc.add_argument("--batch", type=int, default=64)
    mc.add_argument("--samples", type=int, default=64)
    mc.add_argument("--threads", type=int, default=2)
    every = bench_sub.add_parser("all", help="every serving benchmark, written to BENCHMARKS.md (`make bench`)")
    every.add_argument("--repository", type=Path, help=REPOSITORY_HELP)
    every.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"), help="report (default BENCHMARKS.md)")
    every.add_argument("--quick", action="store_true", help="small sizes (a smoke run, not for the report)")
    every.add_argument("--runs", type=Path, help="training runs, for the torch side (default <cache>/runs)")
    every.set_defaults(handler=_cmd_bench_all)
    emb = bench_sub.add_parser("embedded", help="every model and variant on one thread, one process each "
                                                "(size, load, latency, throughput, peak memory, accuracy)")
    emb.add_argument("--repository", type=Path, help=REPOSITORY_HELP)
    emb.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"), help="report whose Embedded section is "
                     "rewritten (default BENCHMARKS.md)")
    emb.add_argument("--quick", action="store_true", help="few rounds (a smoke run, not for the report)")
    emb.set_defaults(handler=_cmd_bench_embedded)
    rpb = bench_sub.add_parser("reprocess", help="`reprocess` on 1 and 2 Dask workers against the in-process "
                                                 "pipeline, and its cost from 1,000 to 16,000 spectra")
    rpb.add_argument("--repository", type=Path, help=REPOSITORY_HELP)
    rpb.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"), help="report whose Reprocess section is "
                     "rewritten (default BENCHMARKS.md)")
    rpb.add_argument("--quick", action="store_true", help="small sizes (a smoke run, not for the report)")
    rpb.set_defaults(handler=_cmd_bench_reprocess)
    load = bench_sub.add_parser("load", help="measure a running server from here (TLS and tokens as for analyze)")
    load.add_argument("--server", default="localhost:8001", help="HOST:PORT (default localhost:8001)")
    load.add_argument("--model", default="rbm", help="the spectrum model to send requests to (default rbm)")
    load.add_argument("--repository", type=Path,
                      help="where that model's preprocessing is read from (default: the default repository)")
    load.add_argument("--rate", type=float, default=200.0, help="requests per second for the latency run (default 200)")
    load.add_argument("--seconds", type=float, default=3.0, help="seconds per measurement (default 3)")
    _add_credentials(load)
    load.set_defaults(handler=_cmd_bench_load)
    gpu = bench_sub.add_parser("gpu", help="CUDA parity checks and benchmarks on a GPU (`make gpu-check`)")
    gpu.add_argument("--repository", type=Path, help=REPOSITORY_HELP)
    gpu.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"),
                     help="report whose CUDA section is rewritten (default BENCHMARKS.md)")
    gpu.add_argument("--device", default="cuda", help="cuda[:N] (cpu runs the same code on the CPU)")
    gpu.add_argument("--quick", action="store_true", help="small sizes (a smoke run, not for the report)")
    gpu.set_defaults(handler=_cmd_bench_gpu)
    srv = sub.add_parser("serve", help="serve a model repository over gRPC")
    srv.add_argument("--repository", type=Path,
                     help="model repository in Triton's layout (default: the shipped models, or <cache>/models "
                          "when `specserve models build` wrote a newer one there)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8001)
    srv.add_argument("--device", default="auto",
                     help="auto (CUDA when it can run here, else the CPU), cpu, cuda or cuda:N (default auto)")
    srv.add_argument("--log-requests", action="store_true",
                     help="log one line per inference request on stderr: id, model(s), rows, status, milliseconds")
    srv.add_argument("--metrics-port", type=int, default=None,
                     help="Prometheus metrics on http://HOST:PORT/metrics (default 8002, skipped with a warning "
                          "when busy; 0: any free port; -1: off)")
    srv.add_argument("--poll-repository", type=float, default=2.0,
                     help="seconds between scans of the repository for changed models (0: never; default 2)")
    srv.add_argument("--threads", type=int, default=0,
                     help="CPU threads per model session (default: the cores shared among the models, 1-4 each)")
    lim = srv.add_argument_group("limits (docs/serving.md, Limits)")
    lim.add_argument("--max-concurrent-rpcs", type=int, default=256,
                     help="calls at once; the next gets RESOURCE_EXHAUSTED (default 256)")
    lim.add_argument("--max-message-mb", type=float, default=None,
                     help="largest message in MB (default: sized from the models' largest legal batch)")
    lim.add_argument("--max-queued-mb", type=float, default=64,
                     help="MB of requests queued or running, server-wide; more get RESOURCE_EXHAUSTED (default 64)")
    lim.add_argument("--stream-window", type=int, default=64,
                     help="messages of one stream read and not yet answered (default 64)")
    lim.add_argument("--keepalive-s", type=float, default=60,
                     help="ping a quiet connection after this many seconds and drop it when the ping goes unanswered "
                          "for a third of that, at most 20 s (dead peers, stalled half-sent calls; default 60)")
    lim.add_argument("--memory-arena", choices=("on", "off"), default="on",
                     help="ONNX Runtime's CPU memory arena: on (default) reuses working memory during a burst and "
                          "gives it back a second after; off allocates per run (PhysFormer at half speed)")
    sec = srv.add_argument_group("security (docs/security.md)")
    sec.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve TLS (re-read when it changes or on SIGHUP)")
    sec.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    sec.add_argument("--tls-client-ca", type=Path,
                     help="PEM CA bundle: require client certificates signed by it (mutual TLS)")
    sec.add_argument("--auth-tokens", type=Path,
                     help="file of 'TOKEN [ROLE]' lines (roles infer, admin): require 'authorization: Bearer TOKEN'")
    sec.add_argument("--model-control", choices=("none", "explicit"), default="none",
                     help="none (default): repository load/unload requests are refused, as in Triton's mode none; "
                          "explicit: allowed (to admin tokens when --auth-tokens is given)")
    sec.add_argument("--reflection", action="store_true", help="serve gRPC reflection (off by default)")
    sec.add_argument("--insecure", action="store_true",
                     help="allow a non-loopback --host without TLS and tokens (anyone who reaches it may use it)")

    ana = sub.add_parser("analyze", help="analyse spectrum files on a running server")
    ana.add_argument("files", nargs="*", help="spectrum files, folders (read recursively) or quoted globs")
    ana.add_argument("--files-from", help="a file of paths, folders or globs, one per line ('-': standard input)")
    ana.add_argument("--wait", type=float, default=10.0,
                     help="seconds to wait for the server to answer with a model ready (default 10)")
    ana.add_argument("--quiet", action="store_true", help="no progress line (there is none when stderr is not a terminal)")
    ana.add_argument("--server", default="localhost:8001", help="HOST:PORT (default localhost:8001)")
    ana.add_argument("--out", type=Path, help="catalogue to write as rows arrive: .csv, .ecsv, .parquet, or .fits/.fit "
                                              "for a FITS table")
    ana.add_argument("--models", default="", help="comma-separated model names (default: every applicable model)")
    ana.add_argument("--batch", type=int, default=64, help="spectra per stream message")
    ana.add_argument("--mc-samples", type=int, default=0,
                     help="Monte Carlo samples for models that draw them (default 0: each model's default)")
    ana.add_argument("--local", action="store_true",
                     help="run the models in this process (the embedded runtime: no server, no grpc)")
    ana.add_argument("--repository", type=Path,
                     help="with --local: model repository (default: the shipped models, or <cache>/models when "
                          "it is a newer build)")
    ana.add_argument("--variant", default="", help="use <model>-VARIANT (e.g. int8, fp16) wherever it exists")
    ana.add_argument("--threads", type=int, default=1, help="with --local: ONNX Runtime threads per model (default 1)")
    ana.add_argument("--no-arena", dest="arena", action="store_false",
                     help="with --local: no ONNX Runtime CPU memory arena (less memory between runs)")

    wat = sub.add_parser("watch", help="stream every spectrum file that appears in a folder to a server")
    wat.add_argument("folder", type=Path)
    wat.add_argument("--out", type=Path, required=True,
                     help="catalogue to append to (.fits/.fit for a FITS table, .parquet, .ecsv, else CSV); read "
                          "back to resume")
    wat.add_argument("--server", default="localhost:8001", help="HOST:PORT (default localhost:8001)")
    wat.add_argument("--rejects", type=Path, help="unreadable files and why (default CATALOGUE.rejects.tsv)")
    wat.add_argument("--pattern", default="*", help="file name pattern in the folder (default *)")
    wat.add_argument("--models", default="", help="comma-separated model names (default: every applicable model)")
    wat.add_argument("--poll", type=float, default=1.0, help="seconds between folder scans (default 1)")
    wat.add_argument("--mc-samples", type=int, default=0, help="Monte Carlo samples (default: each model's)")
    wat.add_argument("--once", action="store_true", help="handle the files there now, then exit")
    for command in (ana, wat):
        _add_credentials(command)

    rep = sub.add_parser("reprocess", help="reprocess an archive of spectrum files on Dask (no server; "
                                           "the archive extra)")
    rep.add_argument("inputs", nargs="*", help="spectrum files, folders (read recursively) or quoted globs")
    rep.add_argument("--files-from", help="a file of paths, folders or globs, one per line ('-': standard input)")
    rep.add_argument("--out", type=Path, required=True,
                     help="catalogue: .parquet, .fits/.fit, .ecsv or .csv; parts and resume state in CATALOGUE.parts/")
    rep.add_argument("--scheduler", help="address of a running Dask scheduler (tcp://HOST:8786); "
                                         "default: a local cluster sized to this machine")
    rep.add_argument("--workers", type=int, help="local cluster: worker processes (default: one per core)")
    rep.add_argument("--batch-files", type=int, default=16, help="files per task (default 16)")
    rep.add_argument("--models", default="", help="comma-separated model names (default: every applicable model)")
    rep.add_argument("--variant", default="", help="use <model>-VARIANT (e.g. int8, fp16) wherever it exists")
    rep.add_argument("--repository", help="model repository, at the same path on every worker "
                                          "(default: each worker's default repository)")
    rep.add_argument("--mc-samples", type=int, default=0, help="Monte Carlo samples (default: each model's)")
    rep.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per model on each worker (default 1)")
    rep.add_argument("--fresh", action="store_true", help="forget the earlier runs' parts and start over")
    rep.add_argument("--quiet", action="store_true", help="no progress bar (there is none when stderr is not a terminal)")
    rep.set_defaults(handler=_cmd_reprocess)

    from specserve.export.commands import register as register_export
    from specserve.training.commands import register as register_training

    register_training(sub)
    register_export(sub)
    return parser


def _add_credentials(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("a protected server (docs/security.md)")
    group.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CAs")
    group.add_argument("--tls-ca", type=Path, help="PEM CA that signed the server's certificate (implies --tls)")
    group.add_argument("--tls-client-cert", type=Path, help="PEM client certificate, for mutual TLS")
    group.add_argument("--tls-client-key", type=Path, help="PEM private key of --tls-client-cert")
    group.add_argument("--token-file", type=Path,
                       help="file whose first line is the bearer token (default: $SPECSERVE_TOKEN, if set)")


def _credentials(args: argparse.Namespace):
    from specserve.runtime.client import Credentials

    return Credentials.from_options(args.tls_ca, args.tls_client_cert, args.tls_client_key, args.token_file,
                                    tls=args.tls)


def _repository(args: argparse.Namespace) -> Path:
    """``--repository``, or the default one (the shipped models, or the cache's build when it is
    newer), with the choice explained on stderr."""
    if args.repository:
        return args.repository
    from specserve.runtime.defaults import default_repository

    choice = default_repository()
    print(f"specserve: repository {choice.path}: {choice.reason}", file=sys.stderr, flush=True)
    return choice.path


def _security(args: argparse.Namespace):
    """The server's :class:`~specserve.runtime.serving.security.Security` from the options."""
    from specserve.runtime.serving.security import Security, SecurityError, TLSFiles, Tokens

    if (args.tls_cert is None) != (args.tls_key is None):
        raise SecurityError("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise SecurityError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
    tls = TLSFiles(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    tokens = Tokens.from_file(args.auth_tokens) if args.auth_tokens else None
    return Security(tls=tls, tokens=tokens, model_control=args.model_control, reflection=args.reflection,
                    insecure=args.insecure)


def _limits(args: argparse.Namespace):
    from specserve.runtime.serving.limits import MB, Limits

    try:
        return Limits(max_concurrent_rpcs=args.max_concurrent_rpcs,
                      max_message_bytes=None if args.max_message_mb is None else int(args.max_message_mb * MB),
                      max_queued_bytes=int(args.max_queued_mb * MB), stream_window=args.stream_window,
                      keepalive_s=args.keepalive_s, keepalive_timeout_s=min(20.0, args.keepalive_s / 3))
    except ValueError as exc:
        raise SpecserveError(f"serve: {exc}") from exc


def _cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from specserve.runtime.embedded.providers import resolve_device
    from specserve.runtime.serving.server import serve

    security = _security(args)
    security.check_address(args.host)  # before anything is loaded
    repository = _repository(args)
    if args.log_requests:
        logging.getLogger("specserve.requests").setLevel(logging.INFO)
    device = dataclasses.replace(resolve_device(args.device, args.threads), memory_arena=args.memory_arena == "on")
    limits = _limits(args)
    print(f"specserve: device {device.name}" + (f" ({device.note})" if device.note else ""), file=sys.stderr, flush=True)
    metrics_port = 8002 if args.metrics_port is None else None if args.metrics_port < 0 else args.metrics_port
    metrics_host = security.metrics_host(args.host)
    on_metrics = lambda port: print(f"specserve: metrics on http://{metrics_host}:{port}/metrics",  # noqa: E731
                                    file=sys.stderr, flush=True)
    asyncio.run(serve(repository, args.host, args.port, device=device, poll_repository=args.poll_repository,
                      metrics_port=metrics_port, on_metrics=on_metrics, metrics_required=args.metrics_port is not None,
                      security=security, limits=limits,
                      on_started=lambda port: print(f"specserve: serving {repository} on {args.host}:{port}", flush=True)))
    return 0


def _analyze_remote(args: argparse.Namespace, models: list[str], skipped, output: _AnalyzeOutput) -> int:
    import time

    import grpc

    from specserve.runtime.catalogue import Sources
    from specserve.runtime.client import Client, StreamError
    from specserve.runtime.errors import SpectrumReadError
    from specserve.runtime.io import read_spectra

    sources = Sources()
    progress = _Progress(args)

    def spectra():
        for path in _inputs(args):
            try:
                items = read_spectra(path)
            except SpectrumReadError as exc:
                skipped(str(path), exc.reason)
                continue
            progress.files += 1
            for spectrum in items:
                yield sources.add(spectrum, path)

    with Client(args.server, credentials=_credentials(args)) as client:
        answered: list = []
        try:
            client.wait_until_ready(args.wait)
            output.start(client.provenance())
            written = time.monotonic()
            for row in client.stream(spectra(), models=models, batch_size=args.batch, mc_samples=args.mc_samples,
                                     variant=args.variant):
                answered.append(row)
                progress.spectra += 1
                progress.show()
                if len(answered) >= args.batch or time.monotonic() - written > 1.0:  # rows written as they arrive
                    output.add(sources.pair(answered))
                    answered, written = [], time.monotonic()
            progress.done()
            return 0
        except StreamError as exc:
            print(f"specserve: error: {exc}", file=sys.stderr)
            return 1
        except grpc.RpcError as exc:
            print(f"specserve: error: server {args.server}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        finally:
            output.add(sources.pair(answered))  # what was answered before an error is kept


def _analyze_local(args: argparse.Namespace, models: list[str], skipped, output: _AnalyzeOutput) -> int:
    from specserve.runtime.catalogue import Provenance
    from specserve.runtime.embedded.local import LocalRuntime

    runtime = LocalRuntime(_repository(args), threads=args.threads, memory_arena=args.arena,
                           variant=args.variant or None)
    output.start(Provenance.from_models(runtime.models))
    progress = _Progress(args)
    for pairs in runtime.iter_files(_inputs(args), models, mc_samples=args.mc_samples, batch=args.batch,
                                    on_unreadable=skipped):
        output.add(pairs)
        progress.files = len(output.files)
        progress.spectra += len(pairs)
        progress.show()
    progress.done()
    return 0


class _AnalyzeOutput:
    """Where analyze's rows go as they arrive: a table on the terminal (each model's headline
    values; the catalogue has every column) and the catalogue (``--out``), appended batch by batch,
    so a crash loses nothing already answered."""

    def __init__(self, args: argparse.Namespace):
        self.out = args.out
        self.writer = None
        self.columns: list[str] | None = None
        self.files: set[str] = set()
        self.n_rows = self.n_errors = 0

    def start(self, provenance) -> None:
        from specserve.runtime.catalogue import CatalogueWriter

        if self.out:
            self.writer = CatalogueWriter(self.out, provenance)

    def add(self, pairs) -> None:
        if not pairs:
            return
        if self.columns is None:
            present = {k for _, r in pairs for k in r.values}
            self.columns = [c for c in TERMINAL_COLUMNS if c in present][:6]
            print("  ".join(["file".ljust(40), "id".ljust(28)] + [c.rjust(14) for c in self.columns]))
        for path, row in pairs:
            cells = [f"{row.values[c]:14.5g}" if c in row.values else " " * 14 for c in self.columns]
            note = row.error or "; ".join(row.notes)
            print("  ".join([Path(path).name[:40].ljust(40), row.id[:28].ljust(28)] + cells)
                  + (f"  {note}" if note else ""))
        if self.writer is not None:
            self.writer.add(pairs)
        self.files.update(path for path, _ in pairs)
        self.n_rows += len(pairs)
        self.n_errors += sum(1 for _, r in pairs if not r.ok)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            if self.n_rows:
                print(f"catalogue written to {self.out}")


def _inputs(args: argparse.Namespace):
    """The files of ``analyze``: its arguments and ``--files-from``, folders and globs expanded, one at a time."""
    from specserve.runtime.io import iter_inputs

    return iter_inputs(args.files, args.files_from)


class _Progress:
    """One progress line on stderr, rewritten at most twice a second: files read, spectra
    answered, spectra per second. Silent with --quiet or when stderr is not a terminal."""

    def __init__(self, args: argparse.Namespace):
        import time

        self.on = not args.quiet and sys.stderr.isatty()
        self.files = self.spectra = 0
        self._t0 = self._shown = time.monotonic()

    def show(self, final: bool = False) -> None:
        import time

        now = time.monotonic()
        if not self.on or (not final and now - self._shown < 0.5):
            return
        self._shown = now
        rate = self.spectra / max(now - self._t0, 1e-9)
        print(f"\rspecserve: {self.files} files read, {self.spectra} spectra answered, {rate:,.0f} spectra/s",
              end="\n" if final else "", file=sys.stderr, flush=True)

    def done(self) -> None:
        self.show(final=True)


def _cmd_analyze(args: argparse.Namespace) -> int:
    failed = 0

    def skipped(path: str, reason: str) -> None:
        nonlocal failed
        failed += 1
        print(f"specserve: skipped {path}: {reason}", file=sys.stderr)

    models = [m for m in args.models.split(",") if m]
    if not args.files and args.files_from is None:
        print("specserve: error: analyze needs spectrum files, folders or --files-from", file=sys.stderr)
        return 2
    output = _AnalyzeOutput(args)
    try:
        code = (_analyze_local if args.local else _analyze_remote)(args, models, skipped, output)
    finally:
        output.close()
    if code:
        return code
    print(f"{output.n_rows} spectra analysed, {output.n_errors} rejected, {failed} files unreadable")
    return 1 if failed or output.n_errors else 0


def _cmd_reprocess(args: argparse.Namespace) -> int:
    if not args.inputs and args.files_from is None:
        print("specserve: error: reprocess needs spectrum files, folders or --files-from", file=sys.stderr)
        return 2
    try:
        from specserve.runtime.archive.reprocess import Job, reprocess, rejects_path
    except ImportError as exc:
        print(f"specserve: error: reprocess needs the archive extra (pip install 'specserve[archive]'): {exc}",
              file=sys.stderr)
        return 1
    job = Job(repository=args.repository, models=tuple(m for m in args.models.split(",") if m),
              variant=args.variant or None, mc_samples=args.mc_samples, threads=args.threads)
    summary = reprocess(args.inputs, args.out, job, scheduler=args.scheduler, workers=args.workers,
                        batch_files=args.batch_files, files_from=args.files_from, fresh=args.fresh,
                        progress=False if args.quiet else None)
    print(f"{summary.files} files ({summary.spectra} spectra) analysed in {summary.seconds:.1f} s "
          f"({summary.rate:,.0f} spectra/s on {summary.workers} workers), {summary.rejected} rejected, "
          f"{summary.skipped} already done")
    print(f"catalogue {args.out}: {summary.catalogue_rows} rows"
          + (f"; rejects {rejects_path(args.out)}: {summary.catalogue_rejects} files" if summary.catalogue_rejects else ""))
    return 0


TERMINAL_COLUMNS = ("p_cv", "teff", "logg", "feh", "age", "mass", "reduced_chi2", "teff_err", "age_err", "mass_err")


def _cmd_inspect(args: argparse.Namespace) -> int:
    from specserve.runtime.datakit import data_dir, inspect_file, inspect_kit

    if args.paths:
        entries = [inspect_file(p.resolve(), p.resolve().parent) for p in args.paths]
    else:
        root = data_dir(args.data)
        print(f"data kit: {root}")
        entries = inspect_kit(root)
    failed = 0
    for e in entries:
        if e.ok:
            waves = f"{e.wave_min:8.1f}-{e.wave_max:8.1f} A" if e.wave_min is not None else ""
            count = f"{e.n_spectra:4d} spectra" if e.kind == "spectrum" else ""
            print(f"ok    {e.path:60s} {e.kind:10s} {e.detail:22s} {count:12s} {waves}")
        else:
            failed += 1
            print(f"FAIL  {e.path:60s} {e.error}")
    n_spectra = sum(e.n_spectra for e in entries)
    print(f"{len(entries)} files, {n_spectra} spectra, {failed} unreadable")
    return 1 if failed else 0


def _cmd_build(args: argparse.Namespace) -> int:
    from specserve.training import benchsets

    for name in args.names:
        seed = benchsets.DEFAULT_SEED if args.seed is None else args.seed
        bench, folder = benchsets.build(name, data=args.data, cache=args.cache, seed=seed, plot=not args.no_plot)
        splits = ", ".join(f"{k} {v}" for k, v in bench.meta["split_sizes"].items())
        print(f"{name}: {bench.size} spectra x {bench.arrays['flux'].shape[1]} px ({splits})")
        print(f"  sha256 {bench.meta['content_hash']}")
        print(f"  written to {folder}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from specserve.export.bench.engine import run_preprocess
    from specserve.runtime.datakit import data_dir

    print(run_preprocess(data_dir(args.data), n=args.n).report())
    return 0


def _cmd_bench_mc(args: argparse.Namespace) -> int:
    from specserve.export.bench.engine import run_mc
    from specserve.runtime.errors import ModelNotFoundError

    folder = _repository(args) / args.model
    versions = sorted((int(p.name) for p in folder.glob("[0-9]*") if (p / "model.onnx").is_file()), reverse=True)
    if not versions:
        raise ModelNotFoundError(f"no model.onnx under {folder} (`specserve models build` builds the default models)")
    print(run_mc(folder / str(versions[0]) / "model.onnx", args.batch, args.samples, threads=args.threads).report())
    return 0


def _cmd_bench_all(args: argparse.Namespace) -> int:
    from specserve.training.common import require_training_extra

    require_training_extra(0)  # the ORT-vs-torch rows need torch
    from specserve.export.bench.suite import run_all

    run_all(_repository(args), args.out, quick=args.quick, runs=args.runs)
    print(f"wrote {args.out}")
    return 0


def _cmd_bench_embedded(args: argparse.Namespace) -> int:
    from specserve.export.bench.embedded import run

    print(run(_repository(args), args.out, quick=args.quick))
    print(f"wrote the Embedded section of {args.out}")
    return 0


def _cmd_bench_reprocess(args: argparse.Namespace) -> int:
    from specserve.export.bench.reprocess import run

    print(run(Path(_repository(args)).resolve(), args.out, quick=args.quick))
    print(f"wrote the Reprocess section of {args.out}")
    return 0


def _cmd_bench_load(args: argparse.Namespace) -> int:
    import grpc

    from specserve.export.bench.serving import remote_load

    try:
        lines = remote_load(args.server, _repository(args), args.model, _credentials(args), args.rate, args.seconds)
    except grpc.RpcError as exc:
        print(f"specserve: error: server {args.server}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


def _cmd_bench_gpu(args: argparse.Namespace) -> int:
    from specserve.training.common import require_training_extra

    require_training_extra(0)
    from specserve.export.bench.suite import gpu_check

    return 0 if gpu_check(_repository(args), args.out, args.device, quick=args.quick) else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handlers = {"data": {"inspect": _cmd_inspect, "build": _cmd_build}, "bench": {"preprocess": _cmd_bench, "mc": _cmd_bench_mc}}
    try:
        if args.command == "serve":
            return _cmd_serve(args)
        if args.command == "analyze":
            return _cmd_analyze(args)
        if args.command == "watch":
            from specserve.runtime.client.watch import watch

            return watch(args.folder, args.out, args.server, rejects=args.rejects, once=args.once,
                         models=[m for m in args.models.split(",") if m], pattern=args.pattern,
                         poll=args.poll, mc_samples=args.mc_samples, credentials=_credentials(args))
        if hasattr(args, "handler"):
            return args.handler(args)
        return handlers[args.command][getattr(args, f"{args.command}_command")](args)
    except SpecserveError as exc:
        print(f"specserve: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
