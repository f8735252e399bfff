"""bench.json and bench.md: the headline table and the detailed Markdown report."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from tstitch_trt.bench.plots import write_plots


def write_outputs(result: dict, out: Path, plot: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _atomic_text(out / "bench.json", json.dumps(result, indent=2, default=_json_default))
    _atomic_text(out / "bench.md", markdown_report(result))
    if plot:
        result.setdefault("plots", [])
        for p in write_plots(result, out):
            result["plots"].append(str(p))


def _json_default(o: object) -> object:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _ms(s: dict | None, scale: float = 1.0, digits: int = 2) -> str:
    if not s:
        return "-"
    return f"{s['min'] * scale:.{digits}f} / {s['median'] * scale:.{digits}f}"


def markdown_summary(result: dict) -> str:
    """The headline table (printed to the terminal)."""
    w = result["workload"]
    lines = [f"## {w['name']}: {' -> '.join(w['models'])}, DDIM {w['steps']} steps, batch {w['batch']}, "
             f"cfg {w['cfg_scale']}, ratio {w['ratio']} (min / median of {w['repeats']})", "",
             "| runner | device | end to end s | speedup vs reference | loop host overhead ms/step (% of step) "
             "| trajectory host overhead ms/step (%) | peak RSS added MB |",
             "|---|---|---|---|---|---|---|"]
    ref = result.get("reference") or {}
    if ref.get("status") == "ok" and "e2e" in ref:
        host = ref.get("memory", {}).get("host", {})
        lines.append(f"| reference loop (eager PyTorch) | {ref['device']} | {_ms(ref['e2e']['seconds'], digits=3)} "
                     f"| 1.00 | - | - | {host.get('peak_rss_added_mb', '-')} |")
    ref16 = result.get("reference_bf16") or {}
    if ref16.get("status") == "ok" and "e2e" in ref16 and ref.get("e2e"):
        host = ref16.get("memory", {}).get("host", {})
        sp = {k: ref["e2e"]["seconds"][k] / ref16["e2e"]["seconds"][k] for k in ("min", "median")}
        lines.append(f"| reference loop under torch.autocast(bf16) | {ref16['device']} "
                     f"| {_ms(ref16['e2e']['seconds'], digits=3)} | {sp['min']:.2f} / {sp['median']:.2f} | - | - "
                     f"| {host.get('peak_rss_added_mb', '-')} |")
    for name, e in result["backends"].items():
        if e.get("status") != "ok":
            lines.append(f"| {name} | - | skipped: {e.get('reason')} | | | | |")
            continue
        e2e = e.get("e2e", {})
        sp = e2e.get("speedup_vs_reference")
        sp_s = f"{sp['min']:.2f} / {sp['median']:.2f}" if sp else "-"
        cols = []
        for ms_key, pct_key in (("host_overhead_ms_per_step", "host_overhead_pct"),
                                ("trajectory_overhead_ms_per_step", "trajectory_overhead_pct")):
            ho, hp = e2e.get(ms_key), e2e.get(pct_key)
            cols.append(f"{_ms(ho, digits=3)} ({hp['min']:.3f}% / {hp['median']:.3f}%)" if ho and hp else "-")
        host = e.get("memory", {}).get("host", {})
        lines.append(f"| {name} | {e.get('device')} | {_ms(e2e.get('seconds'), digits=3)} | {sp_s} | {cols[0]} "
                     f"| {cols[1]} | {host.get('peak_rss_added_mb', '-')} |")
    lines += speedup_table(result)
    if result.get("targets"):
        lines += ["", "| target | backend | value (min) | median | pass |", "|---|---|---|---|---|"]
        for t in result["targets"]:
            lines.append(f"| {t['target']} | {t['backend']} | {t['value']} | {t['median']} | "
                         f"{'yes' if t['pass'] else 'NO'} |")
    return "\n".join(lines)


def speedup_table(result: dict) -> list[str]:
    """Each backend against every other runner of the same end-to-end round robin (min / median)."""
    rows = {n: e["e2e"]["speedup_vs"] for n, e in result["backends"].items() if e.get("e2e", {}).get("speedup_vs")}
    if not rows:
        return []
    cols = list(dict.fromkeys(c for sv in rows.values() for c in sv))
    lines = ["", "speedup, end to end, measured in the same round robin (x faster than the column; min / median)", "",
             "| backend | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, sv in rows.items():
        cells = [f"{sv[c]['min']:.2f} / {sv[c]['median']:.2f}" if c in sv else "-" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def markdown_report(result: dict) -> str:
    h, la = result["host"], result["load_average"]
    lines = ["# tstitch-trt benchmark", "", f"`{result['command']}`", "",
             f"- host: {h['cpu']}, {h['usable_cores']} usable cores, {h['threads']} threads"
             + (f", GPU {h['gpu']}" if h.get("gpu") else ""),
             f"- versions: onnxruntime {h.get('onnxruntime', '-')}, openvino {h.get('openvino', '-')}, "
             f"torch {h.get('torch', '-')}, numpy {h['numpy']}; native bf16: {h.get('native_bf16', '-')}",
             f"- load average (1, 5, 15 min): start {la.get('start')}, end {la.get('end')}",
             f"- created {result['created']}"]
    if result.get("idle_gate"):
        g = result["idle_gate"]
        lines.append(f"- --wait-idle {g['max_wait_s']}: {g['waits']} timed runs waited {g['waited_s']} s in all for "
                     f"other processes to use < {g['busy_cores_threshold']} cores ({g['timeouts']} gave up waiting)")
    lines.append("")
    lines += [markdown_summary(result), ""]
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    step_rows = []
    for name, e in result["backends"].items():
        for model, per_b in (e.get("step_ms") or {}).items():
            for b, s in per_b.items():
                step_rows.append(f"| {name} | {model} | {b} | {_ms(s['wall_ms'])} | {_ms(s.get('engine_ms'))} "
                                 f"| {s['gflops_at_min']} |")
    if step_rows:
        lines += ["", "## ms per step (min / median; CFG doubles the batch inside the step)", "",
                  "| backend | model | batch | wall ms | engine ms | GFLOP/s at min |", "|---|---|---|---|---|---|"]
        lines += step_rows
    for name, e in result["backends"].items():
        sw = e.get("ratio_sweep")
        if not sw or sw.get("status") != "ok":
            continue
        lines += ["", f"## {name}: time against the ratio (s, min / median) next to the ideal line", "",
                  "| ratio | small steps | measured s | ideal s | gap % |", "|---|---|---|---|---|"]
        for p in sw["points"]:
            lines.append(f"| {p['ratio']:.2f} | {p['small_steps']} | {_ms(p['seconds'], digits=3)} "
                         f"| {_pair(p['ideal_seconds'], 3)} "
                         f"| {_pair(p['gap_pct'], 2)} |")
    mem_rows = []
    for name, e in list(result["backends"].items()) + [("reference", result.get("reference") or {}),
                                                       ("reference-bf16", result.get("reference_bf16") or {})]:
        m = e.get("memory")
        if m:
            host, dev = m.get("host", {}), m.get("device")
            mem_rows.append(f"| {name} | {host.get('rss_before_mb')} | {host.get('peak_rss_mb')} "
                            f"| {host.get('peak_rss_added_mb')} | {json.dumps(dev) if dev else '-'} |")
    if mem_rows:
        lines += ["", "## memory", "", "| runner | RSS before MB | peak RSS MB | peak added MB | device |",
                  "|---|---|---|---|---|"] + mem_rows
    return "\n".join(lines) + "\n"


def _pair(d: dict, digits: int) -> str:
    return f"{d['min']:.{digits}f} / {d['median']:.{digits}f}"
