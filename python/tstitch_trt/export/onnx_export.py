"""Export a StepModule to an ONNX step graph (DESIGN.md: one engine launch = one sampling step).

fp32: for ONNX Runtime on the CPU and as the accuracy reference.
fp16: the network's weights and matmuls are fp16-typed in the graph itself (TensorRT 10.12+
deprecates and 11 removes BuilderFlag.FP16: engines are strongly typed); x, x0, guidance, coef,
the sampler update, LayerNorm and softmax statistics stay fp32.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tstitch_trt.export.step_module import STEP_INPUTS, STEP_OUTPUTS, StepModule
from tstitch_trt.runtime.io_roles import DIT_ROLES
from tstitch_trt.sampling.coefficients import NUM_COEFS

OPSET = 18
TWO_GB = 2**31 - 1
# Graphs with more weight bytes than this are cleaned weightless and written with external data even below
# 2 GB (BK-SDM-Tiny's fp32 step graph: 1.3 GB; SD 1.5's fp16: 1.7 GB): in-memory cleanup holds ~7 copies.
STREAM_ABOVE = 256 << 20
RAW_WEIGHTS = "raw-weights.bin"


def example_inputs(step: StepModule, batch: int = 2) -> tuple[torch.Tensor, ...]:
    cfg = step.denoiser.config
    lat = (batch, cfg.in_channels, cfg.input_size, cfg.input_size)
    return (
        torch.randn(lat),
        torch.full((batch,), 500, dtype=torch.int64),
        torch.zeros(batch, dtype=torch.int64),
        torch.tensor(1.5),
        torch.rand(NUM_COEFS),
        torch.randn(lat),
        torch.randn(lat),
    )


def io_spec(step: StepModule) -> dict:
    """Names, shapes ('B' = dynamic batch) and dtypes of the step graph, for the manifest."""
    cfg = step.denoiser.config
    lat = ["B", cfg.in_channels, cfg.input_size, cfg.input_size]
    return {
        "inputs": {
            "x": {"shape": lat, "dtype": "float32"},
            "t": {"shape": ["B"], "dtype": "int64"},
            "y": {"shape": ["B"], "dtype": "int64"},
            "guidance": {"shape": [], "dtype": "float32"},
            "coef": {"shape": [NUM_COEFS], "dtype": "float32"},
            "prev_x0": {"shape": lat, "dtype": "float32"},
            "noise": {"shape": lat, "dtype": "float32"},
        },
        "outputs": {"x_next": {"shape": lat, "dtype": "float32"}, "x0": {"shape": lat, "dtype": "float32"}},
        "roles": DIT_ROLES,  # how runtimes bind the graph (runtime/io_roles.py)
    }


def export_step_graph(step: StepModule, path: str | Path, precision: str = "fp32", fora: str | None = None) -> Path:
    """Write the step graph to `path` (external data in `path.name + '.data'` when over 2 GB).

    The fp16 graph is checked against the typing rules of this module's docstring before it is
    written (a violation is a bug here, not a user error). fora: "full" or "cached": FORA's full graph (+ the
    output fora_next, every block's kept features) or cached graph (+ the input fora) of export/fora.py.
    """
    from tstitch_trt.export.fora import FORA_INPUT, FORA_OUTPUT, ForaStep

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[precision]
    # never mutate the caller's module; fp32 needs no copy (a DiT-XL/2 copy is 2.7 GB)
    module: torch.nn.Module = copy.deepcopy(step).to(dtype) if dtype != step.dtype else step
    batch_dim = {0: "B"}
    dynamic_axes = {"x": batch_dim, "t": batch_dim, "y": batch_dim, "prev_x0": batch_dim, "noise": batch_dim,
                    "x_next": batch_dim, "x0": batch_dim}
    inputs, outputs, example = list(STEP_INPUTS), list(STEP_OUTPUTS), example_inputs(step)
    if fora is not None:
        module = ForaStep(module, fora)  # type: ignore[arg-type]
        if fora == "full":
            outputs.append(FORA_OUTPUT)
            dynamic_axes[FORA_OUTPUT] = {0: "2B"}
        else:
            inputs.append(FORA_INPUT)
            dynamic_axes[FORA_INPUT] = {0: "2B"}
            cfg = step.denoiser.config
            example = (*example, torch.randn(2 * example[0].shape[0], cfg.depth, 2, cfg.num_tokens, cfg.hidden_size))
    # A private directory for the raw export: over 2 GB torch writes one external file per
    # weight beside the graph, which must not land in (and be left behind in) the bundle.
    with tempfile.TemporaryDirectory(prefix="tstitch-export-", dir=path.parent) as raw_dir:
        raw = Path(raw_dir) / "raw.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module.eval(),
                example,
                str(raw),
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        del module
        finish_export(raw, path, lambda m: check_step_graph_typing(m, precision, float_io=(
            *(n for n in inputs + outputs if n not in _INT_IO),), int_io=_INT_IO))
    return path


def finish_export(raw: Path, path: Path, check: Callable[[Any], object] | None = None,
                  prepare: Callable[[Any], object] | None = None) -> Path:
    """The raw torch export `raw` (in a private directory) -> the cleaned, checked graph at `path`.

    Below 2 GB the graph is one protobuf, cleaned (constant folding included) in memory as before. Over
    2 GB torch wrote every weight to its own file beside `raw`: the graph is then loaded WITHOUT its
    weights, cleaned and checked (`check(model)`: typing, on the weightless graph) as structure only, and
    the weights are streamed once, file by file, into `path.name + '.data'`: never two copies of a
    multi-GB graph in memory, never one whole copy (torch already folded constants at export).
    Call it inside the raw export's directory context: the raw weights are read from there.
    """
    import onnx

    header = onnx.load(str(raw), load_external_data=False)
    _inline_attribute_tensors(header, raw.parent)
    if prepare:  # edits of the raw graph's structure, before cleanup
        prepare(header)
    if not _external_initializers(header) and _inline_weight_bytes(header) > STREAM_ABOVE:
        # under 2 GB torch embeds the weights; above STREAM_ABOVE they leave the protos for one raw file (freeing
        # them), so a 1.7 GB graph is not copied by cleanup, inference and serialization (~7 copies in memory)
        from onnx.external_data_helper import convert_model_to_external_data, write_external_data_tensors

        convert_model_to_external_data(header, all_tensors_to_one_file=True, location=RAW_WEIGHTS,
                                       size_threshold=1024)
        write_external_data_tensors(header, str(raw.parent))
    if not _external_initializers(header):
        model = clean_graph(header)
        if check:
            check(model)
        save_graph(model, path)
        return path
    model = clean_graph(header, fold=False)
    if check:
        check(model)
    stream_external_data(model, raw.parent, path)
    return path


def _copy_range(src, dst, offset: int, count: int, name: str) -> None:
    """count bytes of src from offset appended to dst: in the kernel where it can (no user-space copy)."""
    dst.flush()
    while count > 0:
        try:
            n = os.copy_file_range(src.fileno(), dst.fileno(), min(count, 1 << 30), offset)
        except (AttributeError, OSError):  # not Linux, or across file systems that refuse it
            src.seek(offset)
            chunk = src.read(min(count, 16 << 20))
            n = len(chunk)
            dst.write(chunk)
            dst.flush()
        if n == 0:
            raise RuntimeError(f"internal error: the raw export's weight {name} is truncated")
        offset += n
        count -= n
    dst.seek(0, os.SEEK_END)


def _location(init) -> str:
    return next(e.value for e in init.external_data if e.key == "location")


def _point(init, location: str, offset: int, length: int) -> None:
    del init.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        init.external_data.add(key=key, value=value)


def _whole_file_weight(inits: list, src_root: Path):
    """The largest external weight stored alone in a file inside src_root (offset 0, the whole file)."""
    best, best_size = None, 0
    for init in inits:
        info = {e.key: e.value for e in init.external_data}
        src = (src_root / info.get("location", "")).resolve()
        if not src.is_relative_to(src_root) or not src.is_file() or int(info.get("offset", 0)) != 0:
            continue
        size = src.stat().st_size
        if info.get("length") not in (None, str(size)):
            continue
        if size > best_size and sum(_location(i) == info["location"] for i in inits) == 1:
            best, best_size = init, size
    return best


def _inline_attribute_tensors(model, src_dir: Path) -> None:
    """Read back into the graph the Constant-node tensors that torch wrote to their own files over 2 GB.

    torch's exporter externalizes node attribute tensors too (DiT-XL/2's FORA graph: `Constant_10_attr::value`),
    and the streaming below moves initializers only: left external, they would point at raw files that never
    reach the bundle. They are small (shapes, scalars, positional tables), so they go back inline."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor

    def graphs(graph):  # the graph and its subgraphs (If / Loop bodies)
        yield graph
        for node in graph.node:
            for attr in node.attribute:
                for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    yield from graphs(sub)

    for graph in graphs(model.graph):
        for node in graph.node:
            for attr in node.attribute:
                for tensor in [attr.t] if attr.HasField("t") else list(attr.tensors):
                    if tensor.data_location == onnx.TensorProto.EXTERNAL:
                        load_external_data_for_tensor(tensor, str(src_dir))


