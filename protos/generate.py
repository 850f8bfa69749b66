"""Regenerate the Python modules of the ``.proto`` files in this folder.

    python -m specserve.protos.generate          # rewrite the committed modules
    python -m specserve.protos.generate --check  # exit 1 if they are out of date

``python protos/generate.py`` works too. Each ``NAME.proto`` gives ``NAME_pb2.py``,
``NAME_pb2.pyi`` and ``NAME_pb2_grpc.py``. protoc runs with an include root in which the protos
sit at ``specserve/protos/``, so the generated modules import each other through the package
(``from specserve.protos import NAME_pb2``) and register their files in the descriptor pool as
``specserve/protos/NAME.proto``.

Needs grpcio-tools (a dev dependency). The output depends only on the proto files and the
grpcio-tools version (pinned in pyproject.toml), so regenerating twice gives identical files.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE_PATH = Path("specserve", "protos")
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files(source: Path = HERE) -> list[Path]:
    return sorted(source.glob("*.proto"))


def expected_outputs(source: Path = HERE) -> list[str]:
    return sorted(p.stem + suffix for p in proto_files(source) for suffix in SUFFIXES)


def _is_generated(name: str) -> bool:
    return name.endswith(SUFFIXES)


def generate(out_dir: Path, source: Path = HERE) -> list[str]:
    """Compile every proto of ``source`` into ``out_dir``; the names of the files written."""
    from grpc_tools import protoc

    protos = proto_files(source)
    if not protos:
        raise RuntimeError(f"no .proto files in {source}")
    with tempfile.TemporaryDirectory(prefix="specserve-protoc-") as tmp:
        root = Path(tmp, "include")
        package_dir = root / PACKAGE_PATH
        package_dir.mkdir(parents=True)
        for proto in protos:
            shutil.copyfile(proto, package_dir / proto.name)
        built = Path(tmp, "out")
        built.mkdir()
        args = [
            "grpc_tools.protoc",
            f"--proto_path={root}",
            f"--python_out={built}",
            f"--pyi_out={built}",
            f"--grpc_python_out={built}",
            *(str(PACKAGE_PATH / proto.name) for proto in protos),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed (see the messages above)")
        produced = sorted(p.name for p in (built / PACKAGE_PATH).iterdir())
        if produced != expected_outputs(source):
            raise RuntimeError(f"protoc wrote {produced}, expected {expected_outputs(source)}")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in produced:
            shutil.copyfile(built / PACKAGE_PATH / name, out_dir / name)
    return produced


def stale_files(target: Path = HERE) -> list[str]:
    """Generated-looking modules in ``target`` without a proto of their own."""
    expected = set(expected_outputs(target))
    return sorted(p.name for p in target.iterdir() if _is_generated(p.name) and p.name not in expected)


def check(target: Path = HERE) -> list[str]:
    """Names of the committed files that differ from a fresh generation (missing and stale included)."""
    with tempfile.TemporaryDirectory(prefix="specserve-protos-check-") as tmp:
        fresh = Path(tmp)
        differ = [
            name for name in generate(fresh, target)
            if not (target / name).is_file() or (target / name).read_bytes() != (fresh / name).read_bytes()
        ]
    return sorted(differ + stale_files(target))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specserve.protos.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="regenerate into a temporary folder and exit 1 if the committed modules differ")
    args = parser.parse_args(argv)
    if args.check:
        differ = check()
        if differ:
            print("out of date (run `python -m specserve.protos.generate`):", file=sys.stderr)
            for name in differ:
                print(f"  {name}", file=sys.stderr)
            return 1
        print(f"generated modules are up to date ({len(expected_outputs())} files)")
        return 0
    written = generate(HERE)
    for name in stale_files():
        (HERE / name).unlink()
        print(f"removed stale {name}")
    print(f"wrote {', '.join(written)} in {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
