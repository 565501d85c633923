#!/usr/bin/env python3
"""Train the bundled tiny language model: ``server/sluice/example_models/tiny_llama/1/``.

1. A byte-level BPE tokenizer (``tokenizers``) on ``scripts/data/*.txt``.
2. A small Llama-architecture model (Sluice's own implementation, so the saved names are
   the Hugging Face ones its loader reads), trained on that text with AdamW.
3. A Hugging Face-format folder: ``config.json``, ``model.safetensors`` (float16),
   ``tokenizer.json``, ``tokenizer_config.json``, ``generation_config.json``.

Seeds are fixed; with the same torch build and thread count a rerun gives the same model.
It takes a few minutes on two CPU cores. Finally it prints a greedy sample.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor, nn

from sluice.generation.causal_lm import CausalLM
from sluice.generation.config import LlamaConfig, parse_config
from sluice.generation.generate import generate
from sluice.generation.llama import LlamaForCausalLM
from sluice.generation.sampling import SamplingParams
from sluice.generation.tokenizer import Tokenizer as SluiceTokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA = REPO_ROOT / "scripts" / "data"
OUT = REPO_ROOT / "server" / "sluice" / "example_models" / "tiny_llama" / "1"

SEED = 0
EOS = "<|endoftext|>"
VOCAB_SIZE = 2048
CONTEXT = 256
CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": CONTEXT,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": True,
    "torch_dtype": "float16",
}
SAMPLE_PROMPT = "Once upon a time, there was a"


def read_documents(data_dir: Path) -> list[str]:
    """Every blank-line-separated document of the ``*.txt`` files, in file-name order."""
    documents = []
    for path in sorted(data_dir.glob("*.txt")):
        text = path.read_text(encoding="utf-8")
        documents += [doc.strip() for doc in text.split("\n\n") if doc.strip()]
    return documents


def train_tokenizer(documents: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


def token_stream(tokenizer: Tokenizer, documents: list[str]) -> Tensor:
    """All documents as one stream of ids, each followed by the end-of-text token."""
    eos = tokenizer.token_to_id(EOS)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(documents):
        ids += [*encoding.ids, eos]
    return torch.tensor(ids, dtype=torch.long)


def build_model(vocab_size: int) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    config_json = {**CONFIG, "vocab_size": vocab_size}
    config = parse_config(config_json, where=Path("config.json"))
    assert isinstance(config, LlamaConfig)
    model = LlamaForCausalLM(config, device=torch.device("cpu"))
    for name, parameter in model.named_parameters():
        if name.endswith("norm.weight"):
            nn.init.ones_(parameter)
        else:
            # Residual projections are scaled down with depth, as in GPT-2.
            residual = name.endswith(("o_proj.weight", "down_proj.weight"))
            std = 0.02 / math.sqrt(2 * config.num_layers) if residual else 0.02
            nn.init.normal_(parameter, std=std)
    return model, config_json


def train(model: LlamaForCausalLM, stream: Tensor, args: argparse.Namespace) -> None:
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    positions = torch.arange(CONTEXT).expand(args.batch, CONTEXT)
    started = time.monotonic()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        starts = torch.randint(len(stream) - CONTEXT - 1, (args.batch,), generator=generator)
        windows = torch.stack([stream[s : s + CONTEXT + 1] for s in starts.tolist()])
        hidden = model.hidden_states(windows[:, :-1], positions, None)
        logits = model.logits(hidden)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            elapsed = time.monotonic() - started
            print(f"step {step:4d}  loss {loss.item():.3f}  {elapsed:6.1f} s", flush=True)


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    warmup = max(1, args.steps // 20)
    if step < warmup:
        return float(args.lr * (step + 1) / warmup)
    progress = (step - warmup) / max(1, args.steps - warmup)
    return float(args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress))))


def save(
    model: LlamaForCausalLM, config_json: dict[str, Any], tokenizer: Tokenizer, out: Path
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    eos = tokenizer.token_to_id(EOS)
    weights = {
        name: t.detach().to(torch.float16).contiguous() for name, t in model.state_dict().items()
    }
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save(str(out / "tokenizer.json"))
    files = {
        "config.json": {**config_json, "bos_token_id": None, "eos_token_id": eos},
        "generation_config.json": {"eos_token_id": eos, "do_sample": False},
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": EOS,
            "model_max_length": CONTEXT,
            "clean_up_tokenization_spaces": False,
        },
    }
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def sample(out: Path) -> str:
    lm = CausalLM.load(out)
    tokenizer = SluiceTokenizer.load(out)
    prompt = tokenizer.encode(SAMPLE_PROMPT)
    chunks = generate(lm, tokenizer, prompt, SamplingParams(max_new_tokens=60))
    return SAMPLE_PROMPT + "".join(chunk.text for chunk in chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.manual_seed(SEED)
    documents = read_documents(DATA)
    tokenizer = train_tokenizer(documents)
    stream = token_stream(tokenizer, documents)
    print(f"{len(documents)} documents, {len(stream)} tokens, vocab {tokenizer.get_vocab_size()}")
    model, config_json = build_model(tokenizer.get_vocab_size())
    print(f"{sum(p.numel() for p in model.parameters())} parameters")
    train(model, stream, args)
    save(model, config_json, tokenizer, args.out)
    print(sample(args.out))


if __name__ == "__main__":
    main()
