"""Packed vs padded forwards on the HH pairs' real length distribution: tokens the transformer runs and step time.

The HH harmless pairs are tokenised (a byte-level BPE trained on them, plain HH template) and cut to
``--max-length`` the way ``dvpo rm``/``gvm`` drop over-long examples; micro-batches of ``--pairs`` pairs
(chosen and rejected rows, right-padded) in a seeded shuffle are what a reward-model step sees. For
every micro-batch of the whole data set the report counts the padded tokens ``B * L`` and the valid
tokens ``nnz`` (their ratio is what packing saves) and the tokens of the packed rows; a value model
of ``--hidden`` x ``--layers`` then takes timed forward+backward steps on the first ``--steps`` micro-batches with ``train.packing`` off and
on (same weights, the losses checked equal). ``--device cuda`` times them on a GPU under bf16 autocast, as
the trainer runs (the GPU suite runs it at the end-to-end benchmark's 0.5B shape).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForTokenClassification, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import REPO, environment  # noqa: E402

from dvpo.data import Encoder, ValueExample, collate_values, read_preference_pairs  # noqa: E402
from dvpo.models import ValueModel, train_bpe_tokenizer  # noqa: E402
from dvpo.models.packing import pack, set_packing  # noqa: E402

HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def micro_batches(args) -> tuple[list, object]:
    pairs = read_preference_pairs([str(args.data)])
    texts = [t for p in pairs[:2000] for t in (p.chosen, p.rejected)]
    tokenizer = train_bpe_tokenizer(texts, args.vocab)
    encoder = Encoder(tokenizer, template="plain", max_length=args.max_length)
    examples = []
    for p in pairs:
        seqs = encoder.encode(p.prompt, [p.chosen, p.rejected], p.where)
        if seqs is not None:
            examples.append(ValueExample(tuple(seqs), (1.0, 0.0)))
    random.Random(args.seed).shuffle(examples)
    n = args.pairs
    return [collate_values(examples[i:i + n], tokenizer.pad_token_id) for i in range(0, len(examples) - n + 1, n)], \
        tokenizer


def step(model: ValueModel, batch, device: torch.device) -> tuple[float, float]:
    """One reward-model-like forward+backward; (seconds, loss)."""
    batch = batch.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        values = model(batch.input_ids, batch.attention_mask)[:, :-1].float()
    loss = torch.where(batch.mask, (values - batch.rewards) ** 2, 0.0).sum() / batch.mask.sum()
    loss.backward()
    model.zero_grad(set_to_none=True)
    loss = float(loss.detach())  # a host sync: the step's kernels are done
    return time.perf_counter() - start, loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=HH)
    ap.add_argument("--max-length", type=int, default=1024, help="longest prompt + response (longer pairs dropped)")
    ap.add_argument("--pairs", type=int, default=8, help="pairs per micro-batch (2 rows each)")
    ap.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary trained on the pairs")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8, help="timed micro-batches per mode (after one warm-up)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (bf16 autocast, as the trainer runs)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    torch.manual_seed(args.seed)
    batches, tokenizer = micro_batches(args)
    padded = sum(b.input_ids.numel() for b in batches)
    valid = sum(int(b.attention_mask.sum()) for b in batches)
    # sdpa/eager pack into rows no wider than the batch (row ends padded); flash-attn one row of valid tokens
    rows = sum(pack(b.input_ids, b.attention_mask, b.input_ids.shape[1]).input_ids.numel() for b in batches)
    lengths = [n for b in batches for n in b.lengths]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         max_position_embeddings=args.max_length, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    model = ValueModel(AutoModelForTokenClassification.from_config(config, attn_implementation="sdpa")).to(device)
    timed = batches[:args.steps + 1]
    results = {}
    for mode in ("off", "on"):
        set_packing(mode)
        runs = [step(model, b, device) for b in timed]
        results[mode] = {"seconds": [t for t, _ in runs[1:]], "losses": [loss for _, loss in runs]}
    set_packing("auto")
    loss_diff = max(abs(a - b) for a, b in zip(results["off"]["losses"], results["on"]["losses"]))
    t_pad, t_pack = (sum(results[m]["seconds"]) for m in ("off", "on"))
    timed_padded = sum(b.input_ids.numel() for b in timed[1:])
    timed_valid = sum(int(b.attention_mask.sum()) for b in timed[1:])
    meta = {"benchmark": "packing", **environment(device), "threads": torch.get_num_threads(),
            "data": args.data.name, "max_length": args.max_length, "pairs_per_micro_batch": args.pairs,
            "vocab": len(tokenizer), "model": {"hidden": args.hidden, "layers": args.layers, "attn": "sdpa",
                      "precision": "bf16 autocast" if device.type == "cuda" else "fp32"}}
    report = {**meta, "data_set": {"micro_batches": len(batches), "rows": len(lengths), "valid_tokens": valid,
                                   "padded_tokens": padded, "padded_over_valid": padded / valid,
                                   "packed_rows_tokens": rows, "packed_rows_over_valid": rows / valid,
                                   "row_length": {"mean": statistics.mean(lengths),
                                                  "median": statistics.median(lengths), "max": max(lengths)}},
              "timed": {"micro_batches": args.steps, "padded_tokens": timed_padded, "valid_tokens": timed_valid,
                        "padded_seconds": t_pad, "packed_seconds": t_pack, "speedup": t_pad / t_pack,
                        "max_loss_difference": loss_diff}}
    slug = re.sub(r"[^a-z0-9]+", "-", meta["device"].lower()).strip("-")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"packing_{slug}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    d, t = report["data_set"], report["timed"]
    stem.with_suffix(".md").write_text(
        f"# Packed vs padded forwards ({meta['device']})\n\n"
        f"{meta['device']}, {meta['threads']} threads; torch {meta['torch']}, transformers {meta['transformers']}; "
        f"git {meta['git_sha'][:10]}{' (dirty)' if meta['git_dirty'] else ''}.\n\n"
        f"HH harmless pairs, BPE vocabulary {len(tokenizer)}, max length {args.max_length}, {args.pairs} pairs "
        f"({2 * args.pairs} rows) per right-padded micro-batch.\n\n"
        f"| | tokens the transformer runs | per valid token |\n|---|---:|---:|\n"
        f"| padded | {d['padded_tokens']:,} | {d['padded_over_valid']:.2f} |\n"
        f"| packed rows (sdpa/eager) | {d['packed_rows_tokens']:,} | {d['packed_rows_over_valid']:.2f} |\n"
        f"| packed, one row (flash-attn) | {d['valid_tokens']:,} | 1.00 |\n\n"
        f"{d['micro_batches']} micro-batches, {d['rows']} rows; row length mean {d['row_length']['mean']:.0f}, "
        f"median {d['row_length']['median']:.0f}, max {d['row_length']['max']}.\n\n"
        f"Value model {args.hidden} hidden x {args.layers} layers (sdpa, {meta['model']['precision']}), "
        f"forward+backward of the first "
        f"{args.steps} micro-batches ({t['padded_tokens']:,} padded / {t['valid_tokens']:,} valid tokens):\n\n"
        f"| | seconds | speedup |\n|---|---:|---:|\n| padded | {t_pad:.2f} | 1.00 |\n"
        f"| packed | {t_pack:.2f} | {t_pad / t_pack:.2f} |\n\n"
        f"Largest loss difference packed vs padded: {loss_diff:.2e}. Under sdpa/eager a packed row attends "
        f"through a dense block-diagonal mask, so sequences are packed first-fit into rows no wider than the "
        f"batch (attention work never above the padded batch's); flash-attn's varlen kernels take one row.\n")
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
