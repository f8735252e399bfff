"""bf16 only inside the matmul/conv body: which ops of a graph OpenVINO's CPU plugin must keep in fp32.

With INFERENCE_PRECISION_HINT=bf16 the CPU plugin (Graph::EnforceInferencePrecision, OpenVINO 2026.4)
lowers every fp32 node to bf16 except (a) the "graph tail", found by walking back from the outputs
and stopping at Convolution / FullyConnected / MatMul / RNN / Interpolate nodes of its *own* fused
graph, and (b) nodes whose rt_info carries DisablePrecisionConversion (what ov::disable_fp16_compression
/ ov::disable_conversion write; the plugin reads it as Node::keepOrigPrecision). (a) depends on how the
plugin fused the graph, which depends on the ISA (snippets' MHA / eltwise tokenization and brgemm kernel
choices differ between AMX and AVX512-BF16), so what stays fp32 there is not something to rely on.
Measured here (AVX512-BF16, no AMX): t * freqs of the sinusoidal timestep embedding (t=999 is 1000 in
bf16), every LayerNorm (MVN) and the fused MatMul-Softmax-MatMul of attention ran in bf16; the sampler
tail stayed fp32. On an AMX Xeon the DiT test pair gave NaN at t=999.

So every graph compiled in bf16 is marked here, explicitly and ISA-independently (keep_f32_nodes):
  - the sinusoidal embeddings: Sin / Cos and everything between them and the graph inputs or the
    next Convolution/MatMul (t, its Convert, t * freqs, the Concat);
  - softmax, normalization (MVN, GroupNormalization, BatchNorm, NormalizeL2) and their statistics in
    decomposed form (ReduceMean / ReduceSum / Sqrt / Power / Divide), Exp / Log (variance, learned sigma);
  - the graph tail, computed on the ONNX-level graph: every node from which an output is reachable
    without passing a Convolution or MatMul (CFG combine, learned-sigma math, the whole sampler update).
bf16 then runs only in the matmul / conv heavy body (tests/test_openvino_precision.py reads the
compiled runtime model back and checks both halves).

Marks are lost on nodes a transformation rebuilds, so the model goes through OpenVINO's common
simplifications before it is marked (marked_for_bf16), and the tests check the compiled result.
The marking has no Python API (ov.Node rt_info set from Python holds a string, which the plugin
cannot cast), so it travels the way IR files carry it: the model is saved as IR, the attribute is
written into the marked layers' <rt_info>, and the IR is read back. The weights do not travel: every
weight Constant is swapped for a Parameter before saving and the same Constant node is put back into
the read model, so the IR is the topology alone (kilobytes). Saving the weights too wrote a full copy
of each graph into the temporary directory per bf16 compile: 10 GB for the SDXL U-Net, which failed with
"basic_ios::clear: iostream error" when the disk had less free, and cost a 10 GB write and read each time.
"""

from __future__ import annotations

import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# OpenVINO's rt_info attribute behind ov::disable_conversion / ov::disable_fp16_compression (serialized
# name and version); value "from:to,to": from any type to f16 or bf16 (the CPU plugin checks f16 in
# 2026.4, bf16 in later versions: both are written)
ATTRIBUTE = ("DisablePrecisionConversion", "0", "dynamic:f16,bf16")

# the body: nodes bf16 is for; the tail walk and the embedding walks stop here
SIGNIFICANT = frozenset({"MatMul", "Convolution", "GroupConvolution", "ConvolutionBackpropData",
                         "GroupConvolutionBackpropData"})
# numerically sensitive wherever they are: exp/log overflow, normalization statistics, softmax
SENSITIVE = frozenset({"Softmax", "LogSoftmax", "MVN", "GroupNormalization", "BatchNormInference",
                       "NormalizeL2", "ReduceMean", "ReduceSum", "ReduceL2", "Sqrt", "Power", "Divide",
                       "Exp", "Log", "Sin", "Cos"})
_SINUSOID = frozenset({"Sin", "Cos"})
_LEAVES = frozenset({"Parameter", "Constant", "Result"})


def _type(node: Any) -> str:
    return node.get_type_name()


def _parents(node: Any) -> list[Any]:
    return [v.get_node() for v in node.input_values()]


def _children(node: Any) -> list[Any]:
    return [i.get_node() for out in node.outputs() for i in out.get_target_inputs()]


def _walk(starts: Iterable[Any], step) -> set[Any]:
    """Every node reachable from `starts` along `step`, not crossing SIGNIFICANT nodes or leaves (excluded)."""
    seen: dict[str, Any] = {}
    stack = list(starts)
    while stack:
        node = stack.pop()
        for nxt in step(node):
            if _type(nxt) in SIGNIFICANT or _type(nxt) in _LEAVES:
                continue
            key = nxt.get_friendly_name()
            if key not in seen:
                seen[key] = nxt
                stack.append(nxt)
    return set(seen)


def _bias_adds(ops: list[Any]) -> set[str]:
    """Add nodes that add a Constant to a MatMul / Convolution output."""
    out = set()
    for op in ops:
        parents = {_type(p) for p in _parents(op)}
        if _type(op) == "Add" and parents & SIGNIFICANT and "Constant" in parents:
            out.add(op.get_friendly_name())
    return out


