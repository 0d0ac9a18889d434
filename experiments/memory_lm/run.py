"""The experiment, end to end, through a real daemon:

    python -m experiments.memory_lm.run [--tiny] [--out DIR] [--steps-scale F] [--steps P,FT,S]

1. spawns `memoryd serve` on a temp unix socket with a temp data dir and talks
   to it with knnlayer.MemoryClient, as a user would;
2. phase P: a byte GPT with a product-key base bank (kind base) and its value
   table; push the table into the bank, freeze it, record its checksum;
3. claim 1: four fine-tune arms on SymPy from the P weights (dense, LoRA,
   domain bank with random keys, domain bank with data keys), evaluated along
   the steps on base-val and SymPy-val; the base bank's checksum again;
4. claim 2: phase S (episodic layer in the last block, backbone frozen), then
   the session-memory eval on held-out long documents;
5. writes results.json, summary.md and (with matplotlib) two PNGs to --out.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from experiments.memory_lm.report import DEVIATIONS, claim1_verdict, claim2_verdict, summary_md

ROOT = Path(__file__).resolve().parents[2]


def _cpu(proc=None) -> float:
    """CPU seconds (user + system) of this process, plus the daemon's when given."""
    t = os.times()
    total = t.user + t.system
    if proc is not None:
        try:
            f = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def log(msg: str) -> None:
    print(msg, flush=True)


def export_sha256(memory, bank: str) -> str:
    """sha256 over the bank's export: ids, keys, values of every row, in id order."""
    chunks = list(memory.export(bank))
    ids = np.concatenate([c.ids for c in chunks])
    order = np.argsort(ids, kind="stable")
    h = hashlib.sha256()
    for field in ("ids", "keys", "values"):
        parts = [getattr(c, field) for c in chunks]
        if parts[0] is None:
            continue
        h.update(np.ascontiguousarray(np.concatenate(parts)[order]).tobytes())
    return "sha256:" + h.hexdigest()


def frozen_write_raises(memory, bank: str, dim: int, value_dim: int) -> dict:
    from memoryd.errors import BankFrozen
    out = {}
    for what, call in [("update_values", lambda: memory.update_values(
                            bank, np.array([0]), np.zeros((1, value_dim), np.float32))),
                       ("add", lambda: memory.add(bank, np.eye(1, dim, dtype=np.float32),
                                                  np.zeros((1, value_dim), np.float32)))]:
        try:
            call()
            out[what] = "accepted"
        except BankFrozen:
            out[what] = "BankFrozen"
        except Exception as e:               # another refusal is recorded as what it is
            out[what] = type(e).__name__
    return out


def finite_check(obj, path="") -> list[str]:
    """Paths of non-finite floats in a JSON-like object."""
    bad = []
    if isinstance(obj, float):
        if not math.isfinite(obj):
            bad.append(path)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            bad += finite_check(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            bad += finite_check(v, f"{path}[{i}]")
    return bad


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m experiments.memory_lm.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the seconds-long smoke variant")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default experiments/results/, --tiny: experiments/results/tiny/)")
    ap.add_argument("--steps-scale", type=float, default=1.0,
                    help="multiply P / FT / S steps (e.g. 0.05 to time the full configuration)")
    ap.add_argument("--steps", default=None, help="P,FT,S step counts, e.g. 1000,200,300")
    ap.add_argument("--arms", default=None, help="comma-separated subset of the fine-tune arms")
    ap.add_argument("--docs", type=int, default=None, help="long documents for the session eval")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a RunConfig field, e.g. --set lr_domain=0.03 or "
                         "--set model.epi_combine=gate (repeatable)")
    return ap.parse_args(argv)


