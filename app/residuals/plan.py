"""Planning a merge split by output shard: which tensors each output file holds.

The plan is a pure function of the tensor specs (in the merged order) and the
largest shard size, the same one :class:`~app.residuals.shards.ShardedWriter`
follows, so the files written shard by shard, by any number of workers, are the
files one writer would have written: same names, same headers, same bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from app.residuals.shards import TensorSpec, plan_shards, shard_files
from app.residuals.tensorjobs import TensorJob


@dataclass(frozen=True)
class OutputShard:
    """One output file of a merged model and the tensors it holds, in order.

    Attributes:
        index: 0-based position of the file among the model's shards.
        file: its file name (``model-00002-of-00008.safetensors``).
        tensors: names of its tensors, in the order their bytes are written.
        nbytes: tensor bytes in the file (the header not counted).
    """

    index: int
    file: str
    tensors: tuple[str, ...]
    nbytes: int


def plan_output(
    specs: list[TensorSpec], max_shard_bytes: int, prefix: str = "model"
) -> list[OutputShard]:
    """The output files of a checkpoint of ``specs`` (in write order) cut at
    ``max_shard_bytes``, as a single :class:`ShardedWriter` would write them.

    Args:
        specs: every output tensor, in the merged order.
        max_shard_bytes: largest shard (a lone larger tensor gets a file of its own).
        prefix: file name stem.

    Returns:
        The shards in file order.
    """
    shards = plan_shards(specs, max_shard_bytes)
    files = shard_files(prefix, len(shards))
    return [
        OutputShard(i, files[i], tuple(s.name for s in shard), sum(s.nbytes for s in shard))
        for i, shard in enumerate(shards)
    ]


def shard_jobs(jobs: list[TensorJob], shard: OutputShard) -> list[TensorJob]:
    """The tensor jobs that produce ``shard``, in its order.

    Raises:
        ValueError: ``jobs`` do not hold every tensor of ``shard`` (a plan made for
            other inputs).
    """
    by_name = {j.spec.name: j for j in jobs}
    missing = [n for n in shard.tensors if n not in by_name]
    if missing:
        raise ValueError(f"{shard.file}: the merge plan has no tensor {missing[0]!r}")
    return [by_name[n] for n in shard.tensors]


def layout_digest(specs: list[TensorSpec], max_shard_bytes: int) -> str:
    """sha256 of every output tensor's name, dtype and shape in write order, and the
    shard size: what decides the output files, so two planners of a split that agree on
    it write the same files."""
    h = hashlib.sha256(f"{max_shard_bytes}\n".encode())
    for s in specs:
        h.update(f"{s.name}\0{s.dtype.code}\0{list(s.shape)}\n".encode())
    return h.hexdigest()
