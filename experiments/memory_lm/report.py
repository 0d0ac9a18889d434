"""The run's verdicts and its markdown summary: the design's win and failure
lines (experiment-design.md section 4) applied to results.json, and what the
run changed from the design (DEVIATIONS)."""
from __future__ import annotations

import numpy as np

from experiments.memory_lm.evaluate import paired_bootstrap


def _interp(curve: list[dict], gain: float) -> float:
    """Forgetting of an arm's curve at a given gain (linear, clamped at the ends)."""
    pts = sorted((p["gain"], p["forgetting"]) for p in curve)
    return float(np.interp(gain, [g for g, _ in pts], [f for _, f in pts]))


def claim1_verdict(arms: dict) -> dict:
    if "dense" not in arms:
        return {"note": "needs the dense arm"}
    dense = arms["dense"]["curve"]
    g_dense = dense[-1]["gain"]
    f_dense = dense[-1]["forgetting"]
    out = {"dense_gain": g_dense, "dense_forgetting": f_dense}
    for name in ("domain_random", "domain_data"):
        if name not in arms:
            continue
        last = arms[name]["curve"][-1]
        g, f = last["gain"], last["forgetting"]
        f_dense_at = _interp(dense, g)
        r = {"gain": g, "forgetting": f, "gain_share_of_dense": g / g_dense if g_dense else float("nan"),
             "dense_forgetting_at_same_gain": f_dense_at}
        r["win"] = bool(g >= 0.5 * g_dense and f <= 0.014 and f <= 0.25 * max(f_dense_at, 0.0))
        fail = [g < 0.25 * g_dense]
        if "lora" in arms:
            r["lora_forgetting_at_same_gain"] = _interp(arms["lora"]["curve"], g)
            fail.append(f >= r["lora_forgetting_at_same_gain"])
        r["failure"] = bool(any(fail))
        out[name] = r
    return out


def claim2_verdict(sess: dict, mems) -> dict:
    """The design's lines: bpb(0) > bpb(1k) > bpb(8k) >= bpb(64k), CIs of 0 -> 1k and 1k -> 8k
    below 0; wrong memory within the CI of M=0; correct minus wrong at max M < 0. Failure: flat
    (the CI of 0 -> max M holds 0) or non-monotone, or wrong memory gives most of the gain."""
    bpb = sess["bpb"]
    names = [f"M={m}" for m in mems]
    wrong = sess["settings"][-1]
    seq = [bpb[n] for n in names]
    monotone = all(a > b for a, b in zip(seq[:-2], seq[1:-1])) and seq[-2] >= seq[-1]
    key = ([("M=0", "M=1024"), ("M=1024", "M=8192")] if {"M=0", "M=1024", "M=8192"} <= set(bpb)
           else [(names[0], names[-1])])
    steps = [{"step": f"{a} -> {b}", **paired_from(sess, a, b)} for a, b in zip(names[:-1], names[1:])]
    key_steps = [{"step": f"{a} -> {b}", **paired_from(sess, a, b)} for a, b in key]
    whole = paired_from(sess, names[0], names[-1])
    w0 = paired_from(sess, names[0], wrong)
    cw = paired_from(sess, wrong, names[-1])
    gain, wrong_gain = bpb[names[0]] - bpb[names[-1]], bpb[names[0]] - bpb[wrong]
    out = {"monotone": monotone, "steps": steps, "key_steps": key_steps, "M0_to_max": whole,
           "wrong_minus_M0": w0, "wrong_within_ci_of_M0": w0["ci"][0] <= 0 <= w0["ci"][1],
           "correct_minus_wrong": cw, "correct_beats_wrong": cw["delta"] < 0}
    out["win"] = bool(monotone and all(k["ci"][1] < 0 for k in key_steps)
                      and out["wrong_within_ci_of_M0"] and out["correct_beats_wrong"])
    flat = whole["ci"][0] <= 0 <= whole["ci"][1]
    out["failure"] = bool(flat or not monotone or (gain > 0 and wrong_gain > 0.5 * gain))
    return out


