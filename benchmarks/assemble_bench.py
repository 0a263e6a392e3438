"""Benchmark of stage 4 (assemble) on a synthetic MedMax-sized input.

    python benchmarks/assemble_bench.py --scale 0.01          # quick
    python benchmarks/assemble_bench.py --scale 1             # 1.47M rows, ~14 GB of jsonl

Generates, in a temporary folder on disk: a row file of round(1.47M * scale) rows (about one image
per row, ~1.3k ids per published sequence, a --credentialed-share of credential = yes rows with
MIMIC-style ids and empty tokens), the image_blocks of the credentialed images, empty problem
artifacts and a small Chameleon-layout tokenizer. Then runs `medmax assemble` in a subprocess at
10% and at 100% of the rows (wall time, rows/s, peak RSS from the child's ru_maxrss), and a
straightforward pandas implementation of the same job on a slice, beside the stage on that slice.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medmax_pipeline.core import constants as C  # noqa: E402
from medmax_pipeline.core.artifacts import ArtifactWriter, write_artifact  # noqa: E402
from medmax_pipeline.core.text_tokenizer import build_chameleon_tokenizer  # noqa: E402

FULL_ROWS = 1_470_000
SOURCE = "mimic_cxr"
TEMPLATE = "files/p{subject_id:.2}/p{subject_id}/s{study_id}/{dicom_id}.jpg"
WORDS = "the chest radiograph shows no acute cardiopulmonary process heart size normal lungs clear pleural effusion pneumothorax lesion biopsy tissue stain cells".split()
TASKS = ["VQA", "Visual Chat", "Image Captioning", "Multimodal Generation", "Image Generation", "Report Understanding"]
PUBLIC_SOURCES = ["pmc_oa", "quilt", "slake", "pathvqa", "vqa_rad", "llava_med"]


def make_text(rng: np.random.Generator, n_words: int, images: int) -> str:
    words = rng.choice(WORDS, n_words).tolist()
    prompt = " ".join(words[: n_words // 3])
    answer = " ".join(words[n_words // 3:])
    return " ".join(["<image>"] * images) + " " + prompt + " <reserved08706> " + answer


def block(rng: np.random.Generator) -> np.ndarray:
    return np.concatenate([[C.BEGIN_IMAGE_ID], rng.integers(0, C.NUM_IMAGE_CODES, C.CODES_PER_IMAGE) + C.IMAGE_CODE_OFFSET, [C.END_IMAGE_ID]])


def generate(work: Path, n_rows: int, credentialed_share: float, seed: int = 0) -> dict[str, Path]:
    """Write the row file, the upstream artifacts and the tokenizer; return their paths."""
    rng = np.random.default_rng(seed)
    _, tokenizer = build_chameleon_tokenizer(work / "tokenizer", [make_text(rng, 200, 1) for _ in range(200)], text_vocab_size=2000)
    # A pool of distinct public rows (json prefix before the image path, suffix after): rows
    # repeat pool entries with their own image_path, so generating 14 GB stays I/O bound.
    pool = []
    for i in range(512):
        images = 1 if rng.random() < 0.9 else 0
        text = make_text(rng, int(rng.integers(150, 350)), images)
        text_ids = rng.integers(8800, 65536, int(rng.integers(200, 400)))
        tokens = [C.BOS_ID] + (np.concatenate([text_ids[:50], block(rng), text_ids[50:]]) if images else text_ids).tolist() + [C.EOS_ID]
        head = json.dumps({"text": text, "tokens": tokens, "task": TASKS[i % 5], "source": PUBLIC_SOURCES[i % 6], "credential": "no"})[:-1]
        pool.append((head.encode(), images))
    cred_texts = [make_text(rng, int(rng.integers(150, 350)), 1) for _ in range(64)]
    rows_path = work / "train.jsonl"
    n_cred = 0
    with open(rows_path, "wb", buffering=1 << 24) as f:
        choice = rng.integers(0, len(pool), n_rows)
        is_cred = rng.random(n_rows) < credentialed_share
        for i in range(n_rows):
            if is_cred[i]:
                subject = 10_000_000 + n_cred
                line = json.dumps({"text": cred_texts[i % 64], "tokens": [], "task": "Report Understanding", "source": SOURCE,
                                   "credential": "yes", "subject_id": str(subject), "study_id": str(50_000_000 + n_cred), "dicom_id": f"d{n_cred}"})
                f.write(line.encode() + b"\n")
                n_cred += 1
            else:
                head, images = pool[choice[i]]
                f.write(head + (b', "image_path": "img/%d.jpg"}\n' % i if images else b"}\n"))
    blocks_path = work / "image_blocks.parquet"
    schema = pa.schema([("image_key", pa.string()), ("img_path", pa.string()), ("credential", pa.string()), ("block", pa.list_(pa.int32()))])
    with ArtifactWriter(blocks_path, schema, artifact="image_blocks") as writer:
        for start in range(0, n_cred, 8192):
            ids = range(start, min(start + 8192, n_cred))
            keys = [f"{SOURCE}:files/p10/p{10_000_000 + j}/s{50_000_000 + j}/d{j}.jpg" for j in ids]
            flat = (rng.integers(0, C.NUM_IMAGE_CODES, (len(keys), C.CODES_PER_IMAGE)) + C.IMAGE_CODE_OFFSET).astype(np.int32)
            full = np.concatenate([np.full((len(keys), 1), C.BEGIN_IMAGE_ID, np.int32), flat, np.full((len(keys), 1), C.END_IMAGE_ID, np.int32)], axis=1)
            offsets = pa.array(np.arange(len(keys) + 1, dtype=np.int32) * C.IMAGE_BLOCK_LEN)
            writer.write(pa.table({"image_key": keys, "img_path": keys, "credential": ["yes"] * len(keys),
                                   "block": pa.ListArray.from_arrays(offsets, pa.array(full.ravel()))}, schema=schema))
    path_problems = work / "image_path_problems.parquet"
    write_artifact(pa.table({"file": pa.array([], pa.string()), "line": pa.array([], pa.int64()), "row_id": pa.array([], pa.string()),
                             "split": pa.array([], pa.string()), "source": pa.array([], pa.string()), "credential": pa.array([], pa.string()),
                             "image_key": pa.array([], pa.string()), "reason": pa.array([], pa.string())}), path_problems, artifact="image_path_problems")
    token_errors = work / "image_token_errors.parquet"
    write_artifact(pa.table({"img_path": pa.array([], pa.string()), "image_key": pa.array([], pa.string()), "credential": pa.array([], pa.string()),
                             "reason": pa.array([], pa.string())}), token_errors, artifact="image_token_errors")
    return {"rows": rows_path, "image_blocks": blocks_path, "path_problems": path_problems, "token_errors": token_errors, "tokenizer": tokenizer}


def head_lines(src: Path, dst: Path, n: int) -> Path:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for i, line in enumerate(fin):
            if i >= n:
                break
            fout.write(line)
    return dst


def _tree_memory_kb(root: int) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) in kB over `root` and all its descendants, read from /proc.
    PSS splits shared pages (libraries, the workers' shared-memory handoff files) between the
    processes that map them, so its sum is the memory the whole stage holds."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    rss = pss = 0
    todo = [root]
    while todo:
        pid = todo.pop()
        todo.extend(parents.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:
            continue
    return rss, pss


def run_stage(paths: dict[str, Path], rows: Path, out: Path, workers: int | None = None) -> dict[str, float]:
    """Run `medmax assemble` in a child; wall time and peak memory: the largest single process
    (ru_maxrss, as before the stage had worker processes) and the sampled sum over the stage's
    process tree (the stage's main process and its workers)."""
    argv = [sys.executable, "-m", "medmax_pipeline", "assemble", "--rows", str(rows), "--split", "train",
            "--image-blocks", str(paths["image_blocks"]), "--path-problems", str(paths["path_problems"]),
            "--token-errors", str(paths["token_errors"]), "--tokenizer", str(paths["tokenizer"]),
            "--credentialed", f"{SOURCE}=/nonexistent={TEMPLATE}", "--max-length", "2048", "--overflow", "truncate",
            "--max-error-fraction", "0.01", "--output-dir", str(out)]
    if workers is not None:
        argv += ["--workers", str(workers)]
    # A fresh wrapper per run, so RUSAGE_CHILDREN holds this run's peak only.
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); r = subprocess.run(sys.argv[1:]);"
               "u = resource.getrusage(resource.RUSAGE_CHILDREN);"
               "print('BENCH', r.returncode, time.perf_counter() - t, u.ru_maxrss, u.ru_utime + u.ru_stime)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", wrapper, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak_rss_kb = peak_pss_kb = 0
    while proc.poll() is None:
        rss_kb, pss_kb = _tree_memory_kb(proc.pid)
        peak_rss_kb, peak_pss_kb = max(peak_rss_kb, rss_kb), max(peak_pss_kb, pss_kb)
        time.sleep(1.0)  # reading smaps_rollup walks the page tables: sampling more often costs the stage CPU
    stdout, stderr = proc.communicate()
    bench = [line for line in stdout.splitlines() if line.startswith("BENCH")]
    if not bench or bench[-1].split()[1] != "0":
        raise SystemExit(f"stage failed:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    _, _, wall, rss_kb, cpu = bench[-1].split()
    n_rows = sum(1 for _ in open(rows, "rb"))
    return {"rows": n_rows, "wall_s": float(wall), "rows_per_s": n_rows / float(wall), "peak_rss_mb": int(rss_kb) / 1024,
            # CPU seconds of the stage and its workers: unlike wall time, not skewed by other work
            # on the machine; cpu_s / cores is the least wall time the stage could take here.
            "cpu_s": float(cpu), "peak_tree_rss_mb": peak_rss_kb / 1024, "peak_tree_pss_mb": peak_pss_kb / 1024,
            "output_mb": sum(p.stat().st_size for p in out.glob("*.parquet")) / 1e6}


def pandas_job(paths: dict[str, Path], rows: Path, out: Path) -> dict[str, float]:
    """The same job written plainly with pandas: per-row Python checks and sequence building."""
    import pandas as pd

    from medmax_pipeline.core.sequences import check_image_block
    from medmax_pipeline.core.image_keys import CredentialedSource, image_key_for_row
    from medmax_pipeline.core.text_tokenizer import load_tokenizer

    start = time.perf_counter()
    df = pd.read_json(rows, lines=True, dtype=False)
    blocks = pd.read_parquet(paths["image_blocks"])
    lookup = dict(zip(blocks["image_key"], blocks["block"]))
    tokenizer = load_tokenizer(paths["tokenizer"])
    sources = {SOURCE: CredentialedSource(SOURCE, "/nonexistent", TEMPLATE)}
    extra_cols = [c for c in df.columns if c not in ("text", "tokens", "image_path", "task", "source", "credential")]
    out_tokens, keep, problems = [], [], []
    for i, row in enumerate(df.to_dict("records")):
        n_img = row["text"].count("<image>")
        if row["credential"] == "no":
            toks = list(row["tokens"])
            ok = toks and toks[0] == 0 and toks[-1] == 2 and all(0 <= t < 65536 for t in toks)
            starts = [j for j, t in enumerate(toks) if t == C.BEGIN_IMAGE_ID]
            ok = ok and len(starts) == n_img and all(check_image_block(toks[s:s + C.IMAGE_BLOCK_LEN]) is None for s in starts)
        else:
            extra = json.dumps({c: row[c] for c in extra_cols if isinstance(row[c], str)})
            key = image_key_for_row({**row, "extra": extra}, sources).key
            blk = lookup.get(key)
            ok = blk is not None
            if ok:
                ids = tokenizer.encode(row["text"], add_special_tokens=False).ids
                toks = [0]
                for t in ids:
                    toks.extend(blk.tolist() if t == C.IMAGE_PLACEHOLDER_ID else [t])
                toks.append(2)
        if ok:
            if len(toks) > 2048:
                cut = 2048
                for s in [j for j, t in enumerate(toks[:2048]) if t == C.BEGIN_IMAGE_ID]:
                    if s + C.IMAGE_BLOCK_LEN > 2048:
                        cut = s
                toks = toks[:cut]
            out_tokens.append(toks)
            keep.append(i)
        else:
            problems.append(i)
    result = df.iloc[keep].copy()
    result["tokens"] = out_tokens
    result["n_tokens"] = [len(t) for t in out_tokens]
    result.drop(columns=extra_cols).to_parquet(out / "dataset_pandas.parquet")
    result[result["credential"] == "no"].drop(columns=extra_cols).to_parquet(out / "dataset_public_pandas.parquet")
    wall = time.perf_counter() - start
    return {"rows": len(df), "wall_s": wall, "rows_per_s": len(df) / wall, "pandas": pd.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.01, help="fraction of the 1.47M rows")
    parser.add_argument("--credentialed-share", type=float, default=0.1)
    parser.add_argument("--pandas-rows", type=int, default=20000, help="slice for the pandas comparison")
    parser.add_argument("--workdir", help="keep inputs and outputs here (default: a temporary folder, removed)")
    parser.add_argument("--workers", type=int, help="passed to the stage (default: the stage's own, one per core up to 4)")
    args = parser.parse_args()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="assemble_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        n_rows = max(10, round(FULL_ROWS * args.scale))
        t = time.perf_counter()
        paths = generate(work, n_rows, args.credentialed_share)
        size_gb = paths["rows"].stat().st_size / 1e9
        print(f"generated {n_rows} rows ({size_gb:.2f} GB jsonl) in {time.perf_counter() - t:.0f} s", flush=True)
        results = {}
        tenth = head_lines(paths["rows"], work / "train_10pct.jsonl", max(1, n_rows // 10))
        results["stage_10pct"] = run_stage(paths, tenth, work / "out_10pct", args.workers)
        print(json.dumps({"stage_10pct": results["stage_10pct"]}), flush=True)
        results["stage_100pct"] = run_stage(paths, paths["rows"], work / "out_100pct", args.workers)
        print(json.dumps({"stage_100pct": results["stage_100pct"]}), flush=True)
        slice_rows = head_lines(paths["rows"], work / "train_slice.jsonl", min(args.pandas_rows, n_rows))
        results["stage_slice"] = run_stage(paths, slice_rows, work / "out_slice", args.workers)
        (work / "out_pandas").mkdir(exist_ok=True)
        results["pandas_slice"] = pandas_job(paths, slice_rows, work / "out_pandas")
        results["ratio_stage_vs_pandas_rows_per_s_on_slice"] = results["stage_slice"]["rows_per_s"] / results["pandas_slice"]["rows_per_s"]
        results["ratio_stage_full_vs_pandas_rows_per_s"] = results["stage_100pct"]["rows_per_s"] / results["pandas_slice"]["rows_per_s"]
        results["rss_growth_100_vs_10"] = results["stage_100pct"]["peak_rss_mb"] / results["stage_10pct"]["peak_rss_mb"]
        results["tree_pss_growth_100_vs_10"] = results["stage_100pct"]["peak_tree_pss_mb"] / results["stage_10pct"]["peak_tree_pss_mb"]
        results["tree_rss_growth_100_vs_10"] = results["stage_100pct"]["peak_tree_rss_mb"] / results["stage_10pct"]["peak_tree_rss_mb"]
        results["input_gb"] = size_gb
        results["cpus"] = os.cpu_count()
        results["load_average_after"] = os.getloadavg()  # other work on the machine skews the timings
        print(json.dumps(results, indent=2))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
