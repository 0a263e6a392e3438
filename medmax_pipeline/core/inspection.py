"""`medmax inspect FILE`: print an artifact's footer metadata and walk its lineage back."""

from __future__ import annotations

import argparse
import sys

from medmax_pipeline.core.artifacts import STALE, ArtifactError, check_meta, format_meta, lineage_tree, read_meta


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", help="parquet artifacts to inspect")
    parser.add_argument("--no-lineage", action="store_true", help="print the metadata only")


def run(args: argparse.Namespace) -> int:
    status = 0
    for path in args.files:
        try:
            meta = read_meta(path)
            print(format_meta(meta))
            try:
                check_meta(meta, None)
            except ArtifactError as exc:
                print(f"warning: {exc}")
                status = 1
            if not args.no_lineage:
                lines = lineage_tree(path)
                print("lineage:")
                print("\n".join("  " + line for line in lines))
                stale = [line.strip().split(": ")[0] for line in lines if line.endswith(STALE)]
                if stale:
                    print(f"warning: {len(stale)} input(s) changed since {path} was written (stale): {', '.join(stale)}")
                    status = 1
        except ArtifactError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
        print()
    return status