def keep_f32_nodes(model: Any) -> set[str]:
    """Friendly names of the nodes of `model` (an ov.Model) that must run in fp32 (module docstring)."""
    ops = model.get_ordered_ops()
    keep = {op.get_friendly_name() for op in ops if _type(op) in SENSITIVE}
    # the sampler update, CFG combine, learned-sigma math; a matmul's / conv's bias Add belongs to the body
    # (the plugin fuses it into the FullyConnected / Convolution, whose output is bf16 either way)
    tail = {n for n in _walk(model.get_results(), _parents) if n not in _bias_adds(ops)}
    sinusoids = [op for op in ops if _type(op) in _SINUSOID]
    embedding = _walk(sinusoids, _parents) | _walk(sinusoids, _children)
    return keep | tail | embedding


# Constants at least this large (bytes) are weights: kept out of the IR round trip (small ones, shapes and axes
# among them, stay in it: read_model's shape inference needs their values)
WEIGHT_BYTES = 1024


def _weights_as_parameters(model: Any) -> dict[str, tuple[Any, Any]]:
    """Swap every weight Constant of `model` for a Parameter of its type and shape, in place.

    Returns {parameter name: (Parameter, Constant)}; _restore_weights undoes it on any model holding those
    parameter names."""
    import openvino as ov

    swapped: dict[str, tuple[Any, Any]] = {}
    for op in model.get_ordered_ops():
        if _type(op) != "Constant" or not op.get_output_element_type(0).is_real():
            continue
        if op.get_byte_size() < WEIGHT_BYTES:
            continue
        param = ov.op.Parameter(op.get_output_element_type(0), op.get_output_partial_shape(0))
        name = f"tstitch_weight_{len(swapped)}"
        param.set_friendly_name(name)
        for target in list(op.output(0).get_target_inputs()):
            target.replace_source_output(param.output(0))
        swapped[name] = (param, op)
    model.add_parameters([p for p, _ in swapped.values()])
    return swapped


def _restore_weights(model: Any, swapped: dict[str, tuple[Any, Any]]) -> None:
    """Put each swapped Constant back in place of the Parameter of the same name in `model`, and drop it."""
    for param in list(model.get_parameters()):
        entry = swapped.get(param.get_friendly_name())
        if entry is None:
            continue
        for target in list(param.output(0).get_target_inputs()):
            target.replace_source_output(entry[1].output(0))
        model.remove_parameter(param)
    model.validate_nodes_and_infer_types()


def mark_keep_f32(core: Any, model: Any, names: set[str]) -> Any:
    """`model` with DisablePrecisionConversion on every node named in `names` (via an IR round trip of its
    topology; the returned model shares `model`'s weight Constants, and `model` is left as it was)."""
    import openvino as ov

    tmp = tempfile.TemporaryDirectory(prefix="tstitch-ov-")
    swapped = _weights_as_parameters(model)
    try:
        xml_path = Path(tmp.name) / "model.xml"
        ov.save_model(model, str(xml_path), compress_to_fp16=False)
        tree = ET.parse(xml_path)
        name, version, value = ATTRIBUTE
        for layer in tree.getroot().iter("layer"):
            if layer.get("name") not in names:
                continue
            rt = layer.find("rt_info")
            if rt is None:
                rt = ET.SubElement(layer, "rt_info")
            ET.SubElement(rt, "attribute", {"name": name, "version": version, "value": value})
        tree.write(xml_path)
        marked = core.read_model(str(xml_path))
        _restore_weights(marked, swapped)
        return marked
    finally:
        _restore_weights(model, swapped)
        tmp.cleanup()


def marked_for_bf16(core: Any, model: Any) -> Any:
    """`model` (changed in place first) with its numerically sensitive nodes kept in fp32 under the bf16 hint.

    OpenVINO's common (MOC) simplifications run first: the plugin would run them anyway, and the nodes they
    rebuild do not inherit the mark (DisablePrecisionConversion is not copyable). Marked before them, the
    tiny SD U-Net's Unsqueeze of t (Expand + Unsqueeze, rebuilt as one Reshape) ran in bf16 and rounded
    t=481 to 480: x_next cosine 0.939 against fp32; marked after them, 0.9996 (torch bf16 autocast: 0.9994).
    """
    from openvino._offline_transformations import apply_moc_transformations

    # on the topology only: with the weights as Constants, MOC's MatMulConstTransposesExtraction + constant
    # folding write a transposed copy of every linear weight (7.7 GB of anonymous memory for the SDXL U-Net, kept
    # by the compiled model, and 15 s); swapped for Parameters, the weights stay the mapped originals
    swapped = _weights_as_parameters(model)
    try:
        apply_moc_transformations(model, cf=True)
    finally:
        _restore_weights(model, swapped)
    return mark_keep_f32(core, model, keep_f32_nodes(model))


def runtime_precisions(compiled: Any) -> list[tuple[str, str, list[str]]]:
    """(layerType, runtimePrecision, original layer names) per node of a compiled model's runtime graph."""
    out = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        names = rt["originalLayersNames"].astype(str) if "originalLayersNames" in rt else ""
        out.append((rt["layerType"].astype(str), rt["runtimePrecision"].astype(str),
                    [n for n in names.split(",") if n]))
    return out