def paired_from(sess: dict, a: str, b: str) -> dict:
    pa, pb = np.array(sess["per_doc_bpb"][a]), np.array(sess["per_doc_bpb"][b])
    r = paired_bootstrap(pa, pb, 1, sess.get("n_boot", 2000))   # documents score equal bytes
    return {"delta": r["delta"], "ci": [r["lo"], r["hi"]]}


# ---- the markdown summary --------------------------------------------------------------

def _ci(r: dict) -> str:
    return f"{r['delta']:+.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}]"


def _cl(r: dict) -> str:
    return f"{r['delta']:+.4f} [{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}]"


def summary_md(res: dict) -> str:
    cfg = res["config"]
    L = [f"# memory_lm results{' (--tiny)' if cfg['tiny'] else ''}", ""]
    v = res["versions"]
    L.append(f"python {v['python'].split()[0]}, sympy {v['sympy']}, torch {v['torch']}; bytes read "
             f"{res['data']['read']['bytes']:,} in {res['data']['read']['files']} files, sha256 "
             f"`{res['data']['read']['sha256']}`.")
    L.append("")
    p = res["pretrain"]
    L.append(f"**Phase P** ({cfg['p_steps']} steps, {res['timings_s']['P']:.0f} s): base val "
             f"{p['base_val_bpb']:.3f} bpb, SymPy val (zero-shot) {p['sympy_val_bpb']:.3f} bpb; "
             + (f"knowledge gate |g| {p['gate_norm']:.3f}; " if "gate_norm" in p else "no knowledge gate; ")
             + f"base slots hit on base val "
             f"{p['coverage_base_val']['fraction']:.3f}.")
    L.append("")
    ft = res["finetune"]
    L.append(f"**Claim 1: fine-tune on SymPy** ({cfg['ft_steps']} steps; deltas vs P on "
             f"{cfg['eval_bytes']:,}-byte eval sets, paired bootstrap 95 % CI over windows; "
             "forgetting = base-val bpb change with the banks stacked)")
    L.append("")
    L.append("| arm | trainable | s/step | SymPy bpb | SymPy delta [CI] | base bpb | forgetting [CI] |")
    L.append("|---|---:|---:|---:|---:|---:|---:|")
    L.append(f"| P | - | - | {ft['P']['sympy_bpb']:.3f} | | {ft['P']['base_bpb']:.3f} | |")
    for name, a in ft["arms"].items():
        f = a["final"]
        L.append(f"| {name} | {a['trainable_params']:,} | {a['seconds_per_step']:.2f} | {f['sympy_bpb']:.3f} | "
                 f"{_ci(f['gain_delta'])} | {f['base_bpb']:.3f} | {_ci(f['forgetting'])} |")
    L.append("")
    for name in ("domain_random", "domain_data"):
        w = ft["win"].get(name)
        if w:
            L.append(f"- {name}: gain {w['gain']:+.4f} = {w['gain_share_of_dense']:.0%} of dense; forgetting "
                     f"{w['forgetting']:+.4f} vs dense {w['dense_forgetting_at_same_gain']:+.4f} at the same gain"
                     + (f", LoRA {w['lora_forgetting_at_same_gain']:+.4f}" if "lora_forgetting_at_same_gain" in w else "")
                     + f". **Win line: {'met' if w['win'] else 'not met'}; failure line: "
                       f"{'hit' if w['failure'] else 'not hit'}.**")
    L.append("")
    s = res["session"]
    L.append(f"**Claim 2: session memory** ({len(s['docs'])} held-out stdlib test files, prefix "
             f"{s['prefix_bytes']:,} B, span {s['span_bytes']:,} B, {s['scored_bytes']:,} bytes scored "
             f"identically in every setting: {s['identical_bytes']}; phase S {cfg['s_steps']} steps)")
    L.append("")
    L.append("| setting | bpb | delta vs M=0 [CI over documents] |")
    L.append("|---|---:|---:|")
    m0 = "M=0"
    for name in ["no-episodic"] + s["settings"]:
        d = "" if name == m0 else _cl(paired_from(s, m0, name))
        L.append(f"| {name} | {s['bpb'][name]:.4f} | {d} |")
    w = s["win"]
    L.append("")
    L.append(f"- monotone: {w['monotone']}; " + "; ".join(f"{k['step']}: {_cl(k)}" for k in w["key_steps"])
             + f"; correct - wrong at max M: {_cl(w['correct_minus_wrong'])}; "
             f"wrong - M=0: {_cl(w['wrong_minus_M0'])}. **Win line: {'met' if w['win'] else 'not met'}; "
             f"failure line: {'hit' if w['failure'] else 'not hit'}.**")
    L.append("")
    m = res["mechanics"]
    bb = m["base_bank"]
    L.append(f"**Mechanics:** base bank checksum at freeze `{bb['checksum_at_freeze']}`; export sha256 "
             f"unchanged after fine-tuning: {bb['unchanged']}; writes after freeze: {bb['writes_after_freeze']}; "
             f"zero-gate episodic logits equal: {m['zero_gate_logits_equal']}; uniform logits "
             f"{m['uniform_logits_bpb']:.3f} bpb; domain arms leave dense params bitwise equal: "
             + ", ".join(f"{k}={a['mechanics']['dense_params_bitwise_equal']}/untouched rows "
                         f"{a['mechanics']['untouched_rows_bitwise_equal']}"
                         for k, a in ft["arms"].items() if "mechanics" in a) + ".")
    L.append("")
    t = res["timings_s"]
    L.append("**Timings (wall s):** " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()))
    L.append("")
    L.append("**CPU s (this process + the daemon):** "
             + ", ".join(f"{k} {v:.0f}" for k, v in res.get("cpu_s", {}).items()))
    L.append("")
    L.append(f"Plots: {res['plots']}")
    return "\n".join(L) + "\n"