def _inline_weight_bytes(model) -> int:
    return sum(len(i.raw_data) for i in model.graph.initializer)


def _external_initializers(model) -> list:
    import onnx

    return [i for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]


_ALIGN = 4096  # page-aligned offsets: runtimes can map the weights instead of copying them


def stream_external_data(model, src_dir: Path, path: Path) -> None:
    """Write `model` (a weightless header whose external initializers live in files under `src_dir`) to
    `path`, copying each weight's bytes once, in 16 MB chunks, into one `path.name + '.data'` file."""
    import onnx

    data_name = external_data_name(path)
    src_root = Path(src_dir).resolve()
    inits = _external_initializers(model)
    files = {_location(i) for i in inits}
    single = (src_root / next(iter(files))).resolve() if len(files) == 1 else None
    if single is not None and single.is_relative_to(src_root) and single.is_file():
        size = single.stat().st_size
        os.replace(single, path.parent / data_name)  # every weight in one raw file: moved, offsets kept
        for init in inits:
            info = {e.key: e.value for e in init.external_data}
            offset = int(info.get("offset", 0))
            _point(init, data_name, offset, int(info.get("length") or size - offset))
        os.chmod(path.parent / data_name, 0o644)
        onnx.save_model(model, str(path))
        onnx.checker.check_model(str(path))
        return
    first = _whole_file_weight(inits, src_root)
    if first is not None:  # the largest weight that fills its own raw file: moved, not copied (2 GB of I/O less)
        os.replace(src_root / _location(first), path.parent / data_name)
        inits.remove(first)
        _point(first, data_name, 0, (path.parent / data_name).stat().st_size)
    # each raw file is removed once its last weight is copied: the raw export and the .data never both whole on
    # disk (an SDXL U-Net's fp32 graph is 10.3 GB)
    readers = {loc: sum(_location(i) == loc for i in inits) for loc in files}
    with open(path.parent / data_name, "ab" if first is not None else "wb") as out:
        for init in inits:
            info = {e.key: e.value for e in init.external_data}
            src = (src_root / info["location"]).resolve()
            if not src.is_relative_to(src_root):  # our own export; a bug if it points elsewhere
                raise RuntimeError(f"internal error: the raw export's weight {init.name} lives outside {src_root}")
            offset, length = int(info.get("offset", 0)), info.get("length")
            pad = -out.tell() % _ALIGN
            out.write(b"\0" * pad)
            start = out.tell()
            with open(src, "rb") as f:
                left = int(length) if length is not None else src.stat().st_size - offset
                _copy_range(f, out, offset, left, init.name)
            readers[info["location"]] -= 1
            if readers[info["location"]] == 0:
                src.unlink()
            _point(init, data_name, start, out.tell() - start)
    os.chmod(path.parent / data_name, 0o644)
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))  # by path: the checker resolves (and confines) the external file


