"""The C++ runtime's golden files (cpp/tests/golden, cpp/tests/data/toy_pair, toy_sd) are what the Python package
produces today: regenerated here and compared byte for byte, so a change to the RNG use, the schedules,
the sampler tables, the stitch rules or the loop cannot leave the C++ tests checking stale numbers.
Refresh after an intended change with: python tests/cpp_goldens.py --write
"""

from __future__ import annotations

from pathlib import Path

import cpp_goldens


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_committed_goldens_match_python(tmp_path):
    golden, bundle = tmp_path / "golden", tmp_path / "toy_pair"
    cpp_goldens.generate(golden, bundle)
    dirs = [(golden, cpp_goldens.GOLDEN), (bundle, cpp_goldens.TOY_BUNDLE),
            (tmp_path / "toy_sd", cpp_goldens.TOY_SD_BUNDLE)]
    dirs += [(tmp_path / name, cpp_goldens.TOY_BUNDLE.parent / name) for name in cpp_goldens.TOY_COND_BUNDLES]
    for fresh, committed in dirs:
        want, have = _files(fresh), _files(committed)
        assert sorted(have) == sorted(want), f"{committed}: files differ from what cpp_goldens.py writes"
        stale = [name for name in want if want[name] != have[name]]
        assert not stale, (f"{committed}: {stale} drifted from the Python package; "
                           "run `python tests/cpp_goldens.py --write` and rerun the C++ tests")


def test_goldens_cover_every_sampler_and_the_rng_paths():
    import json

    sampling = json.loads((cpp_goldens.GOLDEN / "sampling.json").read_text())
    assert {t["sampler"] for t in sampling["tables"]} == {"ddim", "ddpm", "dpm-solver++"}
    assert any(p["noise_bits"] for p in sampling["plans"]) and any(not p["noise_bits"] for p in sampling["plans"])
    rng = json.loads((cpp_goldens.GOLDEN / "rng.json").read_text())
    assert len(rng["seeds"]) == len(cpp_goldens.SEEDS) and max(s["seed"] for s in rng["seeds"]) == 2**64 - 1


def test_manifest_corpus_is_refused_by_python_with_a_field_path():
    import json

    corpus = json.loads((cpp_goldens.GOLDEN / "manifest_cases.json").read_text())
    assert len(corpus["cases"]) == len(cpp_goldens.MANIFEST_CASES)
    for case in corpus["cases"]:
        doc = cpp_goldens.apply_patch(corpus["bases"][case["base"]], case["patch"])
        assert cpp_goldens.python_refusal(doc) == case["message"], case["name"]
    named = [c for c in corpus["cases"] if c["field"]]
    assert len(named) >= 50 and {c["base"] for c in named} == {"dit", "sd", "sdxl", "control", "lcm"}