DEVIATIONS = [
    "phase P: 800 steps (the design's own fallback), not 1000: the 2 shared cores ran ~2x slower than "
    "the design's timings",
    "session eval: 8 documents (12 planned) and 2 episodic query heads (H=4 planned): a flat search of "
    "12 x 1024 queries over 64k rows took ~13 s here under load, and the 64 KB prefix pass through the "
    "first blocks costs ~0.8M tokens of forward for 12 documents",
    "episodic layer: knnlayer.MemorizingAttention beside block 4's attention with a zero gate (its local "
    "path trains the key/value projections that remember() stores), replacing the design's hand-tied write path",
    "knowledge layer: PKM's query BatchNorm (no affine, frozen after P) on its input and no gate "
    "(gate=True planned). It trains from scratch with the model, so no zero gate is needed to keep a trained "
    "function; in 100-step probes the gated layer stayed nearly shut (mean |g| 0.007) and hit 0.9 % of the "
    "65,536 slots on base val, BatchNorm without gate 2.8 % at the same bpb (4.07-4.09)",
    "stdlib: every test dir (test/, tests/, idle_test/ at any depth) is excluded, not only the top-level test/",
    "domain_data's bank is HNSW32 (efSearch 32), not Flat: a Flat search of 8k queries over 16k keys took "
    "5-10 s here under load, ~10x HNSW (the random-key bank is product keys 128^2, as designed)",
    "k-means for data keys: knnlayer.domain.data_keys (torch spherical k-means) on 65,536 queries, 8 "
    "iterations, not faiss.Kmeans on ~100k",
    "eval sets: one fixed set of evenly spaced 256-byte windows per corpus (64 KB); the curve along the "
    "steps scores every 4th window (16 KB, not 32 KB); step 0 of dense/LoRA is the P model itself",
    "wrong-memory control: the last max(M) prefix rows of another document and nothing of its own written "
    "during the span (M>0 settings write each scored segment)",
    "dense FT and LoRA use AdamW with weight decay 0 and a constant lr; P uses wd 0.1 on 2-d params",
    "not run: the optional TF-IDF arm (e), the --sweep second lr, the no-KNN-layer reference, Shakespeare",
]
