"""Op-level capture: what every aten op of a step saw and produced, forward and backward.

The foundation of the op-level engine (issue 12), one way and free of verdict logic:

- :func:`capture` records every aten op call as a typed :class:`OpRecord` (key, phase, op overload, argument
  and output layouts, module path, autograd node and the forward op that created it, custom Function;
  optionally values, in-place inputs copied before the write), attributed to modules by forward hooks and,
  in backward, by autograd sequence number;
- :func:`align` joins two captures by key and lists what only one side ran;
- :func:`kink_sites` lists, per piecewise op, the elements within a margin of a branch boundary.

``graph`` and ``cow`` also serve :class:`densenet_debug.trace.Tracer`: sequence-number node discovery instead
of module full backward hooks (which crash on in-place models), and copy-on-write for kept aliases.
"""

from densenet_debug.capture.align import Alignment, align
from densenet_debug.capture.kinks import KinkSite, distance_to_kink, kink_sites
from densenet_debug.capture.mode import capture
from densenet_debug.capture.records import Capture, NodeRef, OpRecord, TensorLayout

__all__ = ["Alignment", "Capture", "KinkSite", "NodeRef", "OpRecord", "TensorLayout", "align", "capture",
           "distance_to_kink", "kink_sites"]