def save_graph(model, path: Path) -> None:  # model: onnx.ModelProto
    """Save and check a graph; over 2 GB the weights go to one external file `path.name + '.data'`."""
    import onnx

    if _fits_proto(model):
        onnx.save_model(model, str(path))
        onnx.checker.check_model(model)
    else:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=external_data_name(path))
        os.chmod(path.parent / external_data_name(path), 0o644)  # onnx creates it 0600: bundles are shared
        onnx.checker.check_model(str(path))  # by path: the checker reads external data itself


def external_data_name(path: str | Path) -> str:
    return Path(path).name + ".data"


def external_data_files(path: str | Path) -> list[Path]:
    """The external data files an ONNX graph references (none below 2 GB), from its header only."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    names = set()
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            names.update(e.value for e in init.external_data if e.key == "location")
    return [path.parent / n for n in sorted(names)]


# --- typing rules ---------------------------------------------------------------------------------
_FLOAT_IO = ("x", "guidance", "coef", "prev_x0", "noise", "x_next", "x0")
_INT_IO = ("t", "y")
_NETWORK_OPS = ("MatMul", "Gemm", "Conv")  # weights and matmuls: fp16 in an fp16 graph
_FP32_OPS = ("LayerNormalization", "Softmax", "Exp")  # statistics and the variance: always fp32


def tensor_types(model) -> dict[str, int]:
    """name -> onnx elem type for every typed value of the graph (shape inference on the header)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(_without_weights(model))
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


