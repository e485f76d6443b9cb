"""The merge a user would write with plain transformers: load three models, add
the instruct residual to the new base's state dict in bf16, save.

    python bench/naive_merge.py BASE INSTRUCT NEW_BASE OUT
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    base_dir, instruct_dir, new_dir, out = sys.argv[1:5]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    instruct = AutoModelForCausalLM.from_pretrained(instruct_dir, dtype=torch.bfloat16)
    new = AutoModelForCausalLM.from_pretrained(new_dir, dtype=torch.bfloat16)
    b, i = base.state_dict(), instruct.state_dict()
    with torch.no_grad():
        for name, p in new.state_dict().items():
            p += i[name] - b[name]
    new.save_pretrained(out)


if __name__ == "__main__":
    main()
