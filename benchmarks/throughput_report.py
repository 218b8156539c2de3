"""The throughput run's summary (ratios, MFU, agreement, memory growth) and its markdown tables."""

from __future__ import annotations

import json
from pathlib import Path

from throughput_lib import PRECISIONS, TASKS, TRAIN_VARIANTS

TARGETS = {"vs_default": 1.5, "vs_tuned": 1.05, "vs_plain": 0.97, "predict": 2.0, "generate": 1.5, "mfu": 0.5, "memory": 0.10}
VARIANT_NAMES = {"taskhead": "taskhead", "hf-default": "HF example defaults", "hf-tuned": "HF tuned", "plain": "plain loop"}
TASK_NAMES = {"imdb": "IMDB classification", "conll": "CoNLL-2003 NER"}


def ok(value, target: float, below: bool = False) -> str:
    if value is None:
        return ""
    return "✓" if (value < target if below else value >= target) else "✗"


def result(doc: dict, name: str) -> dict | None:
    m = doc["measurements"].get(name)
    return m["result"] if m and "result" in m else None


def ratio(a, b):
    return a / b if a and b else None


def load_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def build_summary(doc: dict, work: Path) -> dict:
    peak = {p: (result(doc, f"matmul-{p}") or {}).get("combined_flops_per_s") for p in PRECISIONS}
    training = []
    for task in TASKS:
        for prec in PRECISIONS:
            rs = {v: result(doc, f"train-{task}-{prec}-{v}") for v in TRAIN_VARIANTS}
            if not any(rs.values()):
                continue
            tok = {v: r["tokens_per_s"] if r else None for v, r in rs.items()}
            row = {"task": task, "precision": prec, "tokens_per_s": tok,
                   "samples_per_s": {v: r["samples_per_s"] if r else None for v, r in rs.items()},
                   "padding_share": {v: r["padding_share"] if r else None for v, r in rs.items()},
                   "vs_default": ratio(tok["taskhead"], tok["hf-default"]),
                   "vs_tuned": ratio(tok["taskhead"], tok["hf-tuned"]),
                   "vs_plain": ratio(tok["taskhead"], tok["plain"]),
                   "mfu": {v: ratio(r["model_flops_per_s"], peak[prec]) if r else None for v, r in rs.items()},
                   "mfu_padded": {v: ratio(r["padded_flops_per_s"], peak[prec]) if r else None for v, r in rs.items()}}
            training.append(row)
    prediction = []
    for task in TASKS:
        for prec in PRECISIONS:
            th, pipe = result(doc, f"predict-{task}-{prec}-taskhead"), result(doc, f"predict-{task}-{prec}-pipeline")
            if not (th or pipe):
                continue
            a, b = load_json(work / f"pred-{task}-{prec}-taskhead.json"), load_json(work / f"pred-{task}-{prec}-pipeline.json")
            same = sum(x == y for x, y in zip(a, b)) / len(a) if a and b else None
            prediction.append({"task": task, "precision": prec,
                               "taskhead_items_per_s": th and th["items_per_s"], "pipeline_items_per_s": pipe and pipe["items_per_s"],
                               "ratio": ratio(th and th["items_per_s"], pipe and pipe["items_per_s"]), "same_output_share": same})
    generation = None
    th, hf = result(doc, "generate-taskhead"), result(doc, "generate-hf")
    if th or hf:
        a, b = load_json(work / "gen-taskhead.json"), load_json(work / "gen-hf.json")
        generation = {"taskhead_items_per_s": th and th["items_per_s"], "hf_items_per_s": hf and hf["items_per_s"],
                      "ratio": ratio(th and th["items_per_s"], hf and hf["items_per_s"]),
                      "identical_share": sum(x == y for x, y in zip(a, b)) / len(a) if a and b else None}
    memory = {}
    for stage in ("fit", "test"):
        small, large = doc["measurements"].get(f"memory-small-{stage}"), doc["measurements"].get(f"memory-large-{stage}")
        if small and large and "result" in small and "result" in large:
            memory[stage] = {"small_examples": small["result"]["examples"], "large_examples": large["result"]["examples"],
                             "small_peak_rss_mb": small["peak_rss_mb"], "large_peak_rss_mb": large["peak_rss_mb"],
                             "growth": large["peak_rss_mb"] / small["peak_rss_mb"] - 1.0}
    optimizers = {}
    for name, m in doc["measurements"].items():
        if name.startswith("train-") and "result" in m:
            optimizers.setdefault(name.split("-", 3)[3], m["result"]["setup"]["optimizer"])
    late = {n: m["result"]["error_after_window"] for n, m in doc["measurements"].items() if "error_after_window" in m.get("result", {})}
    late.update({n: m["result"]["error_during_run"] for n, m in doc["measurements"].items() if "error_during_run" in m.get("result", {})})
    return {"matmul_flops_per_s": peak, "optimizers": optimizers, "late_errors": late, "training": training, "prediction": prediction, "generation": generation, "memory": memory}


