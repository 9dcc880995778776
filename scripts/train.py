"""Fine-tune a model with QLoRA: ``python scripts/train.py [--section.field value ...] [--config FILE]``.

With no arguments: SmolLM2-135M-Instruct (4-bit NF4 base, LoRA r=16 on all linear
layers) on the chitchat conversations, 40 steps, outputs in runs/default.
``--help`` lists every flag with its default.
"""

from __future__ import annotations

import json
import sys

from qlora_jax.train.config import parse_config
from qlora_jax.train.loop import run


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv, exit_on_error=True)
    summary = run(config)
    if summary.get("process", 0):  # with several processes, process 0 reports
        return 0
    keys = ("steps", "first_loss", "last_loss", "first_eval_loss", "last_eval_loss", "tokens_per_s", "seconds",
            "sample_before", "sample_after")
    print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2))
    print(f"outputs: {config.output.dir} (metrics.jsonl, loss.png, adapter/, checkpoints/, summary.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
