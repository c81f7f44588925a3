"""The INT8 graph's stem: pixels straight into a fast quantised convolution.

After static quantisation the stem convolution is still float, because onnxruntime's int8
convolution kernels are slow with one input channel (the stem of a grey model was the
slowest node of the graph when quantised as it is). Float, it costs a Transpose, a Cast, a
Pad, a layout reorder and a QuantizeLinear on top of the convolution: about 30 % of the
INT8 model's time at batch 16.

`quantise_stem` rewrites it so neither cost remains:

* the uint8 input *is* a quantised tensor: scale 1, zero point ``round(mean)``; padding with
  the zero point stands for the float graph's padding with the mean (0.5 grey levels apart at
  most, on the crop's outer rows and columns only);
* four neighbouring pixels of a row become the input channels (for NHWC input a reshape,
  free), and the 3x3 stride-2 kernel becomes a 3x2 kernel over those groups with two
  output columns per group stacked as channels; a reshape of the NHWC output puts them back
  side by side. That is the same convolution, now with 4 (or 12) input channels, which the
  fast kernels take; onnxruntime cancels the layout transposes around it.

Measured with `pouchline bench model` (see the model card): the INT8 graph runs about 1.3x
faster at batch 16, with the same outputs to within INT8 rounding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pouchline.models.metadata import ModelError

if TYPE_CHECKING:
    from onnx import GraphProto, ModelProto, NodeProto

#: Pixels of a row grouped into input channels; the stem's stride (2) must divide it.
_GROUP = 4


def _consumers(graph: GraphProto, name: str) -> list[NodeProto]:
    return [node for node in graph.node if name in node.input]


def _single(graph: GraphProto, name: str, op_type: str) -> NodeProto:
    found = _consumers(graph, name)
    if len(found) != 1 or found[0].op_type != op_type:
        raise ModelError(f"INT8 stem: expected {name!r} to feed one {op_type}, found {[node.op_type for node in found]}")
    return found[0]


def _grouped_weights(weight: np.ndarray, channels: int) -> np.ndarray:
    """The 3x3 stride-2 kernel over single pixels as a 3x2 kernel over groups of 4 pixels.

    Output channel ``t*C + c`` is channel c at output column ``2*J + t`` of group column J;
    input channel ``p*channels + k`` is channel k of pixel ``4*J + p``; kernel column 0 looks
    at group J-1, column 1 at group J.
    """
    out_channels = weight.shape[0]
    grouped = np.zeros((2 * out_channels, _GROUP * channels, 3, 2), dtype=np.float64)
    for t in (0, 1):
        for column in (0, 1):
            for p in range(_GROUP):
                dx = _GROUP * (column - 1) + p - 2 * t  # pixel offset from the output column's centre
                if -1 <= dx <= 1:
                    grouped[t * out_channels : (t + 1) * out_channels, p * channels : (p + 1) * channels, :, column] = \
                        weight[:, :, :, dx + 1]
    return grouped


def quantise_stem(model: ModelProto, mean: float) -> None:
    """Rewrite, in place, the float stem of a quantised detector graph (see the module doc).

    Expects what `pouchline.models.export` writes: input ``image`` (N, H, W, C) uint8 (or its
    mirror pair, a Concat of it) -> Transpose -> Cast -> Pad -> Conv (3x3, stride 2) -> Relu ->
    QuantizeLinear -> DequantizeLinear.
    Anything else is a `ModelError` (a changed network must change this too)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    image = graph.input[0]
    dims = [d.dim_value for d in image.type.tensor_type.shape.dim]
    height, width, channels = dims[1], dims[2], dims[3]
    # A top-view model scores each crop with its mirror image: the stem's input is then the
    # pair, concatenated from the raw pixels (`Deployed`), and that is what gets grouped.
    pixels = next((node.output[0] for node in _consumers(graph, image.name) if node.op_type == "Concat"), image.name)
    permute = _single(graph, pixels, "Transpose")
    cast = _single(graph, permute.output[0], "Cast")
    pad = _single(graph, cast.output[0], "Pad")
    conv = _single(graph, pad.output[0], "Conv")
    relu = _single(graph, conv.output[0], "Relu")
    quantise = _single(graph, relu.output[0], "QuantizeLinear")
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    weight = numpy_helper.to_array(initializers[conv.input[1]]).astype(np.float64)
    bias = numpy_helper.to_array(initializers[conv.input[2]]).astype(np.float64)
    attributes = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    if (weight.shape[2:] != (3, 3) or list(attributes.get("strides", [])) != [2, 2] or weight.shape[1] != channels
            or height % 2 or width % _GROUP):
        raise ModelError(f"INT8 stem: a {weight.shape} kernel with strides {attributes.get('strides')} on "
                         f"{height}x{width}x{channels} input is not the 3x3 stride-2 stem this rewrite handles")
    out_channels = weight.shape[0]
    zero_point = int(round(mean))
    if not 0 <= zero_point <= 255:
        raise ModelError(f"INT8 stem: input mean {mean} is not a uint8 value")
    # The float stem computes conv(x padded with the mean) + bias; on (x - zero point) the bias
    # takes back what the shift removed.
    bias = bias + zero_point * weight.sum(axis=(1, 2, 3))
    grouped = _grouped_weights(weight, channels)
    scale = np.abs(grouped).reshape(2 * out_channels, -1).max(axis=1) / 127.0
    scale[scale == 0] = 1.0
    q_weight = np.clip(np.round(grouped / scale[:, None, None, None]), -127, 127).astype(np.int8)
    q_bias = np.round(np.concatenate([bias, bias]) / scale).astype(np.int32)
    new = "stem_int8"
    graph.initializer.extend([
        numpy_helper.from_array(np.array(1.0, np.float32), f"{new}_x_scale"),
        numpy_helper.from_array(np.array(zero_point, np.uint8), f"{new}_x_zero_point"),
        numpy_helper.from_array(q_weight, f"{new}_w"),
        numpy_helper.from_array(scale.astype(np.float32), f"{new}_w_scale"),
        numpy_helper.from_array(np.zeros(2 * out_channels, np.int8), f"{new}_w_zero_point"),
        numpy_helper.from_array(q_bias, f"{new}_b"),
        numpy_helper.from_array(scale.astype(np.float32), f"{new}_b_scale"),
        numpy_helper.from_array(np.zeros(2 * out_channels, np.int32), f"{new}_b_zero_point"),
        numpy_helper.from_array(np.array([-1, height, width // _GROUP, _GROUP * channels], np.int64), f"{new}_in_shape"),
        numpy_helper.from_array(np.array([-1, height // 2, width // 2, out_channels], np.int64), f"{new}_out_shape"),
    ])
    stem_out = quantise.output[0]
    for consumer in _consumers(graph, stem_out):
        consumer.input[:] = [f"{new}_q_nchw" if name == stem_out else name for name in consumer.input]
    front = [
        helper.make_node("Reshape", [pixels, f"{new}_in_shape"], [f"{new}_x_nhwc"], name=f"{new}_group_pixels"),
        helper.make_node("Transpose", [f"{new}_x_nhwc"], [f"{new}_x_nchw"], name=f"{new}_to_nchw", perm=[0, 3, 1, 2]),
        helper.make_node("DequantizeLinear", [f"{new}_x_nchw", f"{new}_x_scale", f"{new}_x_zero_point"],
                         [f"{new}_x"], name=f"{new}_x_dequantise"),
        helper.make_node("DequantizeLinear", [f"{new}_w", f"{new}_w_scale", f"{new}_w_zero_point"],
                         [f"{new}_weight"], name=f"{new}_w_dequantise", axis=0),
        helper.make_node("DequantizeLinear", [f"{new}_b", f"{new}_b_scale", f"{new}_b_zero_point"],
                         [f"{new}_bias"], name=f"{new}_b_dequantise", axis=0),
        helper.make_node("Conv", [f"{new}_x", f"{new}_weight", f"{new}_bias"], [conv.output[0]], name=f"{new}_conv",
                         pads=[1, 1, 0, 0], strides=[2, 1], kernel_shape=[3, 2]),
    ]
    back = [
        helper.make_node("Transpose", [stem_out], [f"{new}_q_nhwc"], name=f"{new}_out_to_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", [f"{new}_q_nhwc", f"{new}_out_shape"], [f"{new}_q_columns"],
                         name=f"{new}_ungroup_columns"),
        helper.make_node("Transpose", [f"{new}_q_columns"], [f"{new}_q_nchw"], name=f"{new}_out_to_nchw", perm=[0, 3, 1, 2]),
    ]
    dropped = {permute.name, cast.name, pad.name, conv.name}
    kept = [node for node in graph.node if node.name not in dropped]
    at = kept.index(quantise) + 1
    made = next((index for index, node in enumerate(kept) if pixels in node.output), -1)  # -1: the graph input
    nodes = kept[: made + 1] + front + kept[made + 1 : at] + back + kept[at:]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    unused = [tensor for tensor in graph.initializer if tensor.name not in used]
    for tensor in unused:
        graph.initializer.remove(tensor)
    # Shapes recorded for the rewritten tensors no longer hold.
    stale = [info for info in graph.value_info if info.name in (conv.output[0], relu.output[0], stem_out)]
    for info in stale:
        graph.value_info.remove(info)
