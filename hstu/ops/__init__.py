"""Every hot op behind one public function that dispatches on `Kernel`.

Layout: hstu/ops/<family>.py holds the public function; hstu/ops/pytorch/<family>.py the
reference implementation, hstu/ops/triton/<family>.py the Triton one, with the same signature
(minus `kernel`). Tests compare the two. docs/DESIGN.md section 3 lists the ops.
"""

from hstu.ops.attention import hstu_mha
from hstu.ops.jagged import (
    concat_2d_jagged,
    jagged_dense_bmm_broadcast_add,
    jagged_tails,
    split_2d_jagged,
)
from hstu.ops.kernel import Kernel
from hstu.ops.layer_norm import layer_norm, swish_layer_norm
from hstu.ops.position import add_timestamp_positional_embeddings
from hstu.ops.stu import LayerSettings, stu_layer, stu_postprocess, stu_preprocess

__all__ = [
    "Kernel",
    "LayerSettings",
    "add_timestamp_positional_embeddings",
    "concat_2d_jagged",
    "hstu_mha",
    "jagged_dense_bmm_broadcast_add",
    "jagged_tails",
    "layer_norm",
    "split_2d_jagged",
    "stu_layer",
    "stu_postprocess",
    "stu_preprocess",
    "swish_layer_norm",
]
