"""Task corpora as Ray Datasets: read (JSONL, Parquet, Hugging Face datasets), then tokenize and
pack whole blocks into fixed-length rows in CPU tasks.

Everything a task needs arrives through its keyword arguments; the only process-level state is a
cache of loaded tokenizers (loading one per block would dominate small blocks).
"""

from __future__ import annotations

import functools
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from esft.data import DataError, PackedRow, iter_packed_rows, parse_line, parse_record, tokenize_conversations


@dataclass(frozen=True)
class Source:
    """One corpus: where it is, how to read it, and the task name its outputs are filed under."""

    spec: str
    kind: str  # "jsonl" | "parquet" | "hf_disk" | "hf_hub"
    task: str


def resolve_source(spec: str) -> Source:
    """Classify a --data argument; local paths must exist, anything else is a hub dataset name."""
    path = Path(spec)
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        return Source(spec, "jsonl", path.stem)
    if path.is_file() and path.suffix == ".parquet":
        return Source(spec, "parquet", path.stem)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            return Source(spec, "hf_disk", path.name)
        if any(path.glob("*.parquet")):
            return Source(spec, "parquet", path.name)
        if any(path.glob("*.jsonl")):
            return Source(spec, "jsonl", path.name)
        raise DataError(f"{spec}: a directory with no *.jsonl, *.parquet or saved Hugging Face dataset in it")
    if path.suffix in (".jsonl", ".json", ".parquet") or spec.startswith((".", "/")):
        raise DataError(f"{spec}: no such file; pass an existing JSONL/Parquet file, a directory, or a hub dataset name")
    return Source(spec, "hf_hub", spec.rstrip("/").split("/")[-1])


def unique_task_names(sources: list[Source]) -> list[Source]:
    """Give every source a distinct task name (a, a-2, a-3 ...)."""
    seen: dict[str, int] = {}
    named = []
    for source in sources:
        seen[source.task] = seen.get(source.task, 0) + 1
        name = source.task if seen[source.task] == 1 else f"{source.task}-{seen[source.task]}"
        named.append(Source(source.spec, source.kind, name))
    return named


def check_readable(source: Source) -> None:
    """Fail fast on a local JSONL file whose first record is not ESFT data."""
    if source.kind != "jsonl" or not Path(source.spec).is_file():
        return
    with open(source.spec, encoding="utf-8-sig", errors="replace") as handle:
        for lineno, line in enumerate(handle, 1):
            if line.strip():
                parse_line(line, f"{source.spec}:{lineno}")
                return
    raise DataError(f"{source.spec}: the file is empty; give a JSONL file with one conversation per line")


BLOCK_BYTES = 128 * 2**20
# Packed rows per streamed chunk (rounded to whole batches): small enough that the first forward
# starts within a second, large enough that per-chunk overhead is noise.
CHUNK_ROWS = 64


def _num_blocks(total_bytes: int) -> int:
    """How many blocks a corpus is read into: a function of its size alone. Ray's default depends
    on the cluster's CPUs, and block boundaries decide shuffling and packing, so a default would
    make the sampled rows differ between a laptop and a cluster."""
    return max(1, math.ceil(total_bytes / BLOCK_BYTES))


def _local_bytes(spec: str, pattern: str) -> int:
    path = Path(spec)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.glob(pattern))


def read_source(source: Source) -> ray.data.Dataset:
    if source.kind == "jsonl":
        return ray.data.read_text(source.spec, override_num_blocks=_num_blocks(_local_bytes(source.spec, "*.jsonl")))
    if source.kind == "parquet":
        return ray.data.read_parquet(source.spec, override_num_blocks=_num_blocks(_local_bytes(source.spec, "*.parquet")))
    import datasets  # only needed for Hugging Face datasets

    if source.kind == "hf_disk":
        hf = datasets.load_from_disk(source.spec)
    else:
        hf = datasets.load_dataset(source.spec, split="train")
    if isinstance(hf, datasets.DatasetDict):
        hf = hf["train"] if "train" in hf else next(iter(hf.values()))
    return ray.data.from_huggingface(hf, override_num_blocks=_num_blocks(int(hf.data.nbytes)))


@functools.cache
def cached_tokenizer(name: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)


def pack_block(
    table: pa.Table,
    *,
    kind: str,
    where: str,
    tokenizer: str,
    trust_remote_code: bool,
    template: str,
    seq_len: int,
    seed: int,
    max_tokens: int,
    loss_tokens_only: bool,
    chunk_rows: int,
) -> Iterator[dict[str, np.ndarray]]:
    """One block of raw rows -> packed rows, in a seeded order, stopping after `max_tokens`
    counted tokens (no single block is ever needed beyond the whole budget).

    Streams: rows are parsed, tokenized and packed lazily and yielded `chunk_rows` at a time, so
    the replicas start computing on the first chunk while the rest is packed (a whole 1M-token
    block took seconds to pack before the first forward). The rows, their order and thus every
    batch are the same whatever `chunk_rows` is, as long as it is a multiple of the batch size.

    Malformed rows (among those read before the budget is reached) are skipped; their count and
    one example travel with the first row of the chunk that follows them, so the driver can
    report them."""
    tok = cached_tokenizer(tokenizer, trust_remote_code)
    records = table.to_pylist()
    random.Random(seed).shuffle(records)
    skips = {"count": 0, "example": ""}

    def conversations():
        for record in records:
            try:
                conversation = parse_line(record["text"], where) if kind == "jsonl" else parse_record(_plain(record), where)
            except DataError as error:
                skips["count"] += 1
                skips["example"] = skips["example"] or str(error)
                continue
            if conversation is not None:
                yield conversation

    samples = tokenize_conversations(conversations(), tok, template=template)
    packed = iter_packed_rows(samples, seq_len, pad_id=pad_id_of(tok), bos_id=tok.bos_token_id, random_concat_ratio=0.0,
                              seed=seed)
    chunk, counted, reported = [], 0, 0
    for row in packed:
        chunk.append(row)
        counted += sum(1 for label, m in zip(row.labels, row.attention_mask) if m and (label != -100 or not loss_tokens_only))
        if counted >= max_tokens:
            break
        if len(chunk) == chunk_rows:
            yield _packed_arrays(chunk, seq_len, loss_tokens_only, skips["count"] - reported, skips["example"])
            reported, chunk = skips["count"], []
    if not chunk and skips["count"] > reported:
        # Nothing usable since the last chunk: one all-padding row still carries the skip count.
        chunk.append(PackedRow([pad_id_of(tok)] * seq_len, [-100] * seq_len, [0] * seq_len))
    if chunk:
        yield _packed_arrays(chunk, seq_len, loss_tokens_only, skips["count"] - reported, skips["example"])


