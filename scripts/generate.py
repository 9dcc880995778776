"""Chat with a base model plus a LoRA adapter, or complete prompts, streaming the tokens as they come.

    python scripts/generate.py [--model PATH] [--adapter DIR] [--prompt TEXT ...] [--max-new-tokens 200]
        [--temperature 0.7] [--top-k 0] [--top-p 0.9] [--repetition-penalty 1.1] [--stop TEXT ...]
        [--seed 0] [--no-chat] [--no-quant] [--dtype auto]

``--model``: an HF folder or .gguf (default: the SmolLM2-135M-Instruct GGUF the trainer starts
from); ``--adapter``: a PEFT LoRA folder, e.g. a training run's ``runs/default/adapter``. With
``--prompt`` (repeatable) the prompts run as one left-padded batch and each completion is printed;
with one prompt it streams. Without ``--prompt``: an interactive chat on standard input, the
conversation kept across turns (an empty line or end of input quits). Prompts go through the
tokenizer's chat template unless ``--no-chat``. Sampling: ``qlora_jax.models.sampling``
(``--temperature 0`` is greedy).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="HF folder or .gguf (default: the trainer's SmolLM2 GGUF)")
    ap.add_argument("--adapter", default="", help="PEFT LoRA folder to apply (default: the base model alone)")
    ap.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable: one batch); none: chat")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0: off")
    ap.add_argument("--top-p", type=float, default=0.9, help="1: off")
    ap.add_argument("--repetition-penalty", type=float, default=1.1, help="1: off")
    ap.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    ap.add_argument("--no-quant", action="store_true", help="keep the base in bfloat16 instead of NF4")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                    help="compute dtype; auto: float32 on a CPU, bfloat16 on a GPU")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from qlora_jax.layers import QuantConfig
    from qlora_jax.models import SamplingConfig
    from qlora_jax.models.generate import complete, stream_text
    from qlora_jax.models.loaders import from_pretrained
    from qlora_jax.train.loop import default_model_path

    try:
        sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                  repetition_penalty=args.repetition_penalty)
    except ValueError as err:
        ap.error(str(err))
    if args.max_new_tokens < 1:
        ap.error(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    dtype = args.dtype if args.dtype != "auto" else ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    model, variables, tokenizer = from_pretrained(args.model or default_model_path(),
                                                  quantization=None if args.no_quant else QuantConfig(),
                                                  dtype=jnp.dtype(dtype), adapter=args.adapter or None)
    if tokenizer is None:
        ap.error(f"{args.model} has no tokenizer (tokenizer.json, or the GGUF's tokenizer fields)")
    chat = not args.no_chat and bool(tokenizer.chat_template)
    key = jax.random.key(args.seed)

    def render(messages):
        return tokenizer.apply_chat_template(messages) if chat else messages[-1]["content"]

    def show(prompts, turn: int) -> list[str]:
        texts = [render(m) for m in prompts]
        step_key = jax.random.fold_in(key, turn)
        if len(texts) > 1:
            return complete(model, variables, tokenizer, texts, args.max_new_tokens, sampling, args.stop, step_key)
        out = ""
        for delta in stream_text(model, variables, tokenizer, texts, args.max_new_tokens, sampling, args.stop,
                                 step_key):
            print(delta[0], end="", flush=True)
            out += delta[0]
        print()
        return [out]

    if args.prompt:
        outs = show([[{"role": "user", "content": p}] for p in args.prompt], 0)
        if len(args.prompt) > 1:
            for p, o in zip(args.prompt, outs):
                print(f"### {p}\n{o.strip()}\n")
        return 0
    history: list[dict[str, str]] = []
    for turn, line in enumerate(sys.stdin):
        if not line.strip():
            break
        history.append({"role": "user", "content": line.strip()})
        history.append({"role": "assistant", "content": show([history], turn)[0].strip()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