def build_config(args):
    from dataclasses import replace
    from experiments.memory_lm import config
    cfg = config.tiny() if args.tiny else config.full()
    if args.steps_scale != 1.0:
        cfg = cfg.scaled(args.steps_scale)
    if args.steps:
        p, ft, s = (int(v) for v in args.steps.split(","))
        evals = tuple(sorted({min(ft, round(e * ft / cfg.ft_steps)) for e in cfg.ft_evals} | {0, ft}))
        cfg = replace(cfg, p_steps=p, ft_steps=ft, ft_evals=evals, s_steps=s,
                      p_warmup=min(cfg.p_warmup, max(1, p // 20)))
    if args.arms:
        cfg = replace(cfg, arms=tuple(a.strip() for a in args.arms.split(",") if a.strip()))
    if args.docs:
        cfg = replace(cfg, docs=args.docs)
    for item in args.set:
        cfg = _override(cfg, item)
    return cfg


def _override(cfg, item: str):
    """cfg with FIELD=VALUE applied (VALUE parsed as the field's current type)."""
    from dataclasses import fields, replace
    name, sep, value = item.partition("=")
    if name.startswith("model."):                # a ModelConfig field: --set model.epi_combine=gate
        return replace(cfg, model=_override(cfg.model, f"{name[6:]}={value}"))
    known = {f.name for f in fields(cfg)}
    if not sep or name not in known or name == "model":
        raise SystemExit(f"--set takes FIELD=VALUE with FIELD one of {sorted(known - {'model'})}; "
                         f"got {item!r}")
    current = getattr(cfg, name)
    if isinstance(current, bool):
        parsed = value.lower() in ("1", "true", "yes")
    elif isinstance(current, tuple):
        parsed = tuple(type(current[0])(v) for v in value.split(",")) if current else (value,)
    elif current is None:
        parsed = int(value)
    else:
        parsed = type(current)(value)
    return replace(cfg, **{name: parsed})


def main(argv=None) -> dict:
    args = parse(argv)
    signal.signal(signal.SIGTERM, _sigterm)   # run the finally blocks: the daemon goes with us
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.threads or args.tiny:     # tiny ops: one thread beats two on a shared machine
        torch.set_num_threads(args.threads or 1)
    t_start, cpu_start = time.perf_counter(), _cpu()
    from experiments.memory_lm import data, evaluate, plots, session_eval, train
    from experiments.memory_lm.model import GPT, clone, dense_state
    from knnlayer import MemoryClient
    from knnlayer.bank_tools import create_base_bank
    from memoryd.daemon.server import spawn

    cfg = build_config(args)
    # the daemon boots while the data loads: memoryd serve on a temp unix socket, temp data dir
    tmp = Path(tempfile.mkdtemp(prefix="memlm-"))
    booting = ThreadPoolExecutor(1).submit(spawn, tmp / "mem", stderr=open(tmp / "memoryd.log", "wb"))
    out = args.out or (ROOT / "experiments" / "results" / ("tiny" if cfg.tiny else ""))
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    c = cfg.model
    T = c.T
    timings: dict[str, float] = {}
    cpu_s: dict[str, float] = {}             # CPU seconds of this process + the daemon, per phase
    results: dict = {"config": cfg.to_dict(), "versions": {**data.versions(),
                     "torch": torch.__version__, "numpy": np.__version__},
                     "deviations": DEVIATIONS}

    try:
        # ---- data ---------------------------------------------------------------------
        t0, c0 = time.perf_counter(), _cpu()
        hasher = data.Hasher()
        base = data.load_corpus("stdlib", data.stdlib_root(), data.STDLIB_EXCLUDE, hasher, cfg.corpus_budget)
        dom = data.load_corpus("sympy", data.sympy_root(), data.SYMPY_EXCLUDE, hasher, cfg.corpus_budget)
        docs = data.long_docs(cfg.docs, cfg.prefix + cfg.span, hasher)
        streams = data.stream_files(cfg.s_min_file, hasher, limit=2 * cfg.batch if cfg.tiny else None)
        splits = {}
        for corpus, root, excl in [(base, data.stdlib_root(), data.STDLIB_EXCLUDE),
                                   (dom, data.sympy_root(), data.SYMPY_EXCLUDE)]:
            again = data.split_files(data.list_files(root, excl))
            splits[corpus.name] = {
                "deterministic": again == (corpus.train_files, corpus.val_files),
                "disjoint": not set(corpus.train_files) & set(corpus.val_files)}
        doc_names = {n for n, _ in docs}
        splits["docs_not_in_training"] = not doc_names & set(base.train_files) and all(
            n.split("/")[0] == "test" for n in doc_names)
        results["data"] = {"stdlib": base.describe(), "sympy": dom.describe(),
                           "docs": sorted(doc_names), "stream_files": len(streams),
                           "stream_bytes": int(sum(s.size for _, s in streams)),
                           "read": hasher.summary(), "splits": splits}
        base_final = data.fixed_windows(base.val, cfg.eval_bytes, T)
        dom_final = data.fixed_windows(dom.val, cfg.eval_bytes, T)
        cs = cfg.curve_stride                     # the curve along the steps: every cs-th window
        base_curve, dom_curve = base_final[::cs], dom_final[::cs]
        timings["data"] = time.perf_counter() - t0
        cpu_s["data"] = _cpu() - c0
        log(f"data: stdlib {base.describe()}, sympy {dom.describe()}, {len(docs)} docs, "
            f"{len(streams)} stream files; sha256 {hasher.summary()['sha256'][:16]}... "
            f"({timings['data']:.1f} s)")
    except BaseException:
        _stop(booting, tmp)
        raise

    def ev(model, windows):
        return evaluate.window_bits(model, windows, cfg.eval_batch)

    mem = None
    try:
        proc, address = booting.result()
        mem = MemoryClient(address)
        log(f"memoryd serving at {address}")
        # ---- phase P ------------------------------------------------------------------
        t0, c0 = time.perf_counter(), _cpu(proc)
        model = GPT(c, mem)
        create_base_bank(mem, "base", c.base_slots, c.know_dk, c.know_dv, index="product-keys",
                         seed=0, kind="base", values=model.knowledge.value_table("base").weight)
        log(f"phase P: {sum(p.numel() for n, p in model.named_parameters() if '.value_tables.' not in n):,} "
            f"dense params + {c.base_slots:,} x {c.know_dv} value table, {cfg.p_steps} steps")
        p_log = train.pretrain(model, base.train, cfg, log)
        model.freeze_query_norm()                # eval-mode statistics from here on
        model.knowledge.push_values(bank="base")
        info = mem.freeze_bank("base")
        sha_before = export_sha256(mem, "base")
        log(f"  base bank frozen: checksum {info.checksum}; export {sha_before[:23]}...")
        p_base, p_dom = ev(model, base_final), ev(model, dom_final)
        nb, nbc = base_final.shape[0] * T, base_curve.shape[0] * T
        p_log.update({
            "base_val_bpb": evaluate.bpb(p_base, nb), "sympy_val_bpb": evaluate.bpb(p_dom, nb),
            "coverage_base_val": train.slot_coverage(model, base_final, cfg.eval_batch)})
        results["pretrain"] = p_log
        timings["P"], cpu_s["P"] = time.perf_counter() - t0, _cpu(proc) - c0
        log(f"  P: base val {p_log['base_val_bpb']:.3f} bpb, SymPy val {p_log['sympy_val_bpb']:.3f} bpb, "
            f"slots hit {p_log['coverage_base_val']['fraction']:.3f} ({timings['P']:.0f} s)")
        p_dense = dense_state(model)
        p_table = model.knowledge.value_table("base").weight.detach().clone()
        mech: dict = {"base_bank": {"checksum_at_freeze": info.checksum, "export_sha256_before": sha_before,
                                    "frozen": bool(info.frozen), "kind": info.spec.kind}}
        mech["base_bank"]["writes_after_freeze"] = frozen_write_raises(mem, "base", c.know_dk, c.know_dv)
        with torch.no_grad():
            u = torch.zeros(2, T, 256)
            mech["uniform_logits_bpb"] = evaluate.bpb_of_logits(u, torch.randint(0, 256, (2, T)))

        # ---- claim 1: fine-tune arms ---------------------------------------------------
        t0, c0 = time.perf_counter(), _cpu(proc)
        p_curve = (evaluate.bpb(p_base[::cs], nbc), evaluate.bpb(p_dom[::cs], nbc))
        arms_out: dict = {}
        for name in cfg.arms:
            ta, ca = time.perf_counter(), _cpu(proc)
            arm = train.make_arm(name, model, mem, dom.train, cfg)
            curve, final = [], {}

            def on_eval(step, m, arm=arm, curve=curve, final=final):
                if step == 0 and arm.name in ("dense", "lora"):
                    b, d = p_curve                        # the P model itself (LoRA's B is 0)
                elif step == cfg.ft_steps:
                    fb, fd = ev(m, base_final), ev(m, dom_final)
                    final.update(base=fb, dom=fd)
                    b, d = evaluate.bpb(fb[::cs], nbc), evaluate.bpb(fd[::cs], nbc)
                else:
                    b = evaluate.bpb(ev(m, base_curve), nbc)
                    d = evaluate.bpb(ev(m, dom_curve), nbc)
                curve.append({"step": step, "base_bpb": b, "sympy_bpb": d,
                              "forgetting": b - p_curve[0], "gain": p_curve[1] - d})

            ft = train.finetune(arm, dom.train, cfg, on_eval, log)
            a = {"trainable_params": arm.trainable, "notes": arm.notes, "curve": curve,
                 "setup_seconds": arm.setup_seconds, "train_seconds": ft["train_seconds"],
                 "seconds_per_step": ft["train_seconds"] / max(1, cfg.ft_steps),
                 "final": {"base_bpb": evaluate.bpb(final["base"], nb),
                           "sympy_bpb": evaluate.bpb(final["dom"], nb),
                           "forgetting": evaluate.paired_bootstrap(p_base, final["base"], T, cfg.n_boot, cfg.seed),
                           "gain_delta": evaluate.paired_bootstrap(p_dom, final["dom"], T, cfg.n_boot, cfg.seed)}}
            if arm.domain_bank is not None:
                now = dense_state(arm.model)
                same = all(torch.equal(now[k], v) for k, v in p_dense.items())
                table = arm.model.knowledge.value_table(arm.domain_bank).weight.detach()
                init = torch.from_numpy(np.stack([g for g in _bank_values(mem, arm.domain_bank)]))
                changed = (table != init).any(dim=1)
                untouched = torch.ones(len(table), dtype=torch.bool)
                untouched[list(arm.touched)] = False
                a["mechanics"] = {
                    "dense_params_bitwise_equal": bool(same and set(now) == set(p_dense)),
                    "base_table_bitwise_equal": bool(torch.equal(
                        arm.model.knowledge.value_table("base").weight, p_table)),
                    "rows_touched": len(arm.touched), "rows_changed": int(changed.sum()),
                    "untouched_rows_bitwise_equal": not bool((changed & untouched).any()),
                    "routed_base_bpb": p_log["base_val_bpb"],
                    "routed_note": "base text without the domain bank is the P model exactly "
                                   "(dense params and base table bitwise equal): zero forgetting by construction"}
                mem.delete_bank(arm.domain_bank)
            arms_out[name] = a
            log(f"  arm {name}: SymPy {a['final']['sympy_bpb']:.3f} (gain {-a['final']['gain_delta']['delta']:+.3f}), "
                f"base {a['final']['base_bpb']:.3f} (forgetting {a['final']['forgetting']['delta']:+.4f}) "
                f"[{time.perf_counter() - ta:.0f} s]")
            timings[f"FT:{name}"], cpu_s[f"FT:{name}"] = time.perf_counter() - ta, _cpu(proc) - ca
            del arm
        results["finetune"] = {"P": {"base_bpb": p_log["base_val_bpb"], "sympy_bpb": p_log["sympy_val_bpb"],
                                     "curve_base_bpb": p_curve[0], "curve_sympy_bpb": p_curve[1]},
                               "arms": arms_out, "win": claim1_verdict(arms_out)}
        info_after = mem.bank_info("base")
        sha_after = export_sha256(mem, "base")
        mech["base_bank"].update({"export_sha256_after": sha_after,
                                  "checksum_catalog_after": info_after.checksum,
                                  "unchanged": sha_after == sha_before and info_after.checksum == info.checksum})
        log(f"  base bank after fine-tuning: export {sha_after[:23]}... unchanged: {mech['base_bank']['unchanged']}")
        timings["FT"], cpu_s["FT"] = time.perf_counter() - t0, _cpu(proc) - c0

        # ---- claim 2: phase S + session eval ---------------------------------------------
        t0, c0 = time.perf_counter(), _cpu(proc)
        s_model = clone(model, mem)
        s_model.add_episodic(mem)
        probe = torch.from_numpy(base_final[:2, :-1].astype(np.int64))
        with torch.no_grad():
            l0, l1 = model(probe), s_model(probe)
        mech["zero_gate_logits_equal"] = bool(torch.equal(l0, l1))
        mech["zero_gate_max_abs_diff"] = float((l0 - l1).abs().max())
        s_log = train.train_session(s_model, mem, streams, cfg, log)
        timings["S"], cpu_s["S"] = time.perf_counter() - t0, _cpu(proc) - c0
        t0, c0 = time.perf_counter(), _cpu(proc)
        sess = session_eval.session_eval(s_model, mem, docs, cfg, log)
        sess["win"] = claim2_verdict(sess, cfg.mems)
        results["phase_s"] = s_log
        results["session"] = sess
        mech["session_identical_bytes"] = sess["identical_bytes"]
        timings["session_eval"], cpu_s["session_eval"] = time.perf_counter() - t0, _cpu(proc) - c0
        cpu_s["total"] = _cpu(proc) - cpu_start
        results["mechanics"] = mech
    finally:
        _stop(booting, tmp, mem)
    timings["total"] = time.perf_counter() - t_start
    results["timings_s"] = timings
    results["cpu_s"] = cpu_s
    results["nonfinite"] = finite_check(results)

    pngs = []
    if args.no_plots:
        results["plots"] = "skipped (--no-plots)"
    elif not plots.available():
        results["plots"] = "skipped: matplotlib not installed (pip install '.[experiment]')"
    else:
        pngs = [plots.pareto(results, out).name, plots.session_curve(results, out).name]
        results["plots"] = pngs
    (out / "results.json").write_text(json.dumps(results, indent=1, default=_jsonable))
    (out / "summary.md").write_text(summary_md(results))
    log(f"\n{summary_md(results)}")
    log(f"wrote {out / 'results.json'}, {out / 'summary.md'}"
        + (f", {', '.join(pngs)}" if pngs else f"; plots {results['plots']}"))
    return results


def _sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _stop(booting, tmp: Path, mem=None) -> None:
    """Close the client, SIGTERM the daemon (graceful), remove its temp data dir."""
    if mem is not None:
        mem.close()
    try:
        proc, _ = booting.result()
    except Exception:
        proc = None
    if proc is not None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except Exception:
            proc.kill()
            proc.wait()
    shutil.rmtree(tmp, ignore_errors=True)


def _bank_values(memory, bank: str):
    """The bank's values in id order (its domain table's initial state: nothing writes the bank)."""
    chunks = list(memory.export(bank))
    ids = np.concatenate([ch.ids for ch in chunks])
    vals = np.concatenate([ch.values for ch in chunks])
    return vals[np.argsort(ids)]


def _jsonable(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


# ---- verdicts against the design's win / failure lines -----------------------------------


if __name__ == "__main__":
    main()