def _packed_arrays(rows: list[PackedRow], seq_len: int, loss_tokens_only: bool, skipped: int,
                   example: str) -> dict[str, np.ndarray]:
    n = len(rows)
    attention = np.asarray([row.attention_mask for row in rows], np.int8).reshape(n, seq_len)
    labels = np.asarray([row.labels for row in rows], np.int64).reshape(n, seq_len)
    return {
        "input_ids": np.asarray([row.input_ids for row in rows], np.int64).reshape(n, seq_len),
        "attention_mask": attention,
        "token_mask": attention * (labels != -100) if loss_tokens_only else attention,
        "skipped_rows": np.asarray([skipped] + [0] * (n - 1), np.int64),
        "skipped_example": np.asarray([example if skipped else ""] + [""] * (n - 1), dtype=object),
    }


def pad_id_of(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id  # padding is masked out; any id works
    raise DataError("the tokenizer has neither a pad nor an eos token; give one that has")


def _plain(record: dict) -> dict:
    """Arrow/Hugging Face rows may hold JSON strings for nested columns; decode them."""
    messages = record.get("messages")
    if isinstance(messages, str):
        try:
            record = {**record, "messages": json.loads(messages)}
        except json.JSONDecodeError:
            pass
    return record


def packed_dataset(source: Source, *, tokenizer: str, trust_remote_code: bool, template: str, seq_len: int,
                   seed: int, max_tokens: int, loss_tokens_only: bool, batch_size: int) -> ray.data.Dataset:
    """Read, shuffle (seeded block order, then a seeded order inside each block), tokenize and
    pack a source. Blocks are packed whole, so packing never depends on how many replicas run;
    each comes out in chunks of whole batches (`batch_size` rows each), one chunk per block, so the
    replicas' batches are the same rows whatever the chunking and any free replica can take the next
    chunk."""
    chunk_rows = batch_size * max(1, CHUNK_ROWS // batch_size)
    return (
        read_source(source)
        .randomize_block_order(seed=seed)
        .map_batches(
            pack_block,
            batch_size=None,
            batch_format="pyarrow",
            fn_kwargs=dict(
                kind=source.kind, where=source.spec, tokenizer=tokenizer, trust_remote_code=trust_remote_code,
                template=template, seq_len=seq_len, seed=seed, max_tokens=max_tokens, loss_tokens_only=loss_tokens_only,
                chunk_rows=chunk_rows,
            ),
        )
        # Ray Data gathers a task's outputs into blocks of up to 128 MiB, so without this a packing task's
        # chunks left it as one block, at its end: the first forward waited for the whole budget to be
        # packed, and a single replica computed the whole corpus however many there were (measured:
        # 1,024 batches on one replica, none on the other). This split fuses into the packing task
        # and makes it hand over each chunk as its own block as soon as it is packed. It also keeps
        # packing out of the replicas' actors: Ray Data does not fuse an operator that may change the
        # row count into one that takes whole batches, so packing runs in its own tasks, on the CPU
        # left for reading, beside the replicas' start-up and compute (tests/test_profile.py checks the plan).
        .repartition(target_num_rows_per_block=chunk_rows)
    )


def load_conversations(spec: str) -> list:
    """All conversations of a (task-sized) corpus, on the driver, with row-numbered errors. Used
    where training needs a fixed, reproducible order of packed rows."""
    from esft.data import read_conversations

    source = resolve_source(spec)
    if source.kind == "jsonl":
        paths = [Path(spec)] if Path(spec).is_file() else sorted(Path(spec).glob("*.jsonl"))
        return [c for path in paths for c in read_conversations(path)]
    if source.kind == "parquet":
        import pyarrow.parquet as pq

        records = pq.read_table(spec).to_pylist()
    else:
        import datasets

        hf = datasets.load_from_disk(spec) if source.kind == "hf_disk" else datasets.load_dataset(spec, split="train")
        if isinstance(hf, datasets.DatasetDict):
            hf = hf["train"] if "train" in hf else next(iter(hf.values()))
        records = list(hf)
    conversations = [parse_record(_plain(record), f"{spec}: row {i}") for i, record in enumerate(records)]
    if not conversations:
        raise DataError(f"{spec}: no rows; give a corpus with at least one conversation")
    return conversations
