"""Generate a synthetic Llama triple (base, instruct, new_base) for the benchmark.

The default shape is TinyLlama-1.1B's (hidden 2048, 22 layers, intermediate 5632,
grouped KV with 4 heads, vocab 32000): about 1.10e9 parameters, 2.2 GB per
checkpoint in bf16. ``--params`` changes the layer count only, so ``--params 2e9``
gives the "model doubles" case with the same tensor widths.

Generation streams: every tensor is produced in row chunks and appended to three
:class:`ShardedWriter` s at once, so memory stays at a few chunks whatever the size.
``instruct = base + N(0, 1e-3)`` and ``new_base = base + N(0, 2e-3)``, computed in
fp32 and rounded once to bf16, like real fine-tuning deltas.

    .venv/bin/python bench/gen_checkpoints.py                   # bench/data/1b
    .venv/bin/python bench/gen_checkpoints.py --params 2e9      # bench/data/2b
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig

from app.demo.tokenizer import write_tokenizer
from app.residuals.dtypes import BF16
from app.residuals.shards import ShardedWriter, TensorSpec

HIDDEN = 2048
INTERMEDIATE = 5632
HEADS = 32
KV_HEADS = 4
VOCAB = 32000
INIT_STD = 0.02
DELTAS = {"instruct": 1e-3, "new_base": 2e-3}
CHUNK_ELEMS = 4 * 1024 * 1024
NAMES = ("base", "instruct", "new_base")


def layer_params() -> int:
    kv = HIDDEN // HEADS * KV_HEADS
    return 2 * HIDDEN * HIDDEN + 2 * HIDDEN * kv + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN


def layers_for(params: float) -> int:
    fixed = 2 * VOCAB * HIDDEN + HIDDEN
    return max(1, round((params - fixed) / layer_params()))


def build_config(layers: int) -> LlamaConfig:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        dtype=torch.bfloat16,
    )
    config.architectures = ["LlamaForCausalLM"]
    return config


def tensor_specs(layers: int) -> list[TensorSpec]:
    """Tensors in ``save_pretrained`` order (embedding, layers, final norm, head)."""
    kv = HIDDEN // HEADS * KV_HEADS
    bf16 = BF16
    specs = [TensorSpec("model.embed_tokens.weight", bf16, (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            TensorSpec(p + "self_attn.q_proj.weight", bf16, (HIDDEN, HIDDEN)),
            TensorSpec(p + "self_attn.k_proj.weight", bf16, (kv, HIDDEN)),
            TensorSpec(p + "self_attn.v_proj.weight", bf16, (kv, HIDDEN)),
            TensorSpec(p + "self_attn.o_proj.weight", bf16, (HIDDEN, HIDDEN)),
            TensorSpec(p + "mlp.gate_proj.weight", bf16, (INTERMEDIATE, HIDDEN)),
            TensorSpec(p + "mlp.up_proj.weight", bf16, (INTERMEDIATE, HIDDEN)),
            TensorSpec(p + "mlp.down_proj.weight", bf16, (HIDDEN, INTERMEDIATE)),
            TensorSpec(p + "input_layernorm.weight", bf16, (HIDDEN,)),
            TensorSpec(p + "post_attention_layernorm.weight", bf16, (HIDDEN,)),
        ]
    specs += [
        TensorSpec("model.norm.weight", bf16, (HIDDEN,)),
        TensorSpec("lm_head.weight", bf16, (VOCAB, HIDDEN)),
    ]
    return specs


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy())  # type: ignore[arg-type]


def write_tensor(spec: TensorSpec, writers: dict[str, ShardedWriter], gen: torch.Generator) -> None:
    rows = spec.shape[0]
    row_elems = math.prod(spec.shape[1:])
    step = max(1, CHUNK_ELEMS // row_elems)
    for r in range(0, rows, step):
        shape = (min(rows, r + step) - r, *spec.shape[1:])
        if spec.name.endswith("norm.weight"):
            base = torch.ones(shape)
        else:
            base = torch.randn(shape, generator=gen).mul_(INIT_STD)
        base_bf16 = base.to(torch.bfloat16)
        writers["base"].write(spec.name, _bytes(base_bf16))
        for name, scale in DELTAS.items():
            moved = torch.randn(shape, generator=gen).mul_(scale).add_(base_bf16)
            writers[name].write(spec.name, _bytes(moved.to(torch.bfloat16)))


def write_metadata(path: Path, config: LlamaConfig, chat: bool) -> None:
    write_tokenizer(path, chat=chat)
    config.save_pretrained(path)
    GenerationConfig(bos_token_id=0, eos_token_id=1).save_pretrained(path)


def generate(out: Path, params: float, shard_gb: float, seed: int) -> None:
    layers = layers_for(params)
    specs = tensor_specs(layers)
    n = sum(math.prod(s.shape) for s in specs)
    print(f"{out}: {layers} layers, {n / 1e9:.3f}e9 params, {n * 2 / 1e9:.2f} GB per checkpoint")
    config = build_config(layers)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dirs = {name: tmp / name for name in NAMES}
    for name, d in dirs.items():
        d.mkdir(parents=True)
        write_metadata(d, config, chat=name == "instruct")
    gen = torch.Generator().manual_seed(seed)
    writers = {
        name: ShardedWriter(d, specs, max_shard_bytes=int(shard_gb * 1e9), hash_files=False)
        for name, d in dirs.items()
    }
    t0 = time.perf_counter()
    for spec in specs:
        write_tensor(spec, writers, gen)
    for w in writers.values():
        w.close()
    (tmp / "info.json").write_text(json.dumps({"params": n, "layers": layers, "seed": seed}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")


def main() -> None:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--params", type=float, default=1.1e9, help="approximate parameter count")
    ap.add_argument("--out", type=Path, help="output dir [default: bench/data/<N>b]")
    ap.add_argument("--shard-gb", type=float, default=1.0, help="largest shard, in GB")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = args.out or here / "data" / f"{max(1, int(args.params / 1e9))}b"
    generate(out, args.params, args.shard_gb, args.seed)


if __name__ == "__main__":
    main()
