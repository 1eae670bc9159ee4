"""Upcycle a dense transformer into a graph-routed one, then continue-train it with sparse heads.

MoH's recipe (continue-tuning a dense LLaMA into mixture-of-heads) with a graph router:

1. build a tiny random ``LlamaForCausalLM`` (GQA) and ``GPT2LMHeadModel`` with ``transformers``
   (offline, from configs; ``vocab_size=256`` so byte tokens work), pretrain each briefly as a
   dense model (a stand-in for a real checkpoint) and save it to a temp dir;
2. convert each directory with :func:`gohgraph.interop.convert.convert_hf_model` and check that the
   converted model's logits equal the source's (``dense_blend = 1``: every head on);
3. continue-train on the default corpus (the standard library's source, byte tokens) while
   :func:`~gohgraph.training.schedules.dense_to_sparse_schedule` anneals from dense to top-k heads, and print
   the validation loss before and after.

Nothing is downloaded; for a real checkpoint use ``gohgraph convert --from DIR --out DIR`` and
train the result. Needs the ``hf`` extra (``pip install 'gohgraph[hf]'``). About two minutes on
2 CPU cores with the defaults.

    python examples/upcycle.py [--pretrain-steps 100] [--steps 100] [--warmup 40] [--top-k-heads 1]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from gohgraph.data.batches import eval_batches, train_batch
from gohgraph.data.corpus import load_corpus
from gohgraph.interop.convert import convert_hf_model
from gohgraph.training.schedules import dense_to_sparse_schedule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=100, help="dense pretraining steps of each source")
    parser.add_argument("--steps", type=int, default=100, help="continued-training steps per model")
    parser.add_argument("--warmup", type=int, default=40, help="steps over which dense heads anneal to top-k")
    parser.add_argument("--n-shared-heads", type=int, default=1)
    parser.add_argument("--top-k-heads", type=int, default=1, help="routed heads per token (of n_heads - shared)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    corpus = load_corpus()  # byte tokens of the standard library, cached after the first run
    print(f"corpus: {corpus.source}, {len(corpus.train):,} train / {len(corpus.val):,} val tokens")
    with tempfile.TemporaryDirectory() as scratch:
        for name, hf_model in build_dense_sources().items():
            pretrain_dense(hf_model, corpus, args)
            source_dir = Path(scratch) / name
            hf_model.save_pretrained(source_dir)
            model = convert_hf_model(source_dir, router="graph", n_shared_heads=args.n_shared_heads,
                                     top_k_heads=args.top_k_heads)
            print(f"\n{name}: {type(hf_model).__name__} -> GoH router={model.config.router}, "
                  f"heads {model.config.n_shared_heads} shared + top-{model.config.top_k_heads} of "
                  f"{model.config.n_routed_heads} routed, {model.num_parameters():,} parameters")
            check_same_logits(hf_model, model, corpus, args.seq_len)
            continue_train(model, corpus, args)


def build_dense_sources() -> dict:
    """Tiny random dense models; ``bos/eos = 0`` keeps their special tokens inside the byte vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=0))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                      bos_token_id=0, eos_token_id=0))
    return {"llama": llama, "gpt2": gpt2}


def pretrain_dense(hf_model, corpus, args) -> None:
    """A few hundred dense steps so the source knows something worth keeping through the conversion."""
    optimizer = torch.optim.AdamW(hf_model.parameters(), lr=args.lr, weight_decay=0.01)
    hf_model.train()
    for step in range(args.pretrain_steps):
        ids = train_batch(corpus.train, args.batch_size, args.seq_len, seed=args.seed + 1, step=step)
        loss = hf_model(ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    hf_model.eval()


@torch.no_grad()
def check_same_logits(hf_model, model, corpus, seq_len: int) -> None:
    ids = next(eval_batches(corpus.val, batch_size=2, seq_len=seq_len))
    difference = (model.eval()(ids).logits - hf_model(ids).logits).abs().max().item()
    print(f"  max |logits difference| vs the dense source (dense_blend=1): {difference:.2e}")
    if difference > 1e-4:
        raise SystemExit("conversion does not reproduce the source model")


@torch.no_grad()
def validation_loss(model, corpus, seq_len: int, max_batches: int = 8) -> float:
    model.eval()
    losses = [model(ids, labels=ids).lm_loss.item()
              for ids in eval_batches(corpus.val, batch_size=8, seq_len=seq_len, max_batches=max_batches)]
    model.train()
    return sum(losses) / len(losses)


def continue_train(model, corpus, args) -> None:
    """AdamW with cosine decay; the dense blend falls from 1 to 0 over ``args.warmup`` steps."""
    print(f"  val loss before, dense (blend 1):        {validation_loss(model, corpus, args.seq_len):.3f}")
    model.set_dense_blend(0.0)
    print(f"  val loss before, top-k heads (blend 0):  {validation_loss(model, corpus, args.seq_len):.3f}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    started = time.perf_counter()
    model.train()
    for step in range(args.steps):
        model.set_dense_blend(dense_to_sparse_schedule(step, args.warmup))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        ids = train_batch(corpus.train, args.batch_size, args.seq_len, seed=args.seed, step=step)
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        model.update_routing_biases()
    model.set_dense_blend(0.0)
    elapsed = time.perf_counter() - started
    print(f"  val loss after {args.steps} steps, top-k heads: {validation_loss(model, corpus, args.seq_len):.3f} "
          f"({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
