"""Every hot op behind one public function that dispatches on `Kernel`.

Layout: hstu/ops/<family>.py holds the public function; hstu/ops/pytorch/<family>.py the
reference implementation, hstu/ops/triton/<family>.py the Triton one, with the same signature
(minus `kernel`). Tests compare the two.
"""

from hstu.ops.attention import hstu_mha
from hstu.ops.kernel import Kernel

__all__ = ["Kernel", "hstu_mha"]
