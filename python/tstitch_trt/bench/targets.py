"""The speed targets, checked on the min of repeats."""

from __future__ import annotations

TARGETS = {
    "ort_speedup_vs_reference": 1.3,  # at least, end to end
    "ratio_gap_pct": 5.0,  # |measured - ideal| / ideal, at every ratio
    "host_overhead_pct": 2.0,  # of the step time
}
# CPU backends, end to end, per workload: (backend, baseline, at least x faster) (issue 15)
SPEEDUP_TARGETS = {
    "demo": [("openvino", "ort", 1.25), ("openvino-bf16", "ort", 1.8)],
    "dit-s-xl": [("openvino-bf16", "ort", 1.8), ("openvino-bf16", "reference", 2.5),
                 ("openvino-bf16", "reference-bf16", 1.25)],
}
_BASELINE_NAMES = {"reference": "the reference loop", "reference-bf16": "the reference loop under bf16 autocast"}


def evaluate_targets(result: dict) -> list[dict]:
    """The speed targets, checked on the min of repeats (see the module docstring)."""
    out = []
    be = result["backends"]
    ort = be.get("ort", {})
    if "speedup_vs_reference" in ort.get("e2e", {}):
        v = ort["e2e"]["speedup_vs_reference"]["min"]
        t = TARGETS["ort_speedup_vs_reference"]
        out.append({"target": f"ort end to end >= {t}x faster than the reference loop", "backend": "ort",
                    "value": round(v, 3), "median": round(ort["e2e"]["speedup_vs_reference"]["median"], 3),
                    "pass": v >= t})
    workload = result.get("workload", {}).get("name")
    for name, baseline, t in SPEEDUP_TARGETS.get(workload, []):
        sp = be.get(name, {}).get("e2e", {}).get("speedup_vs", {}).get(baseline)
        if sp:
            out.append({"target": f"{name} end to end >= {t}x faster than {_BASELINE_NAMES.get(baseline, baseline)}",
                        "backend": name, "value": round(sp["min"], 3), "median": round(sp["median"], 3),
                        "pass": sp["min"] >= t})
    for name, e in be.items():
        sw = e.get("ratio_sweep")
        if sw and sw.get("status") == "ok":
            v = sw["max_abs_gap_pct"]["min"]
            t = TARGETS["ratio_gap_pct"]
            out.append({"target": f"stitched time within {t}% of the ideal line at every ratio", "backend": name,
                        "value": round(v, 2), "median": round(sw["max_abs_gap_pct"]["median"], 2), "pass": v <= t})
        t = TARGETS["host_overhead_pct"]
        for key, what in (("host_overhead_pct", "in the loop: step wall - engine"),
                          ("trajectory_overhead_pct", "whole trajectory: planning, upload, loop, read-back")):
            hp = e.get("e2e", {}).get(key)
            if hp:
                out.append({"target": f"host overhead < {t}% of the step time ({what})", "backend": name,
                            "value": round(hp["min"], 3), "median": round(hp["median"], 3), "pass": hp["min"] < t})
    return out
