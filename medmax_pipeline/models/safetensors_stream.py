"""HF safetensors weights written and read one tensor at a time.

`write_safetensors_streaming` writes tensors made on demand into shards named as transformers
names them (memory holds one tensor, not a shard); `weight_files` and `read_tensor` read one
tensor, or some of its rows, back with plain reads. Used by convert-checkpoint and by the
streamed check of a converted model (models/chameleon.streamed_logits).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
WEIGHT_INDEX_FILE = "model.safetensors.index.json"


def tensor_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """The size in bytes of a tensor of this shape and dtype."""
    count = 1
    for size in shape:
        count *= int(size)
    return count * torch.empty((), dtype=dtype).element_size()


def write_safetensors_streaming(
    folder: str | Path,
    plan: Sequence[tuple[str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]],
    max_shard_bytes: int = 2 * 1024**3,
    after_write: Callable[[str], None] | None = None,
) -> list[str]:
    """Write (name, dtype, shape, make_tensor) entries as HF safetensors shards; return the file names.

    The header of each shard is known from the plan, so every tensor is made, written and
    dropped before the next one is made: memory holds one tensor, not a shard (`after_write(name)`
    runs after each, e.g. to let go of its source). Shards are
    named as transformers names them, with model.safetensors.index.json when there are several.
    """
    folder = Path(folder)
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]]] = [[]]
    size = 0
    for entry in plan:
        nbytes = tensor_bytes(entry[2], entry[1])
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    total = 0
    for name, entries in zip(names, shards):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for tensor_name, dtype, shape, _ in entries:
            nbytes = tensor_bytes(shape, dtype)
            header[tensor_name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[tensor_name] = name
        total += offset
        header_bytes = json.dumps(header, separators=(",", ":")).encode()
        header_bytes += b" " * (-len(header_bytes) % 8)  # safetensors aligns the data start to 8 bytes
        with open(folder / name, "wb") as out:
            out.write(len(header_bytes).to_bytes(8, "little"))
            out.write(header_bytes)
            for tensor_name, dtype, shape, make in entries:
                tensor = make()
                if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                    raise ValueError(f"{tensor_name}: made {tensor.dtype} {tuple(tensor.shape)}, planned {dtype} {tuple(shape)}")
                out.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
                del tensor
                if after_write is not None:
                    after_write(tensor_name)
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / WEIGHT_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names


def weight_files(folder: str | Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of an HF folder (single file or sharded with an index)."""
    folder = Path(folder)
    index = folder / WEIGHT_INDEX_FILE
    if index.is_file():
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    files: dict[str, Path] = {}
    for path in sorted(folder.glob("*.safetensors")):
        files.update({name: path for name in _safetensors_header(path)[0] if name != "__metadata__"})
    return files


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(size)), 8 + size


def read_tensor(files: Mapping[str, Path], name: str, rows: slice | None = None) -> torch.Tensor:
    """One tensor (or a range of its rows) read from its safetensors file with plain reads.

    Not memory-mapped on purpose: pages of a mapping that was read stay in the process's RSS
    while it is open, which would add a second copy of the weights to a streamed check.
    """
    path = Path(files[name])
    header, data_start = _safetensors_header(path)
    entry = header[name]
    dtype = {v: k for k, v in SAFETENSORS_DTYPES.items()}[entry["dtype"]]
    shape = list(entry["shape"])
    begin, end = entry["data_offsets"]
    if rows is not None:
        row_bytes = (end - begin) // shape[0] if shape[0] else 0
        first, last, _ = rows.indices(shape[0])
        begin, end, shape = begin + first * row_bytes, begin + last * row_bytes, [max(last - first, 0), *shape[1:]]
    buffer = bytearray(end - begin)
    with open(path, "rb") as f:
        f.seek(data_start + begin)
        f.readinto(buffer)
    if not buffer:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).reshape(shape)