# ---- markdown ----------------------------------------------------------------------------------------------------------


def f0(x, unit=""):
    return "—" if x is None else f"{x:,.0f}{unit}"


def f1(x, unit=""):
    return "—" if x is None else f"{x:,.1f}{unit}"


def pct(x):
    return "—" if x is None else f"{100 * x:.0f} %"


def times(x, target=None, below=False):
    return "—" if x is None else f"{x:.2f}× {ok(x, target, below) if target else ''}".strip()


def markdown(doc: dict) -> str:
    s, summ, mach = doc["settings"], doc["summary"], doc["machine"]
    tr = s["train"]
    lines = [
        f"# Throughput: taskhead vs Hugging Face baselines ({doc['mode']} run)",
        "",
        f"`{doc['command']}` — {doc['started']}, {doc['wall_s'] / 60:.1f} min. {mach.get('cpu')} "
        f"({mach.get('affinity')} usable cores, {', '.join(mach.get('flags', []))}), torch threads {doc['threads']}; "
        f"load average {mach['loadavg_start'][0]} at the start, {mach['loadavg_end'][0]} at the end. "
        f"torch {doc['versions']['torch']}, transformers {doc['versions']['transformers']}, lightning {doc['versions']['lightning']}; "
        f"git {str(doc['git']['commit'])[:10]}{' (dirty)' if doc['git']['dirty'] else ''}.",
        "",
    ]
    if doc["mode"] == "quick":
        lines += ["**Quick run: a few steps per variant. These numbers only show that the script works.**", ""]
    for n, m in doc["measurements"].items():
        if "error" in m:
            lines += [f"**{n} failed** ({m['error']}); its output is in the .log.", ""]
    for n, e in summ.get("late_errors", {}).items():
        lines += [f"**{n}** raised after its measured window (numbers kept): `{e}`", ""]
    if summ["training"]:
        lines += [
            "## Training: real (non-pad) tokens/s",
            "",
            f"MiniLM-L6 (all-MiniLM-L6-v2), same seeded subset, tokenizer, truncation and hyper-parameters in every variant. "
            f"IMDB: max_length {tr['imdb']['max_length']}, batch {tr['imdb']['batch_size']}, {tr['imdb']['warmup_steps']} warm-up + "
            f"{tr['imdb']['measured_steps']} measured steps. CoNLL: max_length {tr['conll']['max_length']}, batch "
            f"{tr['conll']['batch_size']}, {tr['conll']['warmup_steps']} + {tr['conll']['measured_steps']} steps. "
            f"Ratios compare real tokens/s (targets: ≥ {TARGETS['vs_default']}× example defaults, ≥ {TARGETS['vs_tuned']}× "
            f"tuned Trainer, ≥ {TARGETS['vs_plain']}× plain loop).",
            "",
            "| task | precision | taskhead | HF example defaults | HF tuned | plain loop | taskhead / defaults | taskhead / tuned | taskhead / plain |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in summ["training"]:
            t = r["tokens_per_s"]
            lines.append(f"| {TASK_NAMES[r['task']]} | {r['precision']} | {f0(t['taskhead'])} | {f0(t['hf-default'])} | "
                         f"{f0(t['hf-tuned'])} | {f0(t['plain'])} | {times(r['vs_default'], TARGETS['vs_default'])} | "
                         f"{times(r['vs_tuned'], TARGETS['vs_tuned'])} | {times(r['vs_plain'], TARGETS['vs_plain'])} |")
        peak = summ["matmul_flops_per_s"]
        lines += [
            "",
            "### Efficiency (MFU)",
            "",
            f"Model FLOP/s = (6 × non-embedding params + 12 × layers × hidden × padded seq_len) × real tokens / measured time; "
            f"*padded* counts pad tokens too. MFU = model FLOP/s ÷ torch.matmul FLOP/s at the model's shapes, same run "
            f"(fp32 {f1(peak['fp32'] and peak['fp32'] / 1e9)} GFLOP/s, bf16 {f1(peak['bf16'] and peak['bf16'] / 1e9)} GFLOP/s). "
            f"Target MFU ≥ {pct(TARGETS['mfu'])}.",
            "",
            "| task | precision | variant | samples/s | real tokens/s | padding | GFLOP/s real | GFLOP/s padded | MFU | MFU padded | peak RSS MB |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in summ["training"]:
            for v in TRAIN_VARIANTS:
                res = doc["measurements"].get(f"train-{r['task']}-{r['precision']}-{v}", {})
                x = res.get("result")
                if not x:
                    continue
                mfu = r["mfu"][v]
                lines.append(f"| {r['task']} | {r['precision']} | {VARIANT_NAMES[v]} | {f1(x['samples_per_s'])} | {f0(x['tokens_per_s'])} | "
                             f"{pct(x['padding_share'])} | {f1(x['model_flops_per_s'] / 1e9)} | {f1(x['padded_flops_per_s'] / 1e9)} | "
                             f"{pct(mfu)} {ok(mfu, TARGETS['mfu']) if mfu else ''} | {pct(r['mfu_padded'][v])} | {f0(res.get('peak_rss_mb'))} |")
        plain = [(r, result(doc, f"train-{r['task']}-{r['precision']}-plain")) for r in summ["training"]]
        plain = [(r, x) for r, x in plain if x and "phases_s" in x]
        if plain:
            lines += ["", "Where the plain loop's measured time goes (same batches as taskhead):", "",
                      "| task | precision | data | forward | backward | clip | optimizer step |", "|---|---|---:|---:|---:|---:|---:|"]
            for r, x in plain:
                ph, total = x["phases_s"], x["measured_s"]
                lines.append(f"| {r['task']} | {r['precision']} | " + " | ".join(pct(ph[k] / total) for k in ("data", "forward", "backward", "clip", "optimizer")) + " |")
    if summ["prediction"]:
        p = s["predict"]
        lines += [
            "",
            "## Prediction on raw text: items/s",
            "",
            f"Untrained exports (seeded random heads) loaded with `taskhead.load` vs `transformers.pipeline` on the same "
            f"directory; {p['imdb']['items']:,} IMDB test reviews (truncated at {p['imdb']['max_length']}) and "
            f"{p['conll']['items']:,} CoNLL test sentences (words joined by spaces, max_length {p['conll']['max_length']}); "
            f"batch size {p['imdb']['batch_size']}; tokenisation included; bf16 = autocast around both. Target ≥ {TARGETS['predict']}×.",
            "",
            "| task | precision | taskhead | pipeline | taskhead / pipeline | same output |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in summ["prediction"]:
            lines.append(f"| {TASK_NAMES[r['task']]} | {r['precision']} | {f1(r['taskhead_items_per_s'])} | {f1(r['pipeline_items_per_s'])} | "
                         f"{times(r['ratio'], TARGETS['predict'])} | {pct(r['same_output_share'])} |")
    g = summ["generation"]
    if g:
        gs = s["generate"]
        lines += [
            "",
            "## Generation (seq2seq, BERT2BERT warm-started from MiniLM, untrained): items/s",
            "",
            f"{gs['items']} XSum documents truncated at {gs['max_length']} tokens, batch {gs['batch_size']}, greedy, "
            f"max_new_tokens {gs['max_new_tokens']}, fp32; one GenerationConfig (the export's). Target ≥ {TARGETS['generate']}×.",
            "",
            "| taskhead | model.generate (input order) | taskhead / generate | identical outputs |",
            "|---:|---:|---:|---:|",
            f"| {f1(g['taskhead_items_per_s'])} | {f1(g['hf_items_per_s'])} | {times(g['ratio'], TARGETS['generate'])} | {pct(g['identical_share'])} |",
        ]
    if summ["memory"]:
        lines += ["", "## Memory: peak RSS of taskhead with a tiny BERT (2 layers, hidden 32)", "",
                  f"IMDB, max_length {s['memory']['max_length']}; `fit` = 1 epoch (10 % held out for validation), `test` "
                  f"= the untrained model on the test file. Target growth < {pct(TARGETS['memory'])}.", "",
                  "| stage | examples (small → large) | peak RSS small | peak RSS large | growth |", "|---|---|---:|---:|---:|"]
        for stage, m in summ["memory"].items():
            lines.append(f"| {stage} | {m['small_examples']:,} → {m['large_examples']:,} | {f0(m['small_peak_rss_mb'], ' MB')} | "
                         f"{f0(m['large_peak_rss_mb'], ' MB')} | {pct(m['growth'])} {ok(m['growth'], TARGETS['memory'], below=True)} |")
    mm = [(p, result(doc, f"matmul-{p}")) for p in PRECISIONS]
    mm = [(p, x) for p, x in mm if x]
    if mm:
        lines += ["", "## torch.matmul at the model's shapes (GFLOP/s)", "", "| dtype | " + " | ".join(mm[0][1]["rates_flops_per_s"]) + " | combined |",
                  "|---|" + "---:|" * (len(mm[0][1]["rates_flops_per_s"]) + 1)]
        for p, x in mm:
            lines.append(f"| {p} | " + " | ".join(f1(v / 1e9) for v in x["rates_flops_per_s"].values()) + f" | {f1(x['combined_flops_per_s'] / 1e9)} |")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in notes(doc)]
    lines += ["", "Raw numbers, per-step timings, settings and versions: the .json next to this file.", ""]
    return "\n".join(lines)


def notes(doc: dict) -> list[str]:
    summ, out = doc["summary"], []
    if summ["training"]:
        opts = summ.get("optimizers", {})
        wrong = []
        for name, m in doc["measurements"].items():
            dtype = m.get("result", {}).get("setup", {}).get("matmul_dtype") if name.startswith("train-") else None
            want = "torch.bfloat16" if "-bf16-" in name else "torch.float32"
            if name.startswith("train-") and "result" in m and dtype != want:
                wrong.append(f"{name} computed in {dtype}")
        out += [
            "Each number comes from its own fresh subprocess; peak RSS is that process's `ru_maxrss`.",
            "Precision check (dtype of the first Linear output in the run): "
            + ("every bf16 variant computed in bfloat16, every fp32 one in float32." if not wrong else "**" + "; ".join(wrong) + "**"),
            "Optimisers: " + "; ".join(f"{VARIANT_NAMES[v]}: {o}" for v, o in opts.items()) + ". fused=True is the fused CPU kernel (the Trainer's default `adamw_torch_fused`); "
            "fused/foreach None on CPU is PyTorch's per-tensor loop, several times slower per step (it matters most "
            "for the short CoNLL steps). The plain loop builds its AdamW with taskhead's `build_optimizer`.",
            "Batches: the plain loop iterates taskhead's own `train_dataloader()` (the very batches taskhead trains on); "
            "the Trainer variants draw their own (random, or HF's `LengthGroupedSampler`), so ratios use real tokens/s. "
            "The subsets hold 200 batches, so that HF's sampler sorts 50 batches at a time as taskhead's does.",
            "HF example defaults: run_glue.py pads every example to max_length (`pad_to_max_length=True`, "
            "`default_data_collator`); run_ner.py pads per batch (`pad_to_max_length=False`, "
            "`DataCollatorForTokenClassification`); both use a random sampler. run_glue's own max_seq_length default "
            "(128) is replaced by the common max_length here.",
            "taskhead runs its CLI as shipped (TensorBoard logger into a temp dir, progress bar, Throughput and LR "
            "callbacks); only validation (`limit_val_batches 0`) and top-k checkpoints are off.",
        ]
        reps = {n: m["result"]["repeats_tokens_per_s"] for n, m in doc["measurements"].items()
                if "repeats_tokens_per_s" in m.get("result", {})}
        if reps:
            out.append(f"Each training row pools {doc.get('repeats', 1)} runs made round-robin (all variants, then all "
                       "again); the spread between runs is the noise to read the ratios against. Real tokens/s per run: "
                       + "; ".join(f"{n.removeprefix('train-')} " + " / ".join(f"{x:,.0f}" for x in v) for n, v in reps.items()) + ".")
    if summ["prediction"]:
        out.append("Prediction outputs: IMDB compares the top label. NER compares entity lists, but the pipeline "
                   "(`aggregation_strategy='simple'`) groups sub-token predictions while taskhead tags words by their "
                   "first sub-token, so they differ by design (untrained heads).")
    if summ["generation"]:
        out.append("Generation uses an untrained BERT2BERT (random cross-attention): the identical-output share checks "
                   "that length-sorted batching changes nothing numerically that greedy decoding would notice.")
    if summ["memory"]:
        out.append("Memory: ru_maxrss includes file-backed pages of the memory-mapped tokenised cache (reclaimable).")
    if doc["mode"] == "quick":
        out.append("Quick run: too few steps and items to compare anything, and subsets too small for HF's "
                   "LengthGroupedSampler to group across batches.")
    return out