def check_step_graph_typing(model, precision: str, float_io: tuple[str, ...] = _FLOAT_IO,
                            int_io: tuple[str, ...] = _INT_IO) -> dict[str, dict[str, int]]:
    """Check the step graph's typing; returns {op_type: {elem type name: count}} of its float ops.

    fp16: I/O are fp32 (int64 for t, y); every MatMul/Gemm/Conv computes in fp16; LayerNorm,
    softmax and the variance exp stay fp32. fp32: no fp16 anywhere. float_io / int_io name the
    graph's I/O (default: the DiT step graph's).
    """
    import onnx

    types = tensor_types(model)
    name = onnx.TensorProto.DataType.Name
    problems = []
    for io in float_io:
        if types.get(io) != onnx.TensorProto.FLOAT:
            problems.append(f"{io} is {name(types.get(io, 0))}, not FLOAT")
    for io in int_io:
        if types.get(io) != onnx.TensorProto.INT64:
            problems.append(f"{io} is {name(types.get(io, 0))}, not INT64")
    want = {"fp16": onnx.TensorProto.FLOAT16, "fp32": onnx.TensorProto.FLOAT}[precision]
    summary: dict[str, dict[str, int]] = {}
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    for node in model.graph.node:
        if node.op_type not in _NETWORK_OPS + _FP32_OPS:
            continue
        in_types = {types.get(i) for i in node.input if i and types.get(i) in floats}
        expected = want if node.op_type in _NETWORK_OPS else onnx.TensorProto.FLOAT
        for t in in_types:
            counts = summary.setdefault(node.op_type, {})
            counts[name(t)] = counts.get(name(t), 0) + 1
        if in_types != {expected}:
            problems.append(f"{node.op_type} {node.name} computes in {sorted(name(t) for t in in_types)}")
    if precision == "fp32" and any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer):
        problems.append("an fp32 graph holds fp16 weights")
    if problems:
        raise RuntimeError(f"the {precision} step graph is not typed as designed: " + "; ".join(problems[:5]))
    return summary


def _without_weights(model):  # the graph with empty initializer payloads (types and dims kept): cheap to infer
    import onnx

    light = onnx.ModelProto()
    light.ir_version, light.producer_name = model.ir_version, model.producer_name
    light.opset_import.extend(model.opset_import)
    g = light.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    for init in model.graph.initializer:
        t = onnx.TensorProto(name=init.name, data_type=init.data_type, dims=init.dims)
        t.data_location = onnx.TensorProto.EXTERNAL  # no payload; shape inference reads dims only
        t.external_data.add(key="location", value="none")
        g.initializer.append(t)
    return light


def clean_graph(model, fold: bool = True):  # onnx.ModelProto -> onnx.ModelProto
    """Constant folding, dead-node removal, topological sort (onnx-graphsurgeon), shape inference.

    fold=False: structure only, for a header whose weights are external and not loaded (folding would
    read them); the weights' protos pass through untouched (graphsurgeon keeps lazy values as they are)."""
    import onnx
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    if fold:
        graph.fold_constants()
    graph.cleanup().toposort()
    cleaned = gs.export_onnx(graph)
    cleaned.opset_import[0].version = model.opset_import[0].version
    if _fits_proto(cleaned):
        cleaned = onnx.shape_inference.infer_shapes(cleaned)
    return cleaned


def _fits_proto(model) -> bool:
    try:
        return model.ByteSize() < TWO_GB
    except Exception:  # protobuf refuses to size messages over 2 GB (ValueError or its own error, by version)
        return False
