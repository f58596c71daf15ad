"""Tokenize stage throughput against raw tiktoken, and the stage's peak memory.

    python -m benchmarks.tokenize [--mb 64] [--memory-mb 200]

Builds a corpus by repeating `../shared/data/tinyshakespeare.txt` (or $LLM_MIRROR_DIR's copy) to `--mb`
MB in a temporary folder, then measures, each in a process of its own and on the same cores:
- reference: `encode_ordinary_batch` of tiktoken over the text, already in memory, in 256K-character
  pieces (its best case: no reading, no splitting of documents, no writing);
- the stage: `tokenize_corpus` end to end (read, decode, split, encode, write shards and manifest).
Then the stage alone on a `--memory-mb` corpus, for its peak memory. Last line: `tokenize_vs_tiktoken=R`
(goal: at least 0.9).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import emit, run_worker

ROOT = Path(__file__).resolve().parents[1]


def source_text() -> Path:
    mirror = os.environ.get("LLM_MIRROR_DIR")
    for folder in filter(None, [mirror, ROOT.parent / "shared" / "data"]):
        if (Path(folder) / "tinyshakespeare.txt").is_file():
            return Path(folder) / "tinyshakespeare.txt"
    raise SystemExit("tinyshakespeare.txt not found: set LLM_MIRROR_DIR to a folder that holds it")


def build_corpus(folder: Path, megabytes: int) -> Path:
    """data/raw as the download stage leaves it, with one big text file."""
    from llm.download import write_manifests

    text = source_text().read_bytes()
    path = folder / "raw" / "corpus" / "corpus.txt"
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:
        for _ in range(-(-megabytes * 1_000_000 // len(text))):
            f.write(text)
    write_manifests(folder / "raw", [{"name": "corpus", "role": "corpus", "kind": "text", "text_field": None,
                                      "file": "corpus/corpus.txt", "url": str(path), "sha256": "", "bytes": 0}])
    return folder / "raw"


def reference_worker(raw: Path) -> None:
    from llm.documents import read_text
    from llm.tokenizer import get_tokenizer

    enc = get_tokenizer("gpt2")
    pieces = [p.text for p in read_text(raw / "corpus" / "corpus.txt")]
    start = time.perf_counter()
    ids = enc.encode_ordinary_batch(pieces, num_threads=os.cpu_count() or 1)
    seconds = time.perf_counter() - start
    emit({"tokens": sum(map(len, ids)), "seconds": seconds})


def stage_worker(raw: Path) -> None:
    from llm.config import TokenizeConfig
    from llm.tokenize import tokenize_corpus

    result = tokenize_corpus(raw, raw.parent / "shards", TokenizeConfig())
    emit({"tokens": result.metrics["tokens"], "seconds": result.seconds})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=64, help="corpus size for the throughput comparison")
    parser.add_argument("--memory-mb", type=int, default=200, help="corpus size for the peak-memory run (0: skip)")
    parser.add_argument("--worker", choices=["reference", "stage"], help=argparse.SUPPRESS)
    parser.add_argument("--raw", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        (reference_worker if args.worker == "reference" else stage_worker)(args.raw)
        return

    print(f"cores: {os.cpu_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        raw = build_corpus(Path(tmp), args.mb)
        size_mb = (raw / "corpus" / "corpus.txt").stat().st_size / 1e6
        ref = run_worker("benchmarks.tokenize", "--worker", "reference", "--raw", str(raw))
        ours = run_worker("benchmarks.tokenize", "--worker", "stage", "--raw", str(raw))
    for name, r in (("tiktoken encode_ordinary_batch (text in memory)", ref), ("tokenize stage (end to end)", ours)):
        print(f"{name}: {r['tokens']:,} tokens from {size_mb:.0f} MB in {r['seconds']:.2f} s = "
              f"{r['tokens'] / r['seconds']:,.0f} tokens/s, peak RSS {r['peak_rss_mib']:,.0f} MiB")
    if ref["tokens"] + 1 != ours["tokens"]:  # the stage adds one end-of-text token
        raise SystemExit(f"token counts differ: reference {ref['tokens']}, stage {ours['tokens']}")
    if args.memory_mb:
        with tempfile.TemporaryDirectory() as tmp:
            raw = build_corpus(Path(tmp), args.memory_mb)
            big = run_worker("benchmarks.tokenize", "--worker", "stage", "--raw", str(raw))
        print(f"tokenize stage on {args.memory_mb} MB: {big['tokens']:,} tokens in {big['seconds']:.1f} s, "
              f"peak RSS {big['peak_rss_mib']:,.0f} MiB (goal: under 1024)")
    ratio = (ours["tokens"] / ours["seconds"]) / (ref["tokens"] / ref["seconds"])
    print(f"tokenize_vs_tiktoken={ratio:.2f}")


if __name__ == "__main__":
    main()
