"""MoSA's train/inference gap (docs/decoding.md): the validation loss of one model under the training
rule (expert choice: each sparse head keeps the top T / rho tokens of the whole sequence, which reads
the future) and under each per-token decode rule (``mosa_inference``: the BCE-trained inference
router, and the score threshold; what evaluation and ``generate`` use), at initialisation and after
training. One model is trained (with the row's configured rule); both rules are read from it.

    python benchmarks/mosa_decode_gap.py                 # the comparison's quick 'mosa' row, 300 steps
    python benchmarks/mosa_decode_gap.py --steps 50 --eval-batches 4

Reported: both losses and their difference (decode rule minus training rule), the share of
(token, head) pairs on which the two rules agree, and the share of tokens the decode rule keeps
(the training rule keeps k / T). A loss measurement, not a timing: any machine gives the same numbers
for the same seed and torch version.
"""

from __future__ import annotations

import argparse

import torch

from gohgraph import GoHTransformer
from gohgraph.config import MOSA_INFERENCE
from gohgraph.data.batches import eval_batches, train_batch
from gohgraph.data.corpus import load_corpus
from gohgraph.experiments.variants import MOSA, SETTINGS, comparison_variants
from gohgraph.layers.mosa import MixtureOfSparseAttention


def set_decode_rule(model: GoHTransformer, rule: str) -> None:
    """Switch every sparse-head layer's decode rule (both rules' statistics are trained anyway)."""
    for module in model.modules():
        if isinstance(module, MixtureOfSparseAttention):
            module.inference = rule


def rule_losses(model: GoHTransformer, batches, rule: str) -> dict:
    """Validation loss under the training rule and the decode ``rule``, their agreement and the
    decode rule's kept share."""
    totals = {"training rule": 0.0, "decode rule": 0.0, "agree": 0.0, "kept": 0.0, "topk": 0.0, "n": 0}
    set_decode_rule(model, rule)
    with torch.no_grad():
        for batch in batches:
            model.train()  # expert choice (dropout is 0 in these settings, so nothing else changes)
            train_out = model(batch, labels=batch)
            model.eval()
            eval_out = model(batch, labels=batch)
            totals["training rule"] += train_out.lm_loss.item()
            totals["decode rule"] += eval_out.lm_loss.item()
            for trained, decoded in zip(train_out.routing, eval_out.routing):
                top, rule = trained.sparse_heads.selected, decoded.sparse_heads.selected
                totals["agree"] += (top == rule).float().mean().item() / len(train_out.routing)
                totals["kept"] += rule.float().mean().item() / len(train_out.routing)
                totals["topk"] += top.float().mean().item() / len(train_out.routing)
            totals["n"] += 1
    n = totals.pop("n")
    return {name: value / n for name, value in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape, schedule = SETTINGS["quick"]
    config = comparison_variants(**shape, names=[MOSA])[MOSA]
    corpus = load_corpus()
    torch.manual_seed(args.seed)
    model = GoHTransformer(config)
    batch_size, seq_len = schedule["batch_size"], schedule["seq_len"]
    validation = list(eval_batches(corpus.val, batch_size, seq_len + 1, args.eval_batches))

    def report(when: str) -> None:
        for rule in MOSA_INFERENCE:
            m = rule_losses(model, validation, rule)
            print(f"{when}: training rule {m['training rule']:.4f}, decode rule {rule} {m['decode rule']:.4f}, "
                  f"gap {m['decode rule'] - m['training rule']:+.4f} nats; rules agree on {m['agree']:.1%} of "
                  f"(token, head) pairs; decode rule keeps {m['kept']:.1%} (top-k keeps {m['topk']:.1%})",
                  flush=True)
        set_decode_rule(model, config.mosa_inference)

    print(f"{MOSA}: d_model={config.d_model}, {config.n_layers} layers, {config.n_heads} dense + "
          f"{config.n_mosa_heads} sparse heads, sparsity {config.mosa_sparsity}, seq {seq_len}, "
          f"mosa_aux_loss_coef {config.mosa_aux_loss_coef}")
    report("init")
    optimizer = torch.optim.AdamW(model.parameters(), lr=schedule["lr"])
    model.train()
    for step in range(args.steps):
        batch = train_batch(corpus.train, batch_size, seq_len, args.seed, step)
        out = model(batch, labels=batch)
        (out.lm_loss + out.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % max(1, args.steps // 3) == 0 or step + 1 == args.steps:
            report(f"step {step + 1}")
            model.train()


if __name__ == "__main__":
    main()
