"""ONNX Runtime's CPU InstanceNormalization over one long group against float64: how its statistics' error grows
with the group (the SD VAE's GroupNorms are exported as Reshape + InstanceNormalization; at 1024 px the decoder's
last level normalizes 4,194,304 elements per group).

    python benchmarks/ort_instancenorm_accuracy.py [--elements 4194304]
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--elements", type=int, default=4 * 1024 * 1024)
    p.add_argument("--groups", type=int, default=32)
    args = p.parse_args()
    c, n = args.groups, args.elements
    node = helper.make_node("InstanceNormalization", ["x", "s", "b"], ["y"], epsilon=1e-6)
    graph = helper.make_graph(
        [node], "instance_norm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, n])],
        [helper.make_tensor("s", TensorProto.FLOAT, [c], np.ones(c, np.float32)),
         helper.make_tensor("b", TensorProto.FLOAT, [c], np.zeros(c, np.float32))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for shift in (0.0, 1.0, 3.0):
        x = (rng.standard_normal((1, c, n)) + shift).astype(np.float32)
        y = sess.run(["y"], {"x": x})[0]
        x64 = x.astype(np.float64)
        ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6)
        print(f"mean {shift}: InstanceNormalization over {n} elements, max |err| / max |ref| vs float64: "
              f"{np.abs(y - ref).max() / np.abs(ref).max():.2e}")


if __name__ == "__main__":
    main()
